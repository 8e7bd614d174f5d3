"""``MetaNeuralNetwork``: a drop-in ``nn.Module`` running the switch, routing, specialists, combine.

switch -> softmax -> group scores -> route (fused op) -> gather all routed rows into one buffer ->
each specialist on its contiguous slice -> combine (fixed expert order, no atomics) -> log_softmax.
Output is bitwise equal to :func:`mnn_fast.reference.naive_forward` on CPU in float32.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .backends import BACKEND_NAMES, get_backend, select_backend
from .executors import (EXECUTOR_NAMES, GroupedLinearStack, VmapExperts, as_fresh_aligned, linear_stack_reason,
                        new_stream_pool, recording_grad, run_on_streams, select_executor, vectorised_contribution)
from .reference import Routing, expert_log_contribution
from .routing import check_threshold, check_top_k, group_tensors, is_identity, normalize_groups

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
        num_classes: ``C``; inferred from the switch's output when not given.
        switch_fn: optional ``callable(scores: Tensor[B, E] float32) -> Tensor[B, E] bool`` replacing
            the threshold/top-k rule.
        backend: ``"auto"`` (fastest available: cuda > triton > torch on GPU, cpp > torch on CPU) or one
            of ``"torch"``, ``"cpp"``, ``"cuda"``, ``"triton"``.
        executor: how the specialists run (:mod:`mnn_fast.executors`): ``"sequential"`` (one call
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
        if backend != "auto" and backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {backend!r}")
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
        self._uniform_group_size = len({len(g) for g in self.groups}) == 1
        group_offsets, group_classes = group_tensors(self.groups, torch.device("cpu"))
        self.register_buffer("group_offsets", group_offsets, persistent=False)
        self.register_buffer("group_classes", group_classes, persistent=False)
        # Per-expert class index lists for the contribution math, built once instead of per call.
        for e, g in enumerate(self.groups):
            self.register_buffer(f"_group_idx_{e}", torch.tensor(g, dtype=torch.long), persistent=False)
        self._max_class = max(c for g in self.groups for c in g)
        if num_classes is not None:
            self._cache_class_tables(num_classes)
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

    @property
    def top_k(self) -> int | None:
        return self._top_k

    @top_k.setter
    def top_k(self, value) -> None:
        top_k = check_top_k(value, self.num_experts)
        check_threshold(self._threshold, top_k)
        self._top_k = top_k

    @property
    def backend(self) -> str:
        """The backend in use for the module's current device."""
        return self._backend.name

    def _device(self) -> torch.device:
        first = next(self.parameters(), None)
        return first.device if first is not None else self.group_offsets.device

    def _resolve_backend(self) -> None:
        name, skipped = select_backend(self.requested_backend, self._device())
        self._backend = get_backend(name)
        self.backend_skipped: dict[str, str] = skipped
        self.executor, self.executor_skipped = select_executor(self.requested_executor, self.specialists, self._device())
        self._grouped = None
        if self.executor == "grouped_parallel":
            self._grouped = GroupedLinearStack(self.specialists, parallel=True)
        elif self.executor == "grouped":
            stackable = linear_stack_reason(self.specialists) is None
            self._grouped = GroupedLinearStack(self.specialists) if stackable else VmapExperts(self.specialists)
        self._streams = new_stream_pool(self._device()) if self.executor == "streams" else None

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
        if x.device != self._device():
            raise ValueError(f"x is on {x.device} but the module is on {self._device()}; move one of them")
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

    def _cache_class_tables(self, num_classes: int) -> None:
        """Per expert, the classes outside its group; all groups as ``[E, g]`` when they all have ``g``."""
        for e, group in enumerate(self.groups):
            members = set(group)
            idx = torch.tensor([c for c in range(num_classes) if c not in members], dtype=torch.long)
            self.register_buffer(f"_outside_idx_{e}", idx.to(self.group_offsets.device), persistent=False)
        if self._uniform_group_size:
            self.register_buffer("_group_table", torch.tensor(self.groups, dtype=torch.long).to(self.group_offsets.device), persistent=False)

    def forward(self, x: Tensor, return_routing: bool = False):
        """``x: Tensor[B, ...]`` -> log-probabilities ``Tensor[B, C] float32`` (and the routing)."""
        self._check_input(x)
        logp, scores, num_classes = self._switch_scores(x)
        ops = self._backend
        if self.switch_fn is not None:
            mask = self.switch_fn(scores)
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != scores.shape:
                got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
                raise ValueError(f"switch_fn must return a bool tensor of shape {tuple(scores.shape)}, got {got}")
            # 1.0 > 0.5 exactly where the mask is set: the threshold kernel routes the mask as is.
            routing = ops.route(mask.float(), 0.5, 0)
        else:
            threshold = -math.inf if self._threshold is None else self._threshold
            routing = ops.route(scores, threshold, self._top_k or 0)
        xg = self._gather(x, routing.perm)
        logv = self._run_specialists(xg, routing, num_classes)
        acc = ops.combine(logp, logv, routing.perm, routing.sample_offsets, routing.sample_rows)
        out = torch.log_softmax(acc, dim=1)
        return (out, routing) if return_routing else out

    def _switch_scores(self, x: Tensor) -> tuple[Tensor, Tensor, int]:
        """``(logP: Tensor[B, C] float32, scores: Tensor[B, E] float32, C)`` from the switch on ``x``."""
        z = self.switch(x)
        num_classes = self._check_logits(z, x)
        z = z.float()
        logp = torch.log_softmax(z, dim=1)
        probs = torch.softmax(z, dim=1)
        if is_identity(self.groups, num_classes):
            return logp, probs, num_classes
        return logp, self._backend.group_scores(probs, self.group_offsets, self.group_classes), num_classes

    def _gather(self, x: Tensor, perm: Tensor) -> Tensor:
        """``x[perm]`` as one contiguous ``Tensor[N, ...]`` buffer, through the backend's gather op."""
        flat = x.reshape(x.shape[0], math.prod(x.shape[1:]))  # not -1: B may be 0
        return self._backend.gather(flat.contiguous(), perm).view(-1, *x.shape[1:])

    def _run_specialists(self, xg: Tensor, routing: Routing, num_classes: int) -> Tensor:
        """``log v: Tensor[N, C] float32``, row ``r`` the contribution of buffer row ``r``'s expert."""
        sizes = routing.counts.tolist()
        compiling = torch.compiler.is_compiling()
        for n in sizes:
            torch._check(n >= 0)  # the data-dependent counts are sizes
        if self.num_classes is None and not compiling:
            self.num_classes = num_classes  # learnt from the first batch; later batches must agree
            self._cache_class_tables(num_classes)
        # Grouped executors serve inference; with autograd recording the experts run one by one, so
        # training never pays for re-stacking every expert's weights on each step.
        if self._grouped is not None and not recording_grad(self.specialists):
            y = self._grouped(xg, routing.counts)
            if y is None:
                return xg.new_empty(0, num_classes, dtype=torch.float32)
            self._check_specialist_output(y, -1, xg.shape[0], num_classes)
            if y.shape[1] == num_classes and self._uniform_group_size:
                return self._contributions(y, routing.counts)
            outputs = list(torch.split(y, sizes))
        else:
            outputs = self._expert_outputs(xg, sizes, num_classes, compiling)
        widths = {y.shape[1] for y in outputs if y is not None}
        if widths == {num_classes} and self._uniform_group_size:
            # One row-wise pass over all experts' logits instead of E small ones; the same
            # arithmetic per row, so the result is bitwise the per-expert one.
            return self._contributions(torch.cat([y for y in outputs if y is not None]), routing.counts)
        parts = []
        for e, y in enumerate(outputs):
            if y is None:
                continue
            group_idx = getattr(self, f"_group_idx_{e}")
            outside_idx = getattr(self, f"_outside_idx_{e}", None)
            parts.append(expert_log_contribution(y, self.groups[e], num_classes, group_idx, outside_idx))
        if not parts:
            return xg.new_empty(0, num_classes, dtype=torch.float32)
        return torch.cat(parts)

    def _contributions(self, y: Tensor, counts: Tensor) -> Tensor:
        expert_of_row = torch.repeat_interleave(torch.arange(len(self.groups), device=y.device), counts,
                                                output_size=y.shape[0])
        return vectorised_contribution(y, expert_of_row, self._group_table)

    def _expert_outputs(self, xg: Tensor, sizes: list, num_classes: int, compiling: bool) -> list:
        """Per expert, its logits on its rows (``None`` for an expert with no rows, which is not called)."""
        chunks = torch.split(xg, sizes)
        if not compiling:
            # Each expert sees its rows where the naive loop's fresh x[idx] would be: on the
            # allocator's alignment (a segment of one buffer may start anywhere), or BLAS may
            # round differently. Compiled code makes no bitwise promise and has no data pointers.
            chunks = [as_fresh_aligned(rows) for rows in chunks]
        if self._streams is not None and not compiling:
            outputs = run_on_streams(self.specialists, list(chunks), self._streams)
        else:
            outputs = []
            for expert, n, rows in zip(self.specialists, sizes, chunks):
                if compiling:
                    # Under torch.compile a count is a symbol that may be 0, and some layers (BatchNorm,
                    # for one) branch on "is the batch empty?", which cannot be traced. The expert runs
                    # on its rows plus one padding row, a batch provably non-empty, whose output is dropped.
                    padded = torch.cat([rows, rows.new_zeros(1, *rows.shape[1:])])
                    outputs.append(expert(padded).narrow(0, 0, n))
                elif n == 0:
                    outputs.append(None)  # as in the paper's loop, an expert with no samples is not called
                else:
                    outputs.append(self._call_expert(expert, rows))
        for e, (y, n) in enumerate(zip(outputs, sizes)):
            if y is not None:
                self._check_specialist_output(y, e, n, num_classes)
        return outputs

    @staticmethod
    def _call_expert(expert: nn.Module, rows: Tensor) -> Tensor:
        try:
            return expert(rows)
        except ValueError as exc:
            # An expert may get a single row; in training mode BatchNorm refuses that.
            if expert.training and rows.shape[0] == 1 and "more than 1 value per channel" in str(exc):
                raise ValueError(f"{exc}. A specialist received one row while in training mode; call mnn.eval() "
                                 "for inference") from exc
            raise

    def _check_specialist_output(self, y, e: int, n, num_classes: int) -> None:
        who = f"specialists[{e}]" if e >= 0 else "the grouped specialists"
        width = y.shape[1] if isinstance(y, Tensor) and y.dim() == 2 else -1
        if not isinstance(y, Tensor) or y.dim() != 2 or y.shape[0] != n or width not in (num_classes, 1):
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"{who} must return logits of shape [n, C={num_classes}] (or [n, 1]), got {shape}")
        if width == 1 and e >= 0 and len(self.groups[e]) != 1:
            raise ValueError(f"specialists[{e}] returns one logit (binary) but its group has {len(self.groups[e])} classes")
        if width == 1 and e < 0 and any(len(g) != 1 for g in self.groups):
            raise ValueError("the grouped specialists return one logit (binary) but some groups have several classes")
