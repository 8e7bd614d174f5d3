"""The wire: ``all_to_all_single`` along dim 0, the per-rank header, and failing on every rank together.

Every rank sends every other rank its own status word in each small exchange, so all ranks see the
same flags and all raise together: no rank is left waiting in a collective that the others skipped.
A rank that dies or hangs instead is named by :mod:`.wire`; both raise :class:`RankFailure`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["RankFailure", "WIRE_DTYPES", "HEADER", "control_device", "all_to_all", "header", "check_headers", "raise_failures", "as_bytes"]


class RankFailure(RuntimeError):
    """Another rank raised, died or hung during an :class:`ExpertParallel` forward.

    ``rank``: the (first) rank at fault, ``None`` when none could be named; ``ranks``: all of them;
    ``stage``: the exchange where it surfaced (``"counts"``, ``"dispatch"``, ``"status"``,
    ``"combine"``, or ``"set-up"`` for the check before the first exchange). After a rank died or
    hung the process group is broken: destroy it and restart every rank.
    """

    def __init__(self, message: str, rank: int | None, stage: str, ranks: Sequence[int] | None = None):
        super().__init__(message)
        self.rank, self.stage = rank, stage
        self.ranks = tuple(ranks) if ranks is not None else (() if rank is None else (rank,))


# The input dtypes rows may travel in (as bytes), coded by position in the header.
WIRE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Header words each rank sends every rank before its counts: failed?, dtype code, C, feature-shape key.
HEADER = 4


def control_device(group) -> torch.device:
    """Where a group's small int64 exchanges (counts, status, failure flags) travel: the CPU when its
    backend takes CPU tensors (gloo, or a ``"cpu:gloo,cuda:nccl"`` pair), else (NCCL alone) this
    process's current CUDA device, as NCCL exchanges CUDA tensors only."""
    backend = str(dist.get_backend(group))
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def all_to_all(send: Tensor, send_sizes: Sequence[int], recv_sizes: Sequence[int], group) -> Tensor:
    """One ``dist.all_to_all_single``: ``send: Tensor[sum(send_sizes), ...]`` goes to the ranks in
    blocks of ``send_sizes`` rows; returns ``Tensor[sum(recv_sizes), ...]`` (same dtype and row shape),
    rank ``s``'s block at rows ``sum(recv_sizes[:s]):...``. Zero sizes are fine: every rank calls
    it anyway, since a collective one rank skips would leave the others waiting."""
    out = send.new_empty(sum(recv_sizes), *send.shape[1:])
    dist.all_to_all_single(out, send.contiguous(), list(recv_sizes), list(send_sizes), group=group)
    return out


def header(failed: bool, x: Tensor, num_classes: int) -> Tensor:
    """``Tensor[HEADER] int64``: this rank's status and what its rows look like on the wire."""
    # hash() of a tuple of ints is the same in every process (only str/bytes hashing is salted).
    shape_key = hash(tuple(x.shape[1:])) if not failed else 0
    return torch.tensor([int(failed), WIRE_DTYPES.index(x.dtype), num_classes, shape_key], dtype=torch.long)


def check_headers(headers: Tensor) -> None:
    """``headers: Tensor[W, HEADER] int64`` (every rank's, so every rank raises alike): ``ValueError``
    when ranks pass rows of different feature shapes or dtypes, or their switches disagree on ``C``."""
    first = headers[0].tolist()
    for rank, row in enumerate(headers.tolist()):
        if row[1:] == first[1:]:
            continue
        what = (f"the switch returns C={first[2]} on rank 0 but C={row[2]} on rank {rank}" if row[2] != first[2] else
                f"x is {WIRE_DTYPES[first[1]]} on rank 0 but {WIRE_DTYPES[row[1]]} on rank {rank}" if row[1] != first[1]
                else f"x.shape[1:] differs between rank 0 and rank {rank}")
        raise ValueError(f"every rank must pass rows of one shape and dtype to one switch: {what}")


def raise_failures(flags: Sequence[int], own: BaseException | None, stage: str, during: str) -> None:
    """Raises this rank's own error, or a :class:`RankFailure` naming the ranks that failed, when any
    flag is set; ``flags``: one per rank, every rank's view the same; ``stage``: the exchange that
    carried the flags; ``during``: what the failed ranks were doing."""
    failed = [rank for rank, flag in enumerate(flags) if flag]
    if not failed:
        return
    if own is not None:
        raise own
    who = f"rank {failed[0]}" if len(failed) == 1 else "ranks " + ", ".join(map(str, failed))
    raise RankFailure(f"ExpertParallel: {who} failed {during}; this rank stops too, so that none waits on the others "
                      f"(the error is raised on rank {failed[0]})", failed[0], stage, failed)


def as_bytes(rows: Tensor) -> Tensor:
    """``rows: Tensor[N, ...]`` as ``Tensor[N, row bytes] uint8``: any dtype travels bit for bit,
    whatever reduction types the communication backend knows."""
    width = math.prod(rows.shape[1:])
    return rows.reshape(rows.shape[0], width).contiguous().view(torch.uint8)  # not -1: N may be 0
