"""The C++ backend's ops at direct entries, for the module's eager CPU inference path.

Through ``torch.ops`` plus the backend's wrapper (which steps below the autograd key when grad mode is
off) each op call crossed ~2 us of Python; even an overload's own C++ callable converts every argument
into a boxed stack first (~17 us of a one-sample forward's ~250, where these calls follow GEMVs that
evicted the code). Here each op is ``mnn_fast._serving.serve_<op>`` (``csrc/python/serving.cpp``),
which calls the op's typed dispatcher handle unboxed, and the caller runs them all inside one
``below_autograd()`` region while grad mode is off and nothing is traced: the same kernels on the same
tensors, so the same bits.
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
    """The ``mnn_fast::`` CPU ops, each called with the schema's arguments in order, all positional, as
    ``docs/ops.md`` gives them (tuples, not :class:`~mnn_fast.Routing`); only valid inside
    ``below_autograd()`` with grad mode off.

    ``segment_linear(x, weight, bias, offsets, parallel_segments, perm)``; ``perm=None`` reads ``x``'s
    own rows. ``segment_linear_experts(x, weights, biases, offsets, out_features, perm)``: the same
    matmul on each expert's own weight. ``gather_split(x, perm, offsets)``: each expert's rows as a
    fresh tensor. ``grouped_forward(z, x, routing, C, threshold, top_k, group_offsets, group_classes, program,
    class_group_offsets, class_group_classes, log_spread)``: a grouped Linear stack's forward after
    the switch in one call, below autograd by itself (``csrc/python/serving.cpp`` gives its
    arguments and results). ``sequential_forward(z, x, routing, C, threshold, top_k, group_offsets,
    group_classes, D, experts, explain, class_group_offsets, class_group_classes, log_spread)``: the
    sequential executor's, its specialists called through Python (``csrc/python/sequential.cpp``).
    """

    softmax_rows: Callable
    group_scores: Callable
    route: Callable
    recombine: Callable
    segment_linear: Callable
    segment_linear_experts: Callable
    gather_split: Callable
    grouped_forward: Callable
    sequential_forward: Callable
    below_autograd: Callable[[], ContextManager]


def inference_ops(backend_name: str) -> InferenceOps | None:
    """The direct entries for the library's own ``backend_name`` backend: the C++ CPU kernels for
    ``"cpp"``; ``None`` for any other (their ops keep their Python wrappers and checks)."""
    if backend_name != "cpp" or _BELOW_AUTOGRAD is None:
        return None
    from .. import _C  # noqa: F401  (the cpp backend exists only where it imports; it registers the ops)
    from .. import _serving as entry

    return InferenceOps(entry.serve_softmax_rows, entry.serve_group_scores, entry.serve_route, entry.serve_recombine,
                        entry.serve_segment_linear, entry.serve_segment_linear_experts, entry.serve_gather_split,
                        entry.serve_grouped_forward, entry.serve_sequential_forward, _BELOW_AUTOGRAD)
