"""``--launcher ray``: specialists trained as Ray tasks write the bytes a serial run writes, and a task
whose worker process dies is retried without losing finished work. Ray is the optional extra
``mnn_fast[ray]``; ``make test`` installs it."""
import math

import pytest

ray = pytest.importorskip("ray", reason="Ray is the optional extra mnn_fast[ray]; make test installs it")

from helpers import TINY_RUN as TINY, specialist_bytes  # noqa: E402
from mnn_fast import cli  # noqa: E402
from mnn_fast.launch.local import CRASH_ONCE_ENV  # noqa: E402
from mnn_fast.launch.ray_tasks import run_jobs_ray  # noqa: E402
from mnn_fast.training import TrainConfig, train  # noqa: E402

TRAIN_ARGS = ["--dataset", "digits", "--model", "mlp", "--switch-epochs", "1", "--specialist-epochs", "2"]


def test_ray_tasks_write_the_serial_runs_bytes(serial, tmp_path):
    assert cli.main(["train", str(tmp_path / "run"), *TRAIN_ARGS, "--launcher", "ray", "--workers", "2"]) == 0
    assert specialist_bytes(tmp_path / "run") == serial
    assert not ray.is_initialized()  # the embedded cluster it started is stopped again


def test_a_killed_task_is_retried_and_the_bytes_still_match(serial, tmp_path, monkeypatch):
    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ONCE_ENV, str(marker))  # the first task to start kills its worker process
    train(TrainConfig(**TINY), tmp_path / "run", launcher="ray", workers=2)
    assert marker.exists()  # a worker really died
    assert specialist_bytes(tmp_path / "run") == serial


def test_run_jobs_ray_returns_every_result_once_and_checks_its_arguments():
    # The function must be importable on the workers: a test module is not, math.factorial is.
    got = {}
    run_jobs_ray(math.factorial, [1, 2, 3, 4], lambda job, result: got.setdefault(job, result), num_cpus=2,
                 desc="factorials")
    assert got == {1: 1, 2: 2, 3: 6, 4: 24}
    with pytest.raises(ValueError, match="cpus_per_job must be an int >= 1"):
        run_jobs_ray(math.factorial, [1], lambda *a: None, cpus_per_job=0)
    with pytest.raises(ValueError, match="launcher must be one of"):
        train(TrainConfig(**TINY), "unused", launcher="mpi")
