"""Python side of the ``mnn_fast`` custom ops: fake kernels, autograd, and the compiled library.

The schemas and CPU/CUDA kernels come from ``mnn_fast._C`` (``csrc/``); this module registers what
``torch.compile`` and autograd need on top. Semantics of every op: ``docs/ops.md``.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["EXTENSION_ERROR", "extension_has_cuda"]

try:
    from .. import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)

    EXTENSION_ERROR: str | None = None
except ImportError as exc:  # the package still works on the torch backend without the build
    EXTENSION_ERROR = f"mnn_fast._C could not be imported ({exc}); reinstall with `pip install -e .`"


def extension_has_cuda() -> bool:
    """True when ``mnn_fast._C`` was built with the CUDA kernels."""
    if EXTENSION_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("mnn_fast::route", "CUDA")


# ---------------------------------------------------------------- fake kernels and autograd


def _fake_group_scores(probs: Tensor, group_offsets: Tensor, group_classes: Tensor) -> Tensor:
    return probs.new_empty(probs.shape[0], group_offsets.shape[0] - 1)


def _fake_route(scores: Tensor, threshold: float, top_k: int):
    num_samples, num_experts = scores.shape
    # N, the number of routed rows, depends on the scores' values.
    rows = torch.library.get_ctx().new_dynamic_size()
    new = lambda *shape: scores.new_empty(shape, dtype=torch.long)  # noqa: E731
    return new(num_experts), new(num_experts + 1), new(rows), new(num_samples + 1), new(rows)


def _fake_gather(x: Tensor, perm: Tensor) -> Tensor:
    return x.new_empty(perm.shape[0], x.shape[1])


def _fake_combine(logp: Tensor, logv: Tensor, perm: Tensor, sample_offsets: Tensor, sample_rows: Tensor) -> Tensor:
    return torch.empty_like(logp)


def _setup_gather(ctx, inputs, output):
    x, perm = inputs
    ctx.num_samples = x.shape[0]
    ctx.save_for_backward(perm)


def _backward_gather(ctx, grad):
    (perm,) = ctx.saved_tensors
    grad_x = grad.new_zeros(ctx.num_samples, grad.shape[1])
    return grad_x.index_add_(0, perm, grad), None


def _setup_combine(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])


def _backward_combine(ctx, grad):
    (perm,) = ctx.saved_tensors
    # Row r of logv was added into sample perm[r]'s accumulator exactly once.
    return grad, grad.index_select(0, perm), None, None, None


def _fake_segment_linear(x: Tensor, weight: Tensor, bias, offsets: Tensor, parallel_segments: bool = False) -> Tensor:
    torch._check(x.shape[1] == weight.shape[2])
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("mnn_fast::segment_linear_param_grads", mutates_args=())
def segment_linear_param_grads(x: Tensor, grad: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """Per segment ``e``: ``(grad[seg]^T @ x[seg]: Tensor[E, M, K], grad[seg].sum(0): Tensor[E, M])``.

    A loop over segments (training is not the grouped path's hot loop); an op of its own so the
    data-dependent segment bounds stay out of traced graphs.
    """
    bounds = offsets.tolist()
    pairs = [(grad[a:b].t() @ x[a:b], grad[a:b].sum(0)) for a, b in zip(bounds[:-1], bounds[1:])]
    if not pairs:
        return x.new_zeros(0, grad.shape[1], x.shape[1]), x.new_zeros(0, grad.shape[1])
    return torch.stack([w for w, _ in pairs]), torch.stack([b for _, b in pairs])


@segment_linear_param_grads.register_fake
def _(x, grad, offsets):
    experts = offsets.shape[0] - 1
    return x.new_empty(experts, grad.shape[1], x.shape[1]), x.new_empty(experts, grad.shape[1])


def _setup_segment_linear(ctx, inputs, output):
    x, weight, bias, offsets, _ = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, offsets)


def _backward_segment_linear(ctx, grad):
    x, weight, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    # d/dx of x @ W^T is grad @ W: the same op with each weight transposed ([E, K, M] as [E, M', K']).
    grad_x = torch.ops.mnn_fast.segment_linear(grad, weight.transpose(1, 2), None, offsets) if ctx.needs_input_grad[0] else None
    grad_w = grad_b = None
    if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
        grad_w, grad_b = segment_linear_param_grads(x, grad, offsets)
    return grad_x, grad_w, (grad_b if ctx.has_bias else None), None, None


if EXTENSION_ERROR is None:
    torch.library.register_fake("mnn_fast::segment_linear")(_fake_segment_linear)
    torch.library.register_autograd("mnn_fast::segment_linear", _backward_segment_linear, setup_context=_setup_segment_linear)
    torch.library.register_fake("mnn_fast::group_scores")(_fake_group_scores)
    torch.library.register_fake("mnn_fast::route")(_fake_route)
    torch.library.register_fake("mnn_fast::gather")(_fake_gather)
    torch.library.register_fake("mnn_fast::combine")(_fake_combine)
    torch.library.register_autograd("mnn_fast::gather", _backward_gather, setup_context=_setup_gather)
    torch.library.register_autograd("mnn_fast::combine", _backward_combine, setup_context=_setup_combine)
