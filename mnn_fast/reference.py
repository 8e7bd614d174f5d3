"""Pure-PyTorch references: the paper's naive loop and a vectorised version of every routing op.

Naive loop (SPEC section 5): per expert, boolean mask -> index -> run -> add, experts in increasing
order. Vectorised ops (``*_torch``): what a careful PyTorch user writes with sort/nonzero/cumsum.
Every kernel backend is tested bitwise (``torch.equal``) against these on CPU.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "Routing",
    "naive_forward",
    "naive_route",
    "expert_log_contribution",
    "group_scores_torch",
    "active_mask_torch",
    "route_torch",
    "gather_torch",
    "combine_torch",
]


class Routing(NamedTuple):
    """Routing of a batch: expert-major layout plus the sample-major view (SPEC section 3).

    All fields are ``int64`` on the scores' device. ``counts: Tensor[E]``, ``offsets: Tensor[E+1]``,
    ``perm: Tensor[N]`` (buffer row ``r`` holds sample ``perm[r]``), ``sample_offsets: Tensor[B+1]``,
    ``sample_rows: Tensor[N]`` (each sample's buffer rows in increasing expert order).
    """

    counts: Tensor
    offsets: Tensor
    perm: Tensor
    sample_offsets: Tensor
    sample_rows: Tensor


def _default_groups(num_experts: int) -> list[list[int]]:
    return [[e] for e in range(num_experts)]


def _topk_mask(scores: Tensor, top_k: int) -> Tensor:
    """``Tensor[B, E] bool``: the ``top_k`` largest per row, ties to the lower index, NaN ranked as -inf."""
    key = torch.where(torch.isnan(scores), torch.full_like(scores, -math.inf), scores)
    # A stable descending sort keeps equal keys in index order, which is the tie rule.
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :top_k]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(1, order, True)


def active_mask_torch(scores: Tensor, threshold: float | None, top_k: int | None) -> Tensor:
    """Switch function (SPEC section 2) as a ``Tensor[B, E] bool`` mask; NaN scores are never active."""
    active = ~torch.isnan(scores)
    if threshold is not None:
        active &= scores > threshold
    if top_k:
        active &= _topk_mask(scores, top_k)
    return active


def group_scores_torch(probs: Tensor, group_offsets: Tensor, group_classes: Tensor) -> Tensor:
    """``Tensor[B, E] float32``: each group's probabilities summed in listed order, left to right."""
    offs = group_offsets.tolist()
    sizes = [b - a for a, b in zip(offs[:-1], offs[1:])]
    num_experts = len(sizes)
    if num_experts == 0:
        return probs.new_zeros(probs.shape[0], 0)
    picked = probs.index_select(1, group_classes)  # [B, M]
    # Column j of the result sums the j-th member of every group; adding member columns one
    # position at a time keeps each group's left-to-right order while staying vectorised.
    first = torch.tensor(offs[:-1], dtype=torch.long, device=probs.device)
    scores = picked.index_select(1, first).clone()
    sizes_t = torch.tensor(sizes, dtype=torch.long, device=probs.device)
    for j in range(1, max(sizes)):
        has = (sizes_t > j).nonzero().squeeze(1)
        cols = first.index_select(0, has) + j
        scores[:, has] = scores[:, has] + picked.index_select(1, cols)
    return scores


def route_torch(scores: Tensor, threshold: float | None = 0.25, top_k: int | None = None) -> Routing:
    """Vectorised routing of ``scores: Tensor[B, E] float32`` (builds a ``[B, E]`` mask: the baseline)."""
    active = active_mask_torch(scores, threshold, top_k)
    counts = active.sum(0)
    offsets = torch.zeros(scores.shape[1] + 1, dtype=torch.long, device=scores.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    # nonzero walks row-major, so the transposed mask yields (expert, sample) pairs sorted by
    # expert then sample: exactly the stable expert-major order.
    perm = active.t().nonzero()[:, 1].contiguous()
    per_sample = active.sum(1)
    sample_offsets = torch.zeros(scores.shape[0] + 1, dtype=torch.long, device=scores.device)
    torch.cumsum(per_sample, 0, out=sample_offsets[1:])
    within_expert = active.long().cumsum(0) - 1  # position of sample i inside R_e
    pairs = active.nonzero()  # (sample, expert), sample-major with experts increasing
    sample_rows = offsets[pairs[:, 1]] + within_expert[pairs[:, 0], pairs[:, 1]]
    return Routing(counts, offsets, perm, sample_offsets, sample_rows.contiguous())


def gather_torch(x: Tensor, perm: Tensor) -> Tensor:
    """``Tensor[N, D]``: rows of ``x: Tensor[B, D]`` in ``perm`` order, one contiguous buffer."""
    return x.index_select(0, perm)


def combine_torch(logp: Tensor, logv: Tensor, perm: Tensor, sample_offsets: Tensor, sample_rows: Tensor) -> Tensor:
    """``acc: Tensor[B, C] float32`` = ``logp`` plus each sample's expert rows, in increasing expert order."""
    acc = logp.clone()
    per_sample = sample_offsets[1:] - sample_offsets[:-1]
    if sample_rows.numel() == 0:
        return acc
    # The j-th add of every sample happens in step j, so each sample's adds stay in expert order.
    start = sample_offsets[:-1]
    for j in range(int(per_sample.max())):
        who = (per_sample > j).nonzero().squeeze(1)
        rows = sample_rows.index_select(0, start.index_select(0, who) + j)
        acc[who] = acc[who] + logv.index_select(0, rows)
    return acc


def expert_log_contribution(
    y: Tensor,
    group: Sequence[int],
    num_classes: int,
    group_idx: Tensor | None = None,
    outside_idx: Tensor | None = None,
) -> Tensor:
    """``log v_e: Tensor[n, C] float32`` from specialist logits ``y: Tensor[n, C]`` or ``Tensor[n, 1]``.

    SPEC section 4: classes in the group keep the specialist's log-probabilities (width ``C``) or
    ``log q`` (width 1, a binary specialist); the rest share ``log(1 - q)`` evenly. ``group_idx`` /
    ``outside_idx`` (``Tensor[|G|]`` / ``Tensor[C-|G|]`` int64) may be passed precomputed.
    """
    y = y.float()
    if group_idx is None:
        group_idx = torch.as_tensor(list(group), dtype=torch.long, device=y.device)
    rest = num_classes - len(group)
    if y.shape[1] == 1:
        in_group = nn.functional.logsigmoid(y)
        log_not_q = nn.functional.logsigmoid(-y)
    else:
        ls = torch.log_softmax(y, dim=1)
        in_group = ls.index_select(1, group_idx)
        if outside_idx is None:
            outside = torch.ones(num_classes, dtype=torch.bool, device=y.device)
            outside[group_idx] = False
            outside_idx = outside.nonzero().squeeze(1)
        log_not_q = _logsumexp_rows(ls.index_select(1, outside_idx)) if rest else None
    if rest:
        out = (log_not_q - math.log(rest)).expand(y.shape[0], num_classes).clone()
    else:
        out = y.new_empty(y.shape[0], num_classes, dtype=torch.float32)
    out[:, group_idx] = in_group
    return out


def _logsumexp_rows(a: Tensor) -> Tensor:
    """``torch.logsumexp(a, 1, keepdim=True)`` spelt out as ATen's CPU kernel computes it.

    Written out because the library version's empty-input branch cannot be traced when the row
    count is data-dependent (as it is per expert under ``torch.compile``).
    """
    maxes = torch.amax(a, dim=1, keepdim=True)
    maxes = maxes.masked_fill(maxes.abs() == math.inf, 0.0)
    return torch.sum(torch.exp(a - maxes), dim=1, keepdim=True).log().add(maxes)


def naive_route(probs: Tensor, groups=None, threshold: float | None = 0.25, top_k: int | None = None) -> Routing:
    """The routing the naive loop performs, built one expert at a time from boolean masks."""
    groups = _default_groups(probs.shape[1]) if groups is None else [list(g) for g in groups]
    scores = torch.stack([_score_loop(probs, g) for g in groups], dim=1) if groups else probs[:, :0]
    return _routing_from_mask(active_mask_torch(scores, threshold, top_k))


def _routing_from_mask(active: Tensor) -> Routing:
    idx = [active[:, e].nonzero().squeeze(1) for e in range(active.shape[1])]
    counts = torch.tensor([len(i) for i in idx], dtype=torch.long, device=active.device)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    perm = torch.cat(idx) if idx else counts.new_zeros(0)
    # A sample's rows appear in the expert-major buffer in increasing expert order, so a stable
    # sort of the buffer by sample id lists each sample's rows in the order the combine adds them.
    sample_rows = torch.sort(perm, stable=True).indices
    sizes = active.sum(1)
    sample_offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
    return Routing(counts, offsets, perm, sample_offsets, sample_rows)


def _score_loop(probs: Tensor, group: Sequence[int]) -> Tensor:
    s = probs[:, group[0]].clone()
    for c in group[1:]:
        s = s + probs[:, c]
    return s


@torch.no_grad()
def naive_forward(
    switch: nn.Module,
    specialists: Sequence[nn.Module],
    x: Tensor,
    groups=None,
    threshold: float | None = 0.25,
    top_k: int | None = None,
    return_routing: bool = False,
    switch_fn=None,
):
    """The paper's algorithm as a plain loop: ``Tensor[B, C] float32`` log-probabilities.

    For each expert in increasing order: mask the samples it is active for, run it on them, add its
    contribution ``log v_e`` to their accumulator. ``return_routing=True`` also returns the
    :class:`Routing` the loop used (for equivalence tests). ``switch_fn(scores) -> Tensor[B, E] bool``
    replaces the threshold/top-k rule.
    """
    z = switch(x).float()
    logp = torch.log_softmax(z, dim=1)
    probs = torch.softmax(z, dim=1)
    num_classes = z.shape[1]
    groups = _default_groups(len(specialists)) if groups is None else [list(g) for g in groups]
    acc = logp.clone()
    scores = torch.stack([_score_loop(probs, g) for g in groups], 1)
    active = switch_fn(scores) if switch_fn is not None else active_mask_torch(scores, threshold, top_k)
    for e, (expert, group) in enumerate(zip(specialists, groups)):
        idx = active[:, e].nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        y = expert(x[idx])
        acc[idx] = acc[idx] + expert_log_contribution(y, group, num_classes)
    out = torch.log_softmax(acc, dim=1)
    if return_routing:
        return out, _routing_from_mask(active)
    return out
