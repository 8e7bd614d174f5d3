"""Placements: which rank holds which specialist, as a list of ``E`` rank ids (``placement[e] = rank``).

contiguous: ranks hold consecutive blocks of experts (the default). balanced: a greedy split of
per-expert loads (a calibration batch's routed-row counts, or parameter counts) over the ranks.
"""
from __future__ import annotations

import numbers
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["contiguous_placement", "balanced_placement", "check_placement", "experts_by_rank", "parameter_counts"]


def contiguous_placement(num_experts: int, world_size: int) -> list[int]:
    """``E`` rank ids in blocks: rank ``r`` holds experts ``[first_r, first_{r+1})``, the first
    ``E % world_size`` ranks one expert more than the others (ranks past ``E`` hold none)."""
    _check_positive(num_experts, "num_experts")
    _check_positive(world_size, "world_size")
    base, extra = divmod(num_experts, world_size)
    return [r for r in range(world_size) for _ in range(base + (r < extra))]


def balanced_placement(loads: Sequence[float] | Tensor, world_size: int) -> list[int]:
    """``E`` rank ids giving every rank about the same total load.

    ``loads``: one non-negative number per expert, e.g. the routed-row counts of a calibration batch
    (``mnn(x, return_routing=True)[1].counts``) or :func:`parameter_counts`. Greedy: experts in
    decreasing load (ties: lower index first) each go to the rank with the least load so far (ties:
    the rank holding fewer experts, then the lower rank, so experts no calibration row reached still
    spread out). Within 4/3 of the best split, and deterministic: every rank computes the same
    placement from the same loads.
    """
    _check_positive(world_size, "world_size")
    if isinstance(loads, Tensor):
        if loads.dim() != 1:
            raise ValueError(f"loads must be one number per expert (a 1-D tensor), got shape {tuple(loads.shape)}")
        loads = loads.tolist()
    loads = list(loads)
    if not loads:
        raise ValueError("loads is empty; expected one number per expert")
    for e, load in enumerate(loads):
        if isinstance(load, bool) or not isinstance(load, numbers.Real) or not load >= 0:
            raise ValueError(f"loads[{e}] must be a non-negative number, got {load!r}")
    totals, held = [0.0] * world_size, [0] * world_size
    placement = [0] * len(loads)
    for e in sorted(range(len(loads)), key=lambda e: (-loads[e], e)):
        rank = min(range(world_size), key=lambda r: (totals[r], held[r], r))
        placement[e] = rank
        totals[rank] += loads[e]
        held[rank] += 1
    return placement


def parameter_counts(specialists: Sequence[nn.Module]) -> list[int]:
    """Per specialist, its number of parameter elements (a load for :func:`balanced_placement`)."""
    return [sum(p.numel() for p in s.parameters()) for s in specialists]


def check_placement(placement, num_experts: int, world_size: int) -> tuple[int, ...]:
    """``placement`` as a tuple of ``E`` ints in ``[0, world_size)``, or a one-line ``ValueError``/
    ``TypeError`` saying what is wrong with it."""
    if isinstance(placement, Tensor):
        placement = placement.tolist()
    if isinstance(placement, (str, bytes)) or not isinstance(placement, Sequence):
        raise TypeError(f"placement must be a list of {num_experts} rank ids (one per expert), "
                        f"got {type(placement).__name__}")
    if len(placement) != num_experts:
        raise ValueError(f"placement has {len(placement)} entries but the module has {num_experts} experts; "
                         f"expected one rank id per expert")
    for e, rank in enumerate(placement):
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
            raise TypeError(f"placement[{e}] must be an int rank id, got {type(rank).__name__}")
        if not 0 <= rank < world_size:
            raise ValueError(f"placement[{e}] = {rank} but the process group has {world_size} rank(s) "
                             f"(ids 0 to {world_size - 1})")
    return tuple(int(r) for r in placement)


def experts_by_rank(placement: Sequence[int], world_size: int) -> list[list[int]]:
    """Per rank, the experts it holds, in increasing order (the order its rows travel in)."""
    held: list[list[int]] = [[] for _ in range(world_size)]
    for e, rank in enumerate(placement):
        held[rank].append(e)
    return held


def _check_positive(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
