"""Renders docs/benchmarks.md and the README's speed table from the benchmarks' saved JSON.

The benchmarks (``make bench``, ``make bench-quick`` or ``pytest bench``) write one file per table to
``bench/results/<table>.json``: ``{"meta": ..., "rows": [...]}``, where ``meta`` (bench/conftest.py)
records, when the benchmarks ran, the command, quick or full mode, the date, the git commit and
whether the tree had uncommitted changes, the CPU model, cores, intra-op threads and the torch and
Python versions. ``bench/results/`` is not committed; the tables a page is rendered from are copied
to ``docs/benchmarks/`` and committed with it, so the page can be re-rendered and checked.

Usage (from the repository root)::

    python bench/render_docs.py                      # render from docs/benchmarks/*.json
    python bench/render_docs.py --update-from bench/results   # copy the last run's tables, then render
    python bench/render_docs.py --check              # exit 1 if a generated file is out of date
    make bench-docs                                  # the --update-from line

What is rendered: ``docs/benchmarks.md`` in full, from ``bench/benchmarks_template.md`` (the prose,
with placeholders ``{{table:NAME}}`` or ``{{table:NAME:VARIANT}}`` for each table and its
provenance line), and the README's speed table, the lines between ``<!-- bench:speed:start -->``
and ``<!-- bench:speed:end -->`` (the rest of README.md is left as it is). Nothing here reads the
clock, the machine or git: the output depends only on the JSON and the template.

``--check`` renders both from the JSON in ``--results`` and exits 1, printing a diff, if
``docs/benchmarks.md`` or the README's block differs (0 if both match). ``render(results_dir)`` returns
the page's text and ``render_readme_speed(results_dir)`` the README block's, for a test to compare.

``--update-from DIR`` copies every table file of DIR (``meta`` and ``rows``; pytest-benchmark's own
JSON is not one) into ``--results``. A quick-mode table does not replace a full-mode one unless
``--allow-quick`` is given; tables the run did not produce keep their committed files (each table
names its own command, commit and date).
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = Path(__file__).resolve().parent / "benchmarks_template.md"
RESULTS = ROOT / "docs" / "benchmarks"
PAGE = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"
START, END = "<!-- bench:speed:start -->", "<!-- bench:speed:end -->"
PLACEHOLDER = re.compile(r"\{\{table:([a-z0-9_]+)(?::([a-z0-9_]+))?\}\}")

# Why a table can be absent from the committed results.
ABSENT = {
    "gpu_launches": "it needs a CUDA device, and the results were measured on a machine without one",
    "launchers": "it needs CIFAR-10 and the pretrained ResNet-20 next to the repository, and is skipped in quick mode",
}


# ------------------------------------------------------------------------------ loading

def load_tables(results_dir: Path) -> dict[str, dict]:
    """``table name -> {"meta": ..., "rows": [...]}`` for every table file in ``results_dir``."""
    tables = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "meta" in data and "rows" in data:
            tables[path.stem] = data
    return tables


# ------------------------------------------------------------------------------ number formats

def ms(seconds) -> str:
    """Seconds as milliseconds, three significant digits (four past 1000)."""
    if seconds is None:
        return "–"
    return plain(seconds * 1e3)


def plain(v) -> str:
    """A number already in its unit, three significant digits (all digits from 1000 on)."""
    if v is None:
        return "–"
    a = abs(v)  # thresholds after rounding: 0.9996 prints as 1.00, not 1.000
    return f"{v:.0f}" if a >= 99.95 else f"{v:.1f}" if a >= 9.995 else f"{v:.2f}" if a >= 0.9995 else f"{v:.3f}"


def times(x) -> str:
    """A ratio: ``2.53x``, ``14.6x``."""
    if x is None:
        return "–"
    return f"{x:.1f}x" if x >= 10 else f"{x:.2f}x"


def over(x) -> str:
    """``a / b - 1`` as a signed percentage."""
    if x is None:
        return "–"
    return f"{100 * x:+.1f}%".replace("-", "−")


def ratio(a, b):
    return a / b if a is not None and b else None


def table(head: list[str], rows: list[list[str]], right: int = 0) -> list[str]:
    """A Markdown table; columns from index ``right`` on are right-aligned."""
    align = ["---" if i < right else "---:" for i in range(len(head))]
    return ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]


# ------------------------------------------------------------------------------ provenance

def commit(meta: dict) -> str:
    c = meta.get("commit") or "unknown"
    return c + ("-dirty" if meta.get("dirty") else "")


def mode(meta: dict) -> str:
    return "quick grid" if meta.get("quick") else "full grid"


def date(meta: dict) -> str:
    d = meta.get("date")
    return d.replace("T", " ")[:16] + " UTC" if d else "date not recorded"


def machine(meta: dict) -> str:
    return (f"{meta.get('cpu', 'CPU not recorded')}, {meta.get('cores', '?')} cores, {meta.get('threads', '?')} "
            f"intra-op threads")


def provenance(meta: dict) -> str:
    """One line: what produced the table, where and when."""
    return (f"Command `{meta.get('command', 'not recorded')}` ({mode(meta)}), {date(meta)}, commit `{commit(meta)}`; "
            f"{machine(meta)}; torch {meta.get('torch', '?')}, Python {meta.get('python', '?')}.")


# ------------------------------------------------------------------------------ tables

def _routing_core(rows, variant):
    out = []
    for r in sorted(rows, key=lambda r: (r["B"], r["E"], r["W"])):
        if not all(r.get(k) for k in ("naive", "torch", "cpp", "copy")):
            continue
        gbs = r["bytes"] / r["cpp"] / 1e9
        copy_gbs = 2 * r["copy_bytes"] / r["copy"] / 1e9
        out.append([str(r["B"]), str(r["E"]), str(r["W"]), ms(r["naive"]), ms(r["torch"]), ms(r["cpp"]),
                    times(r["naive"] / r["cpp"]), times(r["torch"] / r["cpp"]), f"{gbs:.1f}", f"{copy_gbs:.1f}",
                    f"{100 * gbs / copy_gbs:.0f}%"])
    return table(["B", "E", "W", "naive ms", "torch ms", "C++ ms", "C++ vs naive", "C++ vs torch", "C++ GB/s",
                  "copy GB/s", "C++ of copy"], out)


def _module_overhead(rows, variant):
    if variant == "per_element":
        out = [[str(r["E"]), str(r["B"]), str(r["arith_elements"]), f"{r['arith_ns_per_element']:.2f}",
                f"{r['copy_ns_per_element']:.2f}", times(r["arith_ns_per_element"] / r["copy_ns_per_element"])]
               for r in sorted(rows, key=lambda r: r["E"]) if "arith_ns_per_element" in r]
        return table(["E", "B", "elements", "row arithmetic ns per element", "copy ns per element",
                      "arithmetic / copy"], out)
    out = [[str(r["E"]), str(r["B"]), str(r["rows"]), plain(r.get("user_ms")), plain(r["naive_ms"]), plain(r["module_ms"]),
            times(r.get("vs_user")), times(r.get("target")), times(r["speedup"]), plain(r["arith_ms"]),
            times(r["ceiling"]), times(ratio(r.get("user_ms"), r["arith_ms"])),
            plain(r.get("rows_calls_ms")), times(r.get("bound")), plain(r["copy_ms"]), f"{r['copy_share']:.2f}"]
           for r in sorted(rows, key=lambda r: r["E"])]
    return table(["E", "B", "rows", "the user's loop ms", "naive ms", "module ms", "module vs the user's loop",
                  "target", "module vs naive", "arith ms", "ceiling", "user / arith", "rows + calls ms", "bound",
                  "copy ms", "copy share"], out)


def _end_to_end_key(r):
    return ({"mlp": 0, "resnet20": 1, "mobilenet_v2": 2}.get(r["model"], 3), r["model"], r["E"], r["B"], r["active"])


def _best(r) -> str | None:
    """The faster bitwise executor of the row: ``engine_sequential`` or ``engine_grouped``."""
    have = [k for k in ("engine_sequential", "engine_grouped") if r.get(k)]
    return min(have, key=lambda k: r[k]) if have else None


def _end_to_end(rows, variant):
    rows = sorted(rows, key=_end_to_end_key)
    if variant == "mlp":
        out = [[str(r["E"]), str(r["B"]), ms(r.get("naive")), ms(r.get("engine_sequential")), ms(r.get("engine_grouped")),
                ms(r.get("engine_grouped_parallel")), ms(r.get("peer_grouped_mm")), ms(r.get("peer_padded_bmm")),
                ms(r.get("dense")), ms(r.get("floor")), times(ratio(r.get("naive"), r.get("engine_grouped"))),
                over(_minus1(ratio(r.get("engine_grouped"), r.get("floor")))),
                over(_minus1(ratio(r.get("engine_grouped_parallel"), r.get("floor"))))]
               for r in rows if r["model"] == "mlp"]
        return table(["E", "B", "naive", "sequential", "grouped", "grouped_parallel", "grouped_mm peer",
                      "padded bmm peer", "dense", "floor", "grouped vs naive", "grouped over floor",
                      "grouped_parallel over floor"], out)
    if variant == "cnn":
        out = []
        for r in rows:
            if r["model"] == "mlp":
                continue
            best = _best(r)
            out.append([r["model"], str(r["E"]), str(r["B"]), str(r["active"]), ms(r.get("naive")),
                        ms(r.get("engine_sequential")), ms(r.get("engine_grouped")), ms(r.get("dense")),
                        ms(r.get("floor")), best.removeprefix("engine_") if best else "–",
                        times(ratio(r.get("naive"), r.get(best))), times(ratio(r.get("dense"), r.get(best))),
                        over(_minus1(ratio(r.get(best), r.get("floor"))))])
        return table(["model", "E", "B", "active", "naive", "sequential", "grouped (vmap)", "dense", "floor", "best",
                      "best vs naive", "best vs dense", "best over floor"], out, right=1)
    raise ValueError(f"end_to_end: no variant {variant!r} (mlp, cnn)")


def _minus1(x):
    return None if x is None else x - 1


def _interleaved(rows, variant):
    out = []
    for r in sorted(rows, key=_end_to_end_key):
        out.append([r["model"], str(r["E"]), str(r["B"]), str(r["active"]), str(r["rounds"]), ms(r.get("naive")),
                    ms(r.get("engine_sequential")), ms(r.get("engine_grouped")), ms(r.get("engine_grouped_parallel")),
                    ms(r.get("floor")), over(_minus1(ratio(r.get("engine_sequential"), r.get("floor")))),
                    over(_minus1(ratio(r.get("engine_grouped"), r.get("floor")))),
                    over(_minus1(ratio(r.get("engine_grouped_parallel"), r.get("floor"))))])
    return table(["model", "E", "B", "active", "rounds", "naive", "sequential", "grouped", "grouped_parallel", "floor",
                  "sequential over floor", "grouped over floor", "grouped_parallel over floor"], out, right=1)


def _allocator(rows, variant):
    out = []
    for r in rows:
        setting = f"{r['allocator']} (`{r['env']}`)" if r.get("env") else r["allocator"]
        out.append([setting, str(r["B"]), str(r["rounds"]), ms(r["naive"]), ms(r["engine_sequential"]), ms(r["floor"]),
                    *(f"{r[f'faults_{name}']:.0f}" for name in ("naive", "engine_sequential", "floor"))])
    return table(["allocator", "B", "rounds", "naive ms", "engine ms", "floor ms", "naive page faults",
                  "engine page faults", "floor page faults"], out, right=1)


def _compile(rows, variant):
    out = [[r["model"], str(r["E"]), str(r["B"]), f"`{r['executor']}`", ms(r["eager"]), ms(r["compiled"]),
            times(r["eager"] / r["compiled"]), plain(r["compile_s"])]
           for r in sorted(rows, key=lambda r: (r["model"] != "mlp", r["model"], r["E"], r["B"], r["executor"]))]
    return table(["model", "E", "B", "executor", "eager ms", "compiled ms", "speed-up", "compile s"], out, right=1)


COMPILE_CALLS = {"plain": "`torch.compile(mnn)`", "fullgraph": "`torch.compile(mnn, fullgraph=True)`",
                 "mnn_fast": "`mnn_fast.compile(mnn, fullgraph=True)`",
                 "nested": "`torch.compile(nn.Sequential(mnn), fullgraph=True)`"}


def _compile_scaling(rows, variant):
    order = list(COMPILE_CALLS)
    out = [[COMPILE_CALLS.get(r["call"], r["call"]), str(r["B"]), plain(r["small_s"]), plain(r["large_s"]),
            times(ratio(r["large_s"], r["small_s"]))]
           for r in sorted(rows, key=lambda r: order.index(r["call"]) if r["call"] in order else len(order))]
    small, large = (rows[0]["E_small"], rows[0]["E_large"]) if rows else ("E", "E")
    return table(["call", "B", f"E = {small} compile s", f"E = {large} compile s", f"E = {large} / E = {small}"],
                 out, right=1)


def _threads(rows, variant):
    every = rows[0].get("all_threads", "all") if rows else "all"
    out = []
    for r in sorted(rows, key=lambda r: (r["model"] != "mlp", r["model"], r["E"], r["B"])):
        cells = [r["model"], str(r["E"]), str(r["B"]), f"`{r['executor']}`"]
        for k in ("naive", "mnn", "floor"):
            cells += [ms(r[f"{k}_1"]), ms(r[f"{k}_all"]), times(r[f"{k}_1"] / r[f"{k}_all"])]
        out.append(cells)
    return table(["model", "E", "B", "executor", "naive 1", f"naive {every}", "naive x", "module 1", f"module {every}",
                  "module x", "floor 1", f"floor {every}", "floor x"], out, right=1)


def _small_batch(rows, variant):
    us = lambda v: plain(v * 1e6) if v is not None else "–"  # noqa: E731
    out = [[str(r["E"]), str(r["B"]), str(r["threads"]), str(r["active"]), f"`{r['executor']}`", us(r["floor"]),
            us(r["module"]), us(r["naive"]), us(r["user"]), over(_minus1(ratio(r["module"], r["floor"]))),
            times(ratio(r["user"], r["module"])), times(ratio(r["naive"], r["module"]))]
           for r in sorted(rows, key=lambda r: (r["E"], r["B"], r["threads"]))]
    return table(["E", "B", "threads", "active experts", "executor", "floor µs", "module µs", "naive loop µs",
                  "user's loop µs", "module over floor", "module vs user's loop", "module vs naive"], out)


SWEEP_MODELS = {"mlp": "digits MLP (8x8)", "small_cnn": "small CNN (28x28)", "resnet20": "ResNet-20 (32x32)"}


def _threshold_sweep(rows, variant):
    out = []
    for r in rows:
        sep = r.get("separate")
        out.append([SWEEP_MODELS.get(r["model"], r["model"]), str(r["B"]), ms(r["one_pass"]), ms(r["sweep"]), ms(sep),
                    times(r["sweep"] / r["one_pass"]), times(ratio(sep, r["sweep"]))])
    return table(["model", "B", "one pass ms", "21-threshold sweep ms", "21 passes ms", "sweep / pass",
                  "21 passes / sweep"], out, right=1)


LAUNCHES = {"serial": "serial (`--workers 1`)", "workers2": "`--workers 2`",
            "ray2": "`--launcher ray --workers 2` (embedded cluster, 2 CPUs)",
            "slurm_local2": "`--launcher slurm --slurm-cluster local --workers 2`"}


def _launchers(rows, variant):
    base = next((r["seconds"] for r in rows if r["launch"] == "serial"), None)
    out = [[LAUNCHES.get(r["launch"], r["launch"]), str(r.get("epochs", "?")), plain(r["seconds"]),
            times(ratio(base, r["seconds"])), {True: "yes", False: "no"}.get(r.get("same_bytes"), "–")]
           for r in rows]
    return table(["launch", "epochs", "seconds", "vs serial", "same bytes as serial"], out, right=1)


def _gpu_launches(rows, variant):
    out = [[r["backend"], str(r["E"]), str(r["kernels"]), str(r["copies"]), str(r["syncs"])]
           for r in sorted(rows, key=lambda r: (r["backend"], r["E"]))]
    return table(["backend", "E", "kernels", "memcpy/memset", "syncs flagged"], out, right=1)


def _expert_parallel(rows, variant):
    naive = next((r["seconds"] for r in rows if r["setup"] == "naive loop"), None)
    order = {"naive loop": 0, "module": 1, "expert parallel": 2}
    out = []
    for r in sorted(rows, key=lambda r: (order.get(r["setup"], 3), r["layout"])):
        sent = r.get("sent_bytes")
        share = r.get("exchange_share")
        out.append([r["setup"], r["layout"], str(r["E"]), str(r["B"]), f"{r['rows_per_s']:.0f}", ms(r["seconds"]),
                    times(ratio(naive, r["seconds"])), plain(r["param_bytes"] / 1e6), plain(r["peak_rss"] / 1e6),
                    plain(sent / 1e6) if sent is not None else "–",
                    f"{100 * share:.0f}%" if share is not None else "–"])
    return table(["setup", "processes x threads", "E", "rows per rank", "rows/s", "ms per call", "vs naive",
                  "parameter MB per process", "peak RSS MB per process", "MB sent per rank per call",
                  "in all-to-all"], out, right=2)


RENDERERS = {
    "routing_core": _routing_core,
    "module_overhead": _module_overhead,
    "end_to_end": _end_to_end,
    "end_to_end_interleaved": _interleaved,
    "allocator": _allocator,
    "compile": _compile,
    "compile_scaling": _compile_scaling,
    "threads": _threads,
    "small_batch": _small_batch,
    "threshold_sweep": _threshold_sweep,
    "launchers": _launchers,
    "gpu_launches": _gpu_launches,
    "expert_parallel": _expert_parallel,
}


def render_table(tables: dict, name: str, variant: str | None = None) -> str:
    """The provenance line and the table ``name`` (or why it is absent)."""
    if name not in RENDERERS:
        raise KeyError(f"no renderer for table {name!r}")
    if name not in tables:
        return f"Not in the committed results: {ABSENT.get(name, 'this benchmark did not run')}."
    data = tables[name]
    lines = RENDERERS[name](data["rows"], variant)
    if len(lines) <= 2:
        return f"Not in the committed results: the run behind them measured no row of this table ({provenance(data['meta'])})"
    return "\n".join([provenance(data["meta"]), ""] + lines)


def render(results_dir: Path = RESULTS, template: Path = TEMPLATE) -> str:
    """docs/benchmarks.md as the JSON in ``results_dir`` renders it."""
    tables = load_tables(results_dir)
    text = Path(template).read_text()
    used = set(PLACEHOLDER.findall(text))
    unknown = sorted({n for n, _ in used} - set(RENDERERS))
    if unknown:
        raise KeyError(f"{template}: placeholders for unknown tables {unknown}")
    out = PLACEHOLDER.sub(lambda m: render_table(tables, m.group(1), m.group(2)), text)
    leftover = re.findall(r"\{\{[^}]*\}\}", out)
    if leftover:
        raise ValueError(f"{template}: placeholders not understood: {leftover}")
    return out


# ------------------------------------------------------------------------------ the README

def render_readme_speed(results_dir: Path = RESULTS) -> str:
    """The README's speed block (between the markers, markers excluded): the engine alone against the
    user's plain-torch loop and the reference loop, then the MLP end-to-end rows against the naive
    loop and the convolutional cells in one sentence, each with its provenance line."""
    tables = load_tables(results_dir)
    lines = []
    alone = tables.get("module_overhead")
    if alone is not None and all(r.get("user_ms") for r in alone["rows"]):
        meta = alone["meta"]
        rows = [[str(r["E"]), plain(r["user_ms"]), plain(r["naive_ms"]), plain(r["module_ms"]), times(r["vs_user"]),
                 times(r["speedup"])] for r in sorted(alone["rows"], key=lambda r: r["E"])]
        lines += [f"**The engine alone** (identity switch and specialists, B = {alone['rows'][0]['B']}, about two "
                  f"experts per sample), ms: command `{meta.get('command', 'not recorded')}` ({mode(meta)}), "
                  f"{date(meta)}; {machine(meta)}; commit `{commit(meta)}`.", ""]
        lines += table(["E", "the user's loop", "reference loop", "module", "vs the user's loop", "vs the reference loop"],
                       rows)
        lines += [""]
    data = tables.get("end_to_end")
    if data is None:
        return "\n".join(lines + ["No end-to-end results are committed yet: run `make bench` and `make bench-docs`."])
    meta, rows = data["meta"], sorted(data["rows"], key=_end_to_end_key)
    mlp = [[str(r["E"]), str(r["B"]), ms(r.get("naive")), ms(r.get("engine_sequential")), ms(r.get("engine_grouped")),
            ms(r.get("engine_grouped_parallel")), times(ratio(r.get("naive"), r.get("engine_grouped"))),
            times(ratio(r.get("naive"), r.get("engine_grouped_parallel")))]
           for r in rows if r["model"] == "mlp"]
    lines += [f"**MLP specialists** (512-64-C, C = E, about two active per sample) against the reference loop, ms: "
              f"command `{meta.get('command', 'not recorded')}` ({mode(meta)}{_rounds(r for r in rows if r['model'] == 'mlp')}), "
              f"{date(meta)}; "
              f"{machine(meta)}; torch {meta.get('torch', '?')}; commit `{commit(meta)}`.", ""]
    lines += table(["E", "B", "reference loop", "`sequential`", "`grouped` (bitwise)", "`grouped_parallel`",
                    "`grouped` vs reference", "`grouped_parallel` vs reference"], mlp)
    lines += _cnn_sentence(tables.get("end_to_end_interleaved"), data)
    return "\n".join(lines)


def _cnn_sentence(turns: dict | None, separate: dict) -> list[str]:
    """The README's sentence on the convolutional cells: the in-turns medians (the naive loop and the
    engine called in turns each round, so under one load) where that table has them;
    otherwise the separately timed rows of ``separate``, whose gaps are within the machine's drift."""
    names = {"resnet20": "ResNet-20", "mobilenet_v2": "MobileNetV2"}

    def cell(r, engine: str) -> str:
        return (f"{names.get(r['model'], r['model'])} (E = {r['E']}, B = {r['B']}, {r['active']} active per sample): "
                f"{ms(r[engine])} ms (`{engine.removeprefix('engine_')}`) against the loop's {ms(r['naive'])} ms")

    phrase = "Where the specialists' own compute dominates there is little to gain; convolutional specialists"
    rows = [] if turns is None else [r for r in sorted(turns["rows"], key=_end_to_end_key)
                                     if r["model"] != "mlp" and r.get("naive") and r.get("engine_sequential")]
    if rows:
        meta = turns["meta"]
        return ["", f"{phrase}, the loop and the module called in turns{_rounds(rows, 'median')} (command "
                    f"`{meta.get('command', 'not recorded')}`, {date(meta)}, commit `{commit(meta)}`): "
                + "; ".join(cell(r, "engine_sequential") for r in rows) + "."]
    rows = [r for r in sorted(separate["rows"], key=_end_to_end_key)
            if r["model"] != "mlp" and _best(r) and r.get("naive")]
    if not rows:
        return []
    return ["", f"{phrase}, same run{_rounds(rows)}: " + "; ".join(cell(r, _best(r)) for r in rows) + "."]


def _rounds(rows, statistic: str = "best") -> str:
    """``", best of N rounds"`` (or another ``statistic``) where the rows agree on N (the benchmark
    records it), else nothing."""
    counts = {r.get("rounds") for r in rows}
    return f", {statistic} of {counts.pop()} rounds" if len(counts) == 1 and None not in counts else ""


def splice_readme(readme: str, block: str) -> str:
    """``readme`` with the lines between the speed markers replaced by ``block``."""
    start, end = readme.find(START), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md: the markers {START} ... {END} are missing")
    return readme[: start + len(START)] + "\n" + block + "\n" + readme[end:]


# ------------------------------------------------------------------------------ command line

def update_from(source: Path, results_dir: Path, allow_quick: bool = False) -> list[str]:
    """Copies the table files of ``source`` into ``results_dir``; returns what was copied."""
    results_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name, data in load_tables(source).items():
        target = results_dir / f"{name}.json"
        if target.exists() and data["meta"].get("quick") and not allow_quick:
            old = json.loads(target.read_text())
            if not old["meta"].get("quick"):
                print(f"kept {target}: a quick-mode table does not replace a full-mode one (--allow-quick)",
                      file=sys.stderr)
                continue
        shutil.copyfile(source / f"{name}.json", target)
        copied.append(name)
    return copied


def _diff(path: Path, want: str) -> str:
    have = path.read_text() if path.exists() else ""
    if have == want:
        return ""
    return "".join(difflib.unified_diff(have.splitlines(True), want.splitlines(True), str(path), "rendered"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="the table JSON to render from")
    parser.add_argument("--out", type=Path, default=PAGE, help="the page to write")
    parser.add_argument("--readme", type=Path, default=README, help="the README whose speed block to write")
    parser.add_argument("--template", type=Path, default=TEMPLATE, help="the page's prose and placeholders")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a generated file is out of date")
    parser.add_argument("--update-from", type=Path, metavar="DIR",
                        help="first copy the table JSON of DIR (e.g. bench/results) into --results")
    parser.add_argument("--allow-quick", action="store_true", help="with --update-from: quick tables may replace full ones")
    args = parser.parse_args(argv)
    if args.check and args.update_from:
        parser.error("--check writes nothing: it cannot take --update-from")
    if args.update_from:
        copied = update_from(args.update_from, args.results, args.allow_quick)
        print(f"copied into {args.results}: {', '.join(copied) or 'nothing'}")
    page = render(args.results, args.template)
    readme = splice_readme(args.readme.read_text(), render_readme_speed(args.results))
    if args.check:
        diffs = [d for d in (_diff(args.out, page), _diff(args.readme, readme)) if d]
        for d in diffs:
            sys.stdout.write(d)
        print(f"out of date: `python bench/render_docs.py` renders them from {args.results}" if diffs else "up to date")
        return 1 if diffs else 0
    args.out.write_text(page)
    args.readme.write_text(readme)
    print(f"written: {args.out}, {args.readme} (speed block)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
