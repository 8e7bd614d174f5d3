"""End to end: the naive loop vs the engine per executor vs dense vs the compute floor, same inputs.

compute floor = the switch plus each specialist on its rows already gathered into a contiguous
batch (no routing, no combine): what any MNN implementation must pay. dense = every specialist on
every sample. overhead = engine / floor - 1. Memory = growth of peak RSS during one call.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from conftest import is_quick
from mnn_fast.benchmark import end_to_end_impls, end_to_end_workload, peak_rss_growth

TABLE = "end_to_end"
# (model, E, B, experts active per sample). The MLP grid is the issue's; ResNet-20 B=512 and
# MobileNetV2 B=128 the paper's setting; ResNet-20 with 5 of 10 active is where dense should catch up.
FULL = ([("mlp", e, b, 2) for e in (10, 100, 1000) for b in (256, 4096)]
        + [("resnet20", 10, 512, 2), ("resnet20", 10, 512, 5), ("mobilenet_v2", 10, 128, 2)])
QUICK = [("mlp", 10, 256, 2), ("mlp", 100, 4096, 2), ("resnet20", 10, 64, 2), ("mobilenet_v2", 10, 32, 2)]
# peer_*: the grouped executor with its GEMM replaced by torch._grouped_mm or a padded baddbmm
# (mnn_fast.benchmark.PEERS), for Linear-stack experts: the grouped GEMMs a user could reach for.
# Order of measurement within a cell: the naive loop, the floor and the bitwise executors first, dense
# last. Calls made after dense (every expert on the whole batch: the largest activations) ran 5-10%
# slower for the rest of the process on the project's VM, so a floor timed last, right after dense, read
# 15-20% above the naive loop and the engine it bounds (ResNet-20, B = 512).
IMPLS = ["naive", "floor", "engine_sequential", "engine_grouped", "engine_grouped_parallel", "peer_grouped_mm",
         "peer_padded_bmm", "dense"]
# Dense runs B x E expert rows: past this many it takes minutes and tells nothing new.
DENSE_MAX_ROWS = 300_000

# The same cells again, the naive loop, the engine and the floor called in turn within each round: on
# a shared machine the load drifts between one implementation's rounds and the next's, which moves the
# per-implementation table's overhead column by +-10% or more (a CNN floor, timed last, after dense,
# has read above the naive loop and the engine); taking turns puts them all under one load.
INTERLEAVED = "end_to_end_interleaved"
TURNS = {"mlp": ("naive", "engine_sequential", "engine_grouped", "engine_grouped_parallel", "floor"),
         "cnn": ("naive", "engine_sequential", "floor")}

_CACHE: dict = {}


def workload(case):
    if case not in _CACHE:
        _CACHE.clear()
        model, experts, batch, active = case
        w = end_to_end_workload(model, experts, batch, active_per_sample=active)
        w["impls"] = end_to_end_impls(w)
        _CACHE[case] = w
    return _CACHE[case]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = QUICK if is_quick(metafunc.config) else FULL
        grid = [(c, i) for c in cases for i in IMPLS]
        metafunc.parametrize("case,impl", grid, ids=[f"{c[0]}-E{c[1]}-B{c[2]}-a{c[3]}-{i}" for c, i in grid])
    if "turns_case" in metafunc.fixturenames:
        cases = QUICK if is_quick(metafunc.config) else FULL
        metafunc.parametrize("turns_case", cases, ids=[f"{c[0]}-E{c[1]}-B{c[2]}-a{c[3]}" for c in cases])


def _fmt(rows):
    head = (f"{'model':>12} {'E':>5} {'B':>5} {'act':>3} {'rows':>6} | {'naive':>8} {'seq':>8} {'grouped':>8} {'grp-par':>8} "
            f"{'grp_mm':>8} {'pad_bmm':>8} {'dense':>8} {'floor':>8} "
            f"| {'best':>7} {'img/s':>8} {'vs naive':>8} {'vs dense':>8} {'overhead':>8} {'par ovh':>8} | {'MB naive':>8} {'MB best':>7}")
    lines = ["times in ms; best = the faster bitwise executor (sequential or grouped); grp-par = grouped_parallel "
             "(opt-in, not bitwise, '-' where the experts are not Linear stacks); grp_mm / pad_bmm = grouped with "
             "torch._grouped_mm / padded baddbmm as its GEMM (peers); overhead = best over the compute floor; par ovh = "
             "grp-par over the compute floor",
             head, "-" * len(head)]
    for r in rows:
        if not all(k in r for k in ("naive", "engine_sequential", "engine_grouped", "floor")):
            continue
        best = min(("engine_sequential", "engine_grouped"), key=lambda k: r[k])
        r.update(best_executor=best.removeprefix("engine_"), images_per_s=r["B"] / r[best],
                 speedup_vs_naive=r["naive"] / r[best], overhead_vs_floor=r[best] / r["floor"] - 1,
                 speedup_vs_dense=(r["dense"] / r[best]) if r.get("dense") else None,
                 overhead_parallel_vs_floor=(r["engine_grouped_parallel"] / r["floor"] - 1)
                 if r.get("engine_grouped_parallel") else None)
        ms = lambda k: f"{r[k] * 1e3:>8.1f}" if r.get(k) else f"{'-':>8}"
        vs_dense = f"{r['speedup_vs_dense']:>7.1f}x" if r["speedup_vs_dense"] else f"{'-':>8}"
        par = r["overhead_parallel_vs_floor"]
        par_overhead = f"{100 * par:>7.1f}%" if par is not None else f"{'-':>8}"
        lines.append(
            f"{r['model']:>12} {r['E']:>5} {r['B']:>5} {r['active']:>3} {r['rows']:>6} | {ms('naive')} {ms('engine_sequential')} "
            f"{ms('engine_grouped')} {ms('engine_grouped_parallel')} {ms('peer_grouped_mm')} {ms('peer_padded_bmm')} {ms('dense')} {ms('floor')} | {r['best_executor']:>7} {r['images_per_s']:>8.0f} "
            f"{r['speedup_vs_naive']:>7.1f}x {vs_dense} {100 * r['overhead_vs_floor']:>7.1f}% {par_overhead} | "
            f"{r['mem_naive'] / 2**20:>8.1f} {r['mem_' + best] / 2**20:>7.1f}")
    return lines


def test_end_to_end(benchmark, results, case, impl, request):
    model, experts, batch, active = case
    # Best of this many calls after one warm-up (fewer in quick mode, which must finish in a minute).
    rounds = 3 if model != "mlp" else (5 if is_quick(request.config) else 10)
    results.formatters[TABLE] = _fmt
    w = workload(case)
    key = dict(model=model, E=experts, B=batch, active=active)
    if impl == "dense" and batch * experts > DENSE_MAX_ROWS:
        results.record(TABLE, key, dense=None)
        results.notes[TABLE] = [f"dense skipped where B x E > {DENSE_MAX_ROWS} expert rows (minutes per call)"]
        return
    if impl not in w["impls"]:  # grouped_parallel exists for Linear stacks only
        results.record(TABLE, key, **{impl: None})
        return
    fn = w["impls"][impl]
    with torch.no_grad():
        if impl.startswith(("engine", "peer")):  # a speed is only worth reporting for a correct output
            want = w["impls"]["naive"]()
            got = fn()
            if impl == "engine_sequential" or (impl == "engine_grouped" and model == "mlp"):
                assert torch.equal(got, want)  # the bitwise configurations (README, exactness)
            elif impl == "engine_grouped_parallel":
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # its stated tolerance (README)
            else:
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        benchmark.group = f"{model} E={experts} B={batch} active={active}"
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
        seconds = benchmark.stats.stats.min
        memory = peak_rss_growth(fn)
    results.record(TABLE, key, rows=w["rows"], threshold=w["threshold"], rounds=rounds,
                   **{impl: seconds, f"mem_{impl}": memory})


def _fmt_interleaved(rows):
    head = (f"{'model':>12} {'E':>5} {'B':>5} {'act':>3} {'rounds':>6} | {'naive':>8} {'seq':>8} {'grouped':>8} "
            f"{'grp-par':>8} {'floor':>8} | {'seq ovh':>8} {'grp ovh':>8} {'par ovh':>8}")
    lines = ["medians in ms of rounds calling the naive loop, the engine (seq = sequential, grouped, grp-par = "
             "grouped_parallel) and the compute floor in turn; ovh = over the floor", head, "-" * len(head)]
    ms = lambda v: f"{v * 1e3:>8.2f}" if v is not None else f"{'-':>8}"
    pct = lambda v: f"{100 * v:>7.1f}%" if v is not None else f"{'-':>8}"
    for r in rows:
        lines.append(f"{r['model']:>12} {r['E']:>5} {r['B']:>5} {r['active']:>3} {r['rounds']:>6} | {ms(r.get('naive'))} "
                     f"{ms(r.get('engine_sequential'))} {ms(r.get('engine_grouped'))} "
                     f"{ms(r.get('engine_grouped_parallel'))} {ms(r.get('floor'))} | {pct(r.get('overhead_sequential'))} "
                     f"{pct(r.get('overhead_grouped'))} {pct(r.get('overhead_parallel'))}")
    return lines


def test_overhead_interleaved(results, turns_case, request):
    model, experts, batch, active = turns_case
    w = workload(turns_case)
    turns = {name: w["impls"][name] for name in TURNS["mlp" if model == "mlp" else "cnn"]}
    quick = is_quick(request.config)
    if model != "mlp":
        rounds = 3 if quick else 5  # up to seconds per call: the median of a few rounds
    else:
        rounds = (7 if quick else 31) if batch <= 256 else (3 if quick else 11)
    times: dict[str, list[float]] = {name: [] for name in turns}
    with torch.no_grad():
        want = turns["naive"]()  # also the naive loop's warm-up
        assert torch.equal(turns["engine_sequential"](), want)
        if "engine_grouped" in turns:
            assert torch.equal(turns["engine_grouped"](), want)
            torch.testing.assert_close(turns["engine_grouped_parallel"](), want, atol=1e-5, rtol=1e-5)
        turns["floor"]()  # warm-up, as the calls above were for the others
        for _ in range(rounds):
            for name, fn in turns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    over = {f"overhead_{label}": median[name] / median["floor"] - 1
            for name, label in (("engine_sequential", "sequential"), ("engine_grouped", "grouped"),
                                ("engine_grouped_parallel", "parallel")) if name in median}
    results.formatters[INTERLEAVED] = _fmt_interleaved
    results.record(INTERLEAVED, dict(model=model, E=experts, B=batch, active=active), rounds=rounds, **median, **over)
