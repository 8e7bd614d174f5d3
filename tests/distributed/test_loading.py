"""Sharded loading of a trained run: each rank reads only its own specialists' files, and its
ExpertParallel is bitwise the single-process ``load_mnn(run)`` module on the rank's batches.

A tiny digits run (one-epoch MLPs on 30% of the data, conftest.py) is trained once; one spawned
gloo group of 2 ranks on 127.0.0.1 loads per-rank copies of it from which the other ranks'
specialist files are deleted (load_cases.py), with the default and a given placement. Refusals are
checked here on a one-rank group.
"""
from __future__ import annotations

import multiprocessing
import queue as queue_module
import shutil

import pytest
import torch
import torch.distributed as dist

from ep_cases import free_port, one_rank_group
from load_cases import worker
from mnn_fast import io
from mnn_fast.distributed import contiguous_placement, experts_by_rank, load_sharded
from mnn_fast.training import RunDir, load_mnn, run_data

E = 10  # digits: one specialist per class


@pytest.fixture
def run(tiny_run):
    return tiny_run


def rank_copies(run, tmp_path, placement, world, drop=()) -> list[str]:
    """One copy of ``run`` per rank, holding only that rank's specialists (less those in ``drop``)."""
    held = experts_by_rank(placement, world)
    copies = []
    for rank in range(world):
        copy = tmp_path / f"rank{rank}"
        shutil.copytree(run, copy)
        for e in range(E):
            if e not in held[rank] or e in drop:
                RunDir(copy).specialist(e).unlink()
        copies.append(str(copy))
    return copies


def batches(run, world) -> list[list[torch.Tensor]]:
    """Per rank, real test digits in uneven batches: an empty one, one row, and larger ones."""
    x = run_data(run).test_x
    sizes = [[0, 1, 37], [64, 0, 5]]
    out, start = [], 0
    for rank in range(world):
        out.append([])
        for n in sizes[rank]:
            out[rank].append(x[start: start + n])
            start += n
    return out


def run_group(world: int, cases) -> dict[int, dict]:
    ctx = multiprocessing.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=worker, args=(rank, world, port, cases, queue)) for rank in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, cases_done = queue.get(timeout=240)
            results[rank] = dict(cases_done)
    except queue_module.Empty:
        pytest.fail("a rank did not report within 240 s")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    crashed = [r["worker crashed"]["message"] for r in results.values() if "worker crashed" in r]
    assert not crashed, crashed[0]
    return results


def reference(run, rank_batches):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks: the bits of a GEMM may depend on the thread count
    try:
        mnn = load_mnn(run)
        with torch.no_grad():
            return mnn, [mnn(x) for x in rank_batches]
    finally:
        torch.set_num_threads(before)


def state_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def check_loaded(run, world, placement, got, rank_batches):
    """Each rank read only the switch and its own specialists, matches the module bitwise, and holds
    its share of the specialists' bytes."""
    held = experts_by_rank(placement, world)
    for rank in range(world):
        mnn, want = reference(run, rank_batches[rank])
        r = got[rank]
        assert "error" not in r, r
        assert sorted(r["opened"]) == sorted(["switch.safetensors"] + [f"expert_{e:04d}.safetensors" for e in held[rank]])
        assert r["local"] == held[rank]
        assert len(r["outputs"]) == len(want)
        for a, b in zip(r["outputs"], want):
            assert torch.equal(torch.from_numpy(a), b), (rank, a.shape, b.shape)
        # Every specialist has the same architecture: a rank holds len(held)/E of their bytes.
        per_specialist = state_bytes(mnn.specialists[0])
        assert r["bytes"]["specialists"] == per_specialist * len(held[rank])
        assert r["bytes"]["switch"] == state_bytes(mnn.switch)
        assert r["bytes"]["all"] == r["bytes"]["switch"] + r["bytes"]["specialists"]


def test_two_ranks_load_only_their_own_files(run, tmp_path):
    # One spawned group (the costly part) runs every case in turn.
    placement = contiguous_placement(E, 2)  # the default: experts 0-4 and 5-9
    # Round-robin, from the last expert: rank-major order differs from expert order, ranks interleave.
    given = [(E - 1 - e) % 2 for e in range(E)]
    x = batches(run, 2)
    ok = rank_copies(run, tmp_path / "ok", placement, 2)
    # Rank 1's own expert 7 is missing too: every rank must raise, none wait.
    broken = rank_copies(run, tmp_path / "broken", placement, 2, drop=(7,))
    got = run_group(2, [("ok", ok, None, x), ("missing", broken, None, x), ("after", ok, None, x),
                        ("given", rank_copies(run, tmp_path / "given", given, 2), given, x)])
    check_loaded(run, 2, placement, {r: got[r]["ok"] for r in got}, x)
    one, zero = got[1]["missing"], got[0]["missing"]
    assert one["error"] == "ValueError" and "rank 1 holds specialist(s) [7]" in one["message"]
    assert "expert_0007.safetensors is not there" in one["message"] and "\n" not in one["message"]
    assert "expert_0007.safetensors" not in one["opened"]
    assert zero["error"] == "RankFailure" and "rank 1 failed loading the run" in zero["message"]
    # The group is still in step after the refused load.
    check_loaded(run, 2, placement, {r: got[r]["after"] for r in got}, x)
    # About 1/R of the specialists each: here exactly half.
    assert got[0]["ok"]["bytes"]["specialists"] == got[1]["ok"]["bytes"]["specialists"]
    check_loaded(run, 2, given, {r: got[r]["given"] for r in got}, x)


# ---------------------------------------------------------------------- one-rank group, this process

@pytest.fixture
def group1(monkeypatch):
    """A one-rank gloo group; ``opened`` lists the tensor files read."""
    opened = []
    real = io.read_tensors
    monkeypatch.setattr(io, "read_tensors", lambda path: opened.append(path) or real(path))
    with one_rank_group():
        yield opened


def test_placement_refused_before_any_file_is_read(run, group1):
    with pytest.raises(ValueError, match=r"placement\[5\] = 1 but the process group has 1 rank"):
        load_sharded(run, placement=contiguous_placement(E, 2))
    with pytest.raises(ValueError, match="placement has 3 entries but the module has 10 experts"):
        load_mnn(run, process_group=dist.group.WORLD, placement=[0, 0, 0])
    assert group1 == []


def test_world_of_one_is_the_whole_module(run, group1):
    ep = load_mnn(run, process_group=dist.group.WORLD, test_threshold=0.1)
    mnn = load_mnn(run, test_threshold=0.1)
    x = run_data(run).test_x[:50]
    with torch.no_grad():
        assert torch.equal(ep(x), mnn(x))
    assert ep.parameter_bytes("specialists") == sum(state_bytes(s) for s in mnn.specialists)
    with pytest.raises(ValueError, match="part must be"):
        ep.parameter_bytes("everything")


def test_refusals_without_a_group(run):
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        load_sharded(run)
    with pytest.raises(ValueError, match="placement: only a sharded load"):
        load_mnn(run, placement=[0] * E)
