"""Input generators shared by the equivalence tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def make_scores(batch: int, experts: int, seed: int, *, levels: int = 0, nan_rows: int = 0) -> torch.Tensor:
    """``Tensor[B, E] float32`` softmax-like scores; ``levels > 0`` quantises them to force ties."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.softmax(torch.randn(batch, experts, generator=gen) * 3, dim=1)
    if levels:
        scores = torch.round(scores * levels) / levels
    if nan_rows and batch:
        rows = torch.randint(0, batch, (nan_rows,), generator=gen)
        scores[rows] = float("nan")
    return scores.contiguous()


def random_groups(classes: int, experts: int, seed: int, max_size: int = 4) -> list[list[int]]:
    """``experts`` non-empty groups of distinct classes, overlapping freely."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for _ in range(experts):
        size = int(torch.randint(1, min(max_size, classes) + 1, (1,), generator=gen))
        groups.append(torch.randperm(classes, generator=gen)[:size].tolist())
    return groups


def assert_routing_equal(got, want) -> None:
    for name in ("counts", "offsets", "perm", "sample_offsets", "sample_rows"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == torch.long, f"{name} dtype {a.dtype}"
        assert torch.equal(a.cpu(), b.cpu()), f"{name} differs"


def assert_partition(groups, num_classes, num_groups):
    assert len(groups) == num_groups
    assert all(g == sorted(g) and g for g in groups)
    assert [g[0] for g in groups] == sorted(g[0] for g in groups)
    assert sorted(c for g in groups for c in g) == list(range(num_classes))


def run_worker(script: Path, mark: str, cwd: Path):
    """Runs ``script --worker`` without ``TRITON_INTERPRET`` (so Triton compiles for real, for a GPU
    target) and returns the JSON it printed after ``mark``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(Path(script).resolve()), "--worker"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"{Path(script).name} worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(mark))
    return json.loads(line[len(mark):])


# The tiny digits run the launcher tests train (tests/launch): every launcher must write its bytes.
TINY_RUN = dict(dataset="digits", model="mlp", switch_epochs=1, specialist_epochs=2)


def specialist_bytes(run_dir) -> dict[int, bytes]:
    """The ten specialists' file bytes of a digits run directory."""
    from mnn_fast.training import RunDir

    run = RunDir(run_dir)
    return {e: run.specialist(e).read_bytes() for e in range(10)}
