"""Operands on the alignment of a fresh allocation, so BLAS computes the naive loop's bits.

MKL picks its GEMM kernel by operand alignment, and kernels round differently: measured on AMD EPYC,
``nn.Linear(5, 10)`` on a view starting at byte offset 4, 8 or 12 (mod 16) differs from a fresh copy.
Every tensor the naive loop hands a specialist (``x[idx]``) is fresh, so the engine matches that.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["FRESH_ALIGNMENT", "as_fresh_aligned", "aligned_stack"]


# Bytes: the alignment of every tensor PyTorch's CPU allocator returns (c10 ``gAlignment``), so of
# ``x[idx]`` in the naive loop. BLAS (MKL) picks its kernel by operand alignment, and kernels round
# differently: an expert must get its rows on this alignment to compute the naive loop's bits.
FRESH_ALIGNMENT = 64


def as_fresh_aligned(t: Tensor) -> Tensor:
    """``t`` if it starts on :data:`FRESH_ALIGNMENT`, else a fresh contiguous copy (which does)."""
    if t.data_ptr() % FRESH_ALIGNMENT == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def aligned_stack(tensors: Sequence[Tensor]) -> Tensor:
    """``torch.stack(tensors)`` with every slice ``[e]`` starting on :data:`FRESH_ALIGNMENT`.

    Each slab is padded to a multiple of 64 bytes (``stride(0)`` may exceed the slice's numel), so
    ``segment_linear`` hands BLAS each expert's weight on the alignment its own parameter has.
    """
    first = tensors[0]
    per_line = FRESH_ALIGNMENT // first.element_size()
    slab = -(-first.numel() // per_line) * per_line if first.numel() else 0
    flat = first.new_empty(len(tensors) * slab + per_line)
    skip = (-(flat.data_ptr() // first.element_size())) % per_line  # 0 for a fresh CPU buffer
    strides = [1] * first.dim()
    for d in range(first.dim() - 2, -1, -1):
        strides[d] = strides[d + 1] * first.shape[d + 1]
    out = flat.as_strided((len(tensors), *first.shape), (slab, *strides), skip)
    for e, t in enumerate(tensors):
        out[e].copy_(t)
    return out
