"""``mnn-fast groups``: the controls report, end to end through the command line."""
from __future__ import annotations

import csv
import json

import pytest

from helpers import assert_partition
from mnn_fast import cli
from mnn_fast.groups.report import random_groups_like


# ------------------------------------------------------------------------------ report

def test_random_groups_keep_the_sizes():
    got = random_groups_like([[0, 4], [1, 2, 3], [5]], 6, seed=0)
    assert sorted(map(len, got)) == [1, 2, 3]
    assert_partition(got, 6, 3)
    with pytest.raises(ValueError, match="groups"):
        random_groups_like([[0, 1]], 3, seed=0)


def test_groups_report_end_to_end(tmp_path, capsys):
    # The whole command on embedded digits with a one-epoch MLP, through its argparse front end.
    assert cli.main(["groups", "--dataset", "digits", "--model", "mlp", "--epochs", "1",
                     "--num-groups", "3", "--head-hidden", "32", "--out", str(tmp_path)]) == 0
    with (tmp_path / "groups.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["row"] for r in rows] == ["base", "classifier_refit", "heads_confusion", "heads_random",
                                        "heads_codetection"]
    assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 for r in rows)
    assert float(rows[0]["overhead_pct"]) == 0.0 and rows[1]["macs"] == rows[0]["macs"]
    assert all(int(r["macs"]) > int(rows[0]["macs"]) and float(r["overhead_pct"]) > 0 for r in rows[2:])
    report = json.loads((tmp_path / "groups.json").read_text())
    for kind in ("confusion", "random", "codetection"):
        assert_partition(report["groups"][kind], 10, 3)
    assert sorted(map(len, report["groups"]["random"])) == sorted(map(len, report["groups"]["confusion"]))
    assert (tmp_path / "similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| heads_confusion |" in capsys.readouterr().out


def test_groups_report_with_mnn_has_compute_matched_rows(tmp_path):
    from mnn_fast.groups.report import run_groups_report

    r = run_groups_report("digits", None, "mlp", None, 3, tmp_path, epochs=1, head_hidden=16, with_mnn=True,
                          test_threshold=0.05, verbose=False)
    names = [row["row"] for row in r["rows"]]
    assert names[-4:] == ["mnn_group_specialists", "base_compute_matched_to_mnn_group_specialists",
                          "mnn_class_specialists", "base_compute_matched_to_mnn_class_specialists"]
    from mnn_fast.training.data import load_dataset, validation_split

    digits = load_dataset("digits", seed=0)
    n_train = len(validation_split(digits.train_x, digits.train_y, 0.1, 0)[0])
    for row in r["rows"][-3::2]:
        # One base epoch plus the specialists' epoch over their subsets: more than the base alone.
        assert row["train_sample_passes"] > n_train and row["macs"] == r["rows"][0]["macs"]
        assert 0.0 <= row["test_accuracy"] <= 1.0
