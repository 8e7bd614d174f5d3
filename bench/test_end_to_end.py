"""End to end: the naive loop vs the engine per executor vs dense vs the compute floor, same inputs.

compute floor = the switch plus each specialist on its rows already gathered into a contiguous
batch (no routing, no combine): what any MNN implementation must pay. dense = every specialist on
every sample. overhead = engine / floor - 1. Memory = growth of peak RSS during one call.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from conftest import is_quick
from mnn_fast.benchmark import end_to_end_impls, end_to_end_workload, peak_rss_growth

TABLE = "end_to_end"
# (model, E, B, experts active per sample). The MLP grid is the issue's; ResNet-20 B=512 and
# MobileNetV2 B=128 the paper's setting; ResNet-20 with 5 of 10 active is where dense should catch up.
FULL = ([("mlp", e, b, 2) for e in (10, 100, 1000) for b in (256, 4096)]
        + [("resnet20", 10, 512, 2), ("resnet20", 10, 512, 5), ("mobilenet_v2", 10, 128, 2)])
QUICK = [("mlp", 10, 256, 2), ("mlp", 1000, 4096, 2), ("resnet20", 10, 64, 2), ("mobilenet_v2", 10, 32, 2)]
# peer_*: the grouped executor with its GEMM replaced by torch._grouped_mm or a padded baddbmm
# (mnn_fast.benchmark.PEERS), for Linear-stack experts: the grouped GEMMs a user could reach for.
IMPLS = ["naive", "engine_sequential", "engine_grouped", "engine_grouped_parallel", "peer_grouped_mm", "peer_padded_bmm",
         "dense", "floor"]
# Dense runs B x E expert rows: past this many it takes minutes and tells nothing new.
DENSE_MAX_ROWS = 300_000

# The same MLP cells again, the engine and the floor called in turn within each round: on a shared
# machine the load drifts between one implementation's rounds and the next's, which moves the
# per-implementation table's overhead column by +-10%; taking turns puts all three under one load.
INTERLEAVED = "end_to_end_interleaved"
TURNS = ("engine_grouped", "engine_grouped_parallel", "floor")

_CACHE: dict = {}


def workload(case):
    if case not in _CACHE:
        _CACHE.clear()
        model, experts, batch, active = case
        w = end_to_end_workload(model, experts, batch, active_per_sample=active)
        w["impls"] = end_to_end_impls(w)
        _CACHE[case] = w
    return _CACHE[case]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = QUICK if is_quick(metafunc.config) else FULL
        grid = [(c, i) for c in cases for i in IMPLS]
        metafunc.parametrize("case,impl", grid, ids=[f"{c[0]}-E{c[1]}-B{c[2]}-a{c[3]}-{i}" for c, i in grid])
    if "mlp_case" in metafunc.fixturenames:
        cases = [c for c in (QUICK if is_quick(metafunc.config) else FULL) if c[0] == "mlp"]
        metafunc.parametrize("mlp_case", cases, ids=[f"{c[0]}-E{c[1]}-B{c[2]}-a{c[3]}" for c in cases])


def _fmt(rows):
    head = (f"{'model':>12} {'E':>5} {'B':>5} {'act':>3} {'rows':>6} | {'naive':>8} {'seq':>8} {'grouped':>8} {'grp-par':>8} "
            f"{'grp_mm':>8} {'pad_bmm':>8} {'dense':>8} {'floor':>8} "
            f"| {'best':>7} {'img/s':>8} {'vs naive':>8} {'vs dense':>8} {'overhead':>8} {'par ovh':>8} | {'MB naive':>8} {'MB best':>7}")
    lines = ["times in ms; best = the faster bitwise executor (sequential or grouped); grp-par = grouped_parallel "
             "(opt-in, not bitwise, '-' where the experts are not Linear stacks); grp_mm / pad_bmm = grouped with "
             "torch._grouped_mm / padded baddbmm as its GEMM (peers); overhead = best over the compute floor; par ovh = "
             "grp-par over the compute floor",
             head, "-" * len(head)]
    for r in rows:
        if not all(k in r for k in ("naive", "engine_sequential", "engine_grouped", "floor")):
            continue
        best = min(("engine_sequential", "engine_grouped"), key=lambda k: r[k])
        r.update(best_executor=best.removeprefix("engine_"), images_per_s=r["B"] / r[best],
                 speedup_vs_naive=r["naive"] / r[best], overhead_vs_floor=r[best] / r["floor"] - 1,
                 speedup_vs_dense=(r["dense"] / r[best]) if r.get("dense") else None,
                 overhead_parallel_vs_floor=(r["engine_grouped_parallel"] / r["floor"] - 1)
                 if r.get("engine_grouped_parallel") else None)
        ms = lambda k: f"{r[k] * 1e3:>8.1f}" if r.get(k) else f"{'-':>8}"
        vs_dense = f"{r['speedup_vs_dense']:>7.1f}x" if r["speedup_vs_dense"] else f"{'-':>8}"
        par = r["overhead_parallel_vs_floor"]
        par_overhead = f"{100 * par:>7.1f}%" if par is not None else f"{'-':>8}"
        lines.append(
            f"{r['model']:>12} {r['E']:>5} {r['B']:>5} {r['active']:>3} {r['rows']:>6} | {ms('naive')} {ms('engine_sequential')} "
            f"{ms('engine_grouped')} {ms('engine_grouped_parallel')} {ms('peer_grouped_mm')} {ms('peer_padded_bmm')} {ms('dense')} {ms('floor')} | {r['best_executor']:>7} {r['images_per_s']:>8.0f} "
            f"{r['speedup_vs_naive']:>7.1f}x {vs_dense} {100 * r['overhead_vs_floor']:>7.1f}% {par_overhead} | "
            f"{r['mem_naive'] / 2**20:>8.1f} {r['mem_' + best] / 2**20:>7.1f}")
    return lines


def test_end_to_end(benchmark, results, case, impl):
    model, experts, batch, active = case
    results.formatters[TABLE] = _fmt
    w = workload(case)
    key = dict(model=model, E=experts, B=batch, active=active)
    if impl == "dense" and batch * experts > DENSE_MAX_ROWS:
        results.record(TABLE, key, dense=None)
        results.notes[TABLE] = [f"dense skipped where B x E > {DENSE_MAX_ROWS} expert rows (minutes per call)"]
        return
    if impl not in w["impls"]:  # grouped_parallel exists for Linear stacks only
        results.record(TABLE, key, **{impl: None})
        return
    fn = w["impls"][impl]
    with torch.no_grad():
        if impl.startswith(("engine", "peer")):  # a speed is only worth reporting for a correct output
            want = w["impls"]["naive"]()
            got = fn()
            if impl == "engine_sequential" or (impl == "engine_grouped" and model == "mlp"):
                assert torch.equal(got, want)  # the bitwise configurations (README, exactness)
            elif impl == "engine_grouped_parallel":
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # its stated tolerance (README)
            else:
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        benchmark.group = f"{model} E={experts} B={batch} active={active}"
        benchmark.pedantic(fn, rounds=3 if model != "mlp" else 10, warmup_rounds=1, iterations=1)
        seconds = benchmark.stats.stats.min
        memory = peak_rss_growth(fn)
    results.record(TABLE, key, rows=w["rows"], threshold=w["threshold"], **{impl: seconds, f"mem_{impl}": memory})


def _fmt_interleaved(rows):
    head = (f"{'model':>6} {'E':>5} {'B':>5} {'rounds':>6} | {'grouped':>8} {'grp-par':>8} {'floor':>8} | "
            f"{'grouped ovh':>11} {'grp-par ovh':>11}")
    lines = ["medians in ms of rounds calling grouped, grp-par (grouped_parallel) and the compute floor in turn; "
             "ovh = over the floor", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:>6} {r['E']:>5} {r['B']:>5} {r['rounds']:>6} | {r['engine_grouped'] * 1e3:>8.2f} "
                     f"{r['engine_grouped_parallel'] * 1e3:>8.2f} {r['floor'] * 1e3:>8.2f} | "
                     f"{100 * r['overhead_grouped']:>10.1f}% {100 * r['overhead_parallel']:>10.1f}%")
    return lines


def test_overhead_interleaved(results, mlp_case, request):
    model, experts, batch, active = mlp_case
    w = workload(mlp_case)
    turns = {name: w["impls"][name] for name in TURNS}
    quick = is_quick(request.config)
    rounds = (7 if quick else 31) if batch <= 256 else (3 if quick else 11)
    times: dict[str, list[float]] = {name: [] for name in turns}
    with torch.no_grad():
        want = w["impls"]["naive"]()
        assert torch.equal(turns["engine_grouped"](), want)
        torch.testing.assert_close(turns["engine_grouped_parallel"](), want, atol=1e-5, rtol=1e-5)
        turns["floor"]()  # warm-up, as the engine calls above were
        for _ in range(rounds):
            for name, fn in turns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    results.formatters[INTERLEAVED] = _fmt_interleaved
    results.record(INTERLEAVED, dict(model=model, E=experts, B=batch, active=active), rounds=rounds, **median,
                   overhead_grouped=median["engine_grouped"] / median["floor"] - 1,
                   overhead_parallel=median["engine_grouped_parallel"] / median["floor"] - 1)
