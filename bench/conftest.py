"""Benchmark plumbing: ``--quick``, a results collector, and the ratio tables printed at the end.

Each benchmark module records ``(table, row, column) -> seconds`` plus any derived numbers; at the
end of the session the tables print side by side and go to ``bench/results/<table>.json`` as
``{"meta": ..., "rows": [...]}``. ``meta`` says where and how the numbers were measured, captured
when the benchmarks run (not when a page is rendered from them): CPU model, cores, intra-op threads,
torch, Python and mnn_fast versions, the git commit (and whether the tree had uncommitted changes),
the command, the date, the session's duration and quick or full mode. ``bench/render_docs.py``
renders docs/benchmarks.md and the README's speed table from these files. The same ``meta`` goes
into pytest-benchmark's JSON (``--benchmark-json``) under ``"mnn_bench"``.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

RESULTS_DIR = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
# Environment variables that change what the benchmarks measure: part of the recorded command.
BENCH_ENV = ("MNN_BENCH_THREADS", "MNN_BENCH_LAUNCH_EPOCHS")
# Intra-op threads for every benchmark (default: one per core); tables state it.
THREADS = int(os.environ.get("MNN_BENCH_THREADS", os.cpu_count() or 1))


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="small grid that finishes in under a minute")


def is_quick(config) -> bool:
    return config.getoption("--quick") or os.environ.get("MNN_BENCH_QUICK") == "1"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _command(config) -> str:
    """What was typed: ``MNN_BENCH_COMMAND`` (the Makefile sets ``make bench``) or the pytest
    command line, after the benchmark variables set in the environment."""
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in BENCH_ENV if k in os.environ]
    command = os.environ.get("MNN_BENCH_COMMAND")
    if not command:
        if os.environ.get("MNN_BENCH_QUICK"):
            env.append(f"MNN_BENCH_QUICK={shlex.quote(os.environ['MNN_BENCH_QUICK'])}")
        command = " ".join(["pytest", *map(shlex.quote, config.invocation_params.args)])
    return " ".join([*env, command])


def run_meta(config) -> dict:
    """Where and how this session measures: recorded with every table it writes."""
    commit = _git("rev-parse", "--short", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    try:
        from mnn_fast import __version__ as mnn_version
    except ImportError:
        mnn_version = None
    return {
        "command": _command(config),
        "quick": is_quick(config),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit,
        "dirty": bool(status) if status is not None else None,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "system": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mnn_fast": mnn_version,
    }


class Results:
    """Collects rows of a table; ``row`` is a dict of key columns, ``values`` are measured numbers."""

    def __init__(self):
        self.tables: dict[str, dict[tuple, dict]] = defaultdict(dict)
        self.notes: dict[str, list[str]] = defaultdict(list)
        self.formatters: dict[str, object] = {}

    def record(self, table: str, key: dict, **values) -> None:
        row = self.tables[table].setdefault(tuple(key.items()), dict(key))
        row.update(values)

    def rows(self, table: str) -> list[dict]:
        return list(self.tables[table].values())


_RESULTS = Results()
_META: dict = {}
_STARTED = time.perf_counter()


def pytest_configure(config):
    global _STARTED
    _STARTED = time.perf_counter()
    _META.clear()
    _META.update(run_meta(config))


def _meta() -> dict:
    return {**_META, "threads": THREADS, "session_s": round(time.perf_counter() - _STARTED, 1)}


@pytest.fixture(scope="session")
def results() -> Results:
    return _RESULTS


@pytest.fixture(scope="session", autouse=True)
def _two_threads():
    # Benchmarks state their thread count so ratios are comparable run to run.
    torch.set_num_threads(THREADS)
    yield


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["mnn_bench"] = _meta()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RESULTS.tables:
        return
    RESULTS_DIR.mkdir(exist_ok=True)
    meta = _meta()
    for table, fmt in _RESULTS.formatters.items():
        rows = _RESULTS.rows(table)
        if not rows:
            continue
        terminalreporter.write_sep("=", f"{table} (threads={meta['threads']}, quick={meta['quick']})")
        for line in fmt(rows):
            terminalreporter.write_line(line)
        for note in _RESULTS.notes[table]:
            terminalreporter.write_line(note)
        path = RESULTS_DIR / f"{table}.json"
        path.write_text(json.dumps({"meta": {**meta, "table": table, "notes": _RESULTS.notes[table]}, "rows": rows},
                                   indent=1) + "\n")
        terminalreporter.write_line(f"written: {path}")
    terminalreporter.write_line(f"benchmark session: {meta['session_s']:.1f} s")
