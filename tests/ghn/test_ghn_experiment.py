"""``ghn`` experiment: a tiny run through the sub-command writes the CSV, JSON, table, figure and checkpoints."""
import argparse
import csv
import json

import pytest

from mnn_fast.ghn import load_ghn
from mnn_fast.ghn.cli import add_ghn_parser
from mnn_fast.ghn.experiment import CSV_FIELDS, markdown_table, run_ghn_experiment, summarise


def _parser():
    parser = argparse.ArgumentParser(prog="mnn-fast")
    add_ghn_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_tiny_run_writes_every_output(tmp_path):
    args = _parser().parse_args([
        "ghn", "--dataset", "digits", "--out", str(tmp_path), "--seeds", "0", "1", "--steps", "3", "--pool-size", "4",
        "--archs-per-split", "1", "--val-archs", "1", "--lr-grid", "0.01", "0.03", "--finetune-steps", "0", "4",
        "--hidden", "8", "--calibration", "64", "--no-progress"])
    args.func(args)
    with (tmp_path / "ghn.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == list(CSV_FIELDS) == ["split", "arch", "init", "steps", "seed", "accuracy"]
    assert {r["split"] for r in rows} == {"in_distribution", "deeper", "wider"}
    assert {r["init"] for r in rows} == {"ghn", "random"}
    assert {r["steps"] for r in rows} == {"0", "4"} and {r["seed"] for r in rows} == {"0", "1"}
    assert len(rows) == 3 * 1 * 2 * 2 * 2  # splits x archs x inits x step counts x seeds
    assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in rows)
    # Each (split, seed) is one architecture, shared by both inits; deeper nets have more layers.
    for split in ("in_distribution", "deeper", "wider"):
        for seed in "01":
            assert len({r["arch"] for r in rows if r["split"] == split and r["seed"] == seed}) == 1
    depth = {r["split"]: r["arch"].split("_")[0].count("-") + 1 for r in rows}
    assert depth["deeper"] >= 5 and depth["in_distribution"] <= 4
    assert (tmp_path / "ghn.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "ghn.md").read_text()
    assert table.splitlines()[0] == "| split | init | 0 steps | 4 steps |" and len(table.splitlines()) == 2 + 6
    info = json.loads((tmp_path / "ghn.json").read_text())
    assert [s["seed"] for s in info["seeds"]] == [0, 1]
    assert [s["lr_chosen_here"] for s in info["seeds"]] == [True, False]  # chosen once, on the first seed
    assert info["seeds"][0]["chosen_lr"] == info["seeds"][1]["chosen_lr"]
    assert set(info["seeds"][0]["validation_accuracy"]["ghn"]) == {"0.01", "0.03"}
    for s in info["seeds"]:
        assert set(s["chosen_lr"]) == {"ghn", "random"} and set(s["chosen_lr"].values()) <= {0.01, 0.03}
        assert set(s["timings_s"]) == {"setup", "ghn_training", "lr_selection", "test"}
        ghn, meta = load_ghn(tmp_path / f"ghn_seed{s['seed']}.safetensors")
        assert ghn.hidden == 8 and meta["seed"] == str(s["seed"])
    assert len(info["summary"]) == 3 * 2 * 2 and all(x["seeds"] == 2 for x in info["summary"])


def test_defaults_are_the_issue_settings():
    args = _parser().parse_args(["ghn", "--out", "x"])
    assert args.dataset == "digits" and args.seeds == [0, 1, 2] and args.finetune_steps == [0, 10, 50, 200]
    assert args.lr_grid == [0.003, 0.01, 0.03, 0.1]
    with pytest.raises(SystemExit):
        _parser().parse_args(["ghn", "--dataset", "cifar10"])


def test_summary_is_mean_and_std_over_seeds_of_per_seed_means():
    rows = [{"split": "deeper", "init": "ghn", "steps": 10, "seed": s, "accuracy": a}
            for s, accs in ((0, (0.5, 0.7)), (1, (0.9, 0.9))) for a in accs]
    (s,) = summarise(rows)
    assert s["mean"] == pytest.approx(0.75) and s["std"] == pytest.approx(0.2121320, rel=1e-5)
    assert s["seeds"] == 2 and s["archs"] == 4
    assert "| deeper | ghn |  | 0.750 ± 0.212 |  |  |" in markdown_table([s])


@pytest.mark.parametrize("kwargs,match", [
    (dict(dataset="cifar10"), "dataset"), (dict(seeds=()), "seeds"), (dict(steps=0), "steps"),
    (dict(lr_grid=(0.0,)), "lr_grid"), (dict(hidden=0), "hidden"), (dict(checkpoints=(-1,)), "checkpoints"),
])
def test_bad_settings_raise_naming_them(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_ghn_experiment(**{"dataset": "digits", "out_dir": tmp_path, **kwargs})
    assert not (tmp_path / "ghn.csv").exists()
