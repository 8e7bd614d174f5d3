"""What each spawned rank runs for test_loading.py: sharded loads of a run directory in one gloo group.

Each rank loads its own copy of the run, from which the parent deleted the specialist files of the
other ranks, and records every tensor file it reads; it reports, per case, the files read, its
outputs on the batches the parent gave it, and its memory report (or the error it raised).
"""
from __future__ import annotations

import datetime
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from mnn_fast import io
from mnn_fast.training import load_mnn


def worker(rank: int, world: int, port: int, cases: list, queue) -> None:
    """``cases``: ``(name, run copy of each rank, placement or None, batches of each rank)``."""
    torch.set_num_threads(1)  # the parent's reference runs on one thread too
    real = io.read_tensors
    opened: list[str] = []

    def recording(path):
        opened.append(Path(path).name)
        return real(path)

    io.read_tensors = recording
    results = []
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        for name, runs, placement, batches in cases:
            opened.clear()
            try:
                ep = load_mnn(runs[rank], process_group=dist.group.WORLD, placement=placement)
            except Exception as exc:  # noqa: BLE001 -- the parent checks which error each rank raised
                results.append((name, {"error": type(exc).__name__, "message": str(exc), "opened": list(opened)}))
                continue
            with torch.no_grad():
                # numpy: a tensor in a queue is shared by a file descriptor, gone once this process exits
                outputs = [ep(x).numpy() for x in batches[rank]]
            results.append((name, {"opened": list(opened), "outputs": outputs, "local": ep.local_experts,
                                   "bytes": {part: ep.parameter_bytes(part) for part in ("all", "switch", "specialists")}}))
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 -- the parent reports it
        results.append(("worker crashed", {"error": "crash", "message": traceback.format_exc()}))
    queue.put((rank, results))
