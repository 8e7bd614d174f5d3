"""group_scores: ``scores[i, e] = probs[i, g0] + probs[i, g1] + ...`` over expert ``e``'s group.

Algorithm: one program per (block of samples x block of experts); it starts from each group's first
member and loops over member positions ``j``, adding ``probs[:, g_j]`` to the groups that have one
(a select keeps the others), so each score is a strict left-to-right float32 sum, written once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import _block_start, _define_op, _is_interpreted, _max


@triton.jit
def _group_scores_kernel(
    probs_ptr, group_offsets_ptr, group_classes_ptr, out_ptr, B, C, E,
    BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """``probs: [B, C] f32``, ``group_offsets: [E+1] i64``, ``group_classes: [M] i64``, ``out: [B, E] f32``.

    Grid ``(cdiv(B, BLOCK_B), cdiv(E, BLOCK_E))``.
    """
    # int64 index math (_block_start): B * C and B * E can pass 2**31. rows is int64, so every row
    # offset (rows * C, rows * E) is an int64 product.
    rows = _block_start(tl.program_id(0), BLOCK_B) + tl.arange(0, BLOCK_B)
    experts = _block_start(tl.program_id(1), BLOCK_E) + tl.arange(0, BLOCK_E)
    row_mask = rows < B
    expert_mask = experts < E
    mask = row_mask[:, None] & expert_mask[None, :]
    start = tl.load(group_offsets_ptr + experts, mask=expert_mask, other=0)
    size = tl.load(group_offsets_ptr + experts + 1, mask=expert_mask, other=0) - start
    row_base = probs_ptr + rows[:, None] * C
    first = tl.load(group_classes_ptr + start, mask=expert_mask, other=0)
    # Start from the first member, not 0.0: 0.0 + p would turn -0.0 into +0.0.
    acc = tl.load(row_base + first[None, :], mask=mask, other=0.0)
    for j in range(1, tl.reduce(size, 0, _max)):
        has = j < size
        cls = tl.load(group_classes_ptr + start + j, mask=has, other=0)
        p = tl.load(row_base + cls[None, :], mask=row_mask[:, None] & has[None, :], other=0.0)
        acc = tl.where(has[None, :], acc + p, acc)
    tl.store(out_ptr + rows[:, None] * E + experts[None, :], acc, mask=mask)


_INTERPRETED = _is_interpreted(_group_scores_kernel)
# Under the interpreter every tl op is a numpy call plus Python overhead: fewer, bigger tiles.
# On a GPU the per-member gathers are scattered: a small tile (~64 registers) keeps many in flight.
_MAX_BLOCK_E = 1024 if _INTERPRETED else 32
_TILE = 65536 if _INTERPRETED else 1024


def _group_scores_config(E: int) -> dict:
    block_e = min(triton.next_power_of_2(max(E, 1)), _MAX_BLOCK_E)
    return {"BLOCK_B": max(1, _TILE // block_e), "BLOCK_E": block_e}


def _check(probs: Tensor, group_offsets: Tensor, group_classes: Tensor) -> None:
    torch._check(probs.dim() == 2 and probs.dtype == torch.float32, lambda: "triton_group_scores: probs must be [B, C] float32")
    torch._check(
        group_offsets.dim() == 1 and group_offsets.shape[0] >= 1 and group_offsets.dtype == torch.int64,
        lambda: "triton_group_scores: group_offsets must be [E+1] int64",
    )
    torch._check(group_classes.dtype == torch.int64, lambda: "triton_group_scores: group_classes must be int64")


def _group_scores_fake(probs: Tensor, group_offsets: Tensor, group_classes: Tensor) -> Tensor:
    _check(probs, group_offsets, group_classes)
    return probs.new_empty(probs.shape[0], group_offsets.shape[0] - 1)


def _group_scores(probs: Tensor, group_offsets: Tensor, group_classes: Tensor) -> Tensor:
    """``probs: [B, C] f32``, CSR groups ``group_offsets: [E+1] i64`` / ``group_classes: [M] i64`` -> ``[B, E] f32``."""
    _check(probs, group_offsets, group_classes)
    probs = probs.contiguous()
    group_offsets = group_offsets.contiguous()
    group_classes = group_classes.contiguous()
    b, c = probs.shape
    e = group_offsets.shape[0] - 1
    out = probs.new_empty(b, e)
    if b == 0 or e == 0:
        return out
    cfg = _group_scores_config(e)
    grid = (triton.cdiv(b, cfg["BLOCK_B"]), triton.cdiv(e, cfg["BLOCK_E"]))
    wrap_triton(_group_scores_kernel)[grid](probs, group_offsets, group_classes, out, b, c, e, **cfg)
    return out


triton_group_scores = _define_op(
    "mnn_fast::triton_group_scores", _group_scores, _group_scores_fake, [_group_scores_kernel]
)
