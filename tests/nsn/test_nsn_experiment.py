"""``mnn-fast nsn``: the CSV's columns and rows, the figure, and the summary over seeds."""
import csv
import json

import pytest

from mnn_fast import cli
from mnn_fast.nsn.experiment import run_nsn_experiment, summary_rows


def test_command_writes_the_csv_figure_and_summary(tmp_path, capsys):
    assert cli.main(["nsn", "--dataset", "digits", "--out", str(tmp_path), "--seeds", "0", "1", "--epochs", "2"]) == 0
    with (tmp_path / "nsn.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["model", "layers_removed", "seed", "accuracy"]
    # 3 models x 3 depths x 2 seeds.
    assert sorted({(r["model"], r["layers_removed"], r["seed"]) for r in rows}) == sorted(
        (m, str(k), str(s)) for m in ("nsn", "separate", "removed") for k in range(3) for s in (0, 1))
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
    # The normally trained base at full depth is the separately trained full-depth model.
    full = {r["seed"]: r["accuracy"] for r in rows if r["layers_removed"] == "0" and r["model"] == "separate"}
    assert full == {r["seed"]: r["accuracy"] for r in rows if r["layers_removed"] == "0" and r["model"] == "removed"}
    assert (tmp_path / "nsn.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "nsn.json").read_text())["summary"]
    assert len(summary) == 9 and all(s["seeds"] == 2 for s in summary)
    assert "| layers removed |" in capsys.readouterr().out


def test_summary_mean_std_and_multiply_adds():
    rows = [{"model": "nsn", "layers_removed": 1, "seed": s, "accuracy": a} for s, a in ((0, 0.9), (1, 0.8))]
    (s,) = summary_rows(rows, features=64, classes=10, depth=2)
    assert s["mean"] == pytest.approx(0.85) and s["std"] == pytest.approx(0.0707107, rel=1e-5)
    assert s["macs"] == 64 * 64 + 64 * 10


def test_bad_dataset_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="dataset must be one of"):
        run_nsn_experiment("cifar10", tmp_path)
