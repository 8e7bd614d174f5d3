"""Eager vs ``mnn_fast.compile(fullgraph=True)`` per executor, same module, same inputs, one run.

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
QUICK = [("mlp", 10, 256, "sequential"), ("mlp", 10, 256, "grouped")]


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


def _best(fn, rounds):
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def test_compile_speed(benchmark, results, case):
    model, experts, batch, executor = case
    results.formatters[TABLE] = _fmt
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
    eager = _best(lambda: mnn(x), rounds)
    benchmark.group = f"compile {model} E={experts} B={batch}"
    benchmark.pedantic(compiled, args=(x,), rounds=rounds, warmup_rounds=1, iterations=1)
    results.record(TABLE, dict(model=model, E=experts, B=batch, executor=executor), eager=eager,
                   compiled=benchmark.stats.stats.min, compile_s=compile_s)
