"""Routing core alone (route + gather + combine, experts excluded): naive loop vs torch vs C++.

Every implementation runs on the same inputs in one session; the table gives speed-ups over the
naive per-expert loop and the vectorised torch version, and the C++ core's effective bandwidth as a
fraction of this machine's copy bandwidth (``clone`` of the same number of bytes, same run).
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import is_quick
from mnn_fast.backends import backend_status, get_backend

THRESHOLD = 0.25
FULL = [(b, e, w) for b in (256, 4096, 65536) for e in (10, 100, 1000) for w in (64, 3072)]
QUICK = [(b, e, w) for b in (256, 4096) for e in (10, 1000) for w in (64, 3072)]
IMPLS = ["naive", "torch", "cpp", "copy"]
TABLE = "routing_core"


def make_workload(batch: int, experts: int, width: int, seed: int = 0) -> dict:
    """Scores with two hot experts per sample (the MNN regime: ~2 of E active at t=0.25), C = E."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, experts, generator=gen) * (0.2 / experts)
    hot = torch.randint(0, experts, (batch, 2), generator=gen)
    scores.scatter_(1, hot, 0.3 + 0.2 * torch.rand(batch, 2, generator=gen))
    x = torch.randn(batch, width, generator=gen)
    logp = torch.log_softmax(torch.randn(batch, experts, generator=gen), 1)
    routing = get_backend("torch").route(scores, THRESHOLD, 0)
    rows = routing.perm.numel()
    logv = torch.randn(rows, experts, generator=gen)
    offsets = routing.offsets.tolist()
    per_expert = [logv[offsets[e] : offsets[e + 1]] for e in range(experts)]
    moved = (
        batch * experts * 4  # scores read
        + (experts * 2 + batch + 2 * rows) * 8  # routing written
        + 2 * rows * width * 4  # gather read + write
        + (2 * batch * experts + rows * experts) * 4 + (rows + batch) * 8  # combine
    )
    return dict(scores=scores, x=x, logp=logp, logv=logv, per_expert=per_expert, rows=rows, bytes=moved,
                copy_src=torch.empty(max(1, moved // 8), dtype=torch.float32).fill_(1.0))


def naive_core(w):
    acc = w["logp"].clone()
    for e, logv_e in enumerate(w["per_expert"]):
        idx = (w["scores"][:, e] > THRESHOLD).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        w["x"][idx]  # the gather the naive loop does for expert e
        acc[idx] = acc[idx] + logv_e
    return acc


def engine_core(name):
    ops = get_backend(name)

    def run(w):
        r = ops.route(w["scores"], THRESHOLD, 0)
        ops.gather(w["x"], r.perm)
        return ops.combine(w["logp"], w["logv"], r.perm, r.sample_offsets, r.sample_rows)

    return run


def copy_core(w):
    return w["copy_src"].clone()


_CACHE: dict = {}


def workload(case):
    if case not in _CACHE:
        _CACHE.clear()  # one case's tensors at a time (the largest is several GB)
        _CACHE[case] = make_workload(*case)
    return _CACHE[case]


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
    fn = {"naive": naive_core, "torch": engine_core("torch"), "cpp": engine_core("cpp"), "copy": copy_core}[impl]
    if impl == "cpp":  # a speed number is only worth reporting for a correct result
        assert torch.equal(fn(w), naive_core(w))
    batch, experts, width = case
    benchmark.group = f"B={batch} E={experts} W={width}"
    rounds = max(3, min(50, int(2e8 / max(w["bytes"], 1))))
    benchmark.pedantic(fn, args=(w,), rounds=rounds, warmup_rounds=1, iterations=1)
    key = dict(B=batch, E=experts, W=width)
    results.record(TABLE, key, **{impl: benchmark.stats.stats.min}, bytes=w["bytes"], rows=w["rows"],
                   copy_bytes=w["copy_src"].numel() * 4)
