"""One intra-op thread vs all of them, per end-to-end cell, interleaved in one run (issue 13, item 4).

Each round times the naive loop, the module (``executor="auto"``, the bitwise default) and the compute
floor at 1 thread and then at all threads, so both counts see the same machine load; the table
reports medians and ``all / 1`` speed-ups. All three are warmed up at both counts before the first
round. docs/threads.md states the policy these numbers support.
"""
from __future__ import annotations

import os
import statistics
import time

import torch

from conftest import is_quick
from mnn_fast.benchmark import end_to_end_impls, end_to_end_workload

TABLE = "threads"
FULL = ([("mlp", e, b) for e in (10, 100, 1000) for b in (256, 4096)] + [("resnet20", 10, 512)])
QUICK = [("mlp", 10, 256), ("mlp", 100, 256)]  # seconds, not the 14 s of E=1000, B=4096
IMPLS = ("naive", "engine_grouped", "engine_sequential", "floor")


def _fmt(rows):
    every = rows[0]["all_threads"] if rows else 0
    head = (f"{'model':>9} {'E':>5} {'B':>5} | {'executor':>10} | {'naive 1':>8} {f'naive {every}':>8} {'x':>5} | "
            f"{'mnn 1':>8} {f'mnn {every}':>8} {'x':>5} | {'floor 1':>8} {f'floor {every}':>8} {'x':>5}")
    lines = [f"ms, median of interleaved rounds; x = time at 1 thread / time at {every} threads (>1: more threads help)",
             head, "-" * len(head)]
    for r in rows:
        cells = []
        for k in ("naive", "mnn", "floor"):
            one, many = r[f"{k}_1"], r[f"{k}_all"]
            cells.append(f"{one * 1e3:>8.1f} {many * 1e3:>8.1f} {one / many:>4.2f}x")
        lines.append(f"{r['model']:>9} {r['E']:>5} {r['B']:>5} | {r['executor']:>10} | " + " | ".join(cells))
    return lines


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = QUICK if is_quick(metafunc.config) else FULL
        metafunc.parametrize("case", cases, ids=[f"{m}-E{e}-B{b}" for m, e, b in cases])


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def test_one_vs_all_threads(results, case):
    model, experts, batch = case
    results.formatters[TABLE] = _fmt
    every = int(os.environ.get("MNN_BENCH_THREADS", os.cpu_count() or 1))
    w = end_to_end_workload(model, experts, batch)
    impls = end_to_end_impls(w, executors=("sequential", "grouped"), peers=False)
    # The module as a user gets it: auto picks grouped for Linear stacks, sequential otherwise.
    executor = "grouped" if "engine_grouped" in impls and model == "mlp" else "sequential"
    run = {"naive": impls["naive"], "mnn": impls[f"engine_{executor}"], "floor": impls["floor"]}
    # An odd count, so the median is a middle call and not the slower of two.
    rounds = 5 if model == "mlp" else 3
    times: dict[str, list[float]] = {f"{k}_{t}": [] for k in run for t in ("1", "all")}
    old = torch.get_num_threads()
    try:
        for threads, tag in ((1, "1"), (every, "all")):  # warm-up at both counts, all three
            torch.set_num_threads(threads)
            want = run["naive"]()
            assert torch.equal(run["mnn"](), want)  # bitwise at any thread count (README, exactness)
            run["floor"]()
        for _ in range(rounds):
            for threads, tag in ((1, "1"), (every, "all")):
                torch.set_num_threads(threads)
                for k, fn in run.items():
                    times[f"{k}_{tag}"].append(_timed(fn))
    finally:
        torch.set_num_threads(old)
    medians = {k: statistics.median(v) for k, v in times.items()}
    results.record(TABLE, dict(model=model, E=experts, B=batch), executor=executor, all_threads=every, **medians)
