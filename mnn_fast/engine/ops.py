"""Python side of the ``mnn_fast`` custom ops: fake kernels, autograd, and the compiled library.

The schemas and CPU/CUDA kernels come from ``mnn_fast._C`` (``csrc/``); this module registers what
``torch.compile`` and autograd need on top. Semantics of every op: ``docs/ops.md``.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch._library.fake_impl import allocate_size as _allocate_size

from . import rowmath

__all__ = ["EXTENSION_ERROR", "extension_has_cuda", "data_dependent_size", "expert_sizes", "register_recombine_autograd", "torch_recombine",
           "torch_contributions", "torch_log_softmax_rows", "torch_softmax_rows"]

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


# ---------------------------------------------------------------- counts as sizes

# counts.tolist() in traced code is `aten._local_scalar_dense`, which dynamo splits the graph at unless
# `capture_scalar_outputs` is on. This op returns the counts as sizes (SymInt[]: no custom_op return
# type spells it, hence a schema of its own), each a fresh data-dependent symbol while tracing.
_LIB = torch.library.Library("mnn_fast", "FRAGMENT")
_LIB.define("expert_sizes(Tensor counts) -> SymInt[]")


def _expert_sizes(counts: Tensor) -> list[int]:
    return counts.tolist()


def _fake_expert_sizes(counts: Tensor) -> list[torch.SymInt]:
    torch._check(counts.dim() == 1, lambda: f"mnn_fast::expert_sizes: counts must be 1-D, got {counts.dim()}-D")
    ctx = torch.library.get_ctx()
    return [data_dependent_size(ctx) for _ in range(counts.shape[0])]


_LIB.impl("expert_sizes", _expert_sizes, "CompositeExplicitAutograd")
torch.library.register_fake("mnn_fast::expert_sizes", _fake_expert_sizes, lib=_LIB)


def expert_sizes(counts: Tensor) -> list[int]:
    """``counts: Tensor[E] int64`` as ``E`` Python ints (symbolic sizes ``>= 0`` under ``torch.compile``,
    with no graph break even where ``capture_scalar_outputs`` is off)."""
    return torch.ops.mnn_fast.expert_sizes(counts)


# ---------------------------------------------------------------- fake kernels and autograd


def _fake_group_scores(probs: Tensor, group_offsets: Tensor, group_classes: Tensor) -> Tensor:
    return probs.new_empty(probs.shape[0], group_offsets.shape[0] - 1)


def data_dependent_size(ctx) -> torch.SymInt:
    """A fresh size symbol (``>= 0``) for an output whose length depends on input values, also where
    dynamo's ``capture_dynamic_output_shape_ops`` is off (plain ``torch.compile(mnn)``).

    ``ctx.new_dynamic_size()`` refuses there: that flag makes dynamo split the graph at any op whose
    output shape is data-dependent, because it cannot know whether the rest of the graph handles an
    unbacked size. The ops of this library are written for one (``fullgraph=True`` traces them whole
    and inductor compiles them), so their fake kernels allocate the symbol from the shape environment
    directly, as torch's own ``device_mesh`` ops do. Outside tracing with a shape environment (fake
    tensors without dynamic shapes) this is ``new_dynamic_size()``, which raises as torch documents.
    """
    shape_env = getattr(ctx, "_shape_env", None)
    if shape_env is None or shape_env.allow_dynamic_output_shape_ops:
        return ctx.new_dynamic_size()
    return _allocate_size(shape_env)


def _fake_route(scores: Tensor, threshold: float, top_k: int):
    num_samples, num_experts = scores.shape
    # N, the number of routed rows, depends on the scores' values.
    rows = data_dependent_size(torch.library.get_ctx())
    new = lambda *shape: scores.new_empty(shape, dtype=torch.long)  # noqa: E731
    return new(num_experts), new(num_experts + 1), new(rows), new(num_samples + 1), new(rows)


def _fake_gather(x: Tensor, perm: Tensor) -> Tensor:
    return x.new_empty(perm.shape[0], x.shape[1])


def _fake_gather_split(x: Tensor, perm: Tensor, offsets: Tensor) -> list[Tensor]:
    ctx = torch.library.get_ctx()  # each expert's row count depends on the routing's values
    return [x.new_empty(data_dependent_size(ctx), x.shape[1]) for _ in range(offsets.shape[0] - 1)]


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


def _fake_recombine(logp: Tensor, logits: list[Tensor], offsets: Tensor, group_offsets: Tensor, group_classes: Tensor,
                    log_spread: Tensor, sample_offsets: Tensor, sample_rows: Tensor) -> Tensor:
    for part in logits:
        torch._check(part.shape[1] == logp.shape[1] or part.shape[1] == 1)
    return torch.empty_like(logp, memory_format=torch.contiguous_format)


def _fake_contributions(logits: Tensor, offsets: Tensor, group_offsets: Tensor, group_classes: Tensor,
                        log_spread: Tensor, num_classes: int) -> Tensor:
    return logits.new_empty(logits.shape[0], num_classes)


def _fake_log_softmax_rows(x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _fake_softmax_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


# The row ops' backward differentiates the recombination, docs/how-it-works.md written in torch (contributions.recombine_formula):
# the gradient of the math the ops compute, recomputed from the saved inputs; training is not the hot path.
def _setup_recombine(ctx, inputs, output):
    logp, logits, *tables = inputs
    # mnn_fast::recombine takes a list of logits tensors; the Triton twin takes one tensor.
    ctx.one_tensor = isinstance(logits, Tensor)
    logits = [logits] if ctx.one_tensor else list(logits)
    ctx.parts = len(logits)
    ctx.save_for_backward(logp, *logits, *tables)


def _backward_recombine(ctx, grad):
    from .contributions import recombine_formula

    logp, *saved = ctx.saved_tensors
    logits, tables = saved[: ctx.parts], saved[ctx.parts :]
    with torch.enable_grad():
        logp_ = logp.detach().requires_grad_()
        logits_ = [y.detach().requires_grad_() for y in logits]
        out = recombine_formula(logp_, logits_, *tables)
        grads = torch.autograd.grad(out, [logp_, *logits_], grad, allow_unused=True)
    grad_logits = [torch.zeros_like(y) if g is None else g for y, g in zip(logits, grads[1:])]
    return (grads[0], grad_logits[0] if ctx.one_tensor else grad_logits) + (None,) * 6


def register_recombine_autograd(name: str) -> None:
    """Registers the backward of a recombine op (``mnn_fast::recombine`` or its Triton twin)."""
    torch.library.register_autograd(name, _backward_recombine, setup_context=_setup_recombine)


def _setup_contributions(ctx, inputs, output):
    ctx.num_classes = inputs[5]
    ctx.save_for_backward(*inputs[:5])


def _backward_contributions(ctx, grad):
    from .contributions import contribution_formula

    logits, *tables = ctx.saved_tensors
    with torch.enable_grad():
        y = logits.detach().requires_grad_()
        v = contribution_formula(y, *tables, ctx.num_classes)
        grads = torch.autograd.grad(v, y, grad)[0]
    return grads, None, None, None, None, None


def _setup_log_softmax_rows(ctx, inputs, output):
    ctx.save_for_backward(output)


def _backward_log_softmax_rows(ctx, grad):
    (out,) = ctx.saved_tensors
    return grad - out.exp() * grad.sum(1, keepdim=True)


def _setup_softmax_rows(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _backward_softmax_rows(ctx, grad_log_probs, grad_probs):
    # d log_softmax: g - p * sum(g); d softmax: p * (g - sum(g * p)).
    (p,) = ctx.saved_tensors
    grad = torch.zeros_like(p)
    if grad_log_probs is not None:
        grad = grad + grad_log_probs - p * grad_log_probs.sum(1, keepdim=True)
    if grad_probs is not None:
        grad = grad + p * (grad_probs - (grad_probs * p).sum(1, keepdim=True))
    return grad


def _fake_segment_linear(x: Tensor, weight: Tensor, bias, offsets: Tensor, parallel_segments: bool = False,
                         perm: Tensor | None = None) -> Tensor:
    torch._check(x.shape[1] == weight.shape[2])
    return x.new_empty(x.shape[0] if perm is None else perm.shape[0], weight.shape[1])


def _fake_segment_linear_experts(x: Tensor, weights: list[Tensor], biases: list[Tensor], offsets: Tensor, out_features: int,
                                 perm: Tensor | None = None) -> Tensor:
    return x.new_empty(x.shape[0] if perm is None else perm.shape[0], out_features)


def _setup_segment_linear_experts(ctx, inputs, output):
    # The eager serving path's form (grad off); training runs the stacked form, which has a backward.
    raise NotImplementedError(
        "mnn_fast::segment_linear_experts is inference-only (no backward); with autograd recording use "
        "mnn_fast::segment_linear on stacked weights")


def _backward_segment_linear_experts(ctx, grad):  # never reached: the setup refuses first
    raise NotImplementedError("mnn_fast::segment_linear_experts has no backward")


def _fake_segment_stack(x: Tensor, weights: list[Tensor], biases: list, activations: list[str],
                        activation_args: list[float], offsets: Tensor, perm: Tensor | None = None,
                        tile_rows: int = 0) -> Tensor:
    torch._check(x.shape[1] == weights[0].shape[2])
    return x.new_empty(x.shape[0] if perm is None else perm.shape[0], weights[-1].shape[1])


def _setup_segment_stack(ctx, inputs, output):
    # Reached only when an input requires grad: the op is the inference path of grouped_parallel.
    raise NotImplementedError(
        "mnn_fast::segment_stack is inference-only (no backward); with autograd recording, run the stack "
        "layer by layer (segment_linear), as the grouped executors do")


def _backward_segment_stack(ctx, grad):  # never reached: _setup_segment_stack refuses first
    raise NotImplementedError("mnn_fast::segment_stack has no backward")


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


def _segment_linear_grads(ctx, grad: Tensor, rows_op) -> tuple:
    """``(grad_x, grad_w, grad_b)`` of ``segment_linear`` (C++ or Triton: ``rows_op(grad, weight^T,
    offsets)`` is that op without bias or ``perm``) from ``ctx.saved_tensors = (x, weight, offsets,
    perm)``: d/dx of ``x @ W^T`` is ``grad @ W``, the same op with each weight transposed ([E, K, M] as
    [E, M', K']), scattered back to ``x``'s rows through ``perm`` when the rows were read through it;
    the loop of :func:`segment_linear_param_grads` for the weights (training is not the grouped
    path's hot loop)."""
    x, weight, offsets, perm = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = None
    if ctx.needs_input_grad[0]:
        rows = rows_op(grad, weight.transpose(1, 2), offsets)
        grad_x = rows if perm is None else x.new_zeros(x.shape).index_add_(0, perm, rows)
    grad_w = grad_b = None
    if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
        grad_w, grad_b = segment_linear_param_grads(x if perm is None else x[perm], grad, offsets)
    return grad_x, grad_w, (grad_b if ctx.has_bias else None)


def _setup_segment_linear(ctx, inputs, output):
    x, weight, bias, offsets, _, perm = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, offsets, perm)


def _backward_segment_linear(ctx, grad):
    op = torch.ops.mnn_fast.segment_linear
    return _segment_linear_grads(ctx, grad, lambda g, w_t, offsets: op(g, w_t, None, offsets)) + (None,) * 3


def _setup_gather_segment_linear(ctx, inputs, output):
    x, weight, bias, offsets, perm = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, offsets, perm)


def _backward_gather_segment_linear(ctx, grad):
    """The Triton ``segment_linear``'s backward (rows read through ``perm`` when given)."""
    op = torch.ops.mnn_fast.triton_segment_linear
    return _segment_linear_grads(ctx, grad, lambda g, w_t, offsets: op(g, w_t, None, offsets, None)) + (None,) * 2


def register_triton_segment_linear_autograd() -> None:
    """Registers the backward of ``mnn_fast::triton_segment_linear`` (once its kernels are imported)."""
    torch.library.register_autograd("mnn_fast::triton_segment_linear", _backward_gather_segment_linear,
                                    setup_context=_setup_gather_segment_linear)


# The torch backend's row ops: rowmath's PyTorch arithmetic as custom ops, so they carry the same
# fake kernels and backward as the C++ ones (the bit tricks of rowmath's exp have no autograd).
def _torch_row_op(name: str, fn, fake, backward, setup):
    op = torch.library.custom_op(f"mnn_fast::torch_{name}", fn, mutates_args=())
    op.register_fake(fake)
    op.register_autograd(backward, setup_context=setup)
    return op


def _recombine_torch(logp: Tensor, logits: list[Tensor], offsets: Tensor, group_offsets: Tensor, group_classes: Tensor,
                     log_spread: Tensor, sample_offsets: Tensor, sample_rows: Tensor) -> Tensor:
    return rowmath.recombine_torch(logp, logits, offsets, group_offsets, group_classes, log_spread, sample_offsets,
                                   sample_rows)


def _contributions_torch(logits: Tensor, offsets: Tensor, group_offsets: Tensor, group_classes: Tensor,
                         log_spread: Tensor, num_classes: int) -> Tensor:
    return rowmath.contributions_torch(logits, offsets, group_offsets, group_classes, log_spread, num_classes)


def _log_softmax_rows_torch(x: Tensor) -> Tensor:
    return rowmath.log_softmax_rows(x)


def _softmax_rows_torch(x: Tensor) -> tuple[Tensor, Tensor]:
    if x.device.type == "cpu":
        return rowmath.softmax_rows(x)
    # On a GPU torch's two kernels are two launches, where rowmath's PyTorch spelling is a dozen;
    # every backend's softmax_rows takes this branch there, so GPU backends still route alike.
    return torch.log_softmax(x, 1), torch.softmax(x, 1)


torch_recombine = _torch_row_op("recombine", _recombine_torch, _fake_recombine, _backward_recombine, _setup_recombine)
torch_contributions = _torch_row_op("contributions", _contributions_torch, _fake_contributions, _backward_contributions,
                                    _setup_contributions)
torch_log_softmax_rows = _torch_row_op("log_softmax_rows", _log_softmax_rows_torch, _fake_log_softmax_rows,
                                       _backward_log_softmax_rows, _setup_log_softmax_rows)
torch_softmax_rows = _torch_row_op("softmax_rows", _softmax_rows_torch, _fake_softmax_rows, _backward_softmax_rows,
                                   _setup_softmax_rows)


if EXTENSION_ERROR is None:
    torch.library.register_fake("mnn_fast::segment_linear")(_fake_segment_linear)
    torch.library.register_autograd("mnn_fast::segment_linear", _backward_segment_linear, setup_context=_setup_segment_linear)
    torch.library.register_fake("mnn_fast::segment_linear_experts")(_fake_segment_linear_experts)
    torch.library.register_autograd("mnn_fast::segment_linear_experts", _backward_segment_linear_experts,
                                    setup_context=_setup_segment_linear_experts)
    torch.library.register_fake("mnn_fast::segment_stack")(_fake_segment_stack)
    torch.library.register_autograd("mnn_fast::segment_stack", _backward_segment_stack, setup_context=_setup_segment_stack)
    torch.library.register_fake("mnn_fast::group_scores")(_fake_group_scores)
    torch.library.register_fake("mnn_fast::route")(_fake_route)
    torch.library.register_fake("mnn_fast::gather")(_fake_gather)
    torch.library.register_fake("mnn_fast::gather_split")(_fake_gather_split)
    torch.library.register_fake("mnn_fast::combine")(_fake_combine)
    torch.library.register_autograd("mnn_fast::gather", _backward_gather, setup_context=_setup_gather)
    torch.library.register_autograd("mnn_fast::combine", _backward_combine, setup_context=_setup_combine)
    torch.library.register_fake("mnn_fast::recombine")(_fake_recombine)
    torch.library.register_fake("mnn_fast::contributions")(_fake_contributions)
    torch.library.register_fake("mnn_fast::log_softmax_rows")(_fake_log_softmax_rows)
    register_recombine_autograd("mnn_fast::recombine")
    torch.library.register_autograd("mnn_fast::contributions", _backward_contributions, setup_context=_setup_contributions)
    torch.library.register_autograd("mnn_fast::log_softmax_rows", _backward_log_softmax_rows,
                                    setup_context=_setup_log_softmax_rows)
    torch.library.register_fake("mnn_fast::softmax_rows")(_fake_softmax_rows)
    torch.library.register_autograd("mnn_fast::softmax_rows", _backward_softmax_rows, setup_context=_setup_softmax_rows)
