"""Accuracy over test thresholds (and dataset thresholds) without re-running networks per threshold.

One pass routes at the lowest test threshold and runs every specialist once on every sample it could
ever see; each threshold keeps the rows whose score still exceeds it (a stable filter of the widest
routing's sample view is that threshold's sample view), and one combine call sums all thresholds.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm import tqdm

from ..engine import stages
from ..engine.module import MetaNeuralNetwork
from ..engine.routing import check_threshold

__all__ = ["sweep_test_thresholds", "log_softmax_argmax", "DEFAULT_TEST_THRESHOLDS"]

DEFAULT_TEST_THRESHOLDS = [round(0.05 * i, 2) for i in range(21)]  # 0.00, 0.05, ..., 1.00


@torch.no_grad()
def sweep_test_thresholds(mnn: MetaNeuralNetwork, x: Tensor, y: Tensor, thresholds, batch_size: int = 1024) -> list[dict]:
    """Per threshold ``t``: ``{"test_threshold", "accuracy", "experts_per_sample"}`` of ``mnn`` at ``t``.

    ``x: Tensor[n, ...]``, ``y: Tensor[n] int64``. Each specialist runs once per batch, not once per
    threshold; outputs equal ``mnn`` evaluated at each threshold (up to the specialists' own
    batch-size-dependent rounding, since they see a larger batch).
    """
    if mnn.switch_fn is not None:
        raise ValueError("mnn: its switch_fn replaces the threshold rule, so a test-threshold sweep does not "
                         "apply; expected a module routing by threshold (switch_fn=None)")
    thresholds = [check_threshold(t) for t in thresholds]
    if not thresholds:
        raise ValueError("thresholds is empty; expected at least one test threshold in [0, 1]")
    thr = torch.tensor(thresholds, dtype=torch.float32)
    correct = torch.zeros(len(thresholds), dtype=torch.long)
    routed = torch.zeros(len(thresholds), dtype=torch.long)
    ops = mnn.ops
    for start in tqdm(range(0, len(x), batch_size), desc="sweep", leave=False, disable=len(x) <= batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        logp, scores = mnn.switch_scores(xb)
        widest = stages.route_batch(scores, ops, min(thresholds), mnn.top_k)
        logv = mnn.contributions(stages.gather_rows(xb, widest.perm, ops), widest, logp.shape[1])
        pred, kept = _predictions_per_threshold(ops, logp, logv, scores, widest, thr.to(logp.device))
        correct += (pred == yb.to(pred.device)).sum(1).cpu()
        routed += kept.sum(1).cpu()
    n = max(len(x), 1)
    return [
        {"test_threshold": t, "accuracy": int(correct[j]) / n, "experts_per_sample": int(routed[j]) / n}
        for j, t in enumerate(thresholds)
    ]


def log_softmax_argmax(acc: Tensor, log_softmax_rows=None) -> Tensor:
    """``log_softmax_rows(acc).argmax(1)`` (``Tensor[n] int64`` from ``acc: Tensor[n, C] float32``),
    bitwise, without a log-softmax of every row. ``log_softmax_rows``: the backend's op (the module's
    final step, ``Backend.log_softmax_rows``); ``None`` = ``torch.log_softmax``.

    log_softmax subtracts one constant per row, a monotone map, so its argmax is ``acc``'s argmax unless
    rounding ties the maximum with an earlier class (possible only within a few ulps of ``|max|`` plus
    ``log C``), or the row is not finite (a NaN row argmaxes to 0). Such rows -- rare -- take the exact
    path. On small C the full log_softmax is the most expensive op of a 21-threshold sweep.
    """
    if acc.numel() == 0:
        return acc.new_empty(acc.shape[0], dtype=torch.long)
    pred = acc.argmax(1)
    top = acc.gather(1, pred[:, None])
    slack = 1e-5 * (top.abs() + math.log(acc.shape[1]) + 1)  # ~100 ulps of the largest term
    # A row with a NaN or an infinity has a non-finite sum (so does one that overflows: harmless).
    unsure = ((acc >= top - slack).sum(1) > 1) | ~torch.isfinite(acc.sum(1))
    rows = unsure.nonzero().squeeze(1)
    if rows.numel():
        unsure_rows = acc.index_select(0, rows)
        exact = log_softmax_rows(unsure_rows) if log_softmax_rows is not None else torch.log_softmax(unsure_rows, 1)
        pred[rows] = exact.argmax(1)
    return pred


def _predictions_per_threshold(ops, logp: Tensor, logv: Tensor, scores: Tensor, widest, thr: Tensor):
    """``(pred, kept)``, both ``Tensor[T, B] int64``: the module's predicted class and number of
    routed rows for each threshold and sample, from the widest routing's buffer ``logv``.

    Row sets shrink as ``t`` grows (the rows whose score exceeds ``t``, a stable filter of the widest
    sample view: the same rows, in the same expert order, as ``route(t)`` gives), so a sample's set
    at ``t_j`` differs from its set at ``t_{j-1}`` exactly when its row count does (the two sets are
    nested, sorted thresholds or not). One combine sums only those new (threshold, sample) sets -- a
    "virtual sample" each -- and every threshold reads the prediction of its latest new set. Each
    sum is bitwise the one the module computes at ``t``.

    Samples are laid out as a padded grid ``[B, L]`` of their view rows' scores (``L`` = most rows
    of any sample), so the work is ``O(B L log L + T B + V L)`` for ``V`` new sets rather than
    ``O(T R)`` over all ``R`` view rows at every threshold.
    """
    T, B = thr.numel(), logp.shape[0]
    E, device = len(widest.counts), logp.device
    per_sample = widest.sample_offsets.diff()
    L = int(per_sample.max()) if B else 0
    expert_of_row = torch.repeat_interleave(torch.arange(E, device=device), widest.counts)
    row_scores = scores.reshape(-1).index_select(0, widest.perm * E + expert_of_row)  # Tensor[N]
    # grid[i, l] = view position of sample i's l-th row (expert order); padding -> score -inf.
    lane = torch.arange(L, device=device)
    grid = widest.sample_offsets[:-1, None] + lane
    real = lane < per_sample[:, None]
    grid = torch.where(real, grid, 0)
    view_scores = row_scores.index_select(0, widest.sample_rows)
    grid_scores = torch.where(real, view_scores[grid], -math.inf)  # Tensor[B, L]
    # kept[j, i] = #{l : grid_scores[i, l] > t_j}: a binary search in each sample's sorted scores.
    ascending = grid_scores.sort(1).values.contiguous()
    kept = (L - torch.searchsorted(ascending, thr.expand(B, T).contiguous(), right=True)).t()  # Tensor[T, B]

    new = torch.ones(T, B, dtype=torch.bool, device=device)
    new[1:] = kept[1:] != kept[:-1]
    at = new.nonzero()  # Tensor[V, 2]: (threshold, sample) of each new set, row-major
    thr_of_set, sample_of_set = at[:, 0], at[:, 1]
    # Padding scores -inf never exceed a threshold (all are in [0, 1]), so they are never members.
    member = grid_scores.index_select(0, sample_of_set) > thr.index_select(0, thr_of_set)[:, None]  # Tensor[V, L]
    rows = widest.sample_rows.index_select(0, grid.index_select(0, sample_of_set)[member])
    sizes = member.sum(1)
    offsets = torch.zeros(at.shape[0] + 1, dtype=torch.long, device=device)
    torch.cumsum(sizes, 0, out=offsets[1:])
    # combine's contract (every backend checks it) is one logv row per sample_rows entry, each
    # owned by the sample perm names; a row shared by several sets is copied once per set.
    owner = torch.repeat_interleave(torch.arange(at.shape[0], device=device), sizes, output_size=rows.numel())
    acc = ops.combine(logp.index_select(0, sample_of_set), logv.index_select(0, rows), owner, offsets,
                      torch.arange(rows.numel(), device=device))
    pred_new = log_softmax_argmax(acc, ops.log_softmax_rows)
    # Each (j, i) reads the latest new set of column i at or before j: positions of new sets grow in
    # row-major order, so a running max down each column finds it (row 0 is always new).
    position = torch.cumsum(new.reshape(-1), 0).sub_(1).view(T, B)
    latest = torch.cummax(torch.where(new, position, -1), 0).values
    return pred_new[latest], kept
