"""Bundles: a saved and reloaded MNN gives bitwise-equal outputs; bad bundles are refused clearly."""
import json

import pytest
import torch

from mnn_fast import MetaNeuralNetwork
from mnn_fast.training.bundle import load_bundle, save_bundle
from mnn_fast.training.models import build_model


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    shape = (1, 8, 8)
    switch = build_model("small_cnn", 10, shape).eval()
    specialists = [build_model("small_cnn", 10, shape).eval() for _ in range(4)]
    groups = [[0, 1], [2, 3, 4], [5], [6, 7, 8, 9]]
    mnn = MetaNeuralNetwork(switch, specialists, groups=groups, threshold=0.15, top_k=2, num_classes=10)
    save_bundle(tmp_path / "b", mnn, "small_cnn", "small_cnn", shape)
    return mnn, tmp_path / "b"


def test_round_trip_is_bitwise(saved):
    mnn, path = saved
    loaded = load_bundle(path)
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), mnn(x))
    assert loaded.groups == mnn.groups and loaded.threshold == 0.15 and loaded.top_k == 2


def test_truncated_weights_are_refused(saved):
    _, path = saved
    weights = path / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="weights.safetensors: not a readable safetensors file"):
        load_bundle(path)


def test_foreign_or_mismatched_config_is_refused(saved):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "specialist_arch": "mlp"}))
    with pytest.raises(ValueError, match="do not match the architecture"):
        load_bundle(path)
    (path / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not an mnn_fast bundle config"):
        load_bundle(path)
    with pytest.raises(ValueError, match="no such file"):
        load_bundle(path / "missing")
