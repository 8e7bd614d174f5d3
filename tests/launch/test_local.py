"""``--workers N``: specialists trained in worker processes write the bytes a serial run writes, and a
worker that dies is retried without losing finished work."""
import os

import pytest

from helpers import TINY_RUN as TINY, specialist_bytes
from mnn_fast import cli
from mnn_fast.launch.local import CRASH_ONCE_ENV, run_jobs
from mnn_fast.training import TrainConfig, train



def _square(x):
    return x * x


def test_two_workers_write_the_serial_runs_bytes(serial, tmp_path):
    train(TrainConfig(**TINY), tmp_path / "run", workers=2)
    assert specialist_bytes(tmp_path / "run") == serial


def test_a_killed_worker_is_retried_and_the_bytes_still_match(serial, tmp_path, monkeypatch):
    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ONCE_ENV, str(marker))  # the first job to start kills its worker
    assert cli.main(["train", str(tmp_path / "run"), "--dataset", "digits", "--model", "mlp", "--switch-epochs", "1",
                     "--specialist-epochs", "2", "--workers", "2"]) == 0
    assert marker.exists()  # a worker really died
    assert specialist_bytes(tmp_path / "run") == serial


def test_run_jobs_returns_every_result_once_and_refuses_bad_worker_counts():
    got = {}
    run_jobs(_square, [1, 2, 3, 4, 5], 2, lambda job, result: got.setdefault(job, result), desc="squares")
    assert got == {1: 1, 2: 4, 3: 9, 4: 16, 5: 25}
    with pytest.raises(ValueError, match="workers must be a positive int"):
        run_jobs(_square, [1], 0, lambda *a: None)


def test_specialist_threads_is_part_of_the_config():
    assert TrainConfig(**TINY).check().specialist_threads == 1
    with pytest.raises(TypeError, match="specialist_threads"):
        TrainConfig(**TINY, specialist_threads=1.5).check()
    assert TrainConfig(**TINY).config_sha256() != TrainConfig(**TINY, specialist_threads=2).config_sha256()
