"""Executors: how the specialists run on the expert-major buffer ``xg`` (rows of expert ``e`` contiguous).

sequential: each expert on its slice, one call after another (the baseline; bitwise the naive loop).
grouped: experts sharing one architecture run as one computation over stacked weights: Linear stacks
as segment matmuls (the ``mnn_fast::segment_linear`` op, no padding, bitwise the naive loop), anything
else via ``torch.func`` + ``vmap`` on count-bucketed padded batches (float32 rounding, not bitwise).
grouped_parallel: Linear stacks with experts spread over the cores (opt-in, not bitwise): on the C++
backend each tile of an expert's rows runs the whole stack on one core (``mnn_fast::segment_stack``).
streams: CUDA.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .alignment import FRESH_ALIGNMENT, aligned_stack
from .backends import Backend

__all__ = ["EXECUTOR_NAMES", "select_executor", "stack_plan", "recording_grad", "linear_stack_reason", "same_architecture_reason",
           "grouped_executor", "GroupedLinearStack", "GroupedLinearRuns", "layout_runs", "VmapExperts", "run_on_streams",
           "new_stream_pool", "bucket_experts"]

EXECUTOR_NAMES = ("auto", "sequential", "grouped", "grouped_parallel", "streams")

# Layers a grouped Linear stack may hold between its Linears: stateless and applied row by row, so
# one call on the whole buffer equals one call per expert slice.
_ROWWISE = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Identity, nn.Dropout)
# Of those, the ones whose every element is one exact operation (a compare, a select, a multiply):
# the same bits wherever the element sits. ATen computes the others with a vector formula except
# past a tensor's last whole vector, where a scalar one (different in the last bit) takes over, so
# an element's bits depend on the tensor it is computed in: bitwise executors call them per expert.
_EXACT_ROWWISE = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Flatten)


# segment_stack's activation after a Linear: its name and argument, per layer type.
_STACK_ACTIVATIONS: dict[type, Callable[[nn.Module], tuple[str, float]]] = {
    nn.ReLU: lambda m: ("relu", 0.0),
    nn.LeakyReLU: lambda m: ("leaky_relu", float(m.negative_slope)),
    nn.Tanh: lambda m: ("tanh", 0.0),
    nn.Sigmoid: lambda m: ("sigmoid", 0.0),
    nn.SiLU: lambda m: ("silu", 0.0),
    nn.GELU: lambda m: ("gelu" if m.approximate == "none" else "gelu_tanh", 0.0),
    nn.ELU: lambda m: ("elu", float(m.alpha)),
}


def stack_plan(layers: Sequence[nn.Module]) -> tuple[list[str], list[float]] | None:
    """``(activations, activation_args)`` for ``mnn_fast::segment_stack``: one entry per Linear from
    the first on, the activation that follows it ("none" if nothing does; Identity and Dropout are
    nothing in inference); ``None`` when a layer after the first Linear is something else or two
    activations follow one Linear."""
    first = next(i for i, layer in enumerate(layers) if isinstance(layer, nn.Linear))
    names: list[str] = []
    args: list[float] = []
    for layer in layers[first:]:
        if isinstance(layer, nn.Linear):
            names.append("none")
            args.append(0.0)
        elif isinstance(layer, (nn.Identity, nn.Dropout)):
            continue
        elif type(layer) in _STACK_ACTIVATIONS and names[-1] == "none":
            names[-1], args[-1] = _STACK_ACTIVATIONS[type(layer)](layer)
        else:
            return None
    return names, args


def _layers(module: nn.Module) -> list[nn.Module]:
    """A Sequential flattened into its leaf layers; any other module is its own single layer."""
    if isinstance(module, nn.Sequential):
        return [leaf for child in module for leaf in _layers(child)]
    return [module]


def _describe(layer: nn.Module) -> tuple:
    if isinstance(layer, nn.Linear):
        return ("Linear", layer.in_features, layer.out_features, layer.bias is not None)
    if isinstance(layer, nn.Flatten):
        return ("Flatten", layer.start_dim, layer.end_dim)
    return (type(layer).__name__, repr(layer))


def linear_stack_reason(experts: Sequence[nn.Module], ops: Backend, runs: bool = False) -> str | None:
    """``None`` when every expert is the same stack of Linear and row-wise layers and ``ops`` (the
    module's backend) has a ``segment_linear``, else why not. ``runs=True``: the stacks may differ
    (:class:`GroupedLinearRuns` groups each run of identical ones) but must end in one output width."""
    if ops.segment_linear is None:
        return f"backend {ops.name!r} has no segment_linear kernel (cpp and torch on CPU; triton, and cuda where Triton imports)"
    devices = {p.device.type for expert in experts for p in expert.parameters()}
    if devices - set(ops.segment_linear_devices):
        return (f"backend {ops.name!r}'s segment_linear runs on {list(ops.segment_linear_devices)}; the specialists "
                f"are on {sorted(devices)}")
    blas = not ops.segment_linear_tiled  # BLAS per segment: bitwise only on operands aligned as fresh ones
    layouts = []
    for e, expert in enumerate(experts):
        layers = _layers(expert)
        for layer in layers:
            flatten_ok = isinstance(layer, nn.Flatten) and layer.start_dim == 1 and layer.end_dim == -1
            if not (isinstance(layer, (nn.Linear, *_ROWWISE)) or flatten_ok):
                return f"specialists[{e}] holds {type(layer).__name__}, not only Linear and row-wise layers"
        if not any(isinstance(layer, nn.Linear) for layer in layers):
            return f"specialists[{e}] has no Linear layer"
        for name, p in expert.named_parameters():
            if blas and p.data_ptr() % FRESH_ALIGNMENT:
                # The grouped copy would be aligned, this parameter is not: BLAS could round differently.
                return f"specialists[{e}].{name} does not start on a {FRESH_ALIGNMENT}-byte boundary"
        layouts.append([_describe(layer) for layer in layers])
    if runs:
        widths = {[d for d in layout if d[0] == "Linear"][-1][2] for layout in layouts}
        return None if len(widths) == 1 else f"specialists end in different output widths {sorted(widths)}"
    if any(layout != layouts[0] for layout in layouts):
        return "specialists differ in layers or sizes"
    return None


def layout_runs(experts: Sequence[nn.Module]) -> list[tuple[int, int]]:
    """``[(first, end), ...]``: maximal runs of consecutive experts with identical layer layouts."""
    runs: list[tuple[int, int]] = []
    previous = None
    for e, expert in enumerate(experts):
        layout = [_describe(layer) for layer in _layers(expert)]
        if runs and layout == previous:
            runs[-1] = (runs[-1][0], e + 1)
        else:
            runs.append((e, e + 1))
        previous = layout
    return runs


def same_architecture_reason(experts: Sequence[nn.Module]) -> str | None:
    """``None`` when all experts share class, parameter names and shapes (stackable for vmap)."""
    def signature(m: nn.Module):
        return (type(m), [(n, tuple(p.shape), p.dtype) for n, p in m.named_parameters()],
                [(n, tuple(b.shape), b.dtype) for n, b in m.named_buffers()])

    first = signature(experts[0])
    for e, expert in enumerate(experts[1:], 1):
        if signature(expert) != first:
            return f"specialists[{e}] differs from specialists[0] in class, parameter or buffer shapes"
    return None


def select_executor(requested: str, experts: Sequence[nn.Module], device: torch.device,
                    ops: Backend) -> tuple[str, dict[str, str]]:
    """``(name, skipped)``: the executor for experts on ``device`` with backend ``ops``; for each one
    passed over, why."""
    if requested not in EXECUTOR_NAMES:
        raise ValueError(f"executor must be one of {EXECUTOR_NAMES}, got {requested!r}")
    skipped: dict[str, str] = {}
    device = torch.device(device).type
    stack_reason = linear_stack_reason(experts, ops)
    if stack_reason is not None:
        # Runs of identical Linear stacks (e.g. NSN specialists at mixed depths) group too.
        stack_reason = linear_stack_reason(experts, ops, runs=True)
    arch_reason = same_architecture_reason(experts)
    if device != "cuda":
        skipped["streams"] = f"CUDA streams need a CUDA device; the module is on {device}"
    if stack_reason is not None:
        # vmap turns each conv into a grouped conv; measured slower than E separate calls on CPU
        # (docs/benchmarks.md), so auto only groups Linear stacks.
        skipped["grouped"] = stack_reason if arch_reason is not None else (
            f"{stack_reason}; explicit executor='grouped' would use vmap over padded batches")
    # Spreading experts over the cores changes each GEMM's thread count, so its bits: opt-in only.
    skipped.setdefault("grouped_parallel", "not bitwise equal to the naive loop; request it explicitly")
    # The Triton kernel sums in tiles, not as the naive loop's BLAS calls: auto groups with it on CUDA
    # (nothing there is bitwise across kernels anyway) but not on CPU, where it runs only under
    # TRITON_INTERPRET for testing and the sequential executor keeps the naive loop's bits.
    tiled_on_cpu = ops.segment_linear_tiled and device != "cuda"
    if stack_reason is None and tiled_on_cpu:
        skipped["grouped"] = ("the Triton grouped kernel is not bitwise the naive loop; on CPU (TRITON_INTERPRET, "
                              "for tests) auto keeps the sequential executor: request executor='grouped'")
    if requested == "auto":
        if stack_reason is None and not tiled_on_cpu:
            return "grouped", skipped
        return ("streams" if "streams" not in skipped else "sequential"), skipped
    if requested == "grouped" and stack_reason is not None and arch_reason is not None:
        raise ValueError(f"executor='grouped' needs specialists of one architecture: {arch_reason}")
    if requested == "grouped_parallel" and stack_reason is not None:
        raise ValueError(f"executor='grouped_parallel' needs identical Linear stacks: {stack_reason}")
    if requested == "streams" and "streams" in skipped:
        return "sequential", skipped  # the documented CPU fallback; `executor_skipped` says why
    return requested, {k: v for k, v in skipped.items() if k != requested}


def grouped_executor(experts: Sequence[nn.Module], ops: Backend, parallel: bool = False):
    """The grouped executor :func:`select_executor` chose ``"grouped"`` (or ``"grouped_parallel"``)
    for: one :class:`GroupedLinearStack` for identical Linear stacks, :class:`GroupedLinearRuns` for
    runs of them, else :class:`VmapExperts`."""
    bitwise = not (parallel or ops.segment_linear_tiled)
    segment_stack = ops.segment_stack if parallel else None
    if linear_stack_reason(experts, ops) is None:
        return GroupedLinearStack(experts, ops.segment_linear, parallel, ops.segment_linear_gather, bitwise=bitwise,
                                  segment_stack=segment_stack)
    if linear_stack_reason(experts, ops, runs=True) is None:
        return GroupedLinearRuns(experts, ops.segment_linear, parallel, bitwise=bitwise, segment_stack=segment_stack)
    return VmapExperts(experts)


def _param_key(params: list[Tensor]) -> tuple[list[int], list[int]]:
    # A tensor's version counter moves on every in-place update (optimizer steps, load_state_dict).
    # Two list comprehensions: half the cost of one generator of pairs (checked on every call).
    return [p._version for p in params], [p.data_ptr() for p in params]


class _ThreadHolds(threading.local):
    """One thread's holds of a :class:`_StackCache`. The attributes exist in every thread from its first
    access (class defaults, per-thread ``holds``): a traced guard on ``held`` then reads the same
    attribute whether or not this thread ever held, instead of recompiling once it first does."""

    held = False
    depth = 0

    def __init__(self):
        self.holds: list[bool] = []


class _StackCache:
    """Stacked copies of per-expert tensors, rebuilt only when one of them changed.

    With autograd recording (training) or under ``torch.compile`` the stack is taken fresh each call,
    so gradients reach every expert's own parameters and no stale copy is ever used, unless the
    cache is *held*: refreshed eagerly just before a compiled call (:meth:`held`), so the traced code
    reads the stacks as graph inputs instead of stacking ``E`` tensors per layer in the graph.
    """

    def __init__(self):
        self._key = None
        self._value: list[Tensor] = []
        # Per thread: a compiled call another thread makes without holding must never read stacks
        # this thread refreshed (the weights may have changed since). Dynamo evaluates its guard on
        # `held` in the calling thread. `depth` lets holds nest.
        self._thread = _ThreadHolds()
        self._lock = threading.Lock()  # one refresh at a time
        # Whether a traced call has read the stacks: only then must a module's pre-hook check every
        # expert before each call. Eager inference checks only the active experts' slices (refresh).
        self.traced = False

    @property
    def stacked(self) -> bool:
        """Whether anything is stacked yet."""
        return self._key is not None

    @property
    def value(self) -> list[Tensor]:
        return self._value

    @property
    def fresh_for_traced_calls(self) -> bool:
        """Whether the calling thread holds the stacks (:meth:`held`)."""
        return self._thread.held

    def get(self, groups_of_tensors: list[list[Tensor]]) -> list[Tensor]:
        recording = torch.is_grad_enabled() and any(t.requires_grad for ts in groups_of_tensors for t in ts)
        if recording or torch.compiler.is_compiling():
            return [torch.stack(ts) for ts in groups_of_tensors]
        key = [_param_key(ts) for ts in groups_of_tensors]
        if key != self._key:
            self._value = [aligned_stack([t.detach() for t in ts]) for ts in groups_of_tensors]
            self._key = key
        return self._value

    def refresh(self, experts: list[int], slots: list[list[tuple[dict, str, nn.Module]]]) -> list[Tensor] | None:
        """The stacks with only the slices of ``experts`` checked (and copied anew where one changed):
        for eager inference, which reads no other slice, so a call costs per active expert, not per
        expert. ``slots[e]``: per stack, expert ``e``'s tensor as ``(parameter dict, name, owner)``
        (the owner's attribute where the dict has none: a parametrized or pruned weight). ``None``
        where :meth:`get` must serve: nothing stacked yet, or a slice that cannot be updated in place
        (a new shape or dtype; an inference-mode stack outside inference mode)."""
        key = self._key
        if key is None:
            return None
        stale = []
        for e in experts:
            for g, ((versions, pointers), (params, name, owner)) in enumerate(zip(key, slots[e])):
                t = params.get(name)
                if t is None:
                    t = getattr(owner, name)
                if t._version != versions[e] or t.data_ptr() != pointers[e]:
                    stale.append((e, g, t))
        if not stale:
            return self._value
        with self._lock:
            if key is not self._key:  # another thread restacked meanwhile
                return None
            for e, g, t in stale:
                stack = self._value[g]
                if (t.shape != stack.shape[1:] or t.dtype != stack.dtype or t.device != stack.device
                        or (stack.is_inference() and not torch.is_inference_mode_enabled())):
                    return None
                # In place: a thread in a kernel now reads this slice only if the weights changed
                # during its call, when the naive loop would read them half-updated too.
                stack[e].copy_(t.detach())
                key[g][0][e], key[g][1][e] = t._version, t.data_ptr()
        return self._value

    @contextlib.contextmanager
    def held(self, groups_of_tensors: list[list[Tensor]]) -> Iterator[None]:
        """Refreshes the stacks now (eagerly) and marks them fresh for traced calls within the block;
        only where autograd is off, since a held stack is detached from the experts' parameters."""
        self.enter(groups_of_tensors)
        try:
            yield
        finally:
            self.exit()

    # enter/exit: :meth:`held` split in two, for a module's forward pre-hook and forward hook.
    def enter(self, groups_of_tensors: list[list[Tensor]] | None, hold: bool = True) -> None:
        """Opens a hold (:meth:`held`); every ``enter`` needs one :meth:`exit` in the same thread.
        ``hold=False`` opens one that holds nothing (``groups_of_tensors`` may then be ``None``)."""
        local = self._thread
        holding = hold and not (torch.is_grad_enabled() or torch.compiler.is_compiling())
        if holding:
            with self._lock:
                self.get(groups_of_tensors)
            local.depth += 1
            local.held = True
        local.holds.append(holding)

    def exit(self) -> None:
        """Closes this thread's latest :meth:`enter`."""
        local = self._thread
        if local.holds and local.holds.pop():
            local.depth -= 1
            local.held = local.depth > 0


def recording_grad(experts: Sequence[nn.Module]) -> bool:
    """Whether autograd would record through the experts (then grouped executors run sequentially)."""
    return torch.is_grad_enabled() and any(p.requires_grad for m in experts for p in m.parameters())


def _each_expert(layer: nn.Module, h: Tensor, bounds: list[int]) -> Tensor:
    """``layer`` on each expert's rows ``h[bounds[e]:bounds[e+1]]`` as a tensor of their own (as the naive
    loop computes a non-exact row-wise layer), concatenated back in expert order."""
    return torch.cat([layer(h[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a] or [h])


class GroupedLinearStack:
    """Runs ``E`` identical Linear stacks as segment matmuls over the expert-major buffer.

    Each Linear: ``y[r] = h[r] @ W[e(r)]^T + b[e(r)]`` for all ``N`` rows in one ``segment_linear``
    op (offsets = expert boundaries, so no padding; one ``addmm`` per expert, at the caller's thread
    count); ReLU-like row-wise layers run once on the whole buffer, transcendental ones (Tanh, GELU,
    ...) once per expert (``bitwise``; see ``_EXACT_ROWWISE``). ``addmm`` is the call ``nn.Linear``
    makes, on operands aligned as fresh tensors, so the output is bitwise the sequential executor's.
    ``parallel=True`` runs experts on all cores, each GEMM on one thread: faster for many small
    experts, equal to float32 rounding only. With ``segment_stack`` (``parallel`` on the C++
    backend) the whole stack is one op: each tile of an expert's rows runs every layer on one core,
    its activations in that core's cache (the stacks :func:`stack_plan` describes; others run layer
    by layer).
    """

    def __init__(self, experts: Sequence[nn.Module], segment_linear: Callable, parallel: bool = False,
                 segment_linear_gather: Callable | None = None, bitwise: bool = True,
                 segment_stack: Callable | None = None):
        self.experts = list(experts)
        self.segment_linear = segment_linear
        self.segment_linear_gather = segment_linear_gather
        self.parallel = parallel
        self.layers = _layers(self.experts[0])
        # Per Linear position, that layer of every expert: flattened once, not on every call (the
        # module rebuilds its executor when it moves, and the stack cache follows the parameters).
        flat = [_layers(expert) for expert in self.experts]
        self._linears = [[layers[i] for layers in flat] for i, layer in enumerate(self.layers)
                         if isinstance(layer, nn.Linear)]
        # Each Linear's own parameter dict, read on every call: nn.Module attribute lookup costs
        # ~1 us (38 us a call at E=10, 4 ms at E=1000); the dict lookup is ~20x cheaper and still
        # sees a parameter assigned anew.
        self._linear_params = [[lin._parameters for lin in linears] for linears in self._linears]
        self._has_bias = [linears[0].bias is not None for linears in self._linears]
        # Per layer, whether it is a Linear with a bias: read here once, as expert 0's parameters
        # are expert 0's to check only when it has rows.
        self._biased = [isinstance(layer, nn.Linear) and layer.bias is not None for layer in self.layers]
        # A ReLU's own function where the layer is only that: a module call costs ~1 us more.
        self._calls = [torch.relu if type(layer) is nn.ReLU and not layer.inplace else layer for layer in self.layers]
        # Per expert, (parameter dict, name, Linear) of each stacked tensor in _per_layer's order
        # (_StackCache.refresh reads them).
        self._slots = [[(linears[e]._parameters, name, linears[e])
                        for linears, has_bias in zip(self._linears, self._has_bias)
                        for name in (("weight", "bias") if has_bias else ("weight",))]
                       for e in range(len(self.experts))]
        self._cache = _StackCache()
        # bitwise: each expert's elements of a non-exact row-wise layer (Tanh, GELU, ...) computed in
        # a tensor of that expert's rows alone, as the naive loop computes them (see _EXACT_ROWWISE).
        self._per_expert = [bitwise and not isinstance(layer, (nn.Linear, *_EXACT_ROWWISE)) for layer in self.layers]
        first = next(i for i, layer in enumerate(self.layers) if isinstance(layer, nn.Linear))
        before = self.layers[:first]
        # Reading x's rows through perm runs the layers before the first Linear on the caller's whole
        # x: not for an in-place one (it would write to x, also through a Flatten's view) nor for one
        # that must run per expert.
        self._reads_through_perm = (segment_linear_gather is not None and not any(self._per_expert[:first])
                                    and not any(getattr(layer, "inplace", False) for layer in before))
        # The first Linear must see 2-D rows for its kernel to read them through perm.
        self._flattens_before_first = any(isinstance(layer, nn.Flatten) for layer in before)
        self._first_linear = first
        self.segment_stack = segment_stack
        # segment_stack is not bitwise: never where the caller asked for the naive loop's bits.
        self._plan = stack_plan(self.layers) if segment_stack is not None and not bitwise else None
        self._dropouts = [layer for layer in self.layers if isinstance(layer, nn.Dropout)]
        # serve()'s program: per layer ("linear", each expert's parameter dict, bias?, out_features),
        # ("per_expert", layer) or ("call", callable). Only for the bitwise layer-by-layer form.
        linear_params = iter(self._linear_params)
        self._serve_steps = None if parallel or self._plan is not None else [
            ("linear", next(linear_params), layer.bias is not None, layer.out_features) if isinstance(layer, nn.Linear)
            else ("per_expert", layer, None, None) if per_expert else ("call", call, None, None)
            for layer, per_expert, call in zip(self.layers, self._per_expert, self._calls)]
        #: The same program as ``_serving.serve_grouped_forward`` takes it (``0``: a Linear, ``1``: a
        #: row-wise call), for the module's one-call serving path; ``None`` where a layer runs per
        #: expert (:meth:`serve` handles those) or :meth:`serve` does not apply.
        self.serve_program = None if self._serve_steps is None or any(s[0] == "per_expert" for s in self._serve_steps) \
            else [(0, *step[1:]) if step[0] == "linear" else (1, *step[1:]) for step in self._serve_steps]

    def _per_layer(self) -> list[list[Tensor]]:
        per_layer = []
        for params, linears, has_bias in zip(self._linear_params, self._linears, self._has_bias):
            names = ("weight", "bias") if has_bias else ("weight",)
            for name in names:
                try:
                    per_layer.append([p[name] for p in params])
                except KeyError:  # parametrized or pruned: the module computes the tensor on access
                    per_layer.append([getattr(lin, name) for lin in linears])
        return per_layer

    def _stacked(self, counts: Tensor | None = None) -> list[Tensor]:
        compiling = torch.compiler.is_compiling()
        # Grad mode is checked again: another thread may hold the cache while this call records.
        if self._cache.fresh_for_traced_calls and not torch.is_grad_enabled():
            # Traced: never touches the E experts' parameters in the graph. Eager (the module's
            # forward pre-hook held them): checked for changes once a call, by the hold.
            if compiling:
                self._cache.traced = True
            return self._cache.value
        if counts is not None and not compiling and not torch.is_grad_enabled() and counts.is_cpu:
            # Only the experts with rows are read: checking the others' parameters was ~1 us each,
            # paid on every call (~80 us at E=100, most of a one-sample forward). numpy finds
            # them in a fifth of the time of Tensor.nonzero.
            stacked = self._cache.refresh(counts.numpy().nonzero()[0].tolist(), self._slots)
            if stacked is not None:
                return stacked
        if compiling:
            self._cache.traced = True  # the next hold checks every expert, so a recompile reads the stacks
        return self._cache.get(self._per_layer())

    def weights_stacked_for_compiled_calls(self):
        """Context manager for a compiled call: stacks the weights eagerly (only if one changed) so the
        traced code reads ``[E, out, in]`` tensors instead of stacking ``E`` parameters per layer in the
        graph, which made compile time grow with ``E``. A no-op while autograd is on."""
        return self._cache.held(self._per_layer())

    def enter_call(self) -> None:
        """:meth:`weights_stacked_for_compiled_calls` opened, for a forward pre-hook (:meth:`exit_call`
        closes it, in the same thread). It checks every expert's weights only for the first stacking
        and once a traced call has read the stacks: an eager call checks just its active experts."""
        hold = self._cache.traced or not self._cache.stacked
        self._cache.enter(self._per_layer() if hold else None, hold)

    def exit_call(self) -> None:
        self._cache.exit()

    @property
    def stacks_held(self) -> bool:
        """Whether this thread holds :meth:`weights_stacked_for_compiled_calls` now."""
        return self._cache.fresh_for_traced_calls

    def __call__(self, xg: Tensor, counts: Tensor) -> Tensor:
        """``xg: Tensor[N, ...]`` expert-major, ``counts: Tensor[E] int64`` -> ``Tensor[N, out]``."""
        return self._run(xg, counts, None)

    def fuses_gather(self, x: Tensor) -> bool:
        """Whether :meth:`run_gathered` can read ``x``'s rows itself (a kernel with a gathered form, no
        in-place or per-expert layer before the first Linear, and a first Linear that sees 2-D rows),
        so the module need not gather the buffer first."""
        return self._reads_through_perm and (x.dim() == 2 or self._flattens_before_first)

    def run_gathered(self, x: Tensor, perm: Tensor, counts: Tensor, offsets: Tensor | None = None,
                     kernel: Callable | None = None) -> Tensor:
        """:meth:`__call__` on ``x[perm]`` without building it: ``x: Tensor[B, ...]``, ``perm: Tensor[N]
        int64`` expert-major -> ``Tensor[N, out]``. The first Linear reads its rows through ``perm``; the
        row-wise layers before it run on ``x``'s ``B`` rows (row-wise, so the same rows result).
        ``offsets: Tensor[E+1] int64``, the routing's (computed from ``counts`` when not given).
        ``kernel``: the same segment matmul as one callable ``(x, weight, bias, offsets, parallel,
        perm)`` (:class:`~.inference_ops.InferenceOps`), in place of the backend's two."""
        return self._run(x, counts, perm, offsets, kernel)

    def serve(self, x: Tensor, perm: Tensor, offsets: Tensor, counts: Tensor, kernel: Callable) -> Tensor | None:
        """:meth:`run_gathered` for eager CPU inference with grad off, on the experts' own parameters.

        ``kernel`` is ``segment_linear_experts`` (:class:`~.inference_ops.InferenceOps`): each Linear gets
        the tensors its active experts' ``nn.Linear`` would read (the experts with rows, in order),
        so nothing is stacked, copied or checked for changes, and a call reads only the active experts'
        weights where they live, as the naive loop does. ``x: Tensor[B, ...]``, ``perm: Tensor[N] int64``,
        ``offsets: Tensor[E+1] int64``, ``counts: Tensor[E] int64`` -> ``Tensor[N, out]``. ``None`` where this
        form does not apply (parallel segments, the one-op stack, a parametrized or pruned weight, which
        its module computes on access): the caller runs :meth:`run_gathered` instead.
        """
        if self._serve_steps is None:
            return None
        active = counts.numpy().nonzero()[0].tolist()
        tensors = []  # per Linear, (weights, biases): read before any layer runs, so a fallback wastes nothing
        try:
            for step in self._serve_steps:
                if step[0] == "linear":
                    params = step[1]
                    tensors.append(([params[e]["weight"] for e in active],
                                    [params[e]["bias"] for e in active] if step[2] else []))
        except KeyError:
            return None
        h = x
        linears = iter(tensors)
        bounds = None
        for step in self._serve_steps:
            if step[0] == "linear":
                weights, biases = next(linears)
                h, perm = kernel(h, weights, biases, offsets, step[3], perm), None
            elif step[0] == "per_expert":
                bounds = offsets.tolist() if bounds is None else bounds
                h = _each_expert(step[1], h, bounds)
            else:
                h = step[1](h)
        return h

    def _run(self, h: Tensor, counts: Tensor, perm: Tensor | None, offsets: Tensor | None = None,
             kernel: Callable | None = None) -> Tensor:
        if offsets is None:
            offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        stacked = self._stacked(counts)
        start = 0
        if self._plan is not None and self._stack_op_applies(h, stacked):
            start = self._first_linear
            for layer in self.layers[:start]:
                h = layer(h)
            if h.dim() == 2:
                return self._run_stack(h, perm, offsets, stacked)
        stacked = iter(stacked)
        bounds = None
        for layer, per_expert, biased, call in zip(self.layers[start:], self._per_expert[start:], self._biased[start:],
                                                   self._calls[start:]):
            if isinstance(layer, nn.Linear):
                weight = next(stacked)
                bias = next(stacked) if biased else None
                if kernel is not None:
                    h, perm = kernel(h, weight, bias, offsets, self.parallel, perm), None
                elif perm is not None:
                    h, perm = self.segment_linear_gather(h, perm, weight, bias, offsets, self.parallel), None
                else:
                    h = self.segment_linear(h, weight, bias, offsets, self.parallel)
            elif per_expert and not torch.compiler.is_compiling():  # compiled code fuses: not bitwise anyway
                bounds = offsets.tolist() if bounds is None else bounds
                h = _each_expert(layer, h, bounds)
            else:
                h = call(h)
        return h

    def _stack_op_applies(self, h: Tensor, stacked: list[Tensor]) -> bool:
        # Not for a training-mode Dropout (random per element: the layer-by-layer path calls it as it
        # is) nor with autograd recording (segment_stack has no backward).
        recording = torch.is_grad_enabled() and (h.requires_grad or any(t.requires_grad for t in stacked))
        return not recording and not any(layer.training for layer in self._dropouts)

    def _run_stack(self, h: Tensor, perm: Tensor | None, offsets: Tensor, stacked: list[Tensor]) -> Tensor:
        stacked = iter(stacked)
        weights, biases = [], []
        for has_bias in self._has_bias:
            weights.append(next(stacked))
            biases.append(next(stacked) if has_bias else None)
        return self.segment_stack(h, weights, biases, self._plan[0], self._plan[1], offsets, perm)


class GroupedLinearRuns:
    """Linear stacks that differ between runs of consecutive experts (identical within a run): one
    :class:`GroupedLinearStack` per run, each on its run's contiguous rows of the expert-major buffer.

    Bitwise the sequential executor, as each run is. It reads the counts on the host to cut the buffer,
    so under ``torch.compile`` it runs eagerly (a graph break, like the vmap form).
    """

    def __init__(self, experts: Sequence[nn.Module], segment_linear: Callable, parallel: bool = False,
                 bitwise: bool = True, segment_stack: Callable | None = None):
        self.runs = layout_runs(experts)
        self.stacks = [GroupedLinearStack(experts[a:b], segment_linear, parallel, bitwise=bitwise,
                                          segment_stack=segment_stack) for a, b in self.runs]

    @torch.compiler.disable
    def __call__(self, xg: Tensor, counts: Tensor) -> Tensor:
        """``xg: Tensor[N, ...]`` expert-major, ``counts: Tensor[E] int64`` -> ``Tensor[N, out]``."""
        bounds = [0]
        for n in counts.tolist():
            bounds.append(bounds[-1] + n)
        parts = [stack(xg[bounds[a]:bounds[b]], counts[a:b]) for (a, b), stack in zip(self.runs, self.stacks)]
        return torch.cat(parts)


def bucket_experts(counts: list[int]) -> list[list[int]]:
    """Experts with rows, in buckets whose smallest count is more than half the largest.

    Padding every expert of a bucket to the bucket's largest count then wastes at most half of the
    bucket's rows; there are at most ``log2(max count) + 1`` buckets.
    """
    order = sorted((e for e, n in enumerate(counts) if n > 0), key=lambda e: -counts[e])
    buckets: list[list[int]] = []
    for e in order:
        if buckets and 2 * counts[e] > counts[buckets[-1][0]]:
            buckets[-1].append(e)
        else:
            buckets.append([e])
    return buckets


class VmapExperts:
    """Same-architecture experts as ``torch.func.functional_call`` under ``vmap`` over stacked state.

    Rows are padded per bucket (:func:`bucket_experts`); ``last_padding_waste`` is the fraction of
    computed rows that were padding in the latest call. Batched convolutions and reductions round
    differently from per-expert calls: outputs agree with sequential to float32 rounding.
    """

    def __init__(self, experts: Sequence[nn.Module]):
        self.experts = list(experts)
        self._names = [n for n, _ in self.experts[0].named_parameters()]
        self._buffer_names = [n for n, _ in self.experts[0].named_buffers()]
        self._cache = _StackCache()
        self.last_padding_waste = 0.0

    @torch.compiler.disable  # buckets sort data-dependent counts in Python: runs eagerly under compile
    def __call__(self, xg: Tensor, counts: Tensor) -> Tensor:
        sizes = counts.tolist()
        named = [(dict(m.named_parameters()), dict(m.named_buffers())) for m in self.experts]
        params = [[p[n] for p, _ in named] for n in self._names]
        buffers = [[b[n] for _, b in named] for n in self._buffer_names]
        stacked = self._cache.get(params + buffers)
        starts = [0]
        for n in sizes:
            starts.append(starts[-1] + n)
        base = self.experts[0]
        outputs: dict[int, Tensor] = {}
        computed = 0

        def call_one(p, b, rows):
            return torch.func.functional_call(base, (p, b), (rows,))

        for bucket in bucket_experts(sizes):
            width = sizes[bucket[0]]
            idx = torch.tensor(bucket, device=xg.device)
            padded = xg.new_zeros(len(bucket), width, *xg.shape[1:])
            for j, e in enumerate(bucket):
                padded[j, : sizes[e]] = xg[starts[e] : starts[e + 1]]
            p = {n: t.index_select(0, idx) for n, t in zip(self._names, stacked[: len(self._names)])}
            b = {n: t.index_select(0, idx) for n, t in zip(self._buffer_names, stacked[len(self._names):])}
            y = torch.vmap(call_one)(p, b, padded)
            computed += len(bucket) * width
            for j, e in enumerate(bucket):
                outputs[e] = y[j, : sizes[e]]
        self.last_padding_waste = 1.0 - xg.shape[0] / computed if computed else 0.0
        if not outputs:
            return None
        return torch.cat([outputs[e] for e in range(len(sizes)) if sizes[e] > 0])


def run_on_streams(experts: Sequence[nn.Module], chunks: list[Tensor], streams: list) -> list[Tensor | None]:
    """Each non-empty chunk's expert on one of ``streams`` (round robin); joins on the current stream.

    Side streams first wait for the current stream (the gather that filled ``xg``); ``record_stream``
    keeps the caching allocator from reusing an input or output while a side stream still uses it.
    """
    main = torch.cuda.current_stream()
    ready = torch.cuda.Event()
    ready.record(main)
    outputs: list[Tensor | None] = [None] * len(chunks)
    used = set()
    for e, (expert, rows) in enumerate(zip(experts, chunks)):
        if rows.shape[0] == 0:
            continue
        stream = streams[e % len(streams)]
        used.add(stream)
        stream.wait_event(ready)
        with torch.cuda.stream(stream):
            rows.record_stream(stream)
            y = expert(rows)
            y.record_stream(main)
        outputs[e] = y
    for stream in used:
        done = torch.cuda.Event()
        done.record(stream)
        main.wait_event(done)
    return outputs


def new_stream_pool(device: torch.device, size: int = 4) -> list:
    return [torch.cuda.Stream(device=device) for _ in range(size)]
