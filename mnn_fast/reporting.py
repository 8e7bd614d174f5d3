"""Reporting in one place: CSV files, markdown tables and matplotlib figures, all written atomically.

Every writer renders to memory first and goes through :func:`mnn_fast.io.atomic_write` (the
user's umask, never a half-written file). Figures use the Agg backend: files only, no display.
"""
from __future__ import annotations

import csv
import io as _stdio
import math
import textwrap

import torch
from torch import Tensor

from . import io

__all__ = ["save_csv", "write_csv", "save_figure", "pyplot", "plot_heatmap", "plot_lines", "plot_similarity",
           "plot_accuracy_by_depth", "plot_accuracy_vs_macs", "groups_markdown_table", "nsn_markdown_table",
           "depth_sweep_markdown_table", "baselines_markdown_table", "baseline_label", "plot_baselines"]


def save_csv(path, rows: list[dict], fieldnames) -> None:
    """``rows`` as CSV with a header, written atomically."""
    buf = _stdio.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(fieldnames))
    writer.writeheader()
    writer.writerows(rows)
    io.atomic_write(path, buf.getvalue().encode())


def write_csv(path, rows: list[dict]) -> None:
    """``rows`` (dicts with the same keys) as CSV, written atomically with the user's umask."""
    save_csv(path, rows, list(rows[0]))


def save_figure(path, fig, dpi: int = 120) -> None:
    """A matplotlib figure as PNG, rendered in memory and written atomically."""
    buf = _stdio.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    io.atomic_write(path, buf.getvalue())


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (no display on servers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(path, rows: list[dict], switch_accuracy: float, title: str = "") -> None:
    """Accuracy over dataset thresholds (rows) x test thresholds (columns), as the paper's Figures 2-3."""
    plt = pyplot()
    ds = sorted({r["dataset_threshold"] for r in rows})
    ts = sorted({r["test_threshold"] for r in rows})
    grid = torch.full((len(ds), len(ts)), math.nan)
    for r in rows:
        grid[ds.index(r["dataset_threshold"]), ts.index(r["test_threshold"])] = r["accuracy"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * len(ts), 1.5 + 0.45 * len(ds)))
    im = ax.imshow(grid.numpy(), aspect="auto", origin="lower", cmap="viridis")
    ax.set_xticks(range(len(ts)), [f"{t:.2f}" for t in ts], rotation=90)
    ax.set_yticks(range(len(ds)), [f"{d:.2f}" for d in ds])
    ax.set_xlabel("test threshold")
    ax.set_ylabel("dataset threshold")
    ax.set_title(title or f"MNN accuracy (switch alone: {switch_accuracy:.4f})")
    fig.colorbar(im, ax=ax, label="test accuracy")
    fig.tight_layout()
    save_figure(path, fig, dpi=120)
    plt.close(fig)


def plot_lines(path, rows: list[dict], switch_accuracy: float, title: str = "") -> None:
    """Accuracy over test thresholds, one line per dataset threshold, switch-only baseline dashed (Figure 4)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for d in sorted({r["dataset_threshold"] for r in rows}):
        sel = sorted((r for r in rows if r["dataset_threshold"] == d), key=lambda r: r["test_threshold"])
        ax.plot([r["test_threshold"] for r in sel], [r["accuracy"] for r in sel], marker="o", ms=3, label=f"dataset threshold {d:.2f}")
    ax.axhline(switch_accuracy, color="k", ls="--", lw=1, label=f"switch alone ({switch_accuracy:.4f})")
    ax.set_xlabel("test threshold")
    ax.set_ylabel("test accuracy")
    ax.set_title(title or "MNN accuracy over the test threshold")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(path, fig, dpi=120)
    plt.close(fig)


def plot_similarity(path, panels: list[tuple[str, Tensor, list[list[int]]]], class_names=None) -> None:
    """One heatmap per ``(title, S: Tensor[C, C], groups)``: rows and columns in group order, white
    lines at group boundaries, so a good grouping shows as bright diagonal blocks."""
    from .groups.confusion import order_by_groups  # late: groups' report imports this module

    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    for ax, (title, S, groups) in zip(axes[0], panels):
        order = order_by_groups(groups)
        m = S.double()[order][:, order].numpy()
        im = ax.imshow(m, cmap="viridis", interpolation="nearest")
        names = [str(class_names[c]) if class_names else str(c) for c in order]
        ax.set_xticks(range(len(order)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(order)), names, fontsize=7)
        edge = -0.5
        for g in groups[:-1]:
            edge += len(g)
            ax.axhline(edge, color="white", lw=1.5)
            ax.axvline(edge, color="white", lw=1.5)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    save_figure(path, fig, dpi=120)
    plt.close(fig)


def groups_markdown_table(rows: list[dict]) -> str:
    """The label-groups report's rows (``row``, ``groups``, ``test_accuracy``, ``macs``, ``overhead_pct``)
    as a markdown table."""
    lines = ["| row | groups | test accuracy | multiply-adds | overhead |", "|---|---|---:|---:|---:|"]
    for r in rows:
        groups = "" if r["groups"] is None else " ".join("{" + ",".join(map(str, g)) + "}" for g in r["groups"])
        lines.append(f"| {r['row']} | {groups} | {r['test_accuracy']:.4f} | {r['macs']:,.0f} | {r['overhead_pct']:+.2f}% |")
    return "\n".join(lines)

def _finish(path, fig, ax, xlabel: str, ylabel: str, title: str, legend_size: int = 8) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend_size)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(path, fig, dpi=120)
    pyplot().close(fig)


def plot_accuracy_by_depth(path, summary: list[dict], title: str, models=("nsn", "separate", "removed")) -> None:
    """Mean test accuracy ± std against multiply-adds (log scale), one line per model (``mnn-fast nsn``)."""
    fig, ax = pyplot().subplots(figsize=(6.5, 4))
    for model, marker in zip(models, "osx"):
        sel = sorted((s for s in summary if s["model"] == model), key=lambda s: s["macs"])
        ax.errorbar([s["macs"] for s in sel], [s["mean"] for s in sel], yerr=[s["std"] for s in sel], marker=marker,
                    capsize=3, label=model)
    ax.set_xscale("log")
    _finish(path, fig, ax, "multiply-adds per sample (weights)", "test accuracy", title)


def plot_accuracy_vs_macs(path, rows: list[dict], title: str) -> None:
    """``mnn-fast nsn-sweep``: a line over test thresholds per (kind, depth), the switch and budget as points."""
    fig, ax = pyplot().subplots(figsize=(7, 4.2))
    for kind, depth in sorted({(r["kind"], r["depth"]) for r in rows if r["kind"] in ("nsn", "plain")}):
        sel = sorted((r for r in rows if r["kind"] == kind and r["depth"] == depth), key=lambda r: r["macs"])
        ax.plot([r["macs"] for r in sel], [r["accuracy"] for r in sel], marker="o" if kind == "nsn" else "s", ms=3,
                ls="-" if kind == "nsn" else "--", label=f"{kind} depth {depth} (over test thresholds)")
    points = {"switch": ("*", "switch alone"), "switch_compute_matched": ("P", "switch, compute-matched")}
    for r in rows:
        if r["kind"] in points or r["kind"].startswith("budget"):
            marker, label = points.get(r["kind"], ("D", r["kind"]))
            ax.scatter([r["macs"]], [r["accuracy"]], marker=marker, s=80, zorder=3, label=label)
    _finish(path, fig, ax, "mean multiply-adds per sample", "test accuracy", title, legend_size=7)


def nsn_markdown_table(summary: list[dict], models=("nsn", "separate", "removed")) -> str:
    """``mnn-fast nsn``'s summary (``model``, ``layers_removed``, ``mean``, ``std``, ``macs``) as a
    markdown table: one row per number of layers removed, one column per model."""
    removed = sorted({s["layers_removed"] for s in summary})
    lines = ["| layers removed | multiply-adds | " + " | ".join(models) + " |", "|---|---:|" + "---:|" * len(models)]
    for r in removed:
        cells = []
        for model in models:
            (s,) = [s for s in summary if s["model"] == model and s["layers_removed"] == r] or [None]
            cells.append(f"{s['mean']:.4f} ± {s['std']:.4f}" if s else "-")
        macs = next(s["macs"] for s in summary if s["layers_removed"] == r)
        lines.append(f"| {r} | {macs:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def depth_sweep_markdown_table(rows: list[dict], threshold: float) -> str:
    """``mnn-fast nsn-sweep``'s rows at test ``threshold`` (plus the switch and budget rows) as markdown."""
    lines = [f"| configuration | test threshold | accuracy | specialists / sample | multiply-adds / sample |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["kind"] in ("switch", "switch_compute_matched") or r["kind"].startswith("budget") \
                or r["test_threshold"] == threshold:
            name = {"switch": "switch alone", "switch_compute_matched": "switch, compute-matched to the plain MNN",
                    "plain": f"plain MNN (depth {r['depth']})",
                    "nsn": f"NSN specialists at depth {r['depth']}"}.get(r["kind"], r["kind"])
            t = f"{r['test_threshold']}" if r["test_threshold"] != "" else "-"
            lines.append(f"| {name} | {t} | {r['accuracy']:.4f} | {r['experts_per_sample']:.2f} | {r['macs']:,.0f} |")
    return "\n".join(lines)


BASELINE_NAMES = {"switch": "switch alone", "switch_compute_matched": "switch, compute-matched",
                  "mnn_ce": "MNN, specialists by cross-entropy", "mnn_binary": "MNN, specialists by binary loss"}
_LOSS_WORDS = {"ce": "cross-entropy", "binary": "binary loss"}
_INIT_WORDS = {"switch": "from the switch", "ghn": "from a GHN", "random": "from random init"}


def baseline_label(name: str) -> str:
    """A readable label for a ``mnn-fast baselines`` row name (``mnn_<loss>[_<model>]_<init>``)."""
    if name in BASELINE_NAMES:
        return BASELINE_NAMES[name]
    parts = name.split("_")
    if parts[0] == "mnn" and len(parts) >= 3 and parts[1] in _LOSS_WORDS and parts[-1] in _INIT_WORDS:
        model = "_".join(parts[2:-1])
        return (f"MNN, {model + ' ' if model else ''}specialists {_INIT_WORDS[parts[-1]]}, "
                f"{_LOSS_WORDS[parts[1]]}")
    return name


def baselines_markdown_table(summary: list[dict]) -> str:
    """``mnn-fast baselines``' summary as markdown: accuracy mean ± std, the MNN rows' paired
    differences to the switch and the compute-matched switch, the specialists' accuracy on the test
    samples routed to them, and the compute each row used."""
    lines = ["| row | test accuracy | vs switch | vs compute-matched | specialists on their samples | "
             "training sample passes | forward passes / sample |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        diffs = [f"{s[k]:+.4f} ± {s[k + '_std']:.4f}" if k in s else "" for k in ("minus_switch",
                                                                                 "minus_switch_compute_matched")]
        specialists = f"{s['specialist_mean']:.4f} ± {s['specialist_std']:.4f}" if "specialist_mean" in s else ""
        lines.append(f"| {baseline_label(s['row'])} | {s['mean']:.4f} ± {s['std']:.4f} | {diffs[0]} | "
                     f"{diffs[1]} | {specialists} | {s['train_sample_passes']:,.0f} | "
                     f"{s['forward_passes_per_sample']:.2f} |")
    return "\n".join(lines)


def plot_baselines(path, rows: list[dict], title: str) -> None:
    """One bar per row (mean over seeds) with its seeds as dots, so the spread is visible."""
    names = list(dict.fromkeys(r["row"] for r in rows))
    fig, ax = pyplot().subplots(figsize=(max(7, 1.1 * len(names)), 3.8))
    for i, name in enumerate(names):
        accs = [r["accuracy"] for r in rows if r["row"] == name]
        ax.bar(i, sum(accs) / len(accs), color="C0" if name.startswith("mnn") else "C7", alpha=0.6)
        ax.scatter([i] * len(accs), accs, color="k", s=12, zorder=3)
    lo = min(r["accuracy"] for r in rows)
    hi = max(r["accuracy"] for r in rows)
    ax.set_ylim(max(0.0, lo - 0.6 * (hi - lo) - 0.005), min(1.0, hi + 0.3 * (hi - lo) + 0.005))
    ax.set_xticks(range(len(names)), [textwrap.fill(baseline_label(n), 16) for n in names], fontsize=7)
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(path, fig, dpi=120)
    pyplot().close(fig)
