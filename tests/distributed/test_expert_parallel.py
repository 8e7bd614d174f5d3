"""ExpertParallel: on every rank, bitwise the single-process module on that rank's own batch.

Spawned gloo groups of 2 and 3 ranks on 127.0.0.1 each run every case in one group (ep_cases.py);
refusals are checked in this process on a one-rank gloo group, with the collective replaced by one
that fails the test if it is ever reached.
"""
from __future__ import annotations

import multiprocessing
import queue as queue_module
import time

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import mnn_fast
from ep_cases import SURVIVORS, free_port, mlp, models, one_rank_group, worker
from mnn_fast.distributed import (ExpertParallel, RankFailure, balanced_placement, check_placement, contiguous_placement,
                                  experts_by_rank, parameter_counts)


# Seconds before the spawned groups are killed: the cases take ~10-20 s, the lethal ones ~10 s more.
WAIT = 150


def draw_cases(count: int) -> list[dict]:
    """``count`` model-and-batch cases drawn by hypothesis (derandomized: the same every run) for the
    spawned ranks, which cannot run hypothesis themselves (every rank must run the same cases)."""
    cases = []

    @st.composite
    def case(draw):
        classes = draw(st.integers(2, 6))
        grouped = draw(st.booleans())
        # Groups of any size (one-class groups may have binary specialists), overlapping, E from 1.
        groups = (draw(st.lists(st.lists(st.integers(0, classes - 1), min_size=1, max_size=classes, unique=True),
                                min_size=1, max_size=8)) if grouped else None)
        experts = len(groups) if grouped else classes
        top_k = draw(st.none() | st.integers(1, experts))
        threshold = draw(st.sampled_from([0.0, 1.0, 0.3] + ([None] if top_k is not None else [])))
        return {"seed": draw(st.integers(0, 2**16)), "d_in": draw(st.integers(1, 9)), "hidden": draw(st.integers(1, 8)),
                "classes": classes, "groups": groups, "binary": draw(st.lists(st.booleans(), min_size=experts,
                                                                               max_size=experts)),
                "threshold": threshold, "top_k": top_k, "placement": draw(st.sampled_from(["contiguous", "reversed"])),
                # Per rank: 0 and 1 rows are edges (nothing to send; a one-row GEMM).
                "rows": draw(st.lists(st.integers(0, 9), min_size=3, max_size=3)),
                "scale": draw(st.sampled_from([0.1, 1.0, 10.0]))}  # 10: saturated switches, one expert takes all

    @settings(max_examples=count, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case())
    def collect(drawn):
        cases.append(drawn)

    collect()
    return cases


def run_group(world: int, cases: list[dict]) -> list[tuple[int, str, bool, str]]:
    """Every rank's reports. Bounded: whatever still runs after WAIT seconds is killed, so a
    regression that hangs a rank fails the test instead of hanging it."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(rank, world, port, queue, cases)) for rank in range(world)]
    for p in procs:
        p.start()
    results, finished = [], set()
    deadline = time.monotonic() + WAIT
    try:
        while not set(SURVIVORS[world]) <= finished:
            rank, cases_run, final = queue.get(timeout=max(deadline - time.monotonic(), 0.1))
            results += [(rank, *case) for case in cases_run]
            if final:
                finished.add(rank)
    except queue_module.Empty:
        results.append((-1, f"no report within {WAIT} s", False, f"finished: {sorted(finished)}"))
    finally:
        for p in procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()  # the hung rank, by design
                p.join()
    return results


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_equals_the_single_process_module(world):
    results = run_group(world, draw_cases(30))
    failed = [r for r in results if not r[2]]
    assert not failed, "\n".join(f"rank {rank}: {name}: {detail}" for rank, name, _, detail in failed)
    names = {name for _, name, _, _ in results}
    assert len([r for r in results if r[0] == 0 and not r[1].startswith("drawn")]) >= 60  # every case ran
    assert len([r for r in results if r[1].startswith("drawn")]) == 30 * world
    # The lethal cases: the survivors named the dead or hung rank (each report also checks the bound).
    lethal = {2: {(0, "dead rank named")}, 3: {(0, "hung rank named"), (1, "hung rank named"),
                                                (1, "dead store host named")}}[world]
    assert lethal <= {(rank, name) for rank, name, _, _ in results}, names


# ---------------------------------------------------------------------- one-rank group, this process

@pytest.fixture
def group1(monkeypatch):
    """A one-rank gloo group for the test; ``calls`` counts the collectives actually run."""
    calls = []
    real = dist.all_to_all_single

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dist, "all_to_all_single", counting)
    with one_rank_group():
        yield calls


def small_mnn():
    return models()["classes"]


def test_world_size_one_is_the_same_path(group1):
    mnn = small_mnn()
    ep = ExpertParallel.from_module(mnn)
    for rows in (0, 1, 7, 64):
        x = torch.randn(rows, 13)
        with torch.no_grad():
            assert torch.equal(ep(x), mnn(x))
    assert len(group1) == 4 * 4  # four exchanges per forward, also for an empty batch


def test_exchange_log_is_opt_in(group1):
    ep = ExpertParallel.from_module(small_mnn())
    assert ep.exchange_log is None
    ep.exchange_log = log = []
    with torch.no_grad():
        ep(torch.randn(6, 13))
    # One entry per exchange, in order; a world of one sends nothing to other ranks.
    assert [entry[0] for entry in log] == ["counts", "dispatch", "status", "combine"]
    assert all(seconds >= 0 and sent == received == 0 for _, seconds, sent, received in log)


def test_a_failed_exchange_with_every_rank_answering_blames_this_rank(group1, monkeypatch):
    # The late rank's view: its exchange fails, yet every other rank reported the failure (here
    # there is none), so it is the one that was too late; the message says so, on one line.
    ep = ExpertParallel.from_module(small_mnn())

    def broken(*args, **kwargs):
        raise RuntimeError("Connection closed by peer\nsecond line")

    monkeypatch.setattr(dist, "all_to_all_single", broken)
    with pytest.raises(RankFailure, match=r"^ExpertParallel: the count exchange failed on rank 0 although every "
                                          r"rank answered: .*\(Connection closed by peer\)$") as caught:
        ep(torch.randn(3, 13))
    assert (caught.value.rank, caught.value.stage, caught.value.ranks) == (0, "counts", (0,))


@pytest.mark.parametrize("backend,cuda,expected", [
    ("gloo", True, "cpu"), ("cpu:gloo,cuda:nccl", True, "cpu"), ("nccl", True, "cuda:0"), ("mpi", False, "cpu")])
def test_control_words_travel_where_the_backend_takes_them(monkeypatch, backend, cuda, expected):
    # NCCL exchanges CUDA tensors only: alone, it gets the counts and status words on this process's
    # GPU; gloo (also beside NCCL) keeps them on the CPU, where reading them costs no device sync.
    from mnn_fast.distributed import exchange
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert exchange.control_device(None) == torch.device(expected)


def test_a_cpu_batch_is_refused_before_any_exchange_under_nccl(group1, monkeypatch):
    from mnn_fast.distributed import exchange
    monkeypatch.setattr(exchange, "control_device", lambda group: torch.device("cuda", 0))
    ep = ExpertParallel.from_module(small_mnn())
    with pytest.raises(ValueError, match=r"^x is on cpu but the process group's backend is NCCL, which exchanges "
                                         r"CUDA tensors: pass x.to\('cuda:0'\)$"):
        ep(torch.randn(3, 13))
    assert group1 == []


def test_built_from_local_parts(group1):
    mnn = models()["groups"]
    local = {e: mnn.specialists[e] for e in range(mnn.num_experts)}
    ep = ExpertParallel(mnn.switch, local, mnn.groups, threshold=0.1)
    configure = mnn_fast.MetaNeuralNetwork(mnn.switch, list(mnn.specialists), mnn.groups, threshold=0.1)
    x = torch.randn(40, 13)
    with torch.no_grad():
        assert torch.equal(ep(x), configure(x))
    assert ep.local_experts == list(range(7)) and ep.placement == (0,) * 7
    assert "rank 0: experts 0-6 (this rank)" == ep.describe()
    assert "experts held: rank 0: 0-6" in repr(ep)


def refuses(group1, match, kind=ValueError, **kwargs):
    with pytest.raises(kind, match=match):
        build = kwargs.pop("build")
        build(**kwargs)
    assert group1 == [], "a collective ran before the refusal"


def test_refusals_before_any_collective(group1):
    mnn = small_mnn()
    refuses(group1, "placement has 4 entries but the module has 5", build=ExpertParallel.from_module, mnn=mnn,
            placement=[0, 0, 0, 0])
    # A placement for two ranks in a one-rank group.
    refuses(group1, r"placement\[3\] = 1 but the process group has 1 rank", build=ExpertParallel.from_module,
            mnn=mnn, placement=contiguous_placement(5, 2))
    refuses(group1, r"placement\[0\] must be an int", TypeError, build=ExpertParallel.from_module, mnn=mnn,
            placement=[0.0] * 5)
    refuses(group1, "must be a MetaNeuralNetwork", TypeError, build=ExpertParallel.from_module, mnn=mlp(5))
    parts = dict(switch=mnn.switch, groups=mnn.groups, build=ExpertParallel)
    refuses(group1, r"rank 0 holds no module for expert\(s\) \[2\]", specialists={0: mlp(5), 1: mlp(5), 3: mlp(5),
                                                                                  4: mlp(5)}, **parts)
    refuses(group1, "pass num_experts=", switch=mnn.switch, specialists={}, build=ExpertParallel)
    refuses(group1, "is on meta but the process group's backend is gloo", switch=mlp(5).to("meta"),
            specialists={e: mlp(5) for e in range(5)}, groups=mnn.groups, build=ExpertParallel)


def test_bad_input_refused_before_any_collective(group1):
    ep = ExpertParallel.from_module(small_mnn())
    refuses(group1, "x is on meta but the process group's backend is gloo", build=ep, x=torch.empty(4, 13, device="meta"))
    refuses(group1, "x must be one of", TypeError, build=ep, x=torch.zeros(4, 13, dtype=torch.long))
    refuses(group1, "at least 2 dimensions", build=ep, x=torch.zeros(13))


def test_needs_an_initialised_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallel.from_module(small_mnn())


# ---------------------------------------------------------------------- placements

def test_contiguous_placement_blocks():
    assert contiguous_placement(5, 2) == [0, 0, 0, 1, 1]
    assert contiguous_placement(7, 3) == [0, 0, 0, 1, 1, 2, 2]
    assert contiguous_placement(2, 3) == [0, 1]  # rank 2 holds nothing
    assert experts_by_rank(contiguous_placement(2, 3), 3) == [[0], [1], []]


def test_balanced_placement_is_greedy_and_deterministic():
    assert balanced_placement([5, 1, 1, 3, 2], 2) == [0, 0, 1, 1, 1]  # totals 6 and 6
    assert balanced_placement(torch.tensor([4, 4, 4, 4]), 2) == [0, 1, 0, 1]
    assert balanced_placement([0, 0, 0], 3) == [0, 1, 2]
    loads = parameter_counts([mlp(5), mlp(5, hidden=64), mlp(5)])
    assert loads[1] > loads[0] == loads[2]
    assert balanced_placement(loads, 2) == [1, 0, 1]
    with pytest.raises(ValueError, match=r"loads\[1\] must be a non-negative number"):
        balanced_placement([1, -1], 2)
    with pytest.raises(ValueError, match="world_size must be a positive int"):
        balanced_placement([1], 0)


def test_check_placement():
    assert check_placement(torch.tensor([1, 0]), 2, 2) == (1, 0)
    with pytest.raises(TypeError, match="placement must be a list of 2 rank ids"):
        check_placement("01", 2, 2)
    with pytest.raises(ValueError, match=r"placement\[1\] = -1"):
        check_placement([0, -1], 2, 2)
