"""The exchanges of one ExpertParallel, and one clear error on every other rank when a rank dies or hangs.

Before each exchange a rank writes "call k, exchange s" to the group's store (a store ``set`` is one
message, not a round trip). When gloo fails (a peer's connection closed, or no answer within the
group's timeout), the rank writes "down at call k" and names the ranks that do not write it: at once
those that never reached the exchange that timed out, else those silent for one more timeout.
"""
from __future__ import annotations

import math
import time
import zlib
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .exchange import RankFailure, all_to_all

__all__ = ["STAGES", "Wire", "group_timeout"]

# The four exchanges of a forward, in order, with the words messages use for them.
STAGES = {"counts": "count exchange", "dispatch": "dispatch", "status": "status exchange", "combine": "combine"}
_ORDER = list(STAGES)
_PREFIX = "mnn_fast/ep"
# Per process group (by name): forwards so far and ExpertParallel instances built. Every rank calls
# the same forwards in the same order, so these agree across ranks and can key the store.
_calls: dict[str, int] = {}
_instances: dict[str, int] = {}


def group_timeout(pg) -> float:
    """Seconds a gloo collective of ``pg`` waits for a peer: the ``timeout`` the group was created with."""
    try:  # the backend's own setting (new_group(timeout=...) may differ from the store's)
        return pg._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    except (AttributeError, RuntimeError):
        pass
    try:
        return pg.get_group_store().timeout.total_seconds()
    except (AttributeError, RuntimeError):
        return 1800.0  # torch's default process-group timeout


def _ranks(ranks: Sequence[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


class Wire:
    """``all_to_all`` over ``group`` for one ExpertParallel: failure detection, and an opt-in log.

    ``log``: ``None``, or a list that gets ``(stage, seconds, bytes sent to other ranks, bytes
    received from other ranks)`` per exchange (the benchmark's timing hook).
    """

    def __init__(self, group, rank: int, world_size: int, num_experts: int, placement: Sequence[int]):
        self.group, self.rank, self.world_size = group, rank, world_size
        pg = group if group is not None else dist.group.WORLD
        self.store = pg.get_group_store()
        self.timeout = group_timeout(pg)
        self.name = pg.group_name
        self.instance = _instances[self.name] = _instances.get(self.name, 0) + 1
        checksum = zlib.crc32(bytes(str(list(placement)), "ascii"))
        self.setup = f"E={num_experts}, placement checksum {checksum:08x}"
        self.store.set(self._key("built", self.instance, rank), self.setup)
        self.agreed = False
        self.call = 0
        self.log: list[tuple[str, float, int, int]] | None = None

    def _key(self, *parts) -> str:
        return "/".join([_PREFIX, *map(str, parts)])

    def begin(self) -> None:
        """Once per forward, before its first exchange: checks (the first time) that every rank built
        this instance alike, and numbers the call."""
        if not self.agreed:
            self._check_agreement()
            self.agreed = True
        self.call = _calls[self.name] = _calls.get(self.name, 0) + 1

    def _check_agreement(self) -> None:
        """One-line ``ValueError`` (every rank alike) when ranks were built with other experts or
        placements: exchanges sized from different placements would not match."""
        keys = [self._key("built", self.instance, q) for q in range(self.world_size)]
        try:
            self.store.wait(keys, timedelta(seconds=self.timeout))
        except RuntimeError as exc:
            silent = [q for q, key in enumerate(keys) if q != self.rank and not self._exists(key)]
            raise RankFailure(f"ExpertParallel: {_ranks(silent or [0])} did not build this ExpertParallel within "
                              f"{self.timeout:g} s (dead or hung, or it builds its instances in another order)",
                              (silent or [0])[0], "set-up", silent or [0]) from exc
        built = [value.decode() for value in self.store.multi_get(keys)]
        for q, theirs in enumerate(built):
            if theirs != built[0]:  # measured against rank 0, so that every rank says the same
                raise ValueError(f"ExpertParallel: rank {q} was built with {theirs} but rank 0 with {built[0]}: "
                                 f"every rank must pass the same experts and placement, and build its "
                                 f"ExpertParallel instances in the same order")

    def _exists(self, key: str) -> bool:
        try:
            return self.store.check([key])
        except RuntimeError:
            return False

    def all_to_all(self, send: Tensor, send_sizes: Sequence[int], recv_sizes: Sequence[int], stage: str) -> Tensor:
        """One ``all_to_all_single`` (see :func:`~mnn_fast.distributed.exchange.all_to_all`); any
        failure of it comes out as :class:`RankFailure`, alike on every rank that is still running."""
        start = time.perf_counter()
        try:
            self.store.set(self._key("at", self.rank), f"{self.call} {_ORDER.index(stage)}")
            out = all_to_all(send, send_sizes, recv_sizes, self.group)
        except RuntimeError as exc:
            raise self._post_mortem(stage, exc, time.perf_counter() - start) from exc
        if self.log is not None:
            row = math.prod(send.shape[1:]) * send.element_size()
            others = [d for d in range(self.world_size) if d != self.rank]
            self.log.append((stage, time.perf_counter() - start, row * sum(send_sizes[d] for d in others),
                             row * sum(recv_sizes[d] for d in others)))
        return out

    def _progress(self, q: int) -> tuple[int, int]:
        key = self._key("at", q)
        if not self.store.check([key]):
            return (-1, -1)
        call, stage = self.store.get(key).decode().split()
        return int(call), int(stage)

    def _post_mortem(self, stage: str, exc: BaseException, elapsed: float) -> RankFailure:
        """Which ranks stopped answering: see the module docstring."""
        what, timeout = STAGES[stage], self.timeout
        others = [q for q in range(self.world_size) if q != self.rank]
        try:
            self.store.set(self._key("down", self.call, self.rank), stage)
            silent = []
            if elapsed >= 0.9 * timeout:  # gloo waited the whole timeout: who never reached this exchange?
                here = (self.call, _ORDER.index(stage))
                silent = [q for q in others if self._progress(q) < here]
            if not silent:  # who else saw the failure? Survivors reach it within their compute skew.
                deadline = time.monotonic() + timeout
                while True:
                    silent = [q for q in others if not self.store.check([self._key("down", self.call, q)])]
                    if not silent or time.monotonic() >= deadline:
                        break
                    time.sleep(0.02)
        except RuntimeError:
            # The store is unreachable: the process hosting it is gone. That is rank 0 for groups
            # started with init_method tcp:// or env:// (torchrun's own store outlives its ranks).
            return RankFailure(f"ExpertParallel: rank 0 did not answer during the {what} and the group's store, "
                               f"which it hosts, is unreachable (dead)", 0, stage)
        if silent:
            return RankFailure(f"ExpertParallel: {_ranks(silent)} did not answer within {timeout:g} s during the "
                               f"{what} (dead or hung)", silent[0], stage, silent)
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return RankFailure(f"ExpertParallel: the {what} failed on rank {self.rank} although every rank answered: "
                           f"this rank was too late (hung or busy past the group's timeout of {timeout:g} s), "
                           f"or the exchange itself failed ({cause})", self.rank, stage)
