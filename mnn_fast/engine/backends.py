"""Backend choice, in one place: which implementations of the routing ops can run, and why not.

``"auto"`` picks the fastest usable one for the input's device (CUDA: cuda > triton > torch;
CPU: cpp > torch) and records why each faster one was skipped. The Triton kernels run on CPU
tensors only under ``TRITON_INTERPRET=1`` (for testing), so ``auto`` never picks them there.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import checks, ops
from .routing import Routing
from .torch_ops import (combine_torch, gather_torch, group_scores_torch, route_torch, segment_linear_grouped_mm,
                        segment_linear_torch)

__all__ = ["Backend", "BACKEND_NAMES", "backend_status", "get_backend", "select_backend", "grouped_mm_reason"]

BACKEND_NAMES = ("torch", "cpp", "cuda", "triton")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}


@dataclass(frozen=True)
class Backend:
    """The ops of one implementation. ``threshold=-inf`` / ``top_k=0`` mean "off".

    ``segment_linear`` (the grouped executor's matmul, ``docs/ops.md``): the C++/torch ones call
    BLAS per segment on CPU (bitwise the naive loop on aligned operands); triton's (also the cuda
    backend's, where Triton imports) is one grouped kernel on CUDA, equal to float32 rounding
    (``segment_linear_tiled``: it sums in tiles, so it is not bitwise and needs no alignment).
    ``segment_linear_gather`` is the same matmul reading its rows of ``x`` through ``perm`` (C++:
    each segment's rows copied just before its GEMM; Triton: inside the kernel), so the gathered
    buffer is never built. ``segment_linear_devices``: where it runs. The row ops
    ``recombine``, ``contributions`` and ``log_softmax_rows`` default to the torch ones (rowmath's
    arithmetic, the same bits): a backend brings its own where it has a kernel. ``gather_split``
    (C++ CPU only) gives each expert its rows as a fresh tensor, for the sequential executor.
    ``segment_stack`` (C++ CPU only) runs a whole Linear/activation stack per tile of an expert's rows
    on one core, for ``grouped_parallel`` (not bitwise).
    """

    name: str
    group_scores: Callable[[Tensor, Tensor, Tensor], Tensor]
    route: Callable[[Tensor, float, int], Routing]
    gather: Callable[[Tensor, Tensor], Tensor]
    combine: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
    segment_linear: Callable[..., Tensor] | None = None
    segment_linear_gather: Callable[..., Tensor] | None = None
    segment_linear_devices: tuple[str, ...] = ("cpu",)
    recombine: Callable[..., Tensor] = ops.torch_recombine
    contributions: Callable[..., Tensor] = ops.torch_contributions
    log_softmax_rows: Callable[[Tensor], Tensor] = ops.torch_log_softmax_rows
    softmax_rows: Callable[[Tensor], tuple[Tensor, Tensor]] = ops.torch_softmax_rows
    segment_linear_tiled: bool = False
    gather_split: Callable[[Tensor, Tensor, Tensor], list[Tensor]] | None = None
    segment_stack: Callable[..., Tensor] | None = None


def _torch_route(scores: Tensor, threshold: float, top_k: int) -> Routing:
    return route_torch(scores, None if threshold == -math.inf else threshold, top_k or None)


def _checked(check: Callable, fn: Callable) -> Callable:
    """``fn`` after ``check`` of the same arguments: the op contract for backends written in Python."""
    def run(*args):
        # Traced code has symbolic sizes that these checks cannot compare; the fake kernels check shapes.
        if not torch.compiler.is_compiling():
            check(*args)
        return fn(*args)

    return run


def _with_checks(backend: Backend) -> Backend:
    # The C++ and CUDA kernels check their inputs themselves; torch and Triton get the same
    # checks here, so one bad input raises one exception type whichever backend runs it.
    return dataclasses.replace(
        backend, group_scores=_checked(checks.check_group_scores, backend.group_scores),
        route=_checked(checks.check_route, backend.route), gather=_checked(checks.check_gather, backend.gather),
        combine=_checked(checks.check_combine, backend.combine),
        recombine=_checked(checks.check_recombine, backend.recombine),
        contributions=_checked(checks.check_contributions, backend.contributions),
        log_softmax_rows=_checked(checks.check_log_softmax_rows, backend.log_softmax_rows),
        softmax_rows=_checked(checks.check_softmax_rows, backend.softmax_rows))


# The guard torch's own Python autograd kernel enters when grad mode is off (torch._library.autograd's
# redispatch_no_grad); private, so looked up with a fallback.
_BELOW_AUTOGRAD = getattr(torch._C, "_AutoDispatchBelowAutograd", None)


def _direct_when_grad_off(op: Callable) -> Callable:
    """``op`` (a custom op with a Python-registered backward) called below the autograd key while
    grad mode is off, in eager mode: the same kernel and result without the Python autograd
    kernel's round trip (boxed redispatch), measured 15-30 us a call here, 3 calls a forward."""
    if _BELOW_AUTOGRAD is None:
        return op

    def run(*args, **kwargs):
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return op(*args, **kwargs)
        with _BELOW_AUTOGRAD():
            return op(*args, **kwargs)

    return run


def _ops_backend(name: str, prefix: str, segment_linear=None, row_ops: bool = False) -> Backend:
    """The ``mnn_fast::<prefix><op>`` ops; ``row_ops``: the backend also has its own ``contributions``
    and ``log_softmax_rows`` (the C++ CPU kernels; elsewhere the torch ones serve)."""
    lib = torch.ops.mnn_fast
    route_op = getattr(lib, prefix + "route")
    direct = _direct_when_grad_off
    extra = ({"contributions": direct(lib.contributions), "log_softmax_rows": direct(lib.log_softmax_rows),
              "softmax_rows": direct(lib.softmax_rows)} if row_ops else {})
    return Backend(
        name,
        getattr(lib, prefix + "group_scores"),
        lambda s, t, k: Routing(*route_op(s, t, k)),
        direct(getattr(lib, prefix + "gather")),
        direct(getattr(lib, prefix + "combine")),
        segment_linear,
        recombine=direct(getattr(lib, prefix + "recombine")),
        **extra,
    )


def _triton_error(device_type: str) -> str | None:
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (a testing mode)"
    if device_type not in ("cpu", "cuda"):
        return f"Triton kernels target CUDA devices, not {device_type}"
    try:
        importlib.import_module("mnn_fast.kernels")
    except Exception as exc:  # a broken Triton install must not break the other backends
        return f"mnn_fast.kernels failed to import ({type(exc).__name__}: {exc})"
    return None


def backend_status(device: torch.device | str | None = None) -> dict[str, str | None]:
    """For each backend name: ``None`` if it can run on ``device``, else the reason it cannot.

    ``device=None`` asks about the device a model would most likely run on here: ``"cuda"`` when
    torch sees a CUDA device, else ``"cpu"``.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    status: dict[str, str | None] = {"torch": None}
    if ops.EXTENSION_ERROR is not None:
        status["cpp"] = status["cuda"] = ops.EXTENSION_ERROR
    else:
        status["cpp"] = None if device_type == "cpu" else f"the C++ CPU kernels need CPU tensors, got {device_type}"
        if device_type != "cuda":
            status["cuda"] = f"the CUDA kernels need CUDA tensors, got {device_type}"
        elif not ops.extension_has_cuda():
            status["cuda"] = "mnn_fast._C was built without CUDA (rebuild on a CUDA machine or with FORCE_CUDA=1)"
        else:
            status["cuda"] = None
    status["triton"] = _triton_error(device_type)
    return status


def select_backend(requested: str, device: torch.device | str) -> tuple[str, dict[str, str]]:
    """Resolves ``requested`` (a name or ``"auto"``) for ``device``: ``(name, {skipped: reason})``."""
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a string, got {type(requested).__name__}")
    if requested != "auto" and requested not in BACKEND_NAMES:
        raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {requested!r}")
    status = backend_status(device)
    if requested != "auto":
        if status[requested] is not None:
            raise ValueError(f"backend={requested!r} cannot run on {torch.device(device)}: {status[requested]}")
        return requested, {}
    order = _AUTO_ORDER.get(torch.device(device).type, ("torch",))
    skipped: dict[str, str] = {}
    for name in order:
        if status[name] is None:
            return name, skipped
        skipped[name] = status[name]
    raise AssertionError("the torch backend is always available")


_TRITON_AUTOGRAD: list[bool] = []


def _import_kernels() -> None:
    importlib.import_module("mnn_fast.kernels")
    if not _TRITON_AUTOGRAD:  # the Triton recombine shares the C++ op's backward
        ops.register_recombine_autograd("mnn_fast::triton_recombine")
        ops.register_triton_segment_linear_autograd()
        _TRITON_AUTOGRAD.append(True)


@torch.compiler.assume_constant_result  # traced code takes the answer as a constant
def _grouped_mm_device_ok(device: torch.device) -> bool:
    # torch 2.14 runs bfloat16 F.grouped_mm as one CUTLASS grouped kernel on NVIDIA compute capability
    # 9.x and 10.x only; elsewhere (ROCm included, whose MI200/MI300 also report 9.x) it falls back to
    # a loop of mm after copying the offsets to the host.
    return (device.type == "cuda" and torch.version.hip is None
            and torch.cuda.get_device_capability(device)[0] in (9, 10))


def grouped_mm_reason(x: Tensor, weight: Tensor, bias: Tensor | None = None, rows_copied: bool = False) -> str | None:
    """``None`` when ``F.grouped_mm`` serves a grouped Linear on ``x: Tensor[N, K]``, ``weight:
    Tensor[E, M, K]`` and ``bias: Tensor[E, M]`` in place of the Triton kernel, else why not. It serves
    bfloat16 inference on NVIDIA GPUs where PyTorch's grouped GEMM is one CUTLASS kernel (compute
    capability 9.x/10.x); elsewhere torch falls back to a loop of ``mm`` that reads the offsets on
    the host (a sync per call). ``rows_copied``: ``x``'s rows are gathered into a fresh buffer first,
    so ``x``'s own layout does not matter."""
    if x.dtype != torch.bfloat16:
        return f"F.grouped_mm serves bfloat16 only (float32 and float16 keep the Triton kernel), got {x.dtype}"
    if not _grouped_mm_device_ok(x.device):
        return "F.grouped_mm is one grouped kernel only on CUDA GPUs of compute capability 9.x/10.x"
    if x.shape[1] % 8 or weight.shape[1] % 8:
        return f"F.grouped_mm needs 16-byte strides: K={x.shape[1]} and M={weight.shape[1]} must be multiples of 8"
    # Traced code cannot read a storage offset; its tensors are fresh buffers (offset 0) anyway.
    misaligned = not torch.compiler.is_compiling() and x.storage_offset() % 8
    if not rows_copied and (not x.is_contiguous() or misaligned):
        return "F.grouped_mm needs x contiguous and starting on 16 bytes"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return "autograd records this call: the Triton kernel's backward serves training"
    return None


def _triton_segment_linear() -> dict:
    """The Backend fields of the grouped Linear on a GPU: ``F.grouped_mm`` where
    :func:`grouped_mm_reason` allows it (bfloat16 on Hopper/Blackwell), else the Triton kernel
    (``mnn_fast::triton_segment_linear``, which reads the rows through ``perm`` itself)."""
    _import_kernels()
    op = torch.ops.mnn_fast.triton_segment_linear

    # parallel_segments is the CPU kernel's thread choice; one grouped launch has none to make.
    def segment_linear(x, weight, bias, offsets, parallel_segments=False):
        if grouped_mm_reason(x, weight, bias) is None:
            return segment_linear_grouped_mm(x, weight, bias, offsets)
        return op(x, weight, bias, offsets, None)

    def segment_linear_gather(x, perm, weight, bias, offsets, parallel_segments=False):
        if grouped_mm_reason(x, weight, bias, rows_copied=True) is None:
            # F.grouped_mm has no gathered form: the rows are gathered first.
            return segment_linear_grouped_mm(x.index_select(0, perm), weight, bias, offsets)
        return op(x, weight, bias, offsets, perm)

    return {"segment_linear": segment_linear, "segment_linear_gather": segment_linear_gather,
            "segment_linear_devices": ("cuda", "cpu"),  # cpu: only under TRITON_INTERPRET=1, for tests
            "segment_linear_tiled": True}


def get_backend(name: str) -> Backend:
    """The :class:`Backend` named ``name`` (check availability with :func:`select_backend` first)."""
    if name == "torch":
        return _with_checks(Backend("torch", group_scores_torch, _torch_route, gather_torch, combine_torch,
                                    segment_linear_torch))  # row ops: the torch defaults
    if name == "cpp":
        op = _direct_when_grad_off(torch.ops.mnn_fast.segment_linear)
        gathered = lambda x, perm, weight, bias, offsets, parallel_segments=False: op(  # noqa: E731
            x, weight, bias, offsets, parallel_segments, perm)
        return dataclasses.replace(_ops_backend(name, "", op, row_ops=True), segment_linear_gather=gathered,
                                   gather_split=torch.ops.mnn_fast.gather_split,
                                   segment_stack=_direct_when_grad_off(torch.ops.mnn_fast.segment_stack))
    if name == "cuda":
        backend = _ops_backend(name, "")
        # The grouped Linear executor's kernel is Triton's: the CUDA extension has none of its own.
        return backend if _triton_error("cuda") is not None else dataclasses.replace(backend, **_triton_segment_linear())
    if name == "triton":
        _import_kernels()
        backend = dataclasses.replace(_ops_backend(name, "triton_"), **_triton_segment_linear())
        # The Triton kernel reads one buffer: per-expert outputs are joined on the device first.
        triton_recombine = torch.ops.mnn_fast.triton_recombine
        recombine = lambda logp, logits, *rest: triton_recombine(  # noqa: E731
            logp, logits[0] if len(logits) == 1 else torch.cat(list(logits)), *rest)
        return _with_checks(dataclasses.replace(backend, recombine=recombine))
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_NAMES}")
