"""``mnn-fast nsn-sweep`` and NSN specialists in the training pipeline (``--specialist-nsn``)."""
import csv

import pytest
import torch

from mnn_fast import cli
from mnn_fast.nsn import DetachableMLP
from mnn_fast.nsn.mnn import detachable_mnn
from mnn_fast.training import TrainConfig, load_mnn, train


def test_specialist_nsn_needs_a_detachable_model():
    with pytest.raises(ValueError, match="specialist_nsn: NSN specialists need model 'nsn_mlp'"):
        TrainConfig(model="mlp", specialist_nsn=True).check()
    with pytest.raises(TypeError, match="specialist_nsn"):
        TrainConfig(model="nsn_mlp", specialist_nsn="yes").check()


def test_a_run_with_nsn_specialists_loads_and_runs_at_every_depth(tmp_path):
    cfg = TrainConfig(dataset="digits", model="nsn_mlp", specialist_nsn=True, switch_epochs=1, specialist_epochs=1)
    train(cfg, tmp_path / "run")
    mnn = load_mnn(tmp_path / "run").eval()
    specialists = list(mnn.specialists)
    assert all(isinstance(s, DetachableMLP) for s in specialists)
    # The specialists trained with paired gradients: their weights moved away from the switch's start.
    assert not torch.equal(specialists[0].hidden[0].weight, mnn.switch.hidden[0].weight)
    x = torch.rand(50, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(detachable_mnn(mnn.switch, specialists, 2).eval()(x), mnn(x))


def test_sweep_command_writes_points_for_every_depth_and_the_references(tmp_path):
    assert cli.main(["nsn-sweep", "--out", str(tmp_path), "--switch-epochs", "1", "--specialist-epochs", "1"]) == 0
    with (tmp_path / "nsn_sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    kinds = {(r["kind"], r["depth"]) for r in rows}
    assert {("nsn", "0"), ("nsn", "1"), ("nsn", "2"), ("plain", "2"), ("switch", ""),
            ("switch_compute_matched", "")} <= kinds
    assert any(r["kind"].startswith("budget") for r in rows)
    (switch,) = [r for r in rows if r["kind"] == "switch"]
    for r in rows:
        if r["test_threshold"] == "1.0":  # nothing activates: the switch alone, at the switch's cost
            assert r["accuracy"] == switch["accuracy"] and float(r["macs"]) == float(switch["macs"])
    depth_macs = {r["depth"]: float(r["macs"]) for r in rows if r["kind"] == "nsn" and r["test_threshold"] == "0.0"}
    assert depth_macs["0"] < depth_macs["1"] < depth_macs["2"]  # deeper specialists cost more
    assert (tmp_path / "nsn_sweep.png").read_bytes()[:4] == b"\x89PNG"
