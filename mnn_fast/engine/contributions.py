"""The contribution math (SPEC section 4): specialist logits -> ``log v``, in one place.

Per row: ``ls = log_softmax(y)``; group classes keep ``ls[c]`` (or ``log q = logsigmoid(y)`` for a
binary specialist); the rest share ``log(1 - q) = logsumexp(ls[not G])`` evenly, minus ``log(C - |G|)``.
Row-wise only, so one pass over all experts' rows is bitwise the per-expert passes of the naive loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["ClassTables", "class_tables", "expert_log_contribution", "logsumexp_rows", "vectorised_contribution",
           "specialist_contributions"]


def logsumexp_rows(a: Tensor) -> Tensor:
    """``torch.logsumexp(a, 1, keepdim=True)`` (``Tensor[n, 1]`` from ``Tensor[n, k]``), as ATen's CPU
    kernel computes it.

    Written out because the library version's empty-input branch cannot be traced when the row
    count is data-dependent (as it is per expert under ``torch.compile``).
    """
    maxes = torch.amax(a, dim=1, keepdim=True)
    maxes = maxes.masked_fill(maxes.abs() == math.inf, 0.0)
    return torch.sum(torch.exp(a - maxes), dim=1, keepdim=True).log().add(maxes)


def expert_log_contribution(
    y: Tensor,
    group: Sequence[int],
    num_classes: int,
    group_idx: Tensor | None = None,
    outside_idx: Tensor | None = None,
) -> Tensor:
    """``log v_e: Tensor[n, C] float32`` from specialist logits ``y: Tensor[n, C]`` or ``Tensor[n, 1]``.

    Classes in the group keep the specialist's log-probabilities (width ``C``) or ``log q`` (width 1,
    a binary specialist); the rest share ``log(1 - q)`` evenly. ``group_idx`` / ``outside_idx``
    (``Tensor[|G|]`` / ``Tensor[C-|G|]`` int64) may be passed precomputed. The naive loop calls this
    on each expert's rows, the engine on each expert's slice or all rows at once (same arithmetic).
    """
    y = y.float()
    if group_idx is None:
        group_idx = torch.as_tensor(list(group), dtype=torch.long, device=y.device)
    rest = num_classes - len(group)
    if y.shape[1] == 1:
        in_group = nn.functional.logsigmoid(y)
        log_not_q = nn.functional.logsigmoid(-y)
    else:
        ls = torch.log_softmax(y, dim=1)
        in_group = ls.index_select(1, group_idx)
        if outside_idx is None:
            outside = torch.ones(num_classes, dtype=torch.bool, device=y.device)
            outside[group_idx] = False
            outside_idx = outside.nonzero().squeeze(1)
        log_not_q = logsumexp_rows(ls.index_select(1, outside_idx)) if rest else None
    if rest:
        out = (log_not_q - math.log(rest)).expand(y.shape[0], num_classes).clone()
    else:
        out = y.new_empty(y.shape[0], num_classes, dtype=torch.float32)
    out[:, group_idx] = in_group
    return out


def vectorised_contribution(y: Tensor, expert_of_row: Tensor, group_table: Tensor) -> Tensor:
    """``log v: Tensor[N, C] float32`` for width-``C`` logits ``y: Tensor[N, C]`` of experts whose groups
    all have ``g`` classes.

    ``expert_of_row: Tensor[N] int64``, ``group_table: Tensor[E, g] int64``. The same row-wise steps as
    :func:`expert_log_contribution` on the same contiguous ``[N, C - g]`` block of out-of-group
    log-probabilities, so each row is bitwise what the per-expert version gives, without an
    ``[N, C]`` index tensor.
    """
    ls = torch.log_softmax(y.float(), dim=1)
    rows_group = group_table.index_select(0, expert_of_row)
    in_group = ls.gather(1, rows_group)
    rest = y.shape[1] - group_table.shape[1]
    if rest:
        log_not_q = logsumexp_rows(_outside_columns(ls, rows_group))
        out = (log_not_q - math.log(rest)).expand(y.shape[0], y.shape[1]).clone()
    else:
        out = torch.empty_like(ls)
    return out.scatter_(1, rows_group, in_group)


# Dropping g columns by shifts costs g passes over [N, C]; masked_select costs one slow pass
# (~10x an element-wise op on CPU). Shifts win for the small groups MNNs use.
_MAX_SHIFTED_COLUMNS = 8


def _outside_columns(ls: Tensor, rows_group: Tensor) -> Tensor:
    """``Tensor[N, C - g]``, contiguous: each row of ``ls: Tensor[N, C]`` without its ``g`` group
    columns ``rows_group: Tensor[N, g] int64`` (distinct per row), the rest in column order.

    Each column is removed by one shift: entries at or after it move one place left. Removing
    the largest column first leaves the smaller ones' positions valid. The shapes are static, so
    the same code traces under ``torch.compile``.
    """
    g = rows_group.shape[1]
    if g > _MAX_SHIFTED_COLUMNS:
        outside = torch.ones_like(ls, dtype=torch.bool).scatter_(1, rows_group, False)
        return ls.masked_select(outside).view(-1, ls.shape[1] - g)
    cols = rows_group.sort(1, descending=True).values if g > 1 else rows_group
    block = ls
    for k in range(g):
        width = block.shape[1] - 1
        shifted = torch.arange(width, device=ls.device)[None, :] >= cols[:, k : k + 1]
        block = torch.where(shifted, block[:, 1:], block[:, :-1])
    return block


@dataclass(frozen=True)
class ClassTables:
    """Index tables of one ``(groups, C, device)``: built once, reused by every batch.

    ``group_idx[e]: Tensor[|G_e|]`` and ``outside_idx[e]: Tensor[C - |G_e|]`` int64 per expert;
    ``group_table: Tensor[E, g]`` when every group has ``g`` classes (the vectorised path), else None.
    """

    num_classes: int
    group_idx: tuple[Tensor, ...]
    outside_idx: tuple[Tensor, ...]
    group_table: Tensor | None


def class_tables(groups: Sequence[Sequence[int]], num_classes: int, device: torch.device) -> ClassTables:
    """The :class:`ClassTables` of ``groups`` (distinct class ids in ``[0, C)``) on ``device``."""
    group_idx, outside_idx = [], []
    for group in groups:
        members = set(group)
        group_idx.append(torch.tensor(list(group), dtype=torch.long, device=device))
        outside_idx.append(torch.tensor([c for c in range(num_classes) if c not in members], dtype=torch.long,
                                        device=device))
    uniform = len({len(g) for g in groups}) == 1
    table = torch.tensor([list(g) for g in groups], dtype=torch.long, device=device) if uniform else None
    return ClassTables(num_classes, tuple(group_idx), tuple(outside_idx), table)


def specialist_contributions(outputs: Sequence[Tensor | None] | Tensor, counts: Tensor,
                             groups: Sequence[Sequence[int]], tables: ClassTables) -> Tensor:
    """``log v: Tensor[N, C] float32`` in buffer order from the specialists' logits.

    ``outputs``: per expert its logits on its rows (``None`` for an expert with no rows), or one
    ``Tensor[N, C]`` of all rows in buffer order (a grouped executor's output); ``counts: Tensor[E]``.
    Width-``C`` experts with equal group sizes take one vectorised pass over all rows; otherwise each
    expert's rows go through :func:`expert_log_contribution` (binary or mixed-width specialists).
    """
    num_classes = tables.num_classes
    if isinstance(outputs, Tensor):
        if outputs.shape[1] == num_classes and tables.group_table is not None:
            return _all_rows(outputs, counts, tables)
        outputs = list(torch.split(outputs, counts.tolist()))
    present = [y for y in outputs if y is not None]
    if not present:
        return counts.new_empty(0, num_classes, dtype=torch.float32)
    if tables.group_table is not None and all(y.shape[1] == num_classes for y in present):
        # One row-wise pass over all experts' logits instead of E small ones; the same arithmetic
        # per row, so the result is bitwise the per-expert one.
        return _all_rows(torch.cat(present), counts, tables)
    parts = [expert_log_contribution(y, groups[e], num_classes, tables.group_idx[e], tables.outside_idx[e])
             for e, y in enumerate(outputs) if y is not None]
    return torch.cat(parts)


def _all_rows(y: Tensor, counts: Tensor, tables: ClassTables) -> Tensor:
    expert_of_row = torch.repeat_interleave(torch.arange(counts.shape[0], device=y.device), counts,
                                            output_size=y.shape[0])
    return vectorised_contribution(y, expert_of_row, tables.group_table)
