"""The tiny model the serving tests share: a digits MLP run with three group specialists (E=3),
exported once with ``mnn-fast export`` (the command itself) and kept in the session's temp folder,
which the xdist workers share, so the export (~15 s of compiling) happens once per test run."""
from __future__ import annotations

import contextlib
import io as text_io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

# Three overlapping-free groups: rows route to one, two or three specialists at threshold 0.25.
GROUPS = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
MAX_BATCH = 64
INPUT_SHAPE = (1, 8, 8)


@dataclass
class Tiny:
    run: Path  # the run directory the package was exported from
    other_run: Path  # the same config with another seed: another fingerprint
    package: Path
    log: str  # what `mnn-fast export` wrote on stderr and stdout
    seconds: float  # its wall time


def tiny(tmp_path_factory) -> Tiny:
    from mnn_fast import cli
    from mnn_fast.io import FileLock
    from mnn_fast.training import TrainConfig, train

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "serving_tiny"
    with FileLock(root / ".lock") as lock:
        lock.acquire(blocking=True)
        done = root / "done.json"
        if not done.exists():
            for name, seed in (("run", 0), ("other", 1)):
                train(TrainConfig(model="mlp", switch_epochs=1, specialist_epochs=1, groups=GROUPS, seed=seed),
                      root / name)
            log = text_io.StringIO()
            started = time.perf_counter()
            with contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
                rc = cli.main(["export", str(root / "run"), "--out", str(root / "tiny.pt2"),
                               "--max-batch", str(MAX_BATCH)])
            seconds = time.perf_counter() - started
            assert rc == 0, log.getvalue()[-3000:]
            done.write_text(json.dumps({"log": log.getvalue(), "seconds": seconds}))
        info = json.loads(done.read_text())
    return Tiny(root / "run", root / "other", root / "tiny.pt2", info["log"], info["seconds"])


def sample_inputs(batch: int):
    """``Tensor[batch, 1, 8, 8] float32``, fixed; scaled so rows route to one, two or three specialists."""
    import torch

    return torch.randn(batch, *INPUT_SHAPE, generator=torch.Generator().manual_seed(batch)) * 3
