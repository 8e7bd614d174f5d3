"""Routing core alone (route + gather + combine, experts excluded): naive loop vs torch vs C++.

Every implementation runs on the same inputs in one session; the table gives speed-ups over the
naive per-expert loop and the vectorised torch version, and the C++ core's effective bandwidth as a
fraction of this machine's copy bandwidth (a copy of the same number of bytes into a buffer kept
across calls, same run).
"""
from __future__ import annotations

import pytest
import torch

from conftest import is_quick
from mnn_fast.engine.backends import backend_status
from mnn_fast.benchmark import engine_core, make_workload, naive_core

FULL = [(b, e, w) for b in (256, 4096, 65536) for e in (10, 100, 1000) for w in (64, 3072)]
QUICK = [(b, e, w) for b in (256, 4096) for e in (10, 1000) for w in (64, 3072)]
IMPLS = ["naive", "torch", "cpp", "copy"]
TABLE = "routing_core"


_CACHE: dict = {}


def workload(case):
    if case not in _CACHE:
        _CACHE.clear()  # one case's tensors at a time (the largest is several GB)
        _CACHE[case] = make_workload(*case)
    return _CACHE[case]


def copy_into_touched():
    """The copy reference: the same bytes copied into a buffer allocated once and reused, as the C++
    core gathers into a workspace kept across calls. (``copy_core``'s ``clone`` writes fresh pages
    every call, whose first-touch faults made the core read at up to 3x "copy bandwidth".)"""
    target: dict[str, torch.Tensor] = {}

    def run(w):
        src = w["copy_src"]
        if "t" not in target or target["t"].numel() != src.numel():
            target["t"] = torch.empty_like(src)
        return target["t"].copy_(src)

    return run


def _cases(config):
    return QUICK if is_quick(config) else FULL


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        grid = [(c, i) for c in _cases(metafunc.config) for i in IMPLS]
        metafunc.parametrize("case,impl", grid, ids=[f"B{c[0]}-E{c[1]}-W{c[2]}-{i}" for c, i in grid])


def _fmt(rows):
    head = f"{'B':>6} {'E':>5} {'W':>5} | {'naive ms':>9} {'torch ms':>9} {'C++ ms':>8} | {'vs naive':>8} {'vs torch':>8} | {'C++ GB/s':>8} {'copy GB/s':>9} {'of copy':>7}"
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["B"], r["E"], r["W"])):
        if not all(k in r for k in ("naive", "torch", "cpp", "copy")):
            continue
        gbs = r["bytes"] / r["cpp"] / 1e9
        copy_gbs = 2 * r["copy_bytes"] / r["copy"] / 1e9
        r.update(speedup_vs_naive=r["naive"] / r["cpp"], speedup_vs_torch=r["torch"] / r["cpp"], cpp_gbps=gbs,
                 copy_gbps=copy_gbs, fraction_of_copy=gbs / copy_gbs)
        lines.append(
            f"{r['B']:>6} {r['E']:>5} {r['W']:>5} | {r['naive']*1e3:>9.3f} {r['torch']*1e3:>9.3f} {r['cpp']*1e3:>8.3f} | "
            f"{r['speedup_vs_naive']:>7.1f}x {r['speedup_vs_torch']:>7.1f}x | {gbs:>8.2f} {copy_gbs:>9.2f} {100*gbs/copy_gbs:>6.0f}%"
        )
    return lines


def test_routing_core(benchmark, results, case, impl):
    if impl == "cpp" and backend_status("cpu")["cpp"]:
        pytest.fail(backend_status("cpu")["cpp"])
    results.formatters[TABLE] = _fmt
    w = workload(case)
    fn = {"naive": naive_core, "torch": engine_core("torch"), "cpp": engine_core("cpp"), "copy": copy_into_touched()}[impl]
    if impl == "cpp":  # a speed number is only worth reporting for a correct result
        assert torch.equal(fn(w), naive_core(w))
    batch, experts, width = case
    benchmark.group = f"B={batch} E={experts} W={width}"
    rounds = max(3, min(50, int(2e8 / max(w["bytes"], 1))))
    benchmark.pedantic(fn, args=(w,), rounds=rounds, warmup_rounds=1, iterations=1)
    key = dict(B=batch, E=experts, W=width)
    results.record(TABLE, key, **{impl: benchmark.stats.stats.min}, bytes=w["bytes"], rows=w["rows"],
                   copy_bytes=w["copy_src"].numel() * 4)
