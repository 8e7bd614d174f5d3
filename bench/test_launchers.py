"""Launchers on a real workload (issue 14): ten CIFAR-10 ResNet-20 specialists, serial vs ``--workers 2``
vs Ray with 2 CPUs vs a submitit job array (local executor, 2 at a time), same config, one run.

The switch is the pretrained ResNet-20 (no switch epochs); each specialist fine-tunes ``EPOCHS`` epochs
(``MNN_BENCH_LAUNCH_EPOCHS``, default 1) on its share of a fixed ``N_TRAIN``-image subset of the
training set, at one intra-op thread. Every launcher
must write the serial run's bytes (asserted). Needs ``../shared`` (CIFAR-10 and the weights), so it is
skipped without it and in ``--quick`` mode.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest
import torch

from conftest import is_quick
from mnn_fast.training import RunDir, TrainConfig, train
from mnn_fast.training.data import load_dataset

TABLE = "launchers"
SHARED = Path(__file__).resolve().parents[2] / "shared"
CIFAR, WEIGHTS = SHARED / "data" / "cifar10", SHARED / "data" / "weights" / "resnet20-12fca82f.th"
N_TRAIN = 5000
EPOCHS = int(os.environ.get("MNN_BENCH_LAUNCH_EPOCHS", "1"))  # longer jobs amortise the launchers' start-up
LAUNCHES = {"serial": ("local", 1, None), "workers2": ("local", 2, None), "ray2": ("ray", 2, None),
            "slurm_local2": ("slurm", 2, {"cluster": "local"})}


def _skip_reason(config) -> str | None:
    if is_quick(config):
        return "the launcher benchmark trains ten ResNet-20 specialists four times: not in --quick"
    if not (CIFAR.is_dir() and WEIGHTS.is_file()):
        return f"needs CIFAR-10 and the pretrained ResNet-20 under {SHARED}"
    return None


@pytest.fixture(scope="module")
def workload(request, tmp_path_factory):
    reason = _skip_reason(request.config)
    if reason:
        pytest.skip(reason)
    splits = load_dataset("cifar10", CIFAR, cache_dir=tmp_path_factory.mktemp("cache"), normalization="imagenet")
    # A fixed random subset, so each launch does the same work (the files are in class order, so the
    # first N_TRAIN images would all be airplanes and one specialist would get every row).
    keep = torch.randperm(len(splits.train_y), generator=torch.Generator().manual_seed(0))[:N_TRAIN]
    splits = dataclasses.replace(splits, train_x=splits.train_x[keep], train_y=splits.train_y[keep])
    cfg = TrainConfig(dataset="cifar10", data_path=str(CIFAR), model="resnet20", pretrained=str(WEIGHTS), switch_epochs=0,
                      specialist_epochs=EPOCHS, optimizer="sgd", lr=0.01, dataset_threshold=0.1)
    return cfg, splits, {}


def _fmt(rows):
    base = next((r["seconds"] for r in rows if r["launch"] == "serial"), None)
    head = f"{'launch':>13} {'launcher':>8} {'workers':>7} | {'seconds':>8} {'vs serial':>9} | same bytes"
    lines = [f"ten ResNet-20 specialists, {N_TRAIN} CIFAR-10 images, {EPOCHS} epoch(s), 1 thread each; one run", head,
             "-" * len(head)]
    for r in rows:
        ratio = f"{base / r['seconds']:>8.2f}x" if base else f"{'-':>9}"
        lines.append(f"{r['launch']:>13} {r['launcher']:>8} {r['workers']:>7} | {r['seconds']:>8.1f} {ratio} | "
                     f"{r['same_bytes']}")
    return lines


@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_launchers(results, workload, launch, tmp_path):
    if launch == "ray2":
        pytest.importorskip("ray")
    if launch == "slurm_local2":
        pytest.importorskip("submitit")
    results.formatters[TABLE] = _fmt
    cfg, splits, serial_bytes = workload
    launcher, workers, options = LAUNCHES[launch]
    # The switch and its probability file are shared work, not the launchers': done before the clock.
    run_dir = tmp_path / "run"
    train(cfg, run_dir, splits=splits, experts=[])
    torch.set_num_threads(2)
    start = time.perf_counter()
    train(cfg, run_dir, splits=splits, workers=workers, launcher=launcher, launcher_options=options)
    seconds = time.perf_counter() - start
    run = RunDir(run_dir)
    got = {e: run.specialist(e).read_bytes() for e in range(10)}
    if launch == "serial":
        serial_bytes.update(got)
    same = got == serial_bytes if serial_bytes else None
    results.record(TABLE, dict(launch=launch), launcher=launcher, workers=workers, epochs=EPOCHS, seconds=seconds,
                   same_bytes=same)
    assert same is not False
