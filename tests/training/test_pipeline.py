"""The training pipeline (SPEC section 7): files, subset rule, warm start, resume, sweeps, refusals.

Runs on sklearn's embedded digits with one-epoch MLPs so the whole file takes seconds.
"""
import dataclasses

import pytest
import torch

from mnn_fast import io
from mnn_fast.training import pipeline as train_mod
from mnn_fast.training.data import load_dataset
from mnn_fast.reference import group_score_loop
from mnn_fast import MetaNeuralNetwork
from mnn_fast.engine.backends import get_backend
from mnn_fast.training.sweep import log_softmax_argmax, sweep_test_thresholds
from mnn_fast.training import RunDir, TrainConfig, accuracy, load_mnn, read_probs, specialist_subsets, train, write_probs


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def tiny(**kw):
    base = dict(model="mlp", switch_epochs=1, specialist_epochs=1, dataset_threshold=0.1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    train(tiny(), root, splits=digits)
    return root


def test_probability_file_round_trip(tmp_path):
    probs = torch.softmax(torch.randn(50, 7), 1)
    labels = torch.randint(0, 7, (50,))
    write_probs(tmp_path / "p.safetensors", probs, labels)
    got_p, got_l = read_probs(tmp_path / "p.safetensors")
    assert torch.equal(got_p, probs) and torch.equal(got_l, labels)


@pytest.mark.parametrize("groups", [None, [[0, 1], [2], [3, 4, 5, 6], [1, 6]]])
def test_subsets_follow_the_spec_definition(groups):
    probs = torch.softmax(torch.randn(400, 7) * 2, 1)
    subsets = specialist_subsets(probs, groups, 0.17)
    groups = groups or [[c] for c in range(7)]
    for e, g in enumerate(groups):
        score = group_score_loop(probs, g)  # SPEC 1: the group's probabilities summed in listed order
        assert torch.equal(subsets[e], (score > 0.17).nonzero().squeeze(1))


def test_specialists_start_from_switch_weights(digits, tmp_path):
    run = train(tiny(specialist_epochs=0), tmp_path, experts=[3], splits=digits)
    switch, expert = io.load_tensors(run.switch)[0], io.load_tensors(run.specialist(3))[0]
    assert switch.keys() == expert.keys()
    assert all(torch.equal(switch[k], expert[k]) for k in switch)
    trained_run = train(tiny(), tmp_path / "b", experts=[3], splits=digits)
    moved = io.load_tensors(trained_run.specialist(3))[0]
    assert any(not torch.equal(switch[k], moved[k]) for k in switch)  # training does move them


def test_same_config_trains_the_same_files(digits, tmp_path):
    # The first run in a process used to initialise the switch from the global generator's state.
    runs = []
    for name in ("a", "b"):
        torch.randn(7)  # whatever the process did before must not matter
        runs.append(train(tiny(), tmp_path / name, experts=[0, 3], splits=digits))
    a, b = runs
    assert a.switch.read_bytes() == b.switch.read_bytes()
    assert all(a.specialist(e).read_bytes() == b.specialist(e).read_bytes() for e in (0, 3))


def test_resume_skips_finished_specialists(digits, tmp_path):
    run = train(tiny(), tmp_path, experts=[0, 1], splits=digits)
    assert [run.specialist(e).exists() for e in range(4)] == [True, True, False, False]
    stamps = {e: run.specialist(e).stat().st_mtime_ns for e in (0, 1)}
    switch_stamp = run.switch.stat().st_mtime_ns
    train(tiny(), tmp_path, splits=digits)
    assert all(run.specialist(e).exists() for e in range(10))
    assert {e: run.specialist(e).stat().st_mtime_ns for e in (0, 1)} == stamps
    assert run.switch.stat().st_mtime_ns == switch_stamp
    assert not list(tmp_path.rglob("*.tmp"))  # no stray temporary files


def test_threshold_one_is_switch_only_and_sweep_matches_module(digits, trained):
    mnn = load_mnn(trained, 0.2, splits=digits)
    thresholds = [0.0, 0.1, 0.3, 0.7, 1.0]
    rows = sweep_test_thresholds(mnn, digits.test_x, digits.test_y, thresholds, batch_size=200)
    assert rows[-1]["experts_per_sample"] == 0
    assert rows[-1]["accuracy"] == accuracy(mnn.switch, digits.test_x, digits.test_y)
    for row in rows:
        mnn.threshold = row["test_threshold"]
        assert row["accuracy"] == accuracy(mnn, digits.test_x, digits.test_y)


def test_refuses_corrupt_files_and_foreign_runs(digits, trained, tmp_path):
    good = RunDir(trained).specialist(0).read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        io.load_tensors(bad)
    bad.write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        io.load_tensors(bad)
    with pytest.raises(ValueError, match="not a probability file"):
        read_probs(RunDir(trained).switch)
    with pytest.raises(ValueError, match=r"holds a different run \(fields differ: \['dataset_threshold'\]\)"):
        train(tiny(dataset_threshold=0.3), trained, splits=digits)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_mnn(tmp_path, splits=digits)


def test_normalization_follows_the_pretrained_weights(monkeypatch):
    # The shared CIFAR ResNets were trained on ImageNet-normalised inputs; "auto" must feed them that.
    import mnn_fast.training.data as data_mod

    seen = []

    class Seen(Exception):
        pass

    def record(*a, **kw):
        seen.append(kw["normalization"])
        raise Seen  # what load_dataset was asked for is all this test needs

    monkeypatch.setattr(data_mod, "load_dataset", record)
    for cfg in (TrainConfig(dataset="cifar10", data_path="d", pretrained="w.th"), TrainConfig(dataset="cifar10", data_path="d"),
                TrainConfig(dataset="cifar10", data_path="d", pretrained="w.th", normalization="cifar")):
        with pytest.raises(Seen):
            train_mod.data_splits(cfg)
    assert seen == ["imagenet", "cifar", "cifar"]
    with pytest.raises(ValueError, match="normalization"):
        TrainConfig(normalization="zca").check()
