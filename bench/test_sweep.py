"""A 21-threshold test sweep against one evaluation pass, on the same inputs in one run.

The sweep routes once at its lowest threshold, runs every specialist once on every row it could
ever see, and recombines per threshold; one evaluation pass is the module's forward at that same
lowest threshold (the most expensive single threshold of the sweep). ``separate`` is the naive way:
one forward per threshold. Networks are freshly initialised: timing does not depend on the weights.
"""
from __future__ import annotations

import time

import torch

from conftest import is_quick
from mnn_fast.training.models import build_model
from mnn_fast.engine.module import MetaNeuralNetwork
from mnn_fast.training.sweep import DEFAULT_TEST_THRESHOLDS, sweep_test_thresholds

TABLE = "threshold_sweep"
# (model, input shape, batch, quick batch): the digits MLP is where per-threshold bookkeeping is
# most visible (tiny networks); ResNet-20 on 32x32 is where network compute dominates.
CASES = [("mlp", (1, 8, 8), 540, 540), ("small_cnn", (1, 28, 28), 1000, 100), ("resnet20", (3, 32, 32), 128, 32)]


def _fmt(rows):
    head = f"{'model':>10} {'B':>5} | {'one pass s':>10} {'sweep s':>9} {'21 passes s':>11} | {'sweep/pass':>10} {'21 passes/sweep':>15}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "one_pass" not in r or "sweep" not in r:
            continue
        r["sweep_over_one_pass"] = r["sweep"] / r["one_pass"]
        separate = r.get("separate")
        separate_s = f"{separate:.4f}" if separate else "-"
        separate_x = f"{separate / r['sweep']:.1f}x" if separate else "-"
        lines.append(f"{r['model']:>10} {r['B']:>5} | {r['one_pass']:>10.4f} {r['sweep']:>9.4f} {separate_s:>11} | "
                     f"{r['sweep_over_one_pass']:>9.2f}x {separate_x:>15}")
    return lines


def _mnn(model: str, shape, num_classes: int = 10) -> MetaNeuralNetwork:
    torch.manual_seed(0)
    nets = [build_model(model, num_classes, shape).eval() for _ in range(num_classes + 1)]
    return MetaNeuralNetwork(nets[0], nets[1:], threshold=min(DEFAULT_TEST_THRESHOLDS))


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        quick = is_quick(metafunc.config)
        grid = [(m, s, bq if quick else b) for m, s, b, bq in CASES]
        metafunc.parametrize("case", grid, ids=[f"{m}-B{b}" for m, _, b in grid])


@torch.no_grad()
def test_threshold_sweep(benchmark, results, case):
    model, shape, batch = case
    results.formatters[TABLE] = _fmt
    mnn = _mnn(model, shape)
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(2))
    thresholds = DEFAULT_TEST_THRESHOLDS

    def one_pass():
        return mnn(x)

    def sweep():
        return sweep_test_thresholds(mnn, x, y, thresholds, batch_size=batch)

    def separate():
        outs = []
        for t in thresholds:
            mnn.threshold = t
            outs.append(mnn(x))
        mnn.threshold = min(thresholds)
        return outs

    # A timing is only worth reporting for a correct sweep: at every threshold it routes as many
    # rows as the module, and at the lowest (same buffer, same batch) its accuracy is the module's.
    rows = sweep()
    for r, t in zip(rows, thresholds):
        mnn.threshold = t
        _, routing = mnn(x, return_routing=True)
        assert r["experts_per_sample"] == routing.perm.numel() / batch
    mnn.threshold = min(thresholds)
    assert rows[0]["accuracy"] == int((one_pass().argmax(1) == y).sum()) / batch
    benchmark.group = f"sweep {model} B={batch}"
    # Convolutional passes take a second or more: a few rounds suffice, and "21 passes" is 21 of them.
    rounds = 10 if model == "mlp" else 3
    key = dict(model=model, B=batch)
    timings = {}
    for name, fn in (("one_pass", one_pass), ("sweep", sweep)) + ((("separate", separate),) if model != "resnet20" else ()):
        fn()
        best = float("inf")
        for _ in range(1 if name == "separate" and model != "mlp" else rounds):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        timings[name] = best
    benchmark.pedantic(sweep, rounds=1, iterations=1)
    results.record(TABLE, key, **timings)
    results.notes[TABLE] = ["one pass = the module's forward at the sweep's lowest threshold (0.0); "
                            "21 passes = one forward per threshold (skipped for ResNet-20: minutes)"]
