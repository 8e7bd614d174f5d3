"""The op contracts of ``docs/ops.md`` as checks, for the backends written in Python (torch, Triton).

The C++ kernels check the same things in C++ (``csrc/cpu/common.h``), the CUDA ones their shapes and
dtypes; with these, one bad input raises one exception type on every backend: ``TypeError`` for a
dtype, ``ValueError`` for a shape or a value. Value checks (indices in range) read the data, so they
run on CPU tensors only (on a GPU they would synchronise). The backends skip these checks while
``torch.compile`` traces (symbolic sizes; the fake kernels check shapes there).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_group_scores", "check_route", "check_gather", "check_combine", "check_recombine",
           "check_contributions", "check_log_softmax_rows", "check_softmax_rows"]


def _describe(t: Tensor) -> str:
    return f"a {t.dim()}-D {str(t.dtype).removeprefix('torch.')} tensor of shape {list(t.shape)} on {t.device}"


def _values_checked(t: Tensor) -> bool:
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _matrix(op: str, name: str, t: Tensor, dtype: torch.dtype | None = torch.float32) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{op}: {name} must be a 2-D tensor, got {_describe(t)}")
    if dtype is None and not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a 2-D floating-point tensor, got {_describe(t)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {name} must be a 2-D {str(dtype).removeprefix('torch.')} tensor, got {_describe(t)}")


def _index(op: str, name: str, t: Tensor, size: int | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{op}: {name} must be a 1-D int64 tensor, got {_describe(t)}")
    if t.dtype != torch.long:
        raise TypeError(f"{op}: {name} must be a 1-D int64 tensor, got {_describe(t)}")
    if size is not None and t.numel() != size:
        raise ValueError(f"{op}: {name} must have {size} entries, got {_describe(t)}")


def _in_range(op: str, name: str, t: Tensor, bound: int, what: str) -> None:
    if _values_checked(t) and t.numel() and (int(t.min()) < 0 or int(t.max()) >= bound):
        raise ValueError(f"{op}: {name} values must be in [0, {what}) with {what} = {bound}, got "
                         f"[{int(t.min())}, {int(t.max())}]")


def _sample_view(op: str, sample_offsets: Tensor, sample_rows: Tensor, batch: int, rows: int,
                 one_per_row: bool) -> None:
    """The routing's sample-major view: ``sample_offsets: Tensor[B+1]`` non-decreasing within
    ``[0, sample_rows.numel()]``, ``sample_rows`` values in ``[0, N)`` (``rows`` = N), and exactly
    ``N`` of them when ``one_per_row``."""
    _index(op, "sample_offsets", sample_offsets, batch + 1)
    _index(op, "sample_rows", sample_rows, rows if one_per_row else None)
    _in_range(op, "sample_rows", sample_rows, rows, "N")
    if _values_checked(sample_offsets) and sample_offsets.numel():
        steps = sample_offsets[1:] - sample_offsets[:-1]
        if int(sample_offsets[0]) < 0 or (steps.numel() and int(steps.min()) < 0) or int(sample_offsets[-1]) > sample_rows.numel():
            raise ValueError(f"{op}: sample_offsets must be non-decreasing within [0, {sample_rows.numel()}]")


def check_group_scores(probs: Tensor, group_offsets: Tensor, group_classes: Tensor) -> None:
    op = "group_scores"
    _matrix(op, "probs", probs)
    _index(op, "group_offsets", group_offsets)
    _index(op, "group_classes", group_classes)
    if group_offsets.numel() < 1:
        raise ValueError(f"{op}: group_offsets must have E+1 >= 1 entries, got {_describe(group_offsets)}")
    _in_range(op, "group_classes", group_classes, probs.shape[1], "C")
    if _values_checked(group_offsets):
        offs = group_offsets.tolist()
        if offs[0] != 0 or offs[-1] != group_classes.numel() or any(b <= a for a, b in zip(offs[:-1], offs[1:])):
            raise ValueError(f"{op}: group_offsets must run from 0 to group_classes.numel() = {group_classes.numel()}, "
                             f"strictly increasing (every group non-empty), got {offs[:8]}")


def check_route(scores: Tensor, threshold: float, top_k: int) -> None:
    op = "route"
    _matrix(op, "scores", scores)
    experts = scores.shape[1]
    if experts < 1:
        raise ValueError(f"{op}: scores must have E >= 1 expert columns, got {_describe(scores)}")
    if not 0 <= top_k <= experts:
        raise ValueError(f"{op}: top_k must be 0 (no top-k) or in [1, E] with E = {experts}, got {top_k}")


def check_gather(x: Tensor, perm: Tensor) -> None:
    op = "gather"
    _matrix(op, "x", x, dtype=None)
    _index(op, "perm", perm)
    _in_range(op, "perm", perm, x.shape[0], "B")


def check_combine(logp: Tensor, logv: Tensor, perm: Tensor, sample_offsets: Tensor, sample_rows: Tensor) -> None:
    op = "combine"
    _matrix(op, "logp", logp)
    _matrix(op, "logv", logv)
    batch, classes = logp.shape
    rows = logv.shape[0]
    if logv.shape[1] != classes:
        raise ValueError(f"{op}: logv must have the same number of columns C = {classes} as logp, got {_describe(logv)}")
    _index(op, "perm", perm, rows)
    _sample_view(op, sample_offsets, sample_rows, batch, rows, one_per_row=False)


def _tables(op: str, logits: Tensor, offsets: Tensor, group_offsets: Tensor, group_classes: Tensor,
            log_spread: Tensor, classes: int) -> None:
    """The group and row tables of ``recombine`` / ``contributions`` (``docs/ops.md``)."""
    _matrix(op, "logits", logits)
    _index(op, "offsets", offsets)
    _index(op, "group_offsets", group_offsets)
    _index(op, "group_classes", group_classes)
    if not isinstance(log_spread, Tensor) or log_spread.dim() != 1 or log_spread.dtype != torch.float32:
        got = _describe(log_spread) if isinstance(log_spread, Tensor) else type(log_spread).__name__
        error = ValueError if isinstance(log_spread, Tensor) and log_spread.dtype == torch.float32 else TypeError
        raise error(f"{op}: log_spread must be a 1-D float32 tensor, got {got}")
    experts = offsets.numel() - 1
    if experts < 1:
        raise ValueError(f"{op}: offsets must have E+1 >= 2 entries, got {_describe(offsets)}")
    if group_offsets.numel() != experts + 1:
        raise ValueError(f"{op}: group_offsets must have E+1 = {experts + 1} entries (one group per expert), "
                         f"got {_describe(group_offsets)}")
    if log_spread.numel() != experts:
        raise ValueError(f"{op}: log_spread must have E = {experts} entries, got {_describe(log_spread)}")
    if logits.shape[1] not in (classes, 1):
        raise ValueError(f"{op}: logits must have C = {classes} columns (or 1, binary specialists), got "
                         f"{_describe(logits)}")
    _in_range(op, "group_classes", group_classes, classes, "C")
    if _values_checked(offsets):
        offs, spans = offsets.tolist(), group_offsets.tolist()
        if offs[0] != 0 or offs[-1] != logits.shape[0] or any(b < a for a, b in zip(offs[:-1], offs[1:])):
            raise ValueError(f"{op}: offsets must run from 0 to N = {logits.shape[0]} (logits rows), non-decreasing, "
                             f"got {offs[:8]}")
        if spans[0] != 0 or spans[-1] != group_classes.numel() or any(b <= a for a, b in zip(spans[:-1], spans[1:])):
            raise ValueError(f"{op}: group_offsets must run from 0 to group_classes.numel() = {group_classes.numel()}, "
                             f"strictly increasing (every group non-empty), got {spans[:8]}")
        if logits.shape[1] == 1 and classes != 1 and any(b - a != 1 for a, b in zip(spans[:-1], spans[1:])):
            raise ValueError(f"{op}: binary logits (1 column) need one-class groups")


def check_recombine(logp: Tensor, logits: list[Tensor], offsets: Tensor, group_offsets: Tensor,
                    group_classes: Tensor, log_spread: Tensor, sample_offsets: Tensor, sample_rows: Tensor) -> None:
    op = "recombine"
    _matrix(op, "logp", logp)
    _index(op, "offsets", offsets)
    if not isinstance(logits, (list, tuple)) or len(logits) not in (1, offsets.numel() - 1) or not logits:
        got = f"{len(logits)} tensors" if isinstance(logits, (list, tuple)) else type(logits).__name__
        raise ValueError(f"{op}: logits must hold one tensor (all rows in buffer order) or one per expert "
                         f"(E = {offsets.numel() - 1}), got {got}")
    for part in logits:
        _matrix(op, "logits", part)
        if part.shape[1] != logits[0].shape[1]:
            raise ValueError(f"{op}: every logits tensor must have the same width, got {_describe(logits[0])} "
                             f"and {_describe(part)}")
    if len(logits) > 1 and _values_checked(offsets):
        sizes = (offsets[1:] - offsets[:-1]).tolist()
        for e, (part, n) in enumerate(zip(logits, sizes)):
            if part.shape[0] != n:
                raise ValueError(f"{op}: logits[{e}] must have the expert's offsets[{e + 1}] - offsets[{e}] = {n} rows, "
                                 f"got {_describe(part)}")
    whole = logits[0] if len(logits) == 1 else torch.cat(list(logits))
    _tables(op, whole, offsets, group_offsets, group_classes, log_spread, logp.shape[1])
    rows = whole.shape[0]
    _sample_view(op, sample_offsets, sample_rows, logp.shape[0], rows, one_per_row=True)


def check_contributions(logits: Tensor, offsets: Tensor, group_offsets: Tensor, group_classes: Tensor,
                        log_spread: Tensor, num_classes: int) -> None:
    op = "contributions"
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{op}: num_classes must be an int >= 1, got {num_classes!r}")
    _tables(op, logits, offsets, group_offsets, group_classes, log_spread, num_classes)


def check_log_softmax_rows(x: Tensor) -> None:
    _matrix("log_softmax_rows", "x", x)


def check_softmax_rows(x: Tensor) -> None:
    _matrix("softmax_rows", "x", x)
