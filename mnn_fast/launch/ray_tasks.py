"""Independent jobs as Ray tasks: the launcher behind ``mnn-fast train --launcher ray``.

Each job is one task; its result (a specialist's weights) comes back to the driver, which alone
writes files, so the nodes need no shared filesystem. A task whose worker process dies, or that
raises, runs again up to ``retries`` times (Ray's ``max_retries`` plus ``retry_exceptions``); a
finished result is never redone. ``pip install mnn_fast[ray]`` (``ray==2.60.0``) brings Ray.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from tqdm import tqdm

from .local import CRASH_ONCE_ENV, run_job

__all__ = ["run_jobs_ray", "LOCAL"]

# ray.init(address="local") always starts a fresh embedded cluster. A plain ray.init() would first
# look for a running one, and the address file a stopped `ray start` leaves behind can make it hang.
LOCAL = "local"


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ImportError("--launcher ray needs Ray: pip install 'mnn_fast[ray]' (ray==2.60.0)") from exc
    return ray


def _task(fn: Callable, job: Any, threads: int) -> Any:
    import torch

    # Ray's OMP_NUM_THREADS does not reach a reused worker: set the threads the task was given here.
    torch.set_num_threads(threads)
    return run_job(fn, job)


def run_jobs_ray(fn: Callable[[Any], Any], jobs: Sequence[Any], on_result: Callable[[Any, Any], None], *,
                 address: str = LOCAL, cpus_per_job: int = 1, num_cpus: int | None = None, retries: int = 2,
                 desc: str = "jobs") -> None:
    """``on_result(job, fn(job))`` in this process for every job, ``fn`` run as Ray tasks.

    ``address``: ``"local"`` starts an embedded single-machine cluster (``num_cpus`` CPUs, default all)
    and stops it afterwards; any other value (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``)
    joins that cluster. A cluster already initialised in this process is used as it is. Each task
    reserves ``cpus_per_job`` CPUs and runs with that many intra-op threads. ``fn`` must be importable
    on the workers (a module-level function of an installed package). Results arrive in completion
    order; a job that still fails after ``retries`` retries raises here.
    """
    for name, value, low in (("cpus_per_job", cpus_per_job, 1), ("retries", retries, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if num_cpus is not None and (isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1):
        raise ValueError(f"num_cpus must be a positive int or None, got {num_cpus!r}")
    if not isinstance(address, str) or not address:
        raise ValueError(f"address must be 'local' or a Ray cluster address, got {address!r}")
    ray = _import_ray()
    if not jobs:  # nothing to do: no cluster to start
        return
    started = not ray.is_initialized()
    if started:
        kwargs = dict(include_dashboard=False, log_to_driver=False)
        if address == LOCAL and num_cpus is not None:
            kwargs["num_cpus"] = num_cpus
        ray.init(address=address, **kwargs)
    try:
        options: dict = dict(num_cpus=cpus_per_job, max_retries=retries, retry_exceptions=True)
        if os.environ.get(CRASH_ONCE_ENV):  # tests' fault injection reaches the workers this way
            options["runtime_env"] = {"env_vars": {CRASH_ONCE_ENV: os.environ[CRASH_ONCE_ENV]}}
        task = ray.remote(_task).options(**options)
        pending = {task.remote(fn, job, cpus_per_job): job for job in jobs}
        with tqdm(total=len(pending), desc=desc) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    job = pending.pop(ref)
                    on_result(job, ray.get(ref))
                    bar.update(1)
    finally:
        if started:
            ray.shutdown()
