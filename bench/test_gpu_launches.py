"""On a GPU: kernel launches and flagged host synchronisations of one routing step, as E grows.

One step = route + gather + recombine (the fused contributions, accumulation and log_softmax) on
scores ``[B, E]`` for E in (10, 100, 1000); the experts are left out (a preallocated buffer of logits
stands in for their outputs) so only the engine's own launches are counted.
Launches come from ``torch.profiler``'s CUDA activity; synchronisations are the ones torch's sync
debug mode flags (``cudaMemcpy``/``cudaStreamSynchronize`` made inside a custom kernel are not
visible to it, so route's read of N, which sizes ``perm``, is counted separately from the code).
Skipped, with the reason, on machines without a CUDA device.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from mnn_fast.engine.backends import backend_status, get_backend
from mnn_fast.engine.contributions import class_tables

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
TABLE = "gpu_launches"
B, WIDTH, C, MAX_ACTIVE = 4096, 256, 16, 10


def _fmt(rows):
    head = f"{'backend':>8} {'E':>5} | {'kernels':>7} {'memcpy/set':>10} {'syncs flagged':>13}"
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["backend"], r["E"])):
        lines.append(f"{r['backend']:>8} {r['E']:>5} | {r['kernels']:>7} {r['copies']:>10} {r['syncs']:>13}")
    per_backend: dict[str, set] = {}
    for r in rows:
        per_backend.setdefault(r["backend"], set()).add(r["kernels"])
    for backend, counts in per_backend.items():
        lines.append(f"{backend}: launches {'independent of' if len(counts) == 1 else 'vary with'} E")
    return lines


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("experts", [10, 100, 1000])
@torch.no_grad()
def test_routing_launches(results, backend, experts):
    reason = backend_status("cuda")[backend]
    if reason:
        pytest.fail(f"{backend} should run on a CUDA machine: {reason}")
    results.formatters[TABLE] = _fmt
    ops = get_backend(backend)
    g = torch.Generator(device="cuda").manual_seed(0)
    scores = torch.softmax(3 * torch.randn(B, experts, device="cuda", generator=g), 1)
    x = torch.randn(B, WIDTH, device="cuda", generator=g)
    logp = torch.log_softmax(torch.randn(B, C, device="cuda", generator=g), 1)
    # Scores sum to 1, so at most 1/threshold = MAX_ACTIVE experts pass per sample.
    expert_rows = torch.randn(B * MAX_ACTIVE, C, device="cuda", generator=g)
    groups = [[e % C] for e in range(experts)]
    tables = class_tables(groups, C, torch.device("cuda"))

    def step():
        r = ops.route(scores, 1.0 / MAX_ACTIVE, 0)
        ops.gather(x, r.perm)
        return ops.recombine(logp, [expert_rows[: r.perm.numel()]], r.offsets, tables.group_offsets,
                             tables.group_classes, tables.log_spread, r.sample_offsets, r.sample_rows)

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    gpu = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA]
    copies = sum(1 for name in gpu if name.startswith(("Memcpy", "Memset")))
    kernels = len(gpu) - copies
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    results.record(TABLE, dict(backend=backend, E=experts), kernels=kernels, copies=copies, syncs=len(caught))
    assert kernels > 0  # the profiler saw the GPU work at all
