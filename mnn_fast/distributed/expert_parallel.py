"""Expert-parallel inference: the switch on every rank, each specialist on one rank, each rank's own batch.

Each rank routes its batch as the module does, sends each routed row to the rank holding its expert
(all_to_all), which runs the expert once per source rank on exactly the rows that source's own
forward would give it; the logits come back (all_to_all) and the origin runs the module's recombine.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..engine import MetaNeuralNetwork, Routing, stages
from . import exchange
from .exchange import HEADER, WIRE_DTYPES
from .placement import check_placement, contiguous_placement, experts_by_rank
from .wire import Wire

__all__ = ["ExpertParallel", "RemoteSpecialist"]


class RemoteSpecialist(nn.Module):
    """Stands in for a specialist another rank holds: no parameters, and never called here."""

    def __init__(self, expert: int, rank: int):
        super().__init__()
        self.expert, self.rank = expert, rank

    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError(f"specialist {self.expert} is held by rank {self.rank}; only ExpertParallel routes rows to it")

    def extra_repr(self) -> str:
        return f"expert={self.expert}, rank={self.rank}"


class ExpertParallel(nn.Module):
    """A :class:`~mnn_fast.MetaNeuralNetwork` forward over a ``torch.distributed`` process group:
    every rank holds the switch and only its own specialists, and routes its own batch.

    Contract: on rank ``r``, ``ExpertParallel(x_r)`` is bitwise equal (``torch.equal``) to the
    single-process ``mnn(x_r)`` with the same weights, on CPU in float32. It is a per-rank contract
    because a CPU ``nn.Linear`` computes a row's last bits differently depending on how many rows
    are in the call, so an expert run once on several ranks' rows together would give each rank
    other bits than its own forward. The rank holding expert ``e`` therefore calls it separately
    for each source rank, on exactly the rows (same count, same order) that the source's own
    forward would hand it, on a fresh allocation's alignment (:func:`mnn_fast.engine.stages.run_specialists`).
    ``merge_sources=True`` instead runs each expert once on all ranks' rows: fewer, larger calls,
    and outputs within float32 rounding of ``mnn(x_r)``, not bitwise.

    Per forward, every rank calls four ``all_to_all_single`` in the same order, also with an empty
    batch: row counts per expert (with a header checking that ranks agree on dtype, shape and ``C``),
    the routed rows (as bytes), the specialists' status and output widths (so binary, width-1
    specialists work and an error on one rank raises on all of them instead of leaving the others
    waiting), and the logits. Inference only (no autograd).

    Failures: when a rank raises, every rank raises together (that rank its own error, the others a
    :class:`~mnn_fast.distributed.RankFailure` naming it), and the group stays usable. When a rank
    dies or hangs, the others raise ``RankFailure`` naming it within about the group's timeout
    (``init_process_group(timeout=...)``; twice that at most), and the group is broken afterwards.

    Build it with :meth:`from_module`, or from this rank's parts:

    Args:
        switch: the switch ``nn.Module`` (every rank holds a copy).
        specialists: ``{expert index: nn.Module}`` for exactly the experts ``placement`` gives this rank.
        groups, threshold, top_k, num_classes, switch_fn, backend: as for ``MetaNeuralNetwork``.
        num_experts: ``E``; needed only when ``groups`` and ``num_classes`` are both ``None``.
        placement: ``E`` rank ids, ``placement[e]`` holding expert ``e``;
            ``None`` = :func:`~mnn_fast.distributed.contiguous_placement`.
        group: the process group (``None`` = the default one); its size must cover the placement.
        merge_sources: one call per expert on all ranks' rows (see above).

    ``forward(x: Tensor[B_r, ...])`` returns log-probabilities ``Tensor[B_r, C] float32``. ``shard`` is a
    ``MetaNeuralNetwork`` holding the switch and this rank's specialists (the others are
    :class:`RemoteSpecialist` placeholders), so its ``state_dict`` keys are the full module's.
    """

    def __init__(self, switch: nn.Module, specialists: Mapping[int, nn.Module], groups=None,
                 threshold: float | None = 0.25, top_k: int | None = None, *, num_experts: int | None = None,
                 num_classes: int | None = None, switch_fn=None, placement=None, group=None, backend="auto",
                 merge_sources: bool = False):
        super().__init__()
        world_size, rank = _group_size_and_rank(group)
        num_experts = _count_experts(groups, num_experts, num_classes)
        placement = check_placement(contiguous_placement(num_experts, world_size) if placement is None else placement,
                                    num_experts, world_size)
        held = experts_by_rank(placement, world_size)
        _check_local(specialists, held[rank], placement, rank)
        self._gloo = dist.get_backend(group) == "gloo"  # gloo exchanges CPU tensors only
        self._control = exchange.control_device(group)  # counts and status words travel there
        if self._gloo:
            for e, module in [(-1, switch), *specialists.items()]:
                device = next((p.device for p in module.parameters() if p.device.type != "cpu"), None)
                if device is not None:
                    who = "the switch" if e < 0 else f"specialists[{e}]"
                    raise ValueError(f"{who} is on {device} but the process group's backend is gloo, which "
                                     f"exchanges CPU tensors: move the module to the CPU")
        full = [specialists[e] if placement[e] == rank else RemoteSpecialist(e, placement[e]) for e in range(num_experts)]
        # The module itself gives the switch side (input checks, scores) and the recombine tables;
        # "sequential" so its executor never stacks the local weights it would not use.
        self.shard = MetaNeuralNetwork(switch, full, groups, threshold, top_k, num_classes=num_classes,
                                       switch_fn=switch_fn, backend=backend, executor="sequential")
        self.group, self.rank, self.world_size = group, rank, world_size
        self.placement: tuple[int, ...] = placement
        self.held = held
        self.merge_sources = bool(merge_sources)
        # Expert segments travel rank-major: the experts of rank 0, then rank 1's, ... (each in
        # increasing order), so each destination's rows are one contiguous block of the send buffer.
        self._order = [e for experts in held for e in experts]
        self._contiguous = list(placement) == sorted(placement)  # then rank-major is expert-major
        self._order_tensor = torch.tensor(self._order, dtype=torch.long)
        self._dest_of_segment = torch.tensor([placement[e] for e in self._order], dtype=torch.long)
        # Last: it registers this instance in the group's store, and a refused build must not count.
        self.wire = Wire(group, rank, world_size, num_experts, placement)

    @classmethod
    def from_module(cls, mnn: MetaNeuralNetwork, group=None, placement=None, *, merge_sources: bool = False):
        """This rank's part of ``mnn``: its switch, settings and backend, and only the specialists
        ``placement`` (default: contiguous blocks) gives this rank. The others are not referenced,
        so dropping ``mnn`` afterwards frees them."""
        if not isinstance(mnn, MetaNeuralNetwork):
            raise TypeError(f"mnn must be a MetaNeuralNetwork, got {type(mnn).__name__}")
        world_size, rank = _group_size_and_rank(group)
        placement = check_placement(contiguous_placement(mnn.num_experts, world_size) if placement is None
                                    else placement, mnn.num_experts, world_size)
        local = {e: mnn.specialists[e] for e, r in enumerate(placement) if r == rank}
        return cls(mnn.switch, local, mnn.groups, mnn.threshold, mnn.top_k, num_experts=mnn.num_experts,
                   num_classes=mnn.num_classes, switch_fn=mnn.switch_fn, placement=placement, group=group,
                   backend=mnn.ops, merge_sources=merge_sources)

    # ------------------------------------------------------------------ configuration

    @property
    def num_experts(self) -> int:
        return self.shard.num_experts

    @property
    def local_experts(self) -> list[int]:
        """The experts this rank holds, in increasing order."""
        return list(self.held[self.rank])

    @property
    def threshold(self) -> float | None:
        return self.shard.threshold

    @threshold.setter
    def threshold(self, value) -> None:
        self.shard.threshold = value  # every rank must set the same value, or they route differently

    @property
    def top_k(self) -> int | None:
        return self.shard.top_k

    @top_k.setter
    def top_k(self, value) -> None:
        self.shard.top_k = value

    def describe(self) -> str:
        """One line per rank: the experts it holds (``rank 0: experts 0-2`` ...)."""
        return "\n".join(f"rank {r}: experts {_ranges(experts)}" + (" (this rank)" if r == self.rank else "")
                         for r, experts in enumerate(self.held))

    def extra_repr(self) -> str:
        held = "; ".join(f"rank {r}: {_ranges(experts)}" for r, experts in enumerate(self.held))
        return f"rank={self.rank}, world_size={self.world_size}, experts held: {held}, merge_sources={self.merge_sources}"

    # ------------------------------------------------------------------ memory (sharded loading)

    def parameter_bytes(self, part: str = "all") -> int:
        """Bytes of the state tensors (parameters and buffers) this rank holds: ``part="switch"``,
        ``"specialists"`` (only this rank's; about ``1/world_size`` of them) or ``"all"`` (both)."""
        if part not in ("all", "switch", "specialists"):
            raise ValueError(f"part must be 'all', 'switch' or 'specialists', got {part!r}")
        modules = ([self.shard.switch] if part != "specialists" else []) + (
            [self.shard.specialists[e] for e in self.local_experts] if part != "switch" else [])
        return sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())

    @property
    def exchange_log(self) -> list | None:
        """``None`` (the default), or a list that each exchange appends ``(stage, seconds, bytes sent
        to other ranks, bytes received from other ranks)`` to: set ``ep.exchange_log = []`` to time them."""
        return self.wire.log

    @exchange_log.setter
    def exchange_log(self, value: list | None) -> None:
        self.wire.log = value

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> Tensor:
        """``x: Tensor[B_r, ...]`` (this rank's batch; ``B_r`` may be 0) -> ``Tensor[B_r, C] float32``
        log-probabilities. Every rank of the group must call it, each with its own batch."""
        self._check_input(x)  # before any collective: a refused call leaves no exchange half-done
        with torch.no_grad():
            return self._forward(x)

    def _check_input(self, x) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in WIRE_DTYPES:
            raise TypeError(f"x must be one of {[str(d) for d in WIRE_DTYPES]}, got {x.dtype}")
        if x.dim() < 2:
            raise ValueError(f"x must have shape [B, ...] with at least 2 dimensions, got {tuple(x.shape)}")
        if x.device.type != "cpu" and self._gloo:
            raise ValueError(f"x is on {x.device} but the process group's backend is gloo, which exchanges CPU "
                             f"tensors: pass x.cpu()")
        if self._control.type == "cuda" and x.device.type != "cuda":
            raise ValueError(f"x is on {x.device} but the process group's backend is NCCL, which exchanges CUDA "
                             f"tensors: pass x.to({str(self._control)!r})")

    def _forward(self, x: Tensor) -> Tensor:
        shard, ops, wire = self.shard, self.shard.ops, self.wire
        local = self.held[self.rank]
        wire.begin()  # the first time: every rank built alike (through the store, not a collective)
        # 1. Route this rank's batch with the module's own stages; an error is held until every
        # rank has said in the first exchange whether it failed, so that all raise together.
        failure, log_probs, routing, rows = None, None, None, x.new_empty(0, *x.shape[1:])
        sent = torch.zeros(self.num_experts, dtype=torch.long)  # rows per expert, rank-major order
        try:
            log_probs, scores = shard.switch_scores(x)
            routing = stages.route_batch(scores, ops, shard.threshold, shard.top_k, shard.switch_fn)
            rows = stages.gather_rows(x, self._rank_major_perm(routing), ops)
            sent = routing.counts.cpu().index_select(0, self._order_tensor)
        except Exception as exc:  # noqa: BLE001 -- re-raised below, after the other ranks know
            failure = exc
        num_classes = log_probs.shape[1] if log_probs is not None else 0

        # 2. Counts: each rank tells each owner how many rows of each of its experts will come.
        head = exchange.header(failure is not None, x, num_classes)
        per_dest = torch.split(sent, [len(experts) for experts in self.held])
        table = wire.all_to_all(torch.cat([torch.cat([head, c]) for c in per_dest]).to(self._control),
                                [HEADER + len(experts) for experts in self.held],
                                [HEADER + len(local)] * self.world_size, "counts").view(self.world_size, HEADER + len(local))
        exchange.raise_failures(table[:, 0].tolist(), failure, "counts", "before the exchange (in the switch or routing)")
        exchange.check_headers(table[:, :HEADER])
        arriving = table[:, HEADER:].tolist()  # [source][j]: rows of expert local[j] from each source

        # 3. Rows: to each owner its experts' rows, as bytes (exact for any dtype).
        to_dest = torch.zeros(self.world_size, dtype=torch.long).index_add_(0, self._dest_of_segment, sent)
        received = wire.all_to_all(exchange.as_bytes(rows), to_dest.tolist(), [sum(c) for c in arriving], "dispatch")
        received = received.view(x.dtype).view(received.shape[0], *x.shape[1:])  # not -1: may be empty

        # 4. The local experts on each source's rows; errors held again until all ranks know.
        failure, results = None, [[None] * len(local) for _ in arriving]
        try:
            results = self._run_local(received, arriving, num_classes)
        except Exception as exc:  # noqa: BLE001
            failure = exc
        widths = [[0 if y is None else y.shape[1] for y in outs] for outs in results]
        status = wire.all_to_all(torch.tensor([v for w in widths for v in (int(failure is not None), *w)],
                                              dtype=torch.long, device=self._control),
                                 [1 + len(local)] * self.world_size, [1 + len(experts) for experts in self.held],
                                 "status").tolist()
        starts = [sum(1 + len(experts) for experts in self.held[:d]) for d in range(self.world_size)]
        exchange.raise_failures([status[s] for s in starts], failure, "status", "running its specialists")

        # 5. Logits back to their origin, float32 as the recombine reads them, then the module's recombine.
        payload = [y.float().reshape(-1) for outs in results for y in outs if y is not None]
        counts = routing.counts.tolist()
        back_widths = {e: status[starts[d] + 1 + j] for d, experts in enumerate(self.held) for j, e in enumerate(experts)}
        logits = wire.all_to_all(torch.cat(payload) if payload else torch.empty(0, device=x.device),
                                 [sum(y.numel() for y in outs if y is not None) for outs in results],
                                 [sum(counts[e] * back_widths[e] for e in experts) for experts in self.held], "combine")
        outputs: list[Tensor | None] = [None] * self.num_experts
        position = 0
        for e in self._order:
            size = counts[e] * back_widths[e]
            if size:
                outputs[e] = logits[position : position + size].view(counts[e], back_widths[e])
            position += size
        return stages.recombine_log_probs(log_probs, outputs, routing, shard.class_tables(num_classes), ops)

    def _rank_major_perm(self, routing: Routing) -> Tensor:
        """``perm: Tensor[N] int64`` with the expert segments in rank-major order (``routing.perm``
        itself when the placement is contiguous, as it is then already)."""
        if self._contiguous:
            return routing.perm
        order = self._order_tensor.to(routing.perm.device)
        counts = routing.counts.index_select(0, order)
        starts = routing.offsets[:-1].index_select(0, order)
        new_starts = torch.cumsum(counts, 0) - counts
        rows = routing.perm.shape[0]
        shift = torch.repeat_interleave(starts - new_starts, counts, output_size=rows)
        return routing.perm.index_select(0, torch.arange(rows, device=order.device) + shift)

    def _run_local(self, received: Tensor, arriving: list[list[int]], num_classes: int) -> list[list[Tensor | None]]:
        """Per source rank, per local expert, its logits ``Tensor[n, C or 1]`` (``None``: no rows)."""
        local = self.held[self.rank]
        modules = [self.shard.specialists[e] for e in local]
        groups = [self.shard.groups[e] for e in local]
        chunks = torch.split(received, [sum(c) for c in arriving])
        try:
            if not self.merge_sources:
                # One call per (source, expert): the rows, count and order the source's own forward
                # would give it, so the GEMM rounds as it does there (see the class docstring).
                results = []
                for rows, sizes in zip(chunks, arriving):
                    outs = stages.run_specialists(modules, rows, torch.tensor(sizes), sizes)
                    stages.check_specialist_output(outs, rows, groups, num_classes)
                    results.append(outs)
                return results
            # One call per expert on every source's rows (expert-major, source-major within).
            pieces = [rows.split(sizes) for rows, sizes in zip(chunks, arriving)]
            merged = torch.cat([p[j] for j in range(len(local)) for p in pieces]) if local else received
            totals = [sum(sizes[j] for sizes in arriving) for j in range(len(local))]
            outs = stages.run_specialists(modules, merged, torch.tensor(totals), totals)
            stages.check_specialist_output(outs, merged, groups, num_classes)
            per_source = [y.split([sizes[j] for sizes in arriving]) if y is not None else [None] * len(arriving)
                          for j, y in enumerate(outs)]
            return [[per_source[j][s] if arriving[s][j] else None for j in range(len(local))]
                    for s in range(len(arriving))]
        except ValueError as exc:
            # The stages name experts by their index in the list they were given: name the module's.
            message = re.sub(r"specialists\[(\d+)\]", lambda m: f"specialists[{local[int(m.group(1))]}]", str(exc))
            raise ValueError(f"{message} (on rank {self.rank})") from exc


def _group_size_and_rank(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group first")
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given process group")
    return world_size, rank


def _count_experts(groups, num_experts, num_classes) -> int:
    if groups is not None and not isinstance(groups, (str, bytes, Tensor)) and hasattr(groups, "__len__"):
        if num_experts is not None and num_experts != len(groups):
            raise ValueError(f"num_experts={num_experts} but groups lists {len(groups)} experts")
        return len(groups)
    if num_experts is not None:
        return num_experts
    if num_classes is not None:
        return num_classes  # groups=None: one expert per class
    raise ValueError("pass num_experts= (or groups= or num_classes=): a rank holds only some specialists, "
                     "so it cannot count them")


def _check_local(specialists, mine: list[int], placement: tuple[int, ...], rank: int) -> None:
    if not isinstance(specialists, Mapping):
        raise TypeError(f"specialists must be a dict {{expert index: nn.Module}} of this rank's experts, "
                        f"got {type(specialists).__name__}")
    for e, module in specialists.items():
        if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < len(placement):
            raise ValueError(f"specialists has key {e!r}; expected expert indices in [0, {len(placement)})")
        if not isinstance(module, nn.Module):
            raise TypeError(f"specialists[{e}] must be an nn.Module, got {type(module).__name__}")
    missing = [e for e in mine if e not in specialists]
    if missing:
        raise ValueError(f"rank {rank} holds no module for expert(s) {missing}, which the placement gives it")
    foreign = sorted(e for e in specialists if placement[e] != rank)
    if foreign:
        raise ValueError(f"specialists holds expert(s) {foreign}, which the placement gives to rank(s) "
                         f"{sorted({placement[e] for e in foreign})}; pass only this rank's "
                         f"(ExpertParallel.from_module keeps only those)")


def _ranges(experts: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``; ``"none"`` when empty."""
    if not experts:
        return "none"
    spans, first, last = [], experts[0], experts[0]
    for e in experts[1:] + [None]:
        if e is not None and e == last + 1:
            last = e
            continue
        spans.append(str(first) if first == last else f"{first}-{last}")
        if e is not None:
            first = last = e
    return ", ".join(spans)
