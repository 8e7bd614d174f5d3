"""Accuracy over test thresholds (and dataset thresholds) without re-running networks per threshold.

One pass routes at the lowest test threshold and runs every specialist once on every sample it could
ever see; each threshold then keeps the rows whose score still exceeds it (a stable filter of the
expert-major buffer is that threshold's buffer) and recombines them with the combine op.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from .module import MetaNeuralNetwork
from .routing import check_threshold

__all__ = ["sweep_test_thresholds", "write_csv", "plot_heatmap", "plot_lines", "DEFAULT_TEST_THRESHOLDS"]

DEFAULT_TEST_THRESHOLDS = [round(0.05 * i, 2) for i in range(21)]  # 0.00, 0.05, ..., 1.00


@torch.no_grad()
def sweep_test_thresholds(mnn: MetaNeuralNetwork, x: Tensor, y: Tensor, thresholds, batch_size: int = 1024) -> list[dict]:
    """Per threshold ``t``: ``{"test_threshold", "accuracy", "experts_per_sample"}`` of ``mnn`` at ``t``.

    ``x: Tensor[n, ...]``, ``y: Tensor[n] int64``. Each specialist runs once per batch, not once per
    threshold; outputs equal ``mnn`` evaluated at each threshold (up to the specialists' own
    batch-size-dependent rounding, since they see a larger batch).
    """
    thresholds = [check_threshold(t) for t in thresholds]
    if not thresholds:
        raise ValueError("thresholds is empty; expected at least one test threshold in [0, 1]")
    correct = [0] * len(thresholds)
    routed = [0] * len(thresholds)
    ops, top_k = mnn._backend, mnn.top_k or 0
    for start in tqdm(range(0, len(x), batch_size), desc="sweep", leave=False, disable=len(x) <= batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        logp, scores, num_classes = mnn._switch_scores(xb)
        widest = ops.route(scores, min(thresholds), top_k)
        xg = mnn._gather(xb, widest.perm)
        logv = mnn._run_specialists(xg, widest, num_classes)
        expert_of_row = torch.repeat_interleave(torch.arange(len(widest.counts), device=xb.device), widest.counts)
        row_scores = scores[widest.perm, expert_of_row]
        for j, t in enumerate(thresholds):
            keep = row_scores > t  # the same float32 comparison the route kernel makes
            r = ops.route(scores, t, top_k)
            acc = ops.combine(logp, logv[keep], r.perm, r.sample_offsets, r.sample_rows)
            correct[j] += int((torch.log_softmax(acc, 1).argmax(1) == yb).sum())
            routed[j] += r.perm.numel()
    n = max(len(x), 1)
    return [
        {"test_threshold": t, "accuracy": correct[j] / n, "experts_per_sample": routed[j] / n}
        for j, t in enumerate(thresholds)
    ]


def write_csv(path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(path, rows: list[dict], switch_accuracy: float, title: str = "") -> None:
    """Accuracy over dataset thresholds (rows) x test thresholds (columns), as the paper's Figures 2-3."""
    plt = _pyplot()
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_lines(path, rows: list[dict], switch_accuracy: float, title: str = "") -> None:
    """Accuracy over test thresholds, one line per dataset threshold, switch-only baseline dashed (Figure 4)."""
    plt = _pyplot()
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
