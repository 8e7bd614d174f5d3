"""Eager vs ``mnn_fast.compile(fullgraph=True)`` per executor, same module, same inputs, one run; and
how the compile time of each way to compile grows from ``E = 8`` to ``E = 64`` experts.

``compile s`` is the compiled module's first call with an empty inductor cache; eager and compiled
are then timed in turns, best of 10 (MLP) or 3 rounds each.

The vmap form of the grouped executor is excluded: its bucketing sorts data-dependent counts in
Python, so it runs eagerly (a graph break) and cannot be ``fullgraph``.

``compile_scaling``: each compile runs in a fresh process with inductor's caches off, after one
warm-up compile there of another model (``E = 4``), so both ``E`` pay the same one-time costs;
``E = 8`` and ``E = 64`` alternate, best of the rounds. Quick mode times the default call alone,
both sizes in one process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

import mnn_fast

from conftest import THREADS, is_quick
from mnn_fast.benchmark import end_to_end_workload
from mnn_fast.engine.module import MetaNeuralNetwork

TABLE = "compile"
# E=8 vs E=64 at one batch: how compile time grows with the number of same-architecture experts (issue 13).
FULL = [("mlp", 10, 256, "sequential"), ("mlp", 10, 256, "grouped"), ("mlp", 100, 4096, "sequential"),
        ("mlp", 100, 4096, "grouped"), ("resnet20", 10, 128, "sequential"), ("mlp", 8, 256, "grouped"),
        ("mlp", 64, 256, "grouped")]
# The sequential executor's cold compile alone takes 10-20 s: quick mode (a minute in all) leaves it out.
QUICK = [("mlp", 10, 256, "grouped")]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = QUICK if is_quick(metafunc.config) else FULL
        metafunc.parametrize("case", cases, ids=[f"{m}-E{e}-B{b}-{x}" for m, e, b, x in cases])


def _fmt(rows):
    head = f"{'model':>8} {'E':>4} {'B':>5} {'executor':>10} | {'eager ms':>9} {'compiled ms':>11} {'speed-up':>8} | {'compile s':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:>8} {r['E']:>4} {r['B']:>5} {r['executor']:>10} | {r['eager'] * 1e3:>9.2f} "
                     f"{r['compiled'] * 1e3:>11.2f} {r['eager'] / r['compiled']:>7.2f}x | {r['compile_s']:>9.1f}")
    return lines


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def test_compile_speed(benchmark, results, case, tmp_path, monkeypatch):
    model, experts, batch, executor = case
    results.formatters[TABLE] = _fmt
    # A fresh on-disk cache per case: "compile s" is a cold compile, not whatever earlier runs on this
    # machine left in inductor's cache.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    w = end_to_end_workload(model, experts, batch)
    mnn = MetaNeuralNetwork(w["switch"], w["specialists"], threshold=w["threshold"], executor=executor)
    assert mnn.executor == executor
    compiled = mnn_fast.compile(mnn, fullgraph=True)
    x = w["x"]
    start = time.perf_counter()
    got = compiled(x)
    compile_s = time.perf_counter() - start
    torch.testing.assert_close(got, mnn(x), atol=1e-4, rtol=1e-4)  # compiled kernels fuse differently
    rounds = 3 if model != "mlp" else 10
    # Eager and compiled in turns, best of each: both see the same machine load. (Timed one after the
    # other, a busy minute once made eager read about 6x its time in the same run's end-to-end table.)
    eager, fast = float("inf"), float("inf")
    for _ in range(rounds):
        eager = min(eager, _timed(lambda: mnn(x)))
        fast = min(fast, _timed(lambda: compiled(x)))
    # pytest-benchmark's statistics of the compiled module, for its JSON.
    benchmark.group = f"compile {model} E={experts} B={batch}"
    benchmark.pedantic(compiled, args=(x,), rounds=rounds, iterations=1)
    results.record(TABLE, dict(model=model, E=experts, B=batch, executor=executor), eager=eager, compiled=fast,
                   compile_s=compile_s)


# ------------------------------------------------------------------ compile time against E

SCALING_TABLE = "compile_scaling"
# The calls a user may type (the last: the module inside a larger compiled model, where the graph
# stacks the experts' weights itself).
CALLS = {
    "plain": "torch.compile(mnn)",
    "fullgraph": "torch.compile(mnn, fullgraph=True)",
    "mnn_fast": "mnn_fast.compile(mnn, fullgraph=True)",
    "nested": "torch.compile(nn.Sequential(mnn), fullgraph=True)",
}
SCALING_EXPERTS = (8, 64)
SCALING_BATCH = 256
# Quick mode: the default call only, one round, both sizes in one fresh process (~15 s on 2 cores).
# Full: best of 3, as one compile on a loaded machine can take twice its time.
QUICK_CALLS, QUICK_ROUNDS, FULL_ROUNDS = ("plain",), 1, 3


def _compiled(mnn, call: str):
    from torch import nn

    if call == "plain":
        return torch.compile(mnn)
    if call == "fullgraph":
        return torch.compile(mnn, fullgraph=True)
    if call == "mnn_fast":
        return mnn_fast.compile(mnn, fullgraph=True)
    return torch.compile(nn.Sequential(mnn), fullgraph=True)


@torch.no_grad()
def _child(call: str, experts: list[int]) -> dict:
    """In a fresh process: one warm-up compile (E=4), then the timed first call at each of ``experts``."""
    torch.set_num_threads(int(os.environ.get("MNN_BENCH_CHILD_THREADS", "1")))
    seconds = []
    for e in (4, *experts):
        w = end_to_end_workload("mlp", e, SCALING_BATCH, seed=e)
        mnn = MetaNeuralNetwork(w["switch"], w["specialists"], threshold=w["threshold"])
        assert mnn.executor == "grouped"
        torch._dynamo.reset()
        compiled = _compiled(mnn, call)
        start = time.perf_counter()
        got = compiled(w["x"])
        seconds.append(time.perf_counter() - start)
        torch.testing.assert_close(got, mnn(w["x"]), atol=1e-4, rtol=1e-4)
    return {"compile_s": seconds[1:]}


def _fresh_process_compile(call: str, experts: list[int]) -> list[float]:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TORCHINDUCTOR_FX_GRAPH_CACHE="0",
                   TORCHINDUCTOR_AUTOGRAD_CACHE="0", MNN_BENCH_CHILD_THREADS=str(THREADS),
                   PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1]),
                                               os.environ.get("PYTHONPATH", "")]))
        done = subprocess.run([sys.executable, __file__, call, *map(str, experts)], env=env, capture_output=True,
                              text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["compile_s"]


def test_compile_time_against_experts(results, request):
    quick = is_quick(request.config)
    results.formatters[SCALING_TABLE] = _fmt_scaling
    rounds = QUICK_ROUNDS if quick else FULL_ROUNDS
    for call in tqdm(QUICK_CALLS if quick else list(CALLS), desc="compile time against E"):
        best = {e: float("inf") for e in SCALING_EXPERTS}
        for _ in range(rounds):
            if quick:  # one process for both sizes (the in-memory kernel cache is shared): a rough check
                times = dict(zip(SCALING_EXPERTS, _fresh_process_compile(call, list(SCALING_EXPERTS))))
            else:  # alternating, a fresh process each: both E see the same machine load
                times = {e: _fresh_process_compile(call, [e])[0] for e in SCALING_EXPERTS}
            best = {e: min(best[e], times[e]) for e in SCALING_EXPERTS}
        small, large = SCALING_EXPERTS
        results.record(SCALING_TABLE, dict(call=call, model="mlp", B=SCALING_BATCH, E_small=small, E_large=large),
                       small_s=best[small], large_s=best[large], rounds=rounds)


def _fmt_scaling(rows):
    head = f"{'call':>52} | {'E=8 s':>7} {'E=64 s':>7} {'ratio':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{CALLS[r['call']]:>52} | {r['small_s']:>7.2f} {r['large_s']:>7.2f} "
                     f"{r['large_s'] / r['small_s']:>5.2f}x")
    return lines


if __name__ == "__main__":  # the fresh process of _fresh_process_compile
    print(json.dumps(_child(sys.argv[1], [int(e) for e in sys.argv[2:]])))
