"""combine: ``acc[i] = ((logp[i] + logv[r0]) + logv[r1]) + ...`` over sample ``i``'s rows, in order.

Algorithm: one program per (block of samples x block of classes); step ``j`` adds row
``sample_rows[sample_offsets[i] + j]`` to every sample that has a ``j``-th row (a select keeps the
others untouched), so each output element is a strict left-to-right float32 sum, written once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import _block_start, _define_op, _is_interpreted, _max
from .gather import triton_gather


@triton.jit
def _combine_kernel(
    logp_ptr, logv_ptr, sample_offsets_ptr, sample_rows_ptr, out_ptr, B, C,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``logp, out: [B, C] f32``, ``logv: [N, C] f32``, ``sample_offsets: [B+1] i64``, ``sample_rows: [N] i64``.

    Grid ``(cdiv(B, BLOCK_B), cdiv(C, BLOCK_C))``.
    """
    # int64 index math (_block_start): B * C and N * C can pass 2**31. rows, start and the loaded
    # row indices r are int64, so every row offset (rows * C, r * C) is an int64 product.
    rows = _block_start(tl.program_id(0), BLOCK_B) + tl.arange(0, BLOCK_B)
    cols = _block_start(tl.program_id(1), BLOCK_C) + tl.arange(0, BLOCK_C)
    row_mask = rows < B
    col_mask = cols < C
    mask = row_mask[:, None] & col_mask[None, :]
    start = tl.load(sample_offsets_ptr + rows, mask=row_mask, other=0)
    count = tl.load(sample_offsets_ptr + rows + 1, mask=row_mask, other=0) - start
    acc = tl.load(logp_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0)
    for j in range(0, tl.reduce(count, 0, _max)):
        has = j < count
        r = tl.load(sample_rows_ptr + start + j, mask=has, other=0)
        v = tl.load(logv_ptr + r[:, None] * C + cols[None, :], mask=has[:, None] & col_mask[None, :], other=0.0)
        # Select instead of adding 0.0: x + 0.0 turns -0.0 into +0.0.
        acc = tl.where(has[:, None], acc + v, acc)
    tl.store(out_ptr + rows[:, None] * C + cols[None, :], acc, mask=mask)


_INTERPRETED = _is_interpreted(_combine_kernel)
# Under the interpreter every tl op is a numpy call plus Python overhead: fewer, bigger tiles.
# On a GPU, 8 elements a thread (an accumulator and a 64-bit row pointer each) use ~80 registers.
_MAX_BLOCK_C = 1024 if _INTERPRETED else 128
_TILE = 65536 if _INTERPRETED else 1024


def _combine_config(C: int) -> dict:
    block_c = min(triton.next_power_of_2(max(C, 1)), _MAX_BLOCK_C)
    return {"BLOCK_B": max(1, _TILE // block_c), "BLOCK_C": block_c}


def _check(logp: Tensor, logv: Tensor, perm: Tensor, sample_offsets: Tensor, sample_rows: Tensor) -> None:
    torch._check(logp.dim() == 2 and logp.dtype == torch.float32, lambda: "triton_combine: logp must be [B, C] float32")
    torch._check(
        logv.dim() == 2 and logv.dtype == torch.float32 and logv.shape[1] == logp.shape[1],
        lambda: "triton_combine: logv must be [N, C] float32",
    )
    torch._check(sample_offsets.dtype == torch.int64 and sample_rows.dtype == torch.int64, lambda: "triton_combine: int64 routing")
    torch._check(sample_offsets.shape[0] == logp.shape[0] + 1, lambda: "triton_combine: sample_offsets must be [B+1]")


def _combine_fake(logp: Tensor, logv: Tensor, perm: Tensor, sample_offsets: Tensor, sample_rows: Tensor) -> Tensor:
    _check(logp, logv, perm, sample_offsets, sample_rows)
    return torch.empty_like(logp, memory_format=torch.contiguous_format)


def _combine(logp: Tensor, logv: Tensor, perm: Tensor, sample_offsets: Tensor, sample_rows: Tensor) -> Tensor:
    """``logp: [B, C] f32``, ``logv: [N, C] f32``, routing from ``triton_route`` -> ``acc: [B, C] f32``."""
    _check(logp, logv, perm, sample_offsets, sample_rows)
    logp = logp.contiguous()
    logv = logv.contiguous()
    sample_offsets = sample_offsets.contiguous()
    sample_rows = sample_rows.contiguous()
    b, c = logp.shape
    out = torch.empty_like(logp)
    if b == 0 or c == 0:
        return out
    cfg = _combine_config(c)
    grid = (triton.cdiv(b, cfg["BLOCK_B"]), triton.cdiv(c, cfg["BLOCK_C"]))
    wrap_triton(_combine_kernel)[grid](logp, logv, sample_offsets, sample_rows, out, b, c, **cfg)
    return out


triton_combine = _define_op("mnn_fast::triton_combine", _combine, _combine_fake, [_combine_kernel])


def _combine_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[2])


def _combine_backward(ctx, grad: Tensor):
    (perm,) = ctx.saved_tensors
    # acc is linear in logp and in each routed row: row r of logv feeds sample perm[r] only.
    return grad, triton_gather(grad, perm), None, None, None


triton_combine.register_autograd(_combine_backward, setup_context=_combine_setup_context)
