"""``--launcher slurm``: specialists trained as one submitit job array write the bytes a serial run
writes, and a job that dies is submitted again. Tested through submitit's local executor (the same
code path minus sbatch); submitit is the optional extra ``mnn_fast[slurm]``, which ``make test`` installs."""
import math

import pytest

pytest.importorskip("submitit", reason="submitit is the optional extra mnn_fast[slurm]; make test installs it")

from helpers import TINY_RUN as TINY, specialist_bytes  # noqa: E402
from mnn_fast import cli  # noqa: E402
from mnn_fast.launch.local import CRASH_ONCE_ENV  # noqa: E402
from mnn_fast.launch.slurm import run_jobs_submitit  # noqa: E402
from mnn_fast.training import TrainConfig, train  # noqa: E402

TRAIN_ARGS = ["--dataset", "digits", "--model", "mlp", "--switch-epochs", "1", "--specialist-epochs", "2"]


def test_a_job_array_writes_the_serial_runs_bytes(serial, tmp_path):
    assert cli.main(["train", str(tmp_path / "run"), *TRAIN_ARGS, "--launcher", "slurm", "--slurm-cluster", "local",
                     "--workers", "2"]) == 0
    assert specialist_bytes(tmp_path / "run") == serial
    assert (tmp_path / "run" / "submitit").is_dir()  # the jobs' pickles and logs


def test_a_killed_job_is_submitted_again_and_the_bytes_still_match(serial, tmp_path, monkeypatch):
    marker = tmp_path / "crashed"
    monkeypatch.setenv(CRASH_ONCE_ENV, str(marker))  # the first job to start kills its own process
    train(TrainConfig(**TINY), tmp_path / "run", launcher="slurm", launcher_options={"cluster": "local"})
    assert marker.exists()
    assert specialist_bytes(tmp_path / "run") == serial


def test_run_jobs_submitit_returns_every_result_once_and_checks_its_arguments(tmp_path):
    got = {}
    run_jobs_submitit(math.factorial, [1, 2, 3, 4], lambda job, result: got.setdefault(job, result),
                      folder=tmp_path / "jobs", cluster="local", poll_s=0.2)
    assert got == {1: 1, 2: 2, 3: 6, 4: 24}
    with pytest.raises(ValueError, match="cluster must be None"):
        run_jobs_submitit(math.factorial, [1], lambda *a: None, folder=tmp_path, cluster="pbs")
