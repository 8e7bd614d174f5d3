"""What each spawned rank runs for tests/distributed: many cases inside one gloo group per world size.

Every rank builds the same seeded models, so the full single-process module is there to compare
with: each case checks ``torch.equal(ExpertParallel(x_r), mnn(x_r))`` on the rank's own batch, and
reports (rank, case, ok, detail) to the parent through a queue. All ranks run the same cases in the
same order, since every forward is a sequence of collectives they must all call.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import time
import traceback

import torch
import torch.distributed as dist
from torch import nn

import mnn_fast
from mnn_fast.distributed import ExpertParallel, RankFailure, balanced_placement, contiguous_placement, experts_by_rank

D_IN = 13
CONFIGS = [(0.25, None), (0.0, None), (1.0, None), (None, 2), (0.1, 2)]  # (threshold, top_k)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_rank_group():
    """A one-rank gloo group in this process, for tests that need a group but no peers."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


def mlp(d_out: int, hidden: int = 16) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(D_IN, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


class Fragile(nn.Module):
    """A specialist that refuses rows whose first feature is above 1000 (a failing expert)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if (x.reshape(x.shape[0], -1)[:, 0] > 1000).any():
            raise ValueError("poisoned row")
        return self.inner(x)


def models() -> dict[str, mnn_fast.MetaNeuralNetwork]:
    """Seeded: the same weights on every rank. Flatten first, so [B, 13] and [B, 13, 1] both run."""
    torch.manual_seed(0)
    out = {}
    out["classes"] = mnn_fast.MetaNeuralNetwork(mlp(5), [mlp(5) for _ in range(5)])
    groups = [[0, 1], [2, 3, 4], [5], [1, 2], [0, 5, 3], [4], [3]]  # overlapping, of several sizes
    out["groups"] = mnn_fast.MetaNeuralNetwork(mlp(6), [mlp(6) for _ in groups], groups)
    out["binary"] = mnn_fast.MetaNeuralNetwork(mlp(4), [mlp(1) for _ in range(4)])
    out["mixed"] = mnn_fast.MetaNeuralNetwork(mlp(4), [mlp(w) for w in (1, 4, 1, 4)])
    for m in out.values():
        m.eval()
    return out


def batch(seed: int, rows: int) -> torch.Tensor:
    return torch.randn(rows, D_IN, generator=torch.Generator().manual_seed(seed)) * 2


def placements(mnn, world: int) -> dict[str, list[int]]:
    experts = mnn.num_experts
    with torch.no_grad():
        counts = mnn(batch(999, 256), return_routing=True)[1].counts
    return {"contiguous": contiguous_placement(experts, world),
            "balanced": balanced_placement(counts, world),
            "round-robin": [(experts - 1 - e) % world for e in range(experts)],  # rank-major != expert-major
            "last rank holds none": [e % (world - 1) for e in range(experts)]}


def one_rank_batch(mnn, target: list[int], rank: int, rows: int = 20) -> torch.Tensor:
    """Rows whose active experts are all in ``target`` (one rank's experts); a slice per rank."""
    pool = batch(4242, 3000)
    with torch.no_grad():
        routing = mnn(pool, return_routing=True)[1]
    active = torch.zeros(pool.shape[0], mnn.num_experts, dtype=torch.bool)
    sample = torch.repeat_interleave(torch.arange(pool.shape[0]), routing.sample_offsets.diff())
    expert = torch.repeat_interleave(torch.arange(mnn.num_experts), routing.counts)[routing.sample_rows]
    active[sample, expert] = True
    inside = active[:, target].any(1) & ~active[:, [e for e in range(mnn.num_experts) if e not in target]].any(1)
    picked = pool[inside]
    assert picked.shape[0] >= rows * 3, picked.shape
    return picked[rank * rows : (rank + 1) * rows]


def configure(model, threshold, top_k) -> None:
    """Sets both in the order the setters accept (threshold and top_k may not both be None)."""
    if top_k is not None:
        model.top_k, model.threshold = top_k, threshold
    else:
        model.threshold, model.top_k = threshold, top_k


def run_cases(rank: int, world: int, report) -> None:
    mnns = models()
    case = 0
    for name, mnn in mnns.items():
        for placement_name, placement in placements(mnn, world).items():
            ep = ExpertParallel.from_module(mnn, placement=placement)
            for threshold, top_k in CONFIGS:
                configure(mnn, threshold, top_k)
                configure(ep, threshold, top_k)
                case += 1
                # Uneven batches: one rank empty in every third case, single rows now and then.
                rows = (5 * case + 17 * rank) % 41
                if case % 3 == rank % 3:
                    rows = 0
                x = batch(100 * case + rank, rows)
                with torch.no_grad():
                    got, want = ep(x), mnn(x)
                report(f"{name}/{placement_name}/t={threshold},k={top_k}", torch.equal(got, want),
                       f"B={rows}: {tuple(got.shape)} vs {tuple(want.shape)}")
    # Every row of every rank goes to the last rank's experts (the others receive nothing).
    mnn = mnns["classes"]
    configure(mnn, 0.25, None)
    for placement in (contiguous_placement(5, world), [(5 - 1 - e) % world for e in range(5)]):
        target = experts_by_rank(placement, world)[world - 1]
        ep = ExpertParallel.from_module(mnn, placement=placement)
        x = one_rank_batch(mnn, target, rank)
        with torch.no_grad():
            report(f"all rows to rank {world - 1} ({placement})", torch.equal(ep(x), mnn(x)), "")
    # Rank 0 sends each expert one row, the others many: a call on one row rounds differently from
    # the same row inside a larger call, so this is where running an expert once on every rank's
    # rows together would break rank 0's bits (measured: 13 of 20 such batches differ).
    configure(mnn, 0.0, None)
    ep = ExpertParallel.from_module(mnn)
    for k in range(5):
        x = batch(10 * k + rank, 1 if rank == 0 else 40 + k)
        with torch.no_grad():
            report(f"one row beside many ({k})", torch.equal(ep(x), mnn(x)), "")
    # merge_sources: one call per expert on all ranks' rows, within float32 rounding.
    ep = ExpertParallel.from_module(mnns["groups"], merge_sources=True)
    x = batch(7 + rank, 30 + 11 * rank)
    with torch.no_grad():
        got, want = ep(x), mnns["groups"](x)
    report("merge_sources allclose", torch.allclose(got, want, rtol=1e-5, atol=1e-5), f"{(got - want).abs().max()}")
    report("describe", ep.describe().count("\n") == world - 1 and f"rank {rank}: experts" in ep.describe(), ep.describe())
    failure_cases(rank, world, mnns, report)


def failure_cases(rank: int, world: int, mnns, report) -> None:
    """An error on one rank raises on every rank, and the group still works afterwards."""
    mnn = mnns["classes"]
    configure(mnn, 0.25, None)
    ep = ExpertParallel.from_module(mnn)
    # Construction checks are local (no collective): every rank holding every specialist is refused.
    try:
        ExpertParallel(mnn.switch, dict(enumerate(mnn.specialists)), num_experts=5)
        report("foreign specialists refused", False, "did not raise")
    except ValueError as exc:
        report("foreign specialists refused", "which the placement gives to rank(s)" in str(exc), str(exc))
    # The switch fails on the last rank only (14 features).
    x = batch(rank, 8) if rank != world - 1 else torch.randn(8, 14)
    try:
        with torch.no_grad():
            ep(x)
        report("switch failure raises on all ranks", False, "did not raise")
    except Exception as exc:  # noqa: BLE001
        # The failed rank raises its own error; the others a RankFailure naming it and the exchange.
        ok = ("mat1" in str(exc) if rank == world - 1 else isinstance(exc, RankFailure) and
              "failed before the exchange" in str(exc) and (exc.rank, exc.stage) == (world - 1, "counts"))
        report("switch failure raises on all ranks", ok, f"{type(exc).__name__}: {exc}")
    # Ranks pass rows of different shapes ([B, 13] and [B, 13, 1]; the switch takes both).
    x = batch(rank, 8) if rank != world - 1 else batch(rank, 8).unsqueeze(2)
    report("shape mismatch raises on all ranks", *_raises(ep, x, ValueError, "x.shape[1:] differs"))
    # Expert 0 (on rank 0) fails on a row from the last rank; every expert is active for every row.
    specialists = list(mnn.specialists)
    specialists[0] = Fragile(specialists[0])
    fragile = mnn_fast.MetaNeuralNetwork(mnn.switch, specialists, threshold=None, top_k=5).eval()
    ep = ExpertParallel.from_module(fragile)
    x = batch(rank, 6)
    if rank == world - 1:
        x[2, 0] = 5000.0
    report("expert failure raises on all ranks", *_raises(ep, x, ValueError if rank == 0 else RankFailure,
                                                          "poisoned" if rank == 0 else "running its specialists"))
    # Ranks built with different placements would size their exchanges differently (gloo would
    # fail on one rank and leave another waiting): every rank refuses at the first forward instead.
    placement = contiguous_placement(5, world) if rank != world - 1 else [(5 - 1 - e) % world for e in range(5)]
    ep = ExpertParallel.from_module(mnn, placement=placement)
    report("placement mismatch refused on all ranks", *_raises(ep, batch(rank, 4), ValueError,
                                                               f"rank {world - 1} was built with E=5, placement"))
    # The group is still in step: a normal forward after the failures.
    ep = ExpertParallel.from_module(mnn)
    x = batch(50 + rank, 9)
    with torch.no_grad():
        report("forward after failures", torch.equal(ep(x), mnn(x)), "")


def _raises(ep, x, kind, words: str) -> tuple[bool, str]:
    try:
        with torch.no_grad():
            ep(x)
    except Exception as exc:  # noqa: BLE001
        return isinstance(exc, kind) and words in str(exc), f"{type(exc).__name__}: {exc}"
    return False, "did not raise"


# ---------------------------------------------------------------------- drawn cases

def drawn_model(case: dict) -> mnn_fast.MetaNeuralNetwork:
    """The model of one case drawn by the parent (test_expert_parallel.draw_cases), seeded alike on every rank."""
    torch.manual_seed(case["seed"])
    d_in, classes, groups = case["d_in"], case["classes"], case["groups"]

    def net(width):
        return nn.Sequential(nn.Linear(d_in, case["hidden"]), nn.ReLU(), nn.Linear(case["hidden"], width))
    experts = groups if groups is not None else [[c] for c in range(classes)]
    specialists = [net(1 if len(g) == 1 and binary else classes) for g, binary in zip(experts, case["binary"])]
    mnn = mnn_fast.MetaNeuralNetwork(net(classes), specialists, groups, num_classes=classes)
    configure(mnn, case["threshold"], case["top_k"])
    return mnn.eval()


def drawn_cases(rank: int, world: int, cases: list[dict], report) -> None:
    for i, case in enumerate(cases):
        mnn = drawn_model(case)
        placement = (contiguous_placement(mnn.num_experts, world) if case["placement"] == "contiguous"
                     else [(mnn.num_experts - 1 - e) % world for e in range(mnn.num_experts)])
        ep = ExpertParallel.from_module(mnn, placement=placement)
        rows = case["rows"][rank]
        x = torch.randn(rows, case["d_in"], generator=torch.Generator().manual_seed(1000 * i + rank)) * case["scale"]
        with torch.no_grad():
            got, want = ep(x), mnn(x)
        report(f"drawn {i}", torch.equal(got, want), f"{case}: rows {rows}")


# ---------------------------------------------------------------------- a rank that dies or hangs

# Short group timeouts for these cases (seconds): the survivors must raise within about this.
LETHAL_TIMEOUT = 5
# Per world size: the ranks whose reports the parent waits for after the lethal cases (the others
# die or hang on purpose, and the parent kills what is left).
SURVIVORS = {2: [0], 3: [1]}


class Saboteur(nn.Module):
    """A specialist that, on ``victim``'s forward, runs ``act`` first (exit or sleep)."""

    def __init__(self, inner: nn.Module, victim: int, act):
        super().__init__()
        self.inner, self.victim, self.act = inner, victim, act

    def forward(self, x):
        if dist.get_rank() == self.victim:
            self.act()
        return self.inner(x)


def _survive(ep, x, victim: int, stage: str, report, name: str) -> None:
    """Runs ``ep(x)``; reports whether it raised the RankFailure naming ``victim`` in time."""
    start = time.monotonic()
    try:
        with torch.no_grad():
            ep(x)
        report(name, False, "did not raise")
    except Exception as exc:  # noqa: BLE001
        took = time.monotonic() - start
        expected = f"rank {victim} did not answer"
        ok = (isinstance(exc, RankFailure) and (exc.rank, exc.stage) == (victim, stage) and expected in str(exc)
              and "\n" not in str(exc) and took < 3 * LETHAL_TIMEOUT)  # bounded: the feature, not a speed check
        report(name, ok, f"{type(exc).__name__} after {took:.1f} s: {exc}")


def lethal_cases(rank: int, world: int, report, leave) -> None:
    """World 2: rank 1 dies (os._exit) while running its specialists. World 3: rank 2 hangs past the
    timeout, then rank 0, which hosts the group's store, dies. On fresh groups with a short timeout,
    every expert active for every row, so that each rank runs its specialists."""
    torch.manual_seed(0)
    specialists = [mlp(5) for _ in range(5)]
    timeout = datetime.timedelta(seconds=LETHAL_TIMEOUT)

    def die():
        leave(3)  # this rank's reports so far go to the parent first

    def build(group, saboteur_on: int, victim: int, act):
        parts = list(specialists)
        parts[saboteur_on] = Saboteur(parts[saboteur_on], victim, act)
        mnn = mnn_fast.MetaNeuralNetwork(mlp(5), parts, threshold=None, top_k=5).eval()
        return ExpertParallel.from_module(mnn, group=group)

    if world == 2:
        group = dist.new_group([0, 1], timeout=timeout)
        ep = build(group, 4, 1, die)  # expert 4 is rank 1's
        _survive(ep, batch(rank, 6), 1, "status", report, "dead rank named")
        return
    group = dist.new_group([0, 1, 2], timeout=timeout)
    ep = build(group, 4, 2, lambda: time.sleep(LETHAL_TIMEOUT + 4))  # expert 4 is rank 2's
    if rank == 2:
        with torch.no_grad():
            ep(batch(rank, 6))  # sleeps; the parent kills this rank
        return
    _survive(ep, batch(rank, 6), 2, "status", report, "hung rank named")
    pair = dist.new_group([0, 1], timeout=timeout, use_local_synchronization=True)  # rank 2 is asleep
    ep = build(pair, 0, 0, die)  # expert 0 is rank 0's
    # Rank 0 dies in its specialists: rank 1 waits in the status exchange, and the store is gone too.
    _survive(ep, batch(rank, 6), 0, "status", report, "dead store host named")


def worker(rank: int, world: int, port: int, queue, cases: list[dict]) -> None:
    """Entry point of one spawned rank: joins the gloo group, runs every case, reports, then the
    lethal cases (which end the group), reports again and leaves."""
    torch.set_num_threads(1)
    results = []

    def flush(final: bool = False) -> None:
        queue.put((rank, list(results), final))
        results.clear()

    def leave(code: int) -> None:
        flush(final=code == 0)
        queue.close()
        queue.join_thread()
        os._exit(code)  # no destroy_process_group: the lethal cases broke the groups

    def report(name, ok, detail):
        results.append((name, bool(ok), str(detail)))
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        run_cases(rank, world, report)
        drawn_cases(rank, world, cases, report)
        flush()
        lethal_cases(rank, world, report, leave)
    except Exception:  # noqa: BLE001 -- the parent reports it
        results.append(("worker crashed", False, traceback.format_exc()))
    leave(0)
