"""Reporting: CSVs, markdown tables and figures, each written atomically with the user's umask."""
from pathlib import Path

import torch

from mnn_fast import io
from mnn_fast.reporting import groups_markdown_table, plot_heatmap, plot_lines, plot_similarity, save_csv, write_csv


def test_csv_and_figures_are_written_atomically(monkeypatch, tmp_path):
    written = []
    inner = io.atomic_write
    monkeypatch.setattr(io, "atomic_write", lambda path, data: (written.append(Path(path).name), inner(path, data)))
    rows = [{"dataset_threshold": 0.1, "test_threshold": t, "accuracy": 0.9, "experts_per_sample": 1.0} for t in (0.1, 0.2)]
    write_csv(tmp_path / "sweep.csv", rows)
    plot_lines(tmp_path / "lines.png", rows, 0.8)
    plot_heatmap(tmp_path / "heat.png", rows, 0.8)
    plot_similarity(tmp_path / "sim.png", [("S", torch.eye(3), [[0, 1], [2]])])
    save_csv(tmp_path / "groups.csv", [{"row": "base", "groups": ""}], ["row", "groups"])
    assert written == ["sweep.csv", "lines.png", "heat.png", "sim.png", "groups.csv"]
    assert (tmp_path / "lines.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "sweep.csv").read_text().splitlines()[0] == "dataset_threshold,test_threshold,accuracy,experts_per_sample"


def test_groups_markdown_table_lists_each_row_with_its_groups():
    rows = [{"row": "base", "groups": None, "test_accuracy": 0.9, "macs": 1000, "overhead_pct": 0.0},
            {"row": "heads", "groups": [[0, 1], [2]], "test_accuracy": 0.925, "macs": 1010, "overhead_pct": 1.0}]
    lines = groups_markdown_table(rows).splitlines()
    assert lines[0].startswith("| row | groups |") and len(lines) == 4
    assert lines[3] == "| heads | {0,1} {2} | 0.9250 | 1,010 | +1.00% |"
