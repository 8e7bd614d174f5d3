"""``MetaNeuralNetwork``: a drop-in ``nn.Module`` over the engine's public stages (:mod:`.stages`).

switch -> softmax -> group scores -> route (fused op) -> gather all routed rows into one buffer ->
each specialist on its contiguous slice -> recombine (one fused op: contributions, accumulation in
fixed expert order, log_softmax).
Output is bitwise equal to :func:`mnn_fast.reference.naive_forward` on CPU in float32. Eager CPU
inference with the grouped Linear executor calls the same kernels at their C++ entries
(:mod:`.inference_ops`), which is what a small batch's fixed cost mostly is.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from . import stages
from .alignment import FRESH_ALIGNMENT
from .backends import BACKEND_NAMES, Backend, get_backend, select_backend
from .contributions import ClassTables, class_tables, specialist_contributions
from .executors import (EXECUTOR_NAMES, GroupedLinearStack, grouped_executor, new_stream_pool, recording_grad,
                        select_executor)
from .inference_ops import inference_ops
from .routing import Routing, check_threshold, check_top_k, group_tensors, is_identity, normalize_groups

__all__ = ["MetaNeuralNetwork"]


class MetaNeuralNetwork(nn.Module):
    """A switch network plus ``E`` specialists; each input wakes only the specialists it needs.

    Args:
        switch: ``nn.Module`` mapping ``x: Tensor[B, ...]`` to logits ``Tensor[B, C]``.
        specialists: ``E`` ``nn.Module`` s; specialist ``e`` maps its rows to ``Tensor[n, C]`` logits,
            or ``Tensor[n, 1]`` (a binary specialist) when its group has one class.
        groups: ``E`` lists of class ids; ``None`` = one specialist per class (``E == C``).
        threshold: activate expert ``e`` for sample ``i`` when its group probability is ``> threshold``
            (``[0, 1]``; ``None`` only together with ``top_k``). Can be changed after training.
        top_k: keep only the ``top_k`` highest-scoring experts per sample (ties: lower index).
        num_classes: ``C``; when not given, each batch uses the switch's own output width.
        switch_fn: optional ``callable(scores: Tensor[B, E] float32) -> Tensor[B, E] bool`` replacing
            the threshold/top-k rule.
        backend: ``"auto"`` (fastest available: cuda > triton > torch on GPU, cpp > torch on CPU), one
            of ``"torch"``, ``"cpp"``, ``"cuda"``, ``"triton"``, or a
            :class:`~mnn_fast.engine.backends.Backend` record of the caller's own ops.
        executor: how the specialists run (:mod:`mnn_fast.engine.executors`): ``"sequential"`` (one call
            per active expert), ``"grouped"`` (one batched computation over stacked weights),
            ``"grouped_parallel"`` (Linear stacks, experts spread over the cores; not bitwise),
            ``"streams"`` (CUDA streams; sequential elsewhere; grouped ones run inference only, with
            autograd recording they run sequentially) or ``"auto"`` (grouped for identical
            Linear stacks, else streams on CUDA, else sequential). ``executor_skipped`` says why
            an executor was passed over.

    ``forward(x)`` returns ``Tensor[B, C] float32`` log-probabilities; ``forward(x, return_routing=True)``
    also returns the :class:`~mnn_fast.Routing` used.
    """

    def __init__(
        self,
        switch: nn.Module,
        specialists: Sequence[nn.Module],
        groups=None,
        threshold: float | None = 0.25,
        top_k: int | None = None,
        *,
        num_classes: int | None = None,
        switch_fn: Callable[[Tensor], Tensor] | None = None,
        backend: str = "auto",
        executor: str = "auto",
    ):
        super().__init__()
        if not isinstance(switch, nn.Module):
            raise TypeError(f"switch must be an nn.Module, got {type(switch).__name__}")
        if isinstance(specialists, nn.Module) and not isinstance(specialists, (nn.ModuleList, nn.Sequential)):
            raise TypeError("specialists must be a sequence of nn.Modules, got a single nn.Module")
        specialists = list(specialists)
        if not specialists:
            raise ValueError("specialists is empty; expected at least one nn.Module")
        for e, s in enumerate(specialists):
            if not isinstance(s, nn.Module):
                raise TypeError(f"specialists[{e}] must be an nn.Module, got {type(s).__name__}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if switch_fn is not None and not callable(switch_fn):
            raise TypeError(f"switch_fn must be callable, got {type(switch_fn).__name__}")
        if not isinstance(backend, Backend) and backend != "auto" and backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES} (or a Backend record), got {backend!r}")
        self.switch = switch
        self.specialists = nn.ModuleList(specialists)
        self.groups = normalize_groups(groups, len(specialists), num_classes)
        self._default_groups = groups is None
        if num_classes is None and groups is None:
            num_classes = len(specialists)
        self.num_classes = num_classes
        self._top_k = check_top_k(top_k, len(specialists))
        self._threshold = check_threshold(threshold, self._top_k)
        self.switch_fn = switch_fn
        self.requested_backend = backend
        if executor not in EXECUTOR_NAMES:
            raise ValueError(f"executor must be one of {EXECUTOR_NAMES}, got {executor!r}")
        self.requested_executor = executor
        group_offsets, group_classes = group_tensors(self.groups, torch.device("cpu"))
        self.register_buffer("group_offsets", group_offsets, persistent=False)
        self.register_buffer("group_classes", group_classes, persistent=False)
        self._max_class = max(c for g in self.groups for c in g)
        # Contribution index tables per (C, device), built on first use; not module state, so a
        # forward never changes the module (C may be learnt per batch when num_classes is None).
        self._tables: dict[tuple[int, torch.device], ClassTables] = {}
        # Set once torch.compile wraps this module (_note_compile_wrapper): from then on the stack
        # hooks are registered (_sync_stack_hooks).
        self._wrapped_for_compile = False
        self._resolve_backend()

    # ------------------------------------------------------------------ configuration

    @property
    def num_experts(self) -> int:
        return len(self.specialists)

    @property
    def threshold(self) -> float | None:
        return self._threshold

    @threshold.setter
    def threshold(self, value) -> None:
        self._threshold = check_threshold(value, self._top_k)
        self._serve_call = self._serve_fast = None  # their arguments hold the threshold

    @property
    def top_k(self) -> int | None:
        return self._top_k

    @top_k.setter
    def top_k(self, value) -> None:
        top_k = check_top_k(value, self.num_experts)
        check_threshold(self._threshold, top_k)
        self._top_k = top_k
        self._serve_call = self._serve_fast = None

    @property
    def backend(self) -> str:
        """The backend in use for the module's current device."""
        return self._backend.name

    @property
    def ops(self) -> Backend:
        """The :class:`~mnn_fast.engine.backends.Backend` (routing ops) the stages run on."""
        return self._backend

    def _device(self) -> torch.device:
        first = next(self.parameters(), None)
        return first.device if first is not None else self.group_offsets.device

    def _resolve_backend(self) -> None:
        # Kept for the per-call input checks: walking every submodule for its first parameter cost
        # ~10 us a call. Refreshed whenever the module moves or changes dtype (_apply).
        self._module_device = self._device()
        # Read by each serving call; device.type builds its string through a C++ stream per read.
        self._on_cpu = self._module_device.type == "cpu"
        self._switch_param = (self.switch, next(self.switch.parameters(), None))
        # is_identity walks every group: at E = 1000 that was ~0.5 ms of each forward.
        self._one_class_groups = len(self.groups) if is_identity(self.groups, len(self.groups)) else None
        if isinstance(self.requested_backend, Backend):  # the caller's own ops, used as given
            self._backend, self.backend_skipped = self.requested_backend, {}
        else:
            name, skipped = select_backend(self.requested_backend, self._module_device)
            self._backend = get_backend(name)
            self.backend_skipped: dict[str, str] = skipped
        self.executor, self.executor_skipped = select_executor(self.requested_executor, self.specialists, self._module_device, self._backend)
        self._grouped = None
        if self.executor in ("grouped", "grouped_parallel"):
            self._grouped = grouped_executor(self.specialists, self._backend, self.executor == "grouped_parallel")
        self._streams = new_stream_pool(self._module_device) if self.executor == "streams" else None
        # The serving path (_serve): the bitwise executors (grouped Linear stacks, sequential) on the
        # library's C++ ops.
        self._inference = None
        if ((self.executor == "sequential" or (self.executor == "grouped" and isinstance(self._grouped, GroupedLinearStack)))
                and not isinstance(self.requested_backend, Backend)):
            self._inference = inference_ops(self._backend.name)
        self._sync_stack_hooks()
        # The executor's one-call entry and its arguments (_serve_arguments), and forward's short path to it.
        self._serve_call = self._serve_fast = None
        self._tables = {}
        self._workspaces: dict[int, Tensor] = {}
        if self.num_classes is not None:
            self.class_tables(self.num_classes)  # built eagerly so compiled code finds them ready

    def _sync_stack_hooks(self) -> None:
        """The hooks that hold the grouped stacks around each call (:func:`_hold_stacks`), registered
        while the executor is a :class:`GroupedLinearStack` and once ``torch.compile`` has wrapped the
        module, the one call they serve: any hook sends every call through ``nn.Module``'s slower hook
        path (12-22 us of a one-sample call), and eager calls read the experts' own parameters."""
        wanted = isinstance(self._grouped, GroupedLinearStack) and getattr(self, "_wrapped_for_compile", False)
        pre = [k for k, hook in self._forward_pre_hooks.items() if hook is _hold_stacks]
        if wanted and not pre:
            self.register_forward_pre_hook(_hold_stacks)
            self.register_forward_hook(_release_stacks, always_call=True)
        elif pre and not wanted:
            for k in pre:
                del self._forward_pre_hooks[k]
            for k in [k for k, hook in self._forward_hooks.items() if hook is _release_stacks]:
                del self._forward_hooks[k]
                self._forward_hooks_always_called.pop(k, None)

    def _apply(self, fn, *args, **kwargs):
        # Moving the module (.to/.cuda/.cpu) can change which backends can run.
        out = super()._apply(fn, *args, **kwargs)
        self._resolve_backend()
        return out

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, classes={self.num_classes}, threshold={self._threshold}, "
            f"top_k={self._top_k}, backend={self.backend!r}, executor={self.executor!r}"
        )

    # ------------------------------------------------------------------ forward

    def _check_input(self, x) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.dim() < 2:
            raise ValueError(f"x must have shape [B, ...] with at least 2 dimensions, got {tuple(x.shape)}")
        if x.device != self._module_device:
            raise ValueError(f"x is on {x.device} but the module is on {self._module_device}; move one of them")
        owner, param = self._switch_param
        if owner is not self.switch:  # a new switch assigned since
            param = next(self.switch.parameters(), None)
        if (param is not None and param.is_floating_point() and x.dtype != param.dtype
                and not torch.is_autocast_enabled(x.device.type)):
            raise TypeError(f"x is {x.dtype} but the switch's parameters are {param.dtype}; "
                            f"convert one of them (x.to({param.dtype}) or mnn.to({x.dtype}))")

    def _check_logits(self, z, x: Tensor) -> int:
        batch = x.shape[0]
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[0] != batch:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            hint = ""
            if isinstance(z, Tensor) and z.dim() == 1:
                # Convolutions accept an unbatched [C, H, W] image and return [classes].
                hint = f"; x of shape {tuple(x.shape)} looks unbatched: pass a batch, e.g. x.unsqueeze(0)"
            raise ValueError(f"switch must return logits of shape [B={batch}, C], got {shape}{hint}")
        num_classes = z.shape[1]
        if self.num_classes is not None and num_classes != self.num_classes:
            hint = ""
            if self._default_groups:
                hint = (f": without groups= each of the {self.num_experts} specialists covers one class, so C must "
                        f"equal the number of specialists; pass groups= (one list of class ids per specialist)")
            raise ValueError(f"switch returned C={num_classes} logits but the module expects C={self.num_classes}{hint}")
        if self._max_class >= num_classes:
            raise ValueError(f"groups name class {self._max_class} but the switch returns only C={num_classes} classes")
        return num_classes

    def class_tables(self, num_classes: int) -> ClassTables:
        """The contribution index tables for ``C = num_classes`` on the module's device (cached)."""
        key = (num_classes, self.group_offsets.device)
        if key not in self._tables:
            self._tables[key] = class_tables(self.groups, num_classes, self.group_offsets.device)
        return self._tables[key]

    def forward(self, x: Tensor, return_routing: bool = False):
        """``x: Tensor[B, ...]`` -> log-probabilities ``Tensor[B, C] float32`` (and the routing)."""
        # Compiling first: a traced forward never reads the short path, so eager calls that set it
        # cannot invalidate a compiled graph's guards.
        served = None if torch.compiler.is_compiling() else self._serve_fast
        if served is not None and type(x) is Tensor and not torch.is_grad_enabled():
            # A call like the one that built the serving entry (_serve): the same switch, its dtype,
            # CPU, the same rank, still no switch_fn. A one-sample call pays each Python step with its
            # caches cold after the GEMVs, so this path takes as few as it can.
            switch, param, ndim, entry, arguments = served
            if (x.dim() == ndim and x.dtype is param.dtype and x.is_cpu and self.switch_fn is None
                    and self._modules["switch"] is switch):
                z = switch(x)
                result = entry(z, x, return_routing, *arguments)
                return result if type(result) is Tensor else self._serve_rest(x, z, result, return_routing)
        if (self._inference is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and isinstance(x, Tensor) and (self._grouped is None or self._grouped.fuses_gather(x))):
            return self._serve(x, return_routing)
        log_probs, scores = self.switch_scores(x)
        routing = stages.route_batch(scores, self._backend, self._threshold, self._top_k, self.switch_fn)
        num_classes = log_probs.shape[1]
        if self._fused_gather(x):
            # The kernel reads x's routed rows itself: x[perm] is not built (except for F.grouped_mm).
            outputs = self._grouped.run_gathered(x, routing.perm, routing.counts, routing.offsets)
            stages.check_specialist_output(outputs, routing.perm, self.groups, num_classes)
        else:
            outputs = self.specialist_outputs(self._gathered(x, routing), routing, num_classes)
        out = stages.recombine_log_probs(log_probs, outputs, routing, self.class_tables(num_classes), self._backend)
        return (out, routing) if return_routing else out

    def _serve(self, x: Tensor, return_routing: bool):
        """:meth:`forward` in eager CPU inference with the grouped Linear or the sequential executor:
        the same stages and kernels, each op called at its C++ entry inside one region below the
        autograd key, so a small batch pays little more than its switch and its active specialists."""
        if not self._input_needs_no_checks(x):
            self._check_input(x)
        z = self._modules["switch"](x)
        # The usual call is one more: the executor's one-call entry (grouped_forward or
        # sequential_forward) checks z against the width checked before (None where it differs)
        # and does the rest, below autograd itself.
        arguments, result = self._serve_call, None
        if arguments is not None and self.switch_fn is None:
            result = arguments[0](z, x, return_routing, *arguments[1:])
            if type(result) is Tensor:  # the output alone: complete, no routing asked for
                return result
        return self._serve_rest(x, z, result, return_routing)

    def _serve_rest(self, x: Tensor, z: Tensor, result: tuple | None, return_routing: bool):
        """:meth:`_serve` after the switch's logits ``z`` and the one-call entry's ``result``: the
        routing asked for, or the entry built (first call, new width) or declined (``None``), or the
        specialists' outputs it could not read (out ``None``) finished op by op."""
        ops = self._inference
        if result is not None and result[0] is not None:
            return result[0], Routing(*result[3:])
        arguments = self._serve_call
        if result is None:
            num_classes = self._check_logits(z, x)
            if arguments is None or arguments[1] != num_classes:  # with a switch_fn: built once too
                built = self._serve_arguments(num_classes, x)
                if built is not arguments:  # (no nn.Module.__setattr__ per call while there is none)
                    self._serve_call = arguments = built
                    self._serve_fast = self._fast_serve_call(x, built)
                if arguments is not None and self.switch_fn is None:
                    result = arguments[0](z, x, True, *arguments[1:])
        else:
            num_classes = arguments[1]
        with ops.below_autograd():
            outputs = None
            if result is not None:
                out, outputs, log_probs, *routed = result
                if out is not None:
                    return (out, Routing(*routed)) if return_routing else out
            else:
                log_probs, probs = ops.softmax_rows(z.float())
                scores = probs if self._one_class_groups == num_classes else ops.group_scores(
                    probs, self.group_offsets, self.group_classes)
                if self.switch_fn is None:
                    args = scores, -math.inf if self._threshold is None else self._threshold, self._top_k or 0
                else:
                    args = stages.route_args(scores, self._threshold, self._top_k, self.switch_fn)
                routed = ops.route(*args)
                if self._grouped is not None:
                    counts, offsets, perm = routed[:3]
                    outputs = self._grouped.serve(x, perm, offsets, counts, ops.segment_linear_experts)
            routing = Routing(*routed)
            if self._grouped is not None:
                if outputs is None:  # a parametrized or pruned weight: the stacked form reads it
                    outputs = self._grouped.run_gathered(x, routing.perm, routing.counts, routing.offsets,
                                                         kernel=ops.segment_linear)
                if not (outputs.dim() == 2 and outputs.shape[0] == routing.perm.shape[0]
                        and outputs.shape[1] == num_classes):
                    stages.check_specialist_output(outputs, routing.perm, self.groups, num_classes)  # binary, or an error
            elif outputs is None:
                outputs = self.specialist_outputs(self._gathered(x, routing, ops), routing, num_classes)
            else:  # sequential_forward ran the specialists; an output it could not read is checked here
                stages.check_row_counts(outputs, routing.counts.tolist())
                stages.check_specialist_output(outputs, routing.perm, self.groups, num_classes)
            out = stages.recombine_log_probs(log_probs, outputs, routing, self.class_tables(num_classes), self._backend,
                                             recombine=ops.recombine)
        return (out, routing) if return_routing else out

    def _input_needs_no_checks(self, x: Tensor) -> bool:
        """The usual serving input, told in a few reads (a one-sample call pays each Python step cold,
        after the GEMVs): a CPU batch of the switch's dtype for a module on the CPU. Anything else
        takes :meth:`_check_input`'s checks and their messages."""
        owner, param = self._switch_param
        return (owner is self._modules["switch"] and param is not None and x.dtype is param.dtype and x.is_cpu
                and self._on_cpu and x.dim() >= 2)

    def _fast_serve_call(self, x: Tensor, arguments: tuple | None) -> tuple | None:
        """``(switch, its first parameter, x.dim(), entry, arguments after (z, x, routing))`` for
        :meth:`forward`'s short path: where ``x`` needs no input checks and no ``switch_fn`` replaces
        the routing; else ``None``."""
        if arguments is None or self.switch_fn is not None or not self._input_needs_no_checks(x):
            return None
        switch, param = self._switch_param
        return switch, param, x.dim(), arguments[0], arguments[1:]

    def _serve_arguments(self, num_classes: int, x: Tensor) -> tuple | None:
        """``(entry, C, ...)``: the executor's one-call entry and what it takes after ``(z, x,
        routing)`` for logits of width ``C = num_classes`` (checked) and inputs like ``x``, or ``None``
        where there is none: a grouped stack's ``grouped_forward`` with its program; for the
        sequential executor ``sequential_forward`` where its rows go through ``gather_split`` (2-D
        ``x`` whose rows are not a multiple of the fresh alignment: :meth:`_rows_split_per_expert`).
        Kept between calls until the threshold, top-k or executor change (each resets it)."""
        ops = self._inference
        if self._grouped is not None:
            entry, program = ops.grouped_forward, self._grouped.serve_program
            if program is None:
                return None
            executor_args = (program,)
        elif x.dim() == 2 and self._rows_split_per_expert(x):
            # The ModuleList's own dict: read at each call, so a replaced specialist is the one called.
            entry = ops.sequential_forward
            executor_args = (x.shape[1], self.specialists._modules, stages.explain_expert_error)
        else:
            return None
        tables = self.class_tables(num_classes)
        groups = (None, None) if self._one_class_groups == num_classes else (self.group_offsets, self.group_classes)
        threshold = -math.inf if self._threshold is None else self._threshold
        return (entry, num_classes, threshold, self._top_k or 0, *groups, *executor_args, tables.group_offsets,
                tables.group_classes, tables.log_spread)

    def _fused_gather(self, x: Tensor) -> bool:
        """The grouped Linear kernel reads the routed rows of ``x`` itself (inference only: the C++
        kernel copies each expert's rows just before its GEMM, Triton's reads them in the kernel)."""
        grouped = self._grouped
        return isinstance(grouped, GroupedLinearStack) and grouped.fuses_gather(x) and not self._records_grad(x)

    def _gathered(self, x: Tensor, routing: Routing, ops=None) -> Tensor | list[Tensor]:
        """The routed rows for the executor: one buffer ``x[perm]``, or, for the sequential executor in
        CPU inference when a row's bytes are not a multiple of the fresh alignment (so most segments
        of one buffer would need realigning copies), each expert's rows as a fresh tensor (by
        ``ops.gather_split``: the backend's, or the serving path's direct entry)."""
        if self._rows_split_per_expert(x) and self._eager_cpu_inference(x):
            return stages.gather_expert_rows(x, routing.perm, routing.offsets, ops or self._backend)
        return stages.gather_rows(x, routing.perm, self._backend, self._workspace_for(x, routing.perm.shape[0]))

    def _rows_split_per_expert(self, x: Tensor) -> bool:
        """Whether the sequential executor takes each expert's rows of ``x`` as a fresh tensor of their
        own (``gather_split``) in eager CPU inference: where a row's bytes are not a multiple of the
        fresh alignment, so most segments of one gathered buffer would need realigning copies."""
        return (self._grouped is None and self._streams is None and self._backend.gather_split is not None
                and math.prod(x.shape[1:]) * x.element_size() % FRESH_ALIGNMENT != 0)

    def _eager_cpu_inference(self, x: Tensor) -> bool:
        """CPU, eager, and nothing that autograd records: where gathered rows need no autograd."""
        return x.is_cpu and not torch.compiler.is_compiling() and not self._records_grad(x)

    def _records_grad(self, x: Tensor) -> bool:
        """Whether autograd records this forward (through ``x`` or the specialists' parameters)."""
        return torch.is_grad_enabled() and (x.requires_grad or recording_grad(self.specialists))

    def weights_stacked_for_compiled_calls(self):
        """Context manager around a call of the compiled module (:func:`mnn_fast.compile` enters it):
        the grouped executor stacks its weights eagerly, so the graph takes them as inputs rather than
        stacking every specialist's parameters (compile time then does not grow with ``E``). Only with
        autograd off; otherwise, and for other executors, a no-op."""
        if isinstance(self._grouped, GroupedLinearStack):
            return self._grouped.weights_stacked_for_compiled_calls()
        return contextlib.nullcontext()

    def _workspace_for(self, x: Tensor, rows: int) -> Tensor | None:
        """The calling thread's gather buffer, grown to this batch's size (its high-water mark), for
        CPU inference in eager mode; ``None`` (a fresh buffer) where autograd may save the gathered rows
        for a backward or ``torch.compile`` traces. One per thread, so concurrent calls never share one."""
        if not self._eager_cpu_inference(x):
            return None
        need = rows * math.prod(x.shape[1:])
        key = threading.get_ident()
        buffer = self._workspaces.get(key)
        if buffer is None or buffer.numel() < need or buffer.dtype != x.dtype:
            buffer = self._workspaces[key] = torch.empty(need, dtype=x.dtype)
        return buffer

    @property
    def workspace_bytes(self) -> int:
        """Bytes held by the gather workspaces (:meth:`release_workspace` frees them)."""
        return sum(b.numel() * b.element_size() for b in self._workspaces.values())

    def release_workspace(self) -> None:
        """Frees the gather buffers kept between calls (also those of threads that have ended); the
        next forward allocates afresh."""
        self._workspaces = {}

    # Derived from the specialists, the device and the requested backend and executor, and rebuilt
    # from them on load: the executor holds a lock and thread-local state, the backend record holds
    # the extension's op handles, none of which pickle; the scratch buffers stay behind.
    _DERIVED_STATE = ("_backend", "backend_skipped", "executor", "executor_skipped", "_grouped", "_streams",
                      "_inference", "_tables", "_workspaces", "_module_device", "_on_cpu", "_switch_param",
                      "_one_class_groups", "_serve_call", "_serve_fast")

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in self._DERIVED_STATE:
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._resolve_backend()

    def switch_scores(self, x: Tensor) -> stages.SwitchScores:
        """Checks ``x: Tensor[B, ...]``, runs the switch: ``(log_probs: Tensor[B, C], scores: Tensor[B, E])`` float32."""
        self._check_input(x)
        z = self.switch(x)
        num_classes = self._check_logits(z, x)
        if self._one_class_groups == num_classes:  # is_identity(self.groups, num_classes)
            return stages.switch_scores(z, self._backend)
        return stages.switch_scores(z, self._backend, self.group_offsets, self.group_classes)

    def contributions(self, xg: Tensor, routing: Routing, num_classes: int) -> Tensor:
        """``log v: Tensor[N, C] float32`` in buffer order: the specialists on their rows of ``xg``."""
        outputs = self.specialist_outputs(xg, routing, num_classes)
        return specialist_contributions(outputs, routing.offsets, self.class_tables(num_classes), self._backend)

    def specialist_outputs(self, xg: Tensor, routing: Routing, num_classes: int):
        """The specialists' logits on their rows of ``xg: Tensor[N, ...]``, checked: per expert
        ``Tensor[n_e, C or 1]`` (``None`` without rows) or one ``Tensor[N, C or 1]`` in buffer order."""
        outputs = stages.run_specialists(self.specialists, xg, routing.counts, grouped=self._grouped,
                                         streams=self._streams)
        stages.check_specialist_output(outputs, xg, self.groups, num_classes)
        return outputs


# ---------------------------------------------------------------- stacked weights under torch.compile
# Registered by MetaNeuralNetwork._sync_stack_hooks while the executor is a GroupedLinearStack, once
# torch.compile has wrapped the module (_note_compile_wrapper). torch.compile(mnn) runs the module's
# hooks eagerly (outside dynamo, which picks up forward's frame) and traces forward. The pre-hook
# stacks the grouped executor's weights there when one changed (version counters), so the graph
# reads one [E, out, in] input per layer instead of stacking E parameters per layer, which made
# compile time grow with E; the forward hook lets go after the call, also when it raised. Only with
# autograd off (a held stack is detached from the parameters). Where dynamo inlines the call (the
# module inside a larger compiled model), the hooks trace as no-ops (their substitutes) and the graph
# stacks the parameters itself, as in training.


def _note_compile_wrapper(parent: nn.Module, name: str, child) -> None:
    """A global module-registration hook: ``torch.compile(mnn)`` registers ``mnn`` as its
    ``OptimizedModule``'s ``_orig_mod``, before its first call; only then does the module need its
    stack hooks. Returns ``None``: the registration goes on unchanged."""
    if name == "_orig_mod" and isinstance(child, MetaNeuralNetwork) and not getattr(child, "_wrapped_for_compile", False):
        child._wrapped_for_compile = True
        child._sync_stack_hooks()


torch.nn.modules.module.register_module_module_registration_hook(_note_compile_wrapper)


@torch.compiler.disable
def _hold_stacks(module: MetaNeuralNetwork, args) -> None:
    if isinstance(module._grouped, GroupedLinearStack):
        module._grouped.enter_call()


@torch.compiler.disable
def _release_stacks(module: MetaNeuralNetwork, args, output) -> None:
    if isinstance(module._grouped, GroupedLinearStack):
        module._grouped.exit_call()


@torch.compiler.substitute_in_graph(_hold_stacks, skip_signature_check=True)
def _hold_stacks_traced(module, args) -> None:
    return None


@torch.compiler.substitute_in_graph(_release_stacks, skip_signature_check=True)
def _release_stacks_traced(module, args, output) -> None:
    return None
