"""Independent jobs in worker processes on this machine: the embedded launcher behind ``--workers N``.

Jobs run in ``spawn``-ed processes (no state inherited from the parent); each result comes back to
the parent, which alone writes files, so workers need no shared filesystem and no locks. A worker
that dies takes its pool down: the unfinished jobs run again in a new pool, up to ``retries`` times;
finished results are never redone. On Ctrl-C the workers end silently and the parent raises
``KeyboardInterrupt`` with every finished result already written.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Sequence

from tqdm import tqdm

__all__ = ["run_jobs", "run_job", "quiet_on_interrupt", "quiet_lost_connections", "children_start_ignoring_sigint",
           "CRASH_ONCE_ENV"]

# Fault injection for tests: a path; the first job to start while it does not exist creates it and
# kills its own worker, as an out-of-memory kill would. Never set outside tests.
CRASH_ONCE_ENV = "MNN_FAST_CRASH_ONCE"


def quiet_on_interrupt(interruptible: bool) -> None:
    """Worker initializer: Ctrl-C reaches every process of the terminal's group; a worker then ends at
    once without a traceback of its own, and the parent alone reports the interruption. Where the
    parent ignores SIGINT (as under nohup), the workers keep ignoring it."""
    if interruptible:
        signal.signal(signal.SIGINT, lambda *_: os._exit(130))
        sys.excepthook = _quiet_lost_connection


def _quiet_lost_connection(kind, value, traceback) -> None:
    # A tensor crosses processes as a file descriptor that multiprocessing's resource sharer hands
    # over from a background thread; when Ctrl-C ends the other side mid-handover, that thread reports
    # the reset connection through sys.excepthook. Expected then, and not worth a traceback.
    if not issubclass(kind, (ConnectionError, EOFError)):
        sys.__excepthook__(kind, value, traceback)


@contextlib.contextmanager
def quiet_lost_connections():
    """The parent's side of :func:`quiet_on_interrupt`: while its workers run, a connection that a
    killed worker left half-open is not reported through ``sys.excepthook``."""
    previous, sys.excepthook = sys.excepthook, _quiet_lost_connection
    try:
        yield
    finally:
        sys.excepthook = previous


@contextlib.contextmanager
def children_start_ignoring_sigint():
    """Workers spawned inside this block start with SIGINT ignored (the disposition survives exec),
    so a Ctrl-C while one is still importing torch prints no traceback; the initializer then installs
    the quiet handler. Signal dispositions can only be changed from the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_job(fn: Callable, job: Any) -> Any:
    """``fn(job)`` in a worker, after the tests' fault injection (``CRASH_ONCE_ENV``) had its say."""
    marker = os.environ.get(CRASH_ONCE_ENV)
    if marker:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        else:
            os.close(fd)
            os._exit(1)
    return fn(job)


def run_jobs(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int, on_result: Callable[[Any, Any], None], *,
             retries: int = 2, desc: str = "jobs") -> None:
    """``on_result(job, fn(job))`` in this process for every job, ``fn`` run in ``workers`` processes.

    ``fn`` must be a module-level function (it is pickled). Results arrive in completion order; a
    raised exception in ``fn`` is raised here (it is a bug or bad input, not a lost worker).
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    pending = list(jobs)
    context = multiprocessing.get_context("spawn")
    with tqdm(total=len(pending), desc=desc) as bar, quiet_lost_connections():
        for attempt in range(retries + 1):
            if not pending:
                return
            lost = []
            interruptible = signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
            with ProcessPoolExecutor(max_workers=min(workers, len(pending)), mp_context=context,
                                     initializer=quiet_on_interrupt, initargs=(interruptible,)) as pool:
                with children_start_ignoring_sigint():  # spawning is lazy: the workers start on submit
                    futures = {pool.submit(run_job, fn, job): job for job in pending}
                while futures:
                    done, _ = wait(futures, return_when=FIRST_COMPLETED)
                    for future in done:
                        job = futures.pop(future)
                        try:
                            result = future.result()
                        except BrokenProcessPool:
                            lost.append(job)  # its worker (or a sibling) died: run it again
                            continue
                        on_result(job, result)
                        bar.update(1)
            pending = lost
        if pending:
            raise RuntimeError(f"{len(pending)} job(s) lost their worker process {retries + 1} times; giving up")
