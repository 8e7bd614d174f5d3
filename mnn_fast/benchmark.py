"""Routing-core workloads shared by ``bench/`` and ``mnn-fast bench``: naive loop vs the engine's ops.

The naive core is the paper's loop with the experts taken out (mask, index, gather, add per
expert); the engine core is route + gather + combine of one backend; ``copy_core`` clones the
same number of bytes, to read the others as a fraction of this machine's copy bandwidth.
"""
from __future__ import annotations

import time

import torch

from .backends import get_backend

THRESHOLD = 0.25


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



def best_time(fn, *args, repeats: int = 5) -> float:
    """The fastest of ``repeats`` timed calls after one warm-up, in seconds."""
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times)
