"""The C++ backend's ops at their C++ entry points, for the module's eager CPU inference path.

Through ``torch.ops`` plus the backend's wrapper (which steps below the autograd key when grad mode is
off) each op call crossed ~2 us of Python; a one-sample forward makes five, about what the whole
routing and recombination may add to the specialists' own time. Here each op is its overload's C++
callable, and the caller runs them all inside one ``below_autograd()`` region while grad mode is
off and nothing is traced: the same kernels on the same tensors, so the same bits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

__all__ = ["InferenceOps", "inference_ops"]

# The guard torch's own Python autograd kernel enters when grad mode is off; private, so looked up
# with a fallback (then no InferenceOps: the module keeps the backend's wrapped ops).
_BELOW_AUTOGRAD = getattr(torch._C, "_AutoDispatchBelowAutograd", None)


@dataclass(frozen=True)
class InferenceOps:
    """The ``mnn_fast::`` CPU ops, each called as the schema in ``docs/ops.md`` gives it (tuples, not
    :class:`~mnn_fast.Routing`); only valid inside ``below_autograd()`` with grad mode off.

    ``segment_linear(x, weight, bias, offsets, parallel_segments, perm)``; ``perm=None`` reads ``x``'s
    own rows. ``segment_linear_experts(x, weights, biases, offsets, out_features, perm)``: the same
    matmul on each expert's own weight (``segment_linear_experts``). ``gather_split(x, perm, offsets)``: each expert's rows as a fresh tensor.
    """

    softmax_rows: Callable
    group_scores: Callable
    route: Callable
    recombine: Callable
    segment_linear: Callable
    segment_linear_experts: Callable
    gather_split: Callable
    below_autograd: Callable[[], ContextManager]


def _entry(op) -> Callable:
    # OpOverload's C++ callable; the overload itself (one Python frame more) where torch has none.
    return getattr(op.default, "_op", op.default)


def inference_ops(backend_name: str) -> InferenceOps | None:
    """The direct ops for the library's own ``backend_name`` backend: the C++ CPU kernels for
    ``"cpp"``; ``None`` for any other (their ops keep their Python wrappers and checks)."""
    if backend_name != "cpp" or _BELOW_AUTOGRAD is None:
        return None
    lib = torch.ops.mnn_fast
    return InferenceOps(_entry(lib.softmax_rows), _entry(lib.group_scores), _entry(lib.route),
                        _entry(lib.recombine), _entry(lib.segment_linear),
                        _entry(lib.segment_linear_experts), _entry(lib.gather_split), _BELOW_AUTOGRAD)
