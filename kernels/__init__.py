"""Triton kernels of the mnn_fast routing ops and of the grouped Linear executor (``segment_linear``), registered as ``mnn_fast::triton_<op>`` custom ops.

Semantics are those of docs/ops.md; results are bitwise equal to ``mnn_fast.reference`` on CPU
under ``TRITON_INTERPRET=1``. Importing this package registers the ops.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import triton
import triton.language as tl

# Reductions and scans are spelled tl.reduce / tl.associative_scan with the standard combine
# functions, which is what tl.sum / tl.max / tl.cumsum lower to. Those wrappers are @jit helpers,
# and under TRITON_INTERPRET every helper call re-patches triton.language (~5 ms); the interpreter
# maps these two combine functions straight to numpy. Integer operands only: order is irrelevant.
_sum = tl.standard._sum_combine
_max = tl.standard._elementwise_max


@triton.jit
def _block_start(index, width):
    """``index * width`` in int64: the first element of block (row, tile) ``index`` of ``width`` elements.

    Every kernel computes its row / tile / program offsets here. int64: B·E (and N·D, B·C) can pass
    2**31, and an int32 product wraps silently into an out-of-bounds address. Widening ``index``
    before the multiply makes the product int64 whatever ``width`` is (int32 argument or constexpr).
    ``tl.cast``, not ``.to``: under the interpreter a ``range`` loop variable is a Python int.
    """
    return tl.cast(index, tl.int64) * width


def _is_interpreted(kernel) -> bool:
    """True when ``@triton.jit`` produced an interpreter function (``TRITON_INTERPRET=1`` at decoration)."""
    from triton.runtime.jit import JITFunction

    return not isinstance(kernel, JITFunction)


def _define_op(name: str, fn: Callable, fake: Callable, kernels: Sequence) -> torch.library.CustomOpDef:
    """``triton_op`` for compiled Triton; an opaque ``custom_op`` with ``fake`` under the interpreter.

    ``triton_op`` uses the body itself as the fake kernel and as the decomposition traced by
    AOTAutograd. ``wrap_triton`` returns an interpreted kernel unwrapped, so under the interpreter
    the traced body would launch it on fake tensors (an error) or drop the launch from the graph.
    """
    if any(_is_interpreted(k) for k in kernels):
        op = torch.library.custom_op(name, fn, mutates_args=())
        op.register_fake(fake)
        return op
    return torch.library.triton_op(name, fn, mutates_args=())


from .combine import triton_combine  # noqa: E402
from .gather import triton_gather  # noqa: E402
from .group_scores import triton_group_scores  # noqa: E402
from .recombine import triton_recombine  # noqa: E402
from .route import triton_route  # noqa: E402
from .segment_linear import triton_segment_linear  # noqa: E402

__all__ = ["triton_group_scores", "triton_route", "triton_gather", "triton_combine", "triton_recombine",
           "triton_segment_linear"]
