"""segment_linear: ``out[r] = x[src(r)] @ weight[e]^T + bias[e]`` for the rows ``r`` of segment ``e``.

Algorithm: per expert ``ceil(count_e / BLOCK_M)`` row tiles, prefix-summed on the device; program
``(p, n)`` finds its (expert, tile) in that table and multiplies its ``BLOCK_M`` rows - read through
``perm`` when given, so the gather is fused into the GEMM - by ``weight[e]``'s ``BLOCK_N`` columns
in ``BLOCK_K`` steps with a float32 accumulator. The grid, ``cdiv(N, BLOCK_M) + E`` row tiles (an
upper bound of the true count), needs no host read of the counts; programs past the last tile exit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import _block_start, _define_op, _is_interpreted

_DOT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _segment_linear_kernel(x_ptr, src_ptr, w_ptr, b_ptr, tile_start_ptr, tile_expert_ptr, offsets_ptr, out_ptr,
                           K, M, E, w_stride, b_stride, HAS_BIAS: tl.constexpr, GATHER: tl.constexpr, IEEE: tl.constexpr,
                           UPCAST: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``x: [B or N, K]``, ``src: [N] int64`` (``GATHER``), ``w: [E, M, K]`` (expert ``e`` at ``e * w_stride``),
    ``b: [E, M]`` (``HAS_BIAS``, expert ``e`` at ``e * b_stride``),
    ``tile_start: [E+1] int64``, ``tile_expert: [grid0] int64``, ``offsets: [E+1] int64``, ``out: [N, M]``
    (dtype of ``x``); grid ``(cdiv(N, BLOCK_M) + E, cdiv(M, BLOCK_N))``. ``UPCAST``: 16-bit operands
    multiplied as float32 (the interpreter of Triton 3.8 returns garbage for a bfloat16 ``tl.dot``)."""
    pid = tl.cast(tl.program_id(0), tl.int64)  # int64 before any arithmetic, as every kernel here
    e = tl.load(tile_expert_ptr + pid)  # E (one past the last expert) for programs beyond the last tile
    first = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    tile = pid - tl.load(tile_start_ptr + e)
    rows = first + _block_start(tile, BLOCK_M) + tl.arange(0, BLOCK_M)
    row_mask = rows < end  # empty for a program past the last tile: offsets[E] == offsets[E + 1] there
    src = tl.load(src_ptr + rows, mask=row_mask, other=0) if GATHER else rows
    cols = _block_start(tl.program_id(1), BLOCK_N) + tl.arange(0, BLOCK_N)
    col_mask = cols < M
    # Past the last tile e == E: read expert E - 1's weights (in bounds) for rows that are all masked.
    e_w = tl.minimum(e, E - 1)
    w_base = _block_start(e_w, w_stride)  # padded stacks (aligned_stack) have w_stride >= M * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(x_ptr + src[:, None] * K + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + w_base + cols[:, None] * K + ks[None, :], mask=col_mask[:, None] & k_mask[None, :],
                    other=0.0)
        if IEEE:
            acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
        elif UPCAST:
            acc = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + _block_start(e_w, b_stride) + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * M + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


_INTERPRETED = _is_interpreted(_segment_linear_kernel)


def _segment_linear_config(K: int, M: int, dtype: torch.dtype) -> dict:
    """Block sizes: 64 x 64 output tiles (16-bit types) or 32 x 64 (float32, twice the bytes per element),
    32-wide K steps; under the interpreter one tile covers a whole small problem (numpy per tile)."""
    if _INTERPRETED:
        return {"BLOCK_M": 64, "BLOCK_N": max(16, triton.next_power_of_2(M)), "BLOCK_K": max(16, triton.next_power_of_2(K))}
    wide = dtype != torch.float32
    return {"BLOCK_M": 64 if wide else 32, "BLOCK_N": 64, "BLOCK_K": 32}


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, offsets: Tensor, perm: Tensor | None) -> None:
    op = "triton_segment_linear"
    torch._check(x.dim() == 2 and weight.dim() == 3,
                 lambda: f"{op}: x must be [B, K] and weight [E, M, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    torch._check(x.dtype in _DOT_DTYPES and weight.dtype == x.dtype,
                 lambda: f"{op}: x and weight must share a dtype of {_DOT_DTYPES}, got {x.dtype} and {weight.dtype}")
    torch._check(weight.shape[2] == x.shape[1], lambda: f"{op}: weight's K {weight.shape[2]} != x's {x.shape[1]}")
    torch._check(offsets.dim() == 1 and offsets.dtype == torch.int64 and offsets.shape[0] == weight.shape[0] + 1,
                 lambda: f"{op}: offsets must be [E+1] int64 with E = {weight.shape[0]}")
    torch._check(bias is None or (bias.shape == weight.shape[:2] and bias.dtype == x.dtype),
                 lambda: f"{op}: bias must be [E, M] of x's dtype")
    torch._check(perm is None or (perm.dim() == 1 and perm.dtype == torch.int64),
                 lambda: f"{op}: perm must be [N] int64")


def _rows(x: Tensor, perm: Tensor | None):
    # Without perm the rows are x's own (N = B); with it, N = len(perm), known without a host read.
    return perm.shape[0] if perm is not None else x.shape[0]


def _segment_linear_fake(x: Tensor, weight: Tensor, bias: Tensor | None, offsets: Tensor,
                         perm: Tensor | None) -> Tensor:
    _check(x, weight, bias, offsets, perm)
    return x.new_empty(_rows(x, perm), weight.shape[1])


def _segment_linear(x: Tensor, weight: Tensor, bias: Tensor | None, offsets: Tensor, perm: Tensor | None) -> Tensor:
    """``Tensor[N, M]`` (dtype of ``x``) from ``x: Tensor[B, K]``, ``weight: Tensor[E, M, K]``, ``bias:
    Tensor[E, M] | None``, ``offsets: Tensor[E+1] int64`` (segment ``e`` is rows ``offsets[e]:offsets[e+1]``)
    and ``perm: Tensor[N] int64 | None`` (row ``r`` reads ``x[perm[r]]``; without it ``x[r]``, N = B).
    float32 accumulates exactly as IEEE products (no TF32); 16-bit types accumulate in float32."""
    _check(x, weight, bias, offsets, perm)
    n, num_experts, m, k = _rows(x, perm), weight.shape[0], weight.shape[1], x.shape[1]
    out = x.new_empty(n, m)
    if n == 0 or m == 0:
        return out
    if k == 0:
        return out.copy_(torch.zeros_like(out) if bias is None else bias.repeat_interleave(offsets.diff(), 0))
    cfg = _segment_linear_config(k, m, x.dtype)
    block_m = cfg["BLOCK_M"]
    tiles = triton.cdiv(n, block_m) + num_experts
    counts = offsets.diff()
    tile_start = torch.cat([offsets.new_zeros(1), torch.cumsum((counts + block_m - 1) // block_m, 0)])
    # Program p's expert: the last e with tile_start[e] <= p (E past the last tile); searchsorted on
    # the device, so the grid is fixed before any count is known on the host.
    tile_expert = torch.searchsorted(tile_start[1:], torch.arange(tiles, device=x.device), right=True)
    # Past the last tile the kernel reads offsets[E] and offsets[E + 1]: a padded table keeps that in bounds.
    padded = torch.cat([offsets, offsets[-1:]])
    tile_start = torch.cat([tile_start, tile_start[-1:]])
    # Each expert's [M, K] block must be dense; the experts may sit apart (a stack padded per expert).
    if weight.stride(2) != 1 or weight.stride(1) != k:
        weight = weight.contiguous()
    if bias is not None and bias.stride(1) != 1:
        bias = bias.contiguous()
    grid = (tiles, triton.cdiv(m, cfg["BLOCK_N"]))
    wrap_triton(_segment_linear_kernel)[grid](
        x.contiguous(), perm.contiguous() if perm is not None else offsets, weight,
        bias if bias is not None else weight, tile_start, tile_expert, padded, out, k, m, num_experts, weight.stride(0),
        bias.stride(0) if bias is not None else 0,
        HAS_BIAS=bias is not None, GATHER=perm is not None, IEEE=x.dtype == torch.float32,
        UPCAST=_INTERPRETED and x.dtype != torch.float32, **cfg)
    return out


triton_segment_linear = _define_op("mnn_fast::triton_segment_linear", _segment_linear, _segment_linear_fake,
                                   [_segment_linear_kernel])
