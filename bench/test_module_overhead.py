"""The whole drop-in module vs the user's plain-torch loop and the naive loop, specialists costing nothing.

The user's loop (``mnn_fast.reference.user_loop_forward``) is what a user writes: one boolean mask per
expert, the recombination with ``torch.log_softmax`` / ``torch.logsumexp``; it is not bitwise the
module (torch's own exp and log), so it is checked to agree within 1e-5 with every argmax equal.
The naive loop (``naive_forward``) is the same loop on the module's row ops: bitwise the module.
Targets at B = 4096: the module 10x / 20x / 25x faster than the user's loop at E = 10 / 100 / 1000.
Switch and experts are ``nn.Identity()``; ``x = randn(B, E) * s`` with ``s`` chosen so a sample wakes
about two experts at threshold 0.1 (as at the paper's thresholds). What is left is the engine's own
cost: softmax, routing, gather, realignment, recombine. ``copy share`` = the time a copy of the
bytes the module must move (into an already-touched buffer) takes, over the module's time (1.0 =
at copy bandwidth). ``arith ms`` = the row arithmetic the naive loop shares with the module (SPEC
section 5): ``softmax_rows`` on the switch logits plus one ``recombine`` of the routed rows, the same
exp passes the naive loop makes through ``contributions`` and ``log_softmax_rows``; ``ceiling`` =
naive / arith, the most any engine with that arithmetic could gain over this naive loop.
``arith ns/el`` = that arithmetic's time per element it reads or writes row-wise (the switch logits,
the routed rows, the output rows: ``(2 B + N) E`` floats), against ``copy ns/el``, a copy of as many
floats into a buffer touched before: how far the vectorised row arithmetic is from moving its data.
"""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from conftest import is_quick
from mnn_fast import MetaNeuralNetwork
from mnn_fast.engine.isa import cpu_isa
from mnn_fast.engine.stages import gather_expert_rows
from mnn_fast.reference import naive_forward, user_loop_forward

TABLE = "module_overhead"
BATCH, THRESHOLD, ACTIVE = 4096, 0.1, 2.0
FULL = (10, 100, 1000)
TARGET = {10: 10.0, 100: 20.0, 1000: 25.0}  # module vs the user's loop
QUICK = (10, 100)
# Rounds of the interleaved timing: a module call at E = 10 takes ~0.3 ms, and on a shared machine a
# median of 7 moved by ~10% from run to run (the E = 10 ratio read 8.6x to 10.8x); E = 1000's user
# loop takes ~0.2-0.4 s a round.
ROUNDS, ROUNDS_LARGE_E = 21, 5


def identity_workload(experts: int, batch: int = BATCH, seed: int = 0) -> tuple[torch.Tensor, float, float]:
    """``(x, scale, mean experts per sample)``: the largest scale (from 12 down) that wakes ``ACTIVE``
    experts per sample on average, or the closest to it."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, experts, generator=gen)
    best = None
    for scale in torch.linspace(12, 0.2, 119).tolist():
        active = (torch.softmax(z * scale, 1) > THRESHOLD).sum(1).float().mean().item()
        if best is None or abs(active - ACTIVE) < abs(best[1] - ACTIVE):
            best = (scale, active)
        if active >= ACTIVE:
            break
    return z * best[0], best[0], best[1]


def _median_ms(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def _interleaved_ms(fns: dict, rounds: int) -> dict:
    """Median ms of each callable, called in turn each round (after one warm-up call each), so that a
    machine's drift hits all of them alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] * 1e3 for name, t in times.items()}


def _fmt(rows):
    head = (f"{'E':>5} {'B':>5} {'rows':>6} | {'user ms':>8} {'naive ms':>9} {'module ms':>9} {'vs user':>8} "
            f"{'target':>6} {'vs naive':>8} | {'arith ms':>8} {'ceiling':>7} {'rows+calls':>10} {'bound':>6} | "
            f"{'copy ms':>8} {'copy share':>10} | "
            f"{'arith ns/el':>11} {'copy ns/el':>10}")
    lines = ["identity switch and experts: the engine's own cost; median of 21 rounds (5 at E >= 1000), interleaved, "
             "same inputs, one run",
             head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: r["E"]):
        target = f"{r['target']:.0f}x" if r.get("target") else "-"
        lines.append(f"{r['E']:>5} {r['B']:>5} {r['rows']:>6} | {r['user_ms']:>8.2f} {r['naive_ms']:>9.2f} "
                     f"{r['module_ms']:>9.2f} {r['vs_user']:>7.1f}x {target:>6} {r['speedup']:>7.1f}x | "
                     f"{r['arith_ms']:>8.2f} {r['ceiling']:>6.1f}x {r['rows_calls_ms']:>10.2f} {r['bound']:>5.1f}x | "
                     f"{r['copy_ms']:>8.2f} {r['copy_share']:>10.2f} | "
                     f"{r['arith_ns_per_element']:>11.2f} {r['copy_ns_per_element']:>10.2f}")
    return lines


def pytest_generate_tests(metafunc):
    if "experts" in metafunc.fixturenames:
        metafunc.parametrize("experts", QUICK if is_quick(metafunc.config) else FULL)


@torch.no_grad()
def test_identity_module_vs_naive(results, experts):
    results.formatters[TABLE] = _fmt
    x, scale, active = identity_workload(experts)
    specialists = [nn.Identity() for _ in range(experts)]
    mnn = MetaNeuralNetwork(nn.Identity(), specialists, threshold=THRESHOLD)
    out, routing = mnn(x, return_routing=True)
    assert torch.equal(out, naive_forward(nn.Identity(), specialists, x, threshold=THRESHOLD))
    user = user_loop_forward(nn.Identity(), specialists, x, threshold=THRESHOLD)
    # Not bitwise (torch's exp and log): within 1e-5, and the same prediction for every sample.
    torch.testing.assert_close(user, out, rtol=1e-5, atol=1e-5)
    assert torch.equal(user.argmax(1), out.argmax(1))
    rows = routing.perm.numel()
    timed = _interleaved_ms({
        "user": lambda: user_loop_forward(nn.Identity(), specialists, x, threshold=THRESHOLD),
        "naive": lambda: naive_forward(nn.Identity(), specialists, x, threshold=THRESHOLD),
        "module": lambda: mnn(x),
    }, ROUNDS_LARGE_E if experts >= 1000 else ROUNDS)
    user_ms, naive_ms, module_ms = timed["user"], timed["naive"], timed["module"]
    ops, tables = mnn.ops, mnn.class_tables(experts)
    logits = x[routing.perm]

    def arithmetic():
        log_probs, _ = ops.softmax_rows(x)
        return ops.recombine(log_probs, [logits], routing.offsets, tables.group_offsets, tables.group_classes,
                             tables.log_spread, routing.sample_offsets, routing.sample_rows)

    assert torch.equal(arithmetic(), out)  # the arithmetic timed is the module's own
    arith_ms = _median_ms(arithmetic, 7)
    # What else every bitwise engine must do (SPEC section 5): each expert's rows copied into a fresh
    # tensor of their own, and each active expert called once on them.
    active_experts = routing.counts.nonzero().flatten().tolist()

    def rows_and_calls():
        parts = gather_expert_rows(x, routing.perm, routing.offsets, ops)
        return [specialists[e](parts[e]) for e in active_experts]

    rows_calls_ms = _median_ms(rows_and_calls, 7)
    # Bytes the module must move, at least: x read and its log-probs, probabilities and the output
    # written (4 B E), the gathered rows written and read back once by recombine (2 N E); a copy
    # moves each byte twice (read, write).
    floats = 2 * BATCH * experts + 2 * rows * experts + 2 * BATCH * experts
    block = torch.randn(floats // 2)
    # Into a buffer touched before, as the module's own buffers are: a clone's fresh pages would
    # add first-touch faults (4.6x the copy at E=1000 here) and flatter the module.
    target = torch.empty_like(block)
    copy_ms = _median_ms(lambda: target.copy_(block), 7)
    # The row arithmetic per element against a copy of as many floats (into a touched buffer too).
    elements = (2 * BATCH + rows) * experts
    source, sink = torch.randn(elements), torch.empty(elements)
    element_copy_ms = _median_ms(lambda: sink.copy_(source), 7)
    results.record(TABLE, dict(E=experts, B=BATCH), rows=rows, scale=scale, active=active, user_ms=user_ms,
                   naive_ms=naive_ms, module_ms=module_ms, vs_user=user_ms / module_ms, target=TARGET.get(experts),
                   cpu_isa=cpu_isa(), speedup=naive_ms / module_ms, arith_ms=arith_ms, ceiling=naive_ms / arith_ms,
                   rows_calls_ms=rows_calls_ms, bound=user_ms / (arith_ms + rows_calls_ms),
                   copy_ms=copy_ms, copy_share=copy_ms / module_ms, arith_elements=elements,
                   arith_ns_per_element=arith_ms * 1e6 / elements, copy_ns_per_element=element_copy_ms * 1e6 / elements)
