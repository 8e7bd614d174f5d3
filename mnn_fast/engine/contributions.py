"""The contribution math (the recombination, docs/how-it-works.md): specialist logits -> ``log v``, in one place.

Per row: ``ls = log_softmax(y)``; group classes keep ``ls[c]`` (or ``log q = logsigmoid(y)`` for a
binary specialist); the rest share ``log(1 - q) = logsumexp(ls[not G])`` evenly, minus ``log(C - |G|)``.
The fast path is the backends' row ops (:mod:`.rowmath` arithmetic, identical bits everywhere); the
plain-torch formula here is the differentiable form their backward uses and the tests' reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from .rowmath import expert_of_row, log_spread_table, membership

__all__ = ["ClassTables", "class_tables", "expert_log_contribution", "logsumexp_rows", "buffer_logits",
           "specialist_contributions", "contribution_formula", "recombine_formula"]


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
    """``log v_e: Tensor[n, C] float32`` from specialist logits ``y: Tensor[n, C]`` or ``Tensor[n, 1]``,
    the recombination, docs/how-it-works.md in differentiable torch ops (``log_softmax``, ``logsumexp``, ``logsigmoid``).

    Classes in the group keep the specialist's log-probabilities (width ``C``) or ``log q`` (width 1,
    a binary specialist); the rest share ``log(1 - q)`` evenly. ``group_idx`` / ``outside_idx``
    (``Tensor[|G|]`` / ``Tensor[C-|G|]`` int64) may be passed precomputed.
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


@dataclass(frozen=True)
class ClassTables:
    """The group tables of one ``(groups, C, device)``: built once, reused by every batch.

    ``group_offsets: Tensor[E+1]`` / ``group_classes: Tensor[M]`` int64 (CSR groups) and
    ``log_spread: Tensor[E] float32`` (``log(C - |G_e|)``) are what the row ops take;
    ``group_idx[e]: Tensor[|G_e|]`` int64 and ``single_offsets[e]`` (``[0, |G_e|]``) let the row ops
    run on one expert's rows alone (the mixed-width path).
    """

    num_classes: int
    group_offsets: Tensor
    group_classes: Tensor
    log_spread: Tensor
    group_idx: tuple[Tensor, ...]
    single_offsets: tuple[Tensor, ...]


def class_tables(groups: Sequence[Sequence[int]], num_classes: int, device: torch.device) -> ClassTables:
    """The :class:`ClassTables` of ``groups`` (distinct class ids in ``[0, C)``) on ``device``."""
    group_idx, single = [], []
    for group in groups:
        group_idx.append(torch.tensor(list(group), dtype=torch.long, device=device))
        single.append(torch.tensor([0, len(group)], dtype=torch.long, device=device))
    sizes = torch.tensor([len(g) for g in groups], dtype=torch.long)
    group_offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
    group_classes = torch.tensor([c for g in groups for c in g], dtype=torch.long)
    return ClassTables(num_classes, group_offsets.to(device), group_classes.to(device),
                       log_spread_table(group_offsets, num_classes).to(device), tuple(group_idx), tuple(single))


def buffer_logits(outputs: Sequence[Tensor | None] | Tensor, num_classes: int,
                  device: torch.device | None = None) -> list[Tensor] | None:
    """The specialists' logits as ``recombine`` takes them: ``[Tensor[N, W]]`` (one tensor in buffer
    order) or one ``Tensor[n_e, W] float32`` per expert (``W = C``, or 1 when every expert is binary;
    an expert without rows gets ``[0, W]``), read in place, no copy; ``None`` when experts return
    different widths.

    ``outputs``: per expert its logits (``None`` for an expert with no rows) or one tensor already
    in buffer order (a grouped executor's output); ``device`` places the empty tensors.
    """
    if isinstance(outputs, Tensor):
        return [outputs.float()]
    widths = {y.shape[1] for y in outputs if y is not None}
    if len(widths) > 1:
        return None
    width = widths.pop() if widths else num_classes
    empty = torch.empty(0, width, device=device)
    return [empty if y is None else y.float() for y in outputs]


def specialist_contributions(outputs: Sequence[Tensor | None] | Tensor, offsets: Tensor, tables: ClassTables,
                             ops) -> Tensor:
    """``log v: Tensor[N, C] float32`` in buffer order from the specialists' logits (see
    :func:`buffer_logits` for ``outputs``), computed by ``ops.contributions`` (a
    :class:`~.backends.Backend`); ``offsets: Tensor[E+1] int64`` the routing's expert offsets.

    Mixed widths (binary and width-``C`` specialists) go expert by expert; every row gets the same
    arithmetic either way, so the result does not depend on the path.
    """
    num_classes = tables.num_classes
    parts = buffer_logits(outputs, num_classes, tables.log_spread.device)
    if parts is not None:
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        if logits.shape[0] == 0:
            return logits.new_empty(0, num_classes)
        return ops.contributions(logits, offsets.to(logits.device), tables.group_offsets, tables.group_classes,
                                 tables.log_spread, num_classes)
    parts = [ops.contributions(y.float(), y.new_tensor([0, y.shape[0]], dtype=torch.long), tables.single_offsets[e],
                               tables.group_idx[e], tables.log_spread[e : e + 1], num_classes)
             for e, y in enumerate(outputs) if y is not None]
    return torch.cat(parts)


def contribution_formula(logits: Tensor, offsets: Tensor, group_offsets: Tensor, group_classes: Tensor,
                         log_spread: Tensor, num_classes: int) -> Tensor:
    """``log v: Tensor[N, C] float32``: :func:`expert_log_contribution` of every expert's rows at once,
    for ``logits: Tensor[N, W]`` in buffer order (``W = C``, or 1 when every group is one class) and
    the ``contributions`` op's tables.

    Vectorised over all rows, with no per-expert slice or host read, so autograd's backward can be
    traced under ``torch.compile`` (expert row counts are data-dependent there).
    """
    rows, width = logits.shape
    y = logits.float()
    expert = expert_of_row(offsets, rows)
    inside = membership(group_offsets, group_classes, num_classes).index_select(0, expert)
    spread = log_spread.index_select(0, expert).unsqueeze(1)
    if width == 1 and num_classes != 1:
        # logsigmoid(+-y) written out as ATen computes it: its backward decomposition guards on the
        # row count, which compiled code cannot do for a data-dependent one.
        log_term = torch.log1p(torch.exp(-y.abs()))
        zero = torch.zeros_like(y)
        in_group, log_not_q = torch.minimum(y, zero) - log_term, torch.minimum(-y, zero) - log_term
        return torch.where(inside, in_group, log_not_q - spread)
    ls = torch.log_softmax(y, dim=1)
    # A group holding every class has no outside term: its row sums zeros instead, so no -inf - -inf
    # NaN reaches the gradient (torch.where still backpropagates through the branch it discards).
    has_rest = (~inside).any(1, keepdim=True)
    outside = torch.where(has_rest, ls.masked_fill(inside, -math.inf), 0.0)
    return torch.where(inside, ls, logsumexp_rows(outside) - spread)


def recombine_formula(logp: Tensor, logits: Sequence[Tensor], offsets: Tensor, group_offsets: Tensor,
                      group_classes: Tensor, log_spread: Tensor, sample_offsets: Tensor, sample_rows: Tensor) -> Tensor:
    """What ``recombine`` computes (``docs/ops.md``), as the recombination, docs/how-it-works.md in differentiable torch ops:
    ``log_softmax(logp[i] + sum of i's rows' log v)``; the backward of the row ops differentiates this.

    Agrees with the op to float32 rounding, not bitwise (torch's exp and sums differ from rowmath's).
    """
    num_classes = logp.shape[1]
    logits = logits[0] if len(logits) == 1 else torch.cat(list(logits))
    logv = contribution_formula(logits, offsets, group_offsets, group_classes, log_spread, num_classes)
    rows = sample_rows.shape[0]
    counts = sample_offsets[1:] - sample_offsets[:-1]
    owner = torch.repeat_interleave(torch.arange(logp.shape[0], device=logp.device), counts, output_size=rows)
    perm = torch.empty_like(owner).index_put_((sample_rows,), owner)
    return torch.log_softmax(logp.index_add(0, perm, logv), dim=1)
