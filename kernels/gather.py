"""gather: ``out[r] = x[perm[r]]``, the expert-major input buffer.

Algorithm: a 2-D grid of (rows x columns) tiles; each program loads its ``BLOCK_N`` source indices
once, then copies a ``BLOCK_N x BLOCK_D`` tile. Pure loads/stores: bitwise copy for any dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import _block_start, _define_op, _is_interpreted


@triton.jit
def _gather_kernel(x_ptr, perm_ptr, out_ptr, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """``x: [B, D]``, ``perm: [N] int64``, ``out: [N, D]`` (dtype of ``x``); grid ``(cdiv(N, BLOCK_N), cdiv(D, BLOCK_D))``."""
    # int64 index math (_block_start): N * D and B * D can pass 2**31. rows and src are int64, so
    # every row offset (rows * D, src * D) is an int64 product.
    rows = _block_start(tl.program_id(0), BLOCK_N) + tl.arange(0, BLOCK_N)
    cols = _block_start(tl.program_id(1), BLOCK_D) + tl.arange(0, BLOCK_D)
    row_mask = rows < N
    mask = row_mask[:, None] & (cols < D)[None, :]
    src = tl.load(perm_ptr + rows, mask=row_mask, other=0)
    vals = tl.load(x_ptr + src[:, None] * D + cols[None, :], mask=mask)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], vals, mask=mask)


_INTERPRETED = _is_interpreted(_gather_kernel)
# Under the interpreter every tl op is a numpy call plus Python overhead: fewer, bigger tiles.
# On a GPU, 16 elements a thread keep the copy near 50 registers (32 a thread needs 168).
_MAX_BLOCK_D = 1024 if _INTERPRETED else 128
_TILE = 65536 if _INTERPRETED else 2048


def _gather_config(D: int) -> dict:
    block_d = min(triton.next_power_of_2(max(D, 1)), _MAX_BLOCK_D)
    return {"BLOCK_N": max(1, _TILE // block_d), "BLOCK_D": block_d}


def _check(x: Tensor, perm: Tensor) -> None:
    torch._check(x.dim() == 2, lambda: f"triton_gather: x must be [B, D], got {tuple(x.shape)}")
    torch._check(x.dtype.is_floating_point, lambda: f"triton_gather: x must be floating, got {x.dtype}")
    torch._check(perm.dim() == 1 and perm.dtype == torch.int64, lambda: "triton_gather: perm must be [N] int64")


def _gather_fake(x: Tensor, perm: Tensor) -> Tensor:
    _check(x, perm)
    return x.new_empty(perm.shape[0], x.shape[1])


def _gather(x: Tensor, perm: Tensor) -> Tensor:
    """``x: Tensor[B, D]`` (any float dtype), ``perm: Tensor[N] int64`` -> ``Tensor[N, D]`` (dtype of ``x``)."""
    _check(x, perm)
    x = x.contiguous()
    perm = perm.contiguous()
    n, d = perm.shape[0], x.shape[1]
    out = x.new_empty(n, d)
    if n == 0 or d == 0:
        return out
    cfg = _gather_config(d)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(d, cfg["BLOCK_D"]))
    wrap_triton(_gather_kernel)[grid](x, perm, out, n, d, **cfg)
    return out


triton_gather = _define_op("mnn_fast::triton_gather", _gather, _gather_fake, [_gather_kernel])


def _gather_setup_context(ctx, inputs, output) -> None:
    x, perm = inputs
    ctx.save_for_backward(perm)
    ctx.x_shape = x.shape


def _gather_backward(ctx, grad: Tensor):
    (perm,) = ctx.saved_tensors
    # A sample routed to several experts receives the sum of their row gradients.
    grad_x = grad.new_zeros(ctx.x_shape).index_add_(0, perm, grad)
    return grad_x, None


triton_gather.register_autograd(_gather_backward, setup_context=_gather_setup_context)
