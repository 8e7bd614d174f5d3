"""Independent jobs as a Slurm job array through submitit: the launcher behind ``--launcher slurm``.

All jobs go in one array (``slurm_array_parallelism`` caps how many run at once); each pickles its
result into ``folder``, which must be on a filesystem the nodes share, and the driver reads it back
and alone writes the run's files. A job that dies or fails is submitted again, up to ``retries``
times; finished results are never redone. ``cluster="local"`` runs the same code through submitit's
local executor (subprocesses on this machine): how it is tested without a Slurm cluster.
``pip install 'mnn_fast[slurm]'`` (``submitit==1.5.4``) brings submitit.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm

from .local import run_job

__all__ = ["run_jobs_submitit"]


def _import_submitit():
    try:
        import submitit
    except ImportError as exc:
        raise ImportError("--launcher slurm needs submitit: pip install 'mnn_fast[slurm]' (submitit==1.5.4)") from exc
    return submitit


def run_jobs_submitit(fn: Callable[[Any], Any], jobs: Sequence[Any], on_result: Callable[[Any, Any], None], *,
                      folder, cluster: str | None = None, parallelism: int | None = None, cpus_per_job: int = 1,
                      timeout_min: int = 240, partition: str | None = None, retries: int = 2,
                      poll_s: float = 1.0, desc: str = "jobs") -> None:
    """``on_result(job, fn(job))`` in this process for every job, ``fn`` run as one submitit job array.

    ``cluster``: ``None`` (submitit picks: Slurm where ``sbatch`` exists), ``"slurm"`` or ``"local"``.
    ``parallelism``: at most this many array tasks at once (Slurm's ``%N``; all by default).
    ``fn`` must be importable where the jobs run (a module-level function of an installed package).
    Results arrive as jobs finish; a job still failing after ``retries`` resubmissions raises here.
    """
    for name, value, low in (("cpus_per_job", cpus_per_job, 1), ("timeout_min", timeout_min, 1), ("retries", retries, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if parallelism is not None and (isinstance(parallelism, bool) or not isinstance(parallelism, int) or parallelism < 1):
        raise ValueError(f"parallelism must be a positive int or None, got {parallelism!r}")
    if cluster not in (None, "slurm", "local"):
        raise ValueError(f"cluster must be None (auto), 'slurm' or 'local', got {cluster!r}")
    submitit = _import_submitit()
    lost_errors = (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError)
    executor = submitit.AutoExecutor(folder=Path(folder), cluster=cluster)
    params: dict = dict(timeout_min=timeout_min, cpus_per_task=cpus_per_job)
    if executor.cluster == "slurm":
        params["slurm_array_parallelism"] = parallelism or max(1, len(jobs))
        if partition:
            params["slurm_partition"] = partition
    executor.update_parameters(**params)
    pending = list(jobs)
    with tqdm(total=len(pending), desc=desc) as bar:
        for _ in range(retries + 1):
            if not pending:
                return
            with executor.batch():
                waiting = [(job, executor.submit(run_job, fn, job)) for job in pending]
            lost = []
            while waiting:
                still = []
                for job, handle in waiting:
                    if not handle.done():
                        still.append((job, handle))
                        continue
                    try:
                        result = handle.result()
                    except lost_errors:
                        lost.append(job)  # died, timed out or raised: submitted again
                        continue
                    on_result(job, result)
                    bar.update(1)
                waiting = still
                if waiting:
                    time.sleep(poll_s)
            pending = lost
        if pending:
            raise RuntimeError(f"{len(pending)} job(s) failed {retries + 1} times; see the logs in {folder}")
