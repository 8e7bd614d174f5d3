"""Benchmark plumbing: ``--quick``, a results collector, and the ratio tables printed at the end.

Each benchmark module records ``(table, row, column) -> seconds`` plus any derived numbers; at the
end of the session the tables print side by side and go to ``bench/results/<table>.json``.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import pytest
import torch

RESULTS_DIR = Path(__file__).parent / "results"


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="small grid that finishes in under a minute")


def is_quick(config) -> bool:
    return config.getoption("--quick") or os.environ.get("MNN_BENCH_QUICK") == "1"


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


@pytest.fixture(scope="session")
def results() -> Results:
    return _RESULTS


@pytest.fixture(scope="session", autouse=True)
def _two_threads():
    # Benchmarks state their thread count so ratios are comparable run to run.
    torch.set_num_threads(int(os.environ.get("MNN_BENCH_THREADS", os.cpu_count() or 1)))
    yield


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RESULTS.tables:
        return
    RESULTS_DIR.mkdir(exist_ok=True)
    for table, fmt in _RESULTS.formatters.items():
        rows = _RESULTS.rows(table)
        if not rows:
            continue
        terminalreporter.write_sep("=", f"{table} (threads={torch.get_num_threads()}, quick={is_quick(config)})")
        for line in fmt(rows):
            terminalreporter.write_line(line)
        for note in _RESULTS.notes[table]:
            terminalreporter.write_line(note)
        path = RESULTS_DIR / f"{table}.json"
        meta = {"threads": torch.get_num_threads(), "quick": is_quick(config), "torch": torch.__version__}
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        terminalreporter.write_line(f"written: {path}")
