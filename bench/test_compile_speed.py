"""Eager vs ``mnn_fast.compile(fullgraph=True)`` per executor, same module, same inputs, one run.

``compile s`` is the compiled module's first call with an empty inductor cache; eager and compiled
are then timed in turns, best of 10 (MLP) or 3 rounds each.

The vmap form of the grouped executor is excluded: its bucketing sorts data-dependent counts in
Python, so it runs eagerly (a graph break) and cannot be ``fullgraph``.
"""
from __future__ import annotations

import time

import pytest
import torch

import mnn_fast

from conftest import is_quick
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
