"""Which SIMD instruction set the C++ CPU row kernels use: ``sse2``, ``avx2`` or ``avx512``.

The extension picks the best one this CPU runs when it loads (``MNN_FAST_CPU_ISA=sse2|avx2|avx512``
caps it, where usable); :func:`set_cpu_isa` changes it at run time. Every choice gives the same
bits (per lane the same operations in the same order, no fused multiply-add), so it only moves
speed; the tests run each usable one against the others and the reference.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from . import ops

__all__ = ["CPU_ISAS", "cpu_isa", "set_cpu_isa", "cpu_isa_status", "using_cpu_isa"]

CPU_ISAS = ("sse2", "avx2", "avx512")


def _ext():
    if ops.EXTENSION_ERROR is not None:
        raise RuntimeError(ops.EXTENSION_ERROR)
    from .. import _C

    return _C


def cpu_isa() -> str:
    """The ISA the C++ CPU row kernels use now (``"sse2"``, ``"avx2"`` or ``"avx512"``)."""
    return _ext().cpu_isa()


def set_cpu_isa(name: str) -> str:
    """Makes ``name`` (one of :data:`CPU_ISAS`, or ``"auto"`` = the best this CPU runs) the ISA in use,
    for every thread, from the next op call on; returns the previous one. ``ValueError`` if it cannot
    run here (the message says why), ``TypeError`` if ``name`` is not a string."""
    if not isinstance(name, str):
        raise TypeError(f"set_cpu_isa: name must be a str, got {type(name).__name__}")
    return _ext().set_cpu_isa(name)


def cpu_isa_status() -> dict[str, str | None]:
    """For each name in :data:`CPU_ISAS`: ``None`` if this CPU runs it, else why not; plus, under
    ``"MNN_FAST_CPU_ISA"``, why that variable was ignored (absent when it was followed or is unset)."""
    if ops.EXTENSION_ERROR is not None:
        return {name: ops.EXTENSION_ERROR for name in CPU_ISAS}
    status = dict(_ext().cpu_isa_status())
    note = _ext().cpu_isa_env_note()
    if note:
        status["MNN_FAST_CPU_ISA"] = note
    return status


@contextlib.contextmanager
def using_cpu_isa(name: str) -> Iterator[str]:
    """``with using_cpu_isa("sse2"): ...`` runs the block on ``name``, then restores the previous ISA."""
    previous = set_cpu_isa(name)
    try:
        yield name
    finally:
        set_cpu_isa(previous)
