"""The ``torch`` backend: every routing op in vectorised PyTorch (sort / nonzero / cumsum).

What a careful PyTorch user writes without custom kernels: the baseline the kernels are measured
against, and the backend that runs where no kernel does. Builds a ``[B, E]`` mask (O(B·E) memory);
bitwise equal to the kernels and to the naive loop (tests/engine/test_torch_ops.py).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .alignment import as_fresh_aligned
from .routing import Routing

__all__ = ["topk_mask", "active_mask_torch", "group_scores_torch", "route_torch", "gather_torch", "combine_torch",
           "segment_linear_torch", "segment_linear_grouped_mm"]


def topk_mask(scores: Tensor, top_k: int) -> Tensor:
    """``Tensor[B, E] bool``: the ``top_k`` largest per row, ties to the lower index, NaN ranked as -inf."""
    key = torch.where(torch.isnan(scores), torch.full_like(scores, -math.inf), scores)
    # A stable descending sort keeps equal keys in index order, which is the tie rule.
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :top_k]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(1, order, True)


def active_mask_torch(scores: Tensor, threshold: float | None, top_k: int | None) -> Tensor:
    """Switch function (the switch function, docs/how-it-works.md) as a ``Tensor[B, E] bool`` mask; NaN scores are never active."""
    active = ~torch.isnan(scores)
    if threshold is not None:
        active &= scores > threshold
    if top_k:
        active &= topk_mask(scores, top_k)
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


def segment_linear_torch(x: Tensor, weight: Tensor, bias: Tensor | None, offsets: Tensor,
                         parallel_segments: bool = False) -> Tensor:
    """``Tensor[N, M]``: rows ``offsets[e]:offsets[e+1]`` of ``x: Tensor[N, K]`` times ``weight[e]^T``
    (``weight: Tensor[E, M, K]``) plus ``bias[e]`` (``Tensor[E, M]``), one ``addmm`` per segment.

    The C++ op's semantics in a Python loop (``parallel_segments`` is accepted and ignored: segments
    run one after another). Operands go through fresh tensors, as ``nn.Linear`` on ``x[idx]`` sees them.
    """
    _check_segment_linear(x, weight, bias, offsets)
    bounds = offsets.tolist()
    out = x.new_empty(x.shape[0], weight.shape[1])
    for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if b > a:
            rows, w_t = x[a:b].clone(), as_fresh_aligned(weight[e]).t()
            out[a:b] = torch.addmm(bias[e], rows, w_t) if bias is not None else rows @ w_t
    return out


def segment_linear_grouped_mm(x: Tensor, weight: Tensor, bias: Tensor | None, offsets: Tensor,
                              parallel_segments: bool = False) -> Tensor:
    """``segment_linear`` (shapes as :func:`segment_linear_torch`) by PyTorch's grouped GEMM,
    ``F.grouped_mm``, the bias added per row afterwards (it takes none itself).

    No host read of the counts: the group ends go to it as an int32 device tensor and the bias rows
    are repeated to the known ``N``. Rounding: the GEMM's output is rounded to ``x.dtype`` before
    the bias is added (``nn.Linear`` adds it first), so for bfloat16 one more rounding step.
    ``K`` and ``M`` must keep 16-byte strides (multiples of 8 for 16-bit types, 4 for float32).
    ``offsets`` are trusted (the routing's): reading them to check would be a host sync on a GPU.
    """
    _check_segment_linear(x, weight, bias, offsets, read_offsets=False)
    out = torch.nn.functional.grouped_mm(x, weight.transpose(1, 2), offs=offsets[1:].to(torch.int32))
    if bias is None:
        return out
    return out + torch.repeat_interleave(bias, offsets.diff(), dim=0, output_size=x.shape[0])


def _check_segment_linear(x: Tensor, weight: Tensor, bias: Tensor | None, offsets: Tensor,
                          read_offsets: bool = True) -> None:
    """The C++ kernel's checks, with its exception types (TypeError for dtypes, ValueError otherwise);
    ``read_offsets=False`` checks shapes and dtypes only (reading the values is a host sync on a GPU)."""
    op = "segment_linear"
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be a 2-D tensor [N, K], got shape {tuple(x.shape)}")
    if weight.dim() != 3:
        raise ValueError(f"{op}: weight must be a 3-D tensor [E, M, K], got shape {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if offsets.dim() != 1 or offsets.dtype != torch.long:
        raise (TypeError if offsets.dim() == 1 else ValueError)(
            f"{op}: offsets must be a 1-D int64 tensor, got {offsets.dtype} of shape {tuple(offsets.shape)}")
    experts, _, k = weight.shape
    if x.shape[1] != k:
        raise ValueError(f"{op}: x has {x.shape[1]} features but weight expects K = {k}")
    if offsets.numel() != experts + 1:
        raise ValueError(f"{op}: offsets must have E + 1 = {experts + 1} entries, got {offsets.numel()}")
    if bias is not None and (bias.dim() != 2 or tuple(bias.shape) != tuple(weight.shape[:2])):
        raise ValueError(f"{op}: bias must be a 2-D tensor [E, M] = {list(weight.shape[:2])}, got {tuple(bias.shape)}")
    if not read_offsets:
        return
    bounds = offsets.tolist()
    if bounds[0] != 0 or bounds[-1] != x.shape[0]:
        raise ValueError(f"{op}: offsets must run from 0 to N = {x.shape[0]}, got {bounds[0]} .. {bounds[-1]}")
    if any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"{op}: offsets must be non-decreasing, got {bounds}")
