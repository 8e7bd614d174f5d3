"""Small batches (the serving case): the module against its compute floor and two loops, in turns.

MLP switch and specialists ``784 -> 256 -> E`` (``E = C``, one specialist per class), threshold set
so a sample wakes about two experts. Per cell (E, B, intra-op threads), timed in turns within each
round: the compute floor (the switch on the batch plus each active specialist once on its rows,
gathered before the clock starts), the module as constructed by default (its executor recorded),
``naive_forward`` (the reference loop) and ``mnn_fast.reference.user_loop_forward`` (the loop a user writes in plain
torch). Each turn makes enough consecutive calls to last about 20 ms (at most 200); the table gives
the best round's time per call (on a machine shared with other jobs a median still moved 2-10x
between runs at 2 threads, where a busy second core stalls each parallel region). Bitwise equality
of the module and ``naive_forward`` is asserted before any timing.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from conftest import is_quick
from mnn_fast import MetaNeuralNetwork
from mnn_fast.reference import naive_forward, user_loop_forward

TABLE = "small_batch"
WIDTH, HIDDEN, ACTIVE = 784, 256, 2.0
EXPERTS, BATCHES, THREADS = (10, 100), (1, 8, 64), (1, 2)
IMPLS = ("floor", "module", "naive", "user")
# Each turn's consecutive calls last about this long. Turns much shorter than this measure the
# caches more than the code: the module reads its stacked copy of the weights, the others the
# specialists' own, which the two loops (run just before the floor) leave warm for the floor.
TURN_S = 20e-3


def _mlp(out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, out)).eval()


_MODELS: dict[int, tuple] = {}


@torch.no_grad()
def models(experts: int) -> tuple[nn.Module, list[nn.Module], torch.Tensor, float]:
    """``(switch, specialists, inputs Tensor[256, 784], threshold)`` for ``experts``, built once.

    The untrained switch's classifier is rescaled to logits of spread 2, centred per class over the
    256 inputs, so routing is confident and spread over the experts as a trained switch's is; the
    threshold lies midway between two scores and wakes ``ACTIVE`` experts per input on average.
    """
    if experts not in _MODELS:
        torch.manual_seed(experts)
        switch, specialists = _mlp(experts), [_mlp(experts) for _ in range(experts)]
        x = torch.randn(256, WIDTH)
        z = switch(x)
        centre, spread = z.mean(0), float((z - z.mean(0)).std())
        switch[-1].weight.mul_(2.0 / spread)
        switch[-1].bias.sub_(centre).mul_(2.0 / spread)
        scores = torch.softmax(switch(x), 1).flatten()
        k = int(ACTIVE * x.shape[0])
        top = torch.topk(scores, k + 1).values
        _MODELS.clear()  # one E at a time: E = 100 specialists are 80 MB of weights
        _MODELS[experts] = (switch, specialists, x, float((top[-2] + top[-1]) / 2))
    return _MODELS[experts]


def _fmt(rows):
    head = (f"{'E':>4} {'B':>3} {'thr':>3} {'act':>3} {'executor':>8} | {'floor':>8} {'module':>8} {'naive':>8} "
            f"{'user':>8} | {'mod/floor':>9} {'user/mod':>8} {'naive/mod':>9}")
    lines = ["us per call, best of rounds taking turns; act = experts with rows", head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["E"], r["B"], r["threads"])):
        lines.append(f"{r['E']:>4} {r['B']:>3} {r['threads']:>3} {r['active']:>3} {r['executor']:>8} | "
                     f"{r['floor'] * 1e6:>8.1f} {r['module'] * 1e6:>8.1f} {r['naive'] * 1e6:>8.1f} "
                     f"{r['user'] * 1e6:>8.1f} | {r['module_vs_floor']:>8.2f}x {r['user_vs_module']:>7.2f}x "
                     f"{r['naive_vs_module']:>8.2f}x")
    return lines


def pytest_generate_tests(metafunc):
    if "cell" in metafunc.fixturenames:
        cells = [(e, b, t) for e in EXPERTS for b in BATCHES for t in THREADS]
        metafunc.parametrize("cell", cells, ids=[f"E{e}-B{b}-t{t}" for e, b, t in cells])


def _per_call(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


@torch.no_grad()
def test_small_batch(results, cell, request):
    experts, batch, threads = cell
    results.formatters[TABLE] = _fmt
    switch, specialists, inputs, threshold = models(experts)
    x = inputs[:batch].clone()
    mnn = MetaNeuralNetwork(switch, specialists, threshold=threshold).eval()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, routing = mnn(x, return_routing=True)
        assert torch.equal(out, naive_forward(switch, specialists, x, threshold=threshold))
        torch.testing.assert_close(user_loop_forward(switch, specialists, x, threshold=threshold), out,
                                   atol=1e-5, rtol=1e-5)
        active = routing.counts.nonzero().flatten().tolist()
        bounds = routing.offsets.tolist()
        chunks = [x[routing.perm[bounds[e]:bounds[e + 1]]].clone() for e in active]

        def floor():
            switch(x)
            return [specialists[e](rows) for e, rows in zip(active, chunks)]

        fns = {"floor": floor, "module": lambda: mnn(x),
               "naive": lambda: naive_forward(switch, specialists, x, threshold=threshold),
               "user": lambda: user_loop_forward(switch, specialists, x, threshold=threshold)}
        for fn in fns.values():  # the first calls at a new thread count start the thread pool (tens of ms)
            fn()
        calls = {name: max(1, min(200, round(TURN_S / _per_call(fn, 3)))) for name, fn in fns.items()}
        rounds = 7 if is_quick(request.config) else 31
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                times[name].append(_per_call(fn, calls[name]))
    finally:
        torch.set_num_threads(old)
    best = {name: min(ts) for name, ts in times.items()}
    results.record(TABLE, dict(E=experts, B=batch, threads=threads), active=len(active), rows=int(routing.perm.numel()),
                   executor=mnn.executor, rounds=rounds, calls=calls, **best,
                   module_vs_floor=best["module"] / best["floor"], user_vs_module=best["user"] / best["module"],
                   naive_vs_module=best["naive"] / best["module"])
