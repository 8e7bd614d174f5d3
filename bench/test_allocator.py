"""CNN specialists and the allocator: first-touch page faults, the same for the loop, the engine and the floor.

A ResNet-20 specialist on a few hundred rows allocates activations of tens of MiB. glibc serves a
block that large with its own mmap (its mmap threshold stops growing at 32 MiB) and unmaps it on
free, so every call touches fresh pages, and the kernel zeroes each one. Here the naive loop, the
engine (``executor="sequential"``, what ``auto`` picks for CNNs) and the compute floor are called in
turns, as in test_end_to_end's turns table, in one child process per allocator setting:

- ``glibc default``: the process as a user starts it;
- ``no mmap``: ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<16 GiB>``, so large blocks come from
  the heap and freed memory stays mapped for the next call.

Per implementation: the median ms per call and the median minor page faults per call (getrusage).
The three pay alike under either setting; the faults are the part of the spread between them that
no engine change can remove.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from conftest import THREADS, is_quick

TABLE = "allocator"
IMPLS = ("naive", "engine_sequential", "floor")
NO_MMAP = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(16 << 30)}
SETTINGS = {"glibc default": {}, "no mmap": NO_MMAP}


def _fmt(rows):
    head = (f"{'allocator':>14} {'B':>4} {'rounds':>6} | {'naive ms':>9} {'engine ms':>9} {'floor ms':>9} | "
            f"{'naive flt':>9} {'engine flt':>10} {'floor flt':>9}")
    lines = ["ResNet-20, E=10, 2 experts per sample: medians per call in turns; flt = minor page faults",
             head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['allocator']:>14} {r['B']:>4} {r['rounds']:>6} | {r['naive'] * 1e3:>9.1f} "
                     f"{r['engine_sequential'] * 1e3:>9.1f} {r['floor'] * 1e3:>9.1f} | {r['faults_naive']:>9.0f} "
                     f"{r['faults_engine_sequential']:>10.0f} {r['faults_floor']:>9.0f}")
    return lines


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(batch: int, rounds: int) -> dict:
    """In this process: median seconds and minor faults per call of each of IMPLS, in turns."""
    from mnn_fast.benchmark import end_to_end_impls, end_to_end_workload

    torch.set_num_threads(THREADS)
    w = end_to_end_workload("resnet20", 10, batch, active_per_sample=2)
    impls = end_to_end_impls(w, executors=("sequential",), peers=False)
    seconds = {name: [] for name in IMPLS}
    faults = {name: [] for name in IMPLS}
    with torch.no_grad():
        want = impls["naive"]()
        assert torch.equal(impls["engine_sequential"](), want)
        impls["floor"]()
        for _ in range(rounds):
            for name in IMPLS:
                before, start = _minor_faults(), time.perf_counter()
                impls[name]()
                seconds[name].append(time.perf_counter() - start)
                faults[name].append(_minor_faults() - before)
    out = {name: statistics.median(ts) for name, ts in seconds.items()}
    out.update({f"faults_{name}": statistics.median(fs) for name, fs in faults.items()})
    return out


def test_cnn_calls_and_page_faults(results, request):
    results.formatters[TABLE] = _fmt
    batch, rounds = (64, 3) if is_quick(request.config) else (512, 5)
    here = Path(__file__).resolve()
    for name, env in SETTINGS.items():
        child = subprocess.run([sys.executable, str(here), str(batch), str(rounds)], env={**os.environ, **env},
                               cwd=here.parent, capture_output=True, text=True, timeout=900)
        assert child.returncode == 0, child.stderr[-2000:]
        row = json.loads(child.stdout.strip().splitlines()[-1])
        results.record(TABLE, dict(allocator=name, B=batch), rounds=rounds, env=" ".join(f"{k}={v}" for k, v in env.items()),
                       **row)


if __name__ == "__main__":  # the child: one allocator setting, fixed at its start
    print(json.dumps(measure(int(sys.argv[1]), int(sys.argv[2]))))
