"""References only: the paper's naive loop that every backend and executor is tested against.

Per expert, in increasing order: boolean mask -> index (a fresh ``x[idx]``) -> run -> add its
contribution. Nothing in the engine imports this module, so editing it never changes the fast path.
The switch's log-probabilities and probabilities, each row's contribution and the final log_softmax
use the engine's row ops (``softmax_rows``; ``contributions`` on that expert's rows alone;
``log_softmax_rows``: rowmath's arithmetic), as the equivalence rules of docs/how-it-works.md allows; that arithmetic is itself
tested against the section 4 formula in plain torch.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .engine.backends import get_backend, select_backend
from .engine.contributions import expert_log_contribution
from .engine.rowmath import log_spread_table
from .engine.routing import Routing

__all__ = ["naive_forward", "naive_route", "active_mask", "group_score_loop", "expert_log_contribution",
           "user_loop_forward"]


def _default_groups(num_experts: int) -> list[list[int]]:
    return [[e] for e in range(num_experts)]


def active_mask(scores: Tensor, threshold: float | None, top_k: int | None) -> Tensor:
    """the switch function, docs/how-it-works.md as a ``Tensor[B, E] bool`` mask: ``s > threshold`` and among the row's ``top_k``
    largest (ties to the lower index; NaN ranks below every number and is never active)."""
    active = ~torch.isnan(scores)
    if threshold is not None:
        active &= scores > threshold
    if top_k:
        key = torch.where(torch.isnan(scores), torch.full_like(scores, -math.inf), scores)
        # A stable descending sort keeps equal keys in index order, which is the tie rule.
        order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :top_k]
        active &= torch.zeros_like(active).scatter_(1, order, True)
    return active


def naive_route(probs: Tensor, groups=None, threshold: float | None = 0.25, top_k: int | None = None) -> Routing:
    """The routing the naive loop performs, built one expert at a time from boolean masks."""
    groups = _default_groups(probs.shape[1]) if groups is None else [list(g) for g in groups]
    scores = torch.stack([group_score_loop(probs, g) for g in groups], dim=1) if groups else probs[:, :0]
    return _routing_from_mask(active_mask(scores, threshold, top_k))


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


def group_score_loop(probs: Tensor, group: Sequence[int]) -> Tensor:
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
    ops = get_backend(select_backend("auto", z.device)[0])
    logp, probs = ops.softmax_rows(z)
    num_classes = z.shape[1]
    groups = _default_groups(len(specialists)) if groups is None else [list(g) for g in groups]
    acc = logp.clone()
    scores = torch.stack([group_score_loop(probs, g) for g in groups], 1)
    active = switch_fn(scores) if switch_fn is not None else active_mask(scores, threshold, top_k)
    spread = log_spread_table(torch.tensor([0] + [len(g) for g in groups]).cumsum(0), num_classes).to(z.device)
    for e, (expert, group) in enumerate(zip(specialists, groups)):
        idx = active[:, e].nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        y = expert(x[idx]).float()
        # One expert's rows alone: offsets [0, n], its group as a one-group table.
        one_expert = torch.tensor([[0, idx.numel()], [0, len(group)]], device=z.device)
        logv = ops.contributions(y, one_expert[0], one_expert[1], torch.tensor(group, device=z.device),
                                 spread[e : e + 1], num_classes)
        acc[idx] = acc[idx] + logv
    out = ops.log_softmax_rows(acc)
    if return_routing:
        return out, _routing_from_mask(active)
    return out



@torch.no_grad()
def user_loop_forward(switch: nn.Module, specialists: Sequence[nn.Module], x: Tensor, groups=None,
                      threshold: float = 0.25) -> Tensor:
    """The loop a user writes in plain PyTorch: ``Tensor[B, C] float32`` log-probabilities.

    The paper's formula with ``torch.log_softmax`` and ``torch.logsumexp``, one boolean mask per
    expert, experts in increasing order. It is what speed is measured against; it is *not* bitwise
    equal to :func:`naive_forward` (torch's own exp and log, summed in torch's order), but agrees with
    it to float32 rounding (~1e-6) and in every argmax.
    """
    z = switch(x).float()
    logp = torch.log_softmax(z, dim=1)
    probs = torch.softmax(z, dim=1)
    num_classes = z.shape[1]
    groups = _default_groups(len(specialists)) if groups is None else [list(g) for g in groups]
    acc = logp.clone()
    for expert, group in zip(specialists, groups):
        score = probs[:, group].sum(dim=1)
        mask = score > threshold
        if not mask.any():
            continue
        y = expert(x[mask]).float()
        inside = torch.zeros(num_classes, dtype=torch.bool, device=z.device)
        inside[group] = True
        if y.shape[1] == 1 and num_classes != 1:  # a binary specialist: q = sigmoid(y)
            log_q, log_not_q = torch.nn.functional.logsigmoid(y), torch.nn.functional.logsigmoid(-y)
            logv = log_q.expand(-1, num_classes)
        else:
            logv = torch.log_softmax(y, dim=1)
            log_not_q = torch.logsumexp(logv[:, ~inside], dim=1, keepdim=True)
        spread = log_not_q - math.log(num_classes - len(group)) if num_classes > len(group) else log_not_q
        acc[mask] += torch.where(inside, logv, spread)
    return torch.log_softmax(acc, dim=1)
