"""Issue 16, item 3: specialists started from the switch, from a GHN's prediction or from random init,
in an architecture that may differ from the switch's. Digits with one-epoch MLP switches; the GHN
trains a handful of steps (what is checked is where each specialist starts, not how good the GHN is).
"""
import copy
import csv

import pytest
import torch

from mnn_fast import reporting
from mnn_fast.cli import main
from mnn_fast.ghn import GHN, predicted_state
from mnn_fast.training import TrainConfig, load_mnn, read_probs, specialist_subsets, train
from mnn_fast.training.baselines import CSV_FIELDS, mnn_row_name, routed_specialist_accuracy, run_baselines
from mnn_fast.training.data import load_dataset, validation_split
from mnn_fast.training.loop import fit
from mnn_fast.training.models import SmallCNN, build_model
from mnn_fast.training.pipeline import RunDir, initial_specialist, load_run_ghn


def reference_routed_accuracy(mnn, x, y, threshold):
    """Plainly: every (sample, specialist) pair whose group score exceeds the threshold, scored alone."""
    probs = torch.softmax(mnn.switch(x), 1)
    hits = total = 0
    for e, spec in enumerate(mnn.specialists):
        rows = (probs[:, e] > threshold).nonzero().flatten()
        hits += int((spec(x[rows]).argmax(1) == y[rows]).sum()) if len(rows) else 0
        total += len(rows)
    return hits / total


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def tiny(**kw):
    return TrainConfig(**{**dict(model="mlp", switch_epochs=1, specialist_epochs=1, dataset_threshold=0.1,
                                 ghn_steps=3), **kw}).check()


@pytest.fixture(scope="module")
def ghn_run(digits, tmp_path_factory):
    """An MLP switch with small-CNN specialists started from the run's own GHN."""
    root = tmp_path_factory.mktemp("ghn_run")
    cfg = tiny(specialist_model="small_cnn", specialist_init="ghn")
    train(cfg, root / "run", splits=digits)
    return cfg, root / "run"


def hand_fit(cfg, digits, run_dir, expert, start):
    """Specialist ``expert`` trained by hand from the state ``start``, as the pipeline must have."""
    probs, _ = read_probs(RunDir(run_dir).probs)
    idx = specialist_subsets(probs, None, cfg.dataset_threshold)[expert]
    train_x, train_y, _, _ = validation_split(digits.train_x, digits.train_y, cfg.val_fraction, cfg.seed)
    model = build_model(cfg.specialist_architecture, 10, digits.input_shape)
    model.load_state_dict(start)
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.specialist_threads)  # the bits depend on it
    try:
        return fit(model, train_x[idx], train_y[idx], cfg.specialist_epochs, cfg, cfg.seed + 1 + expert, "check")
    finally:
        torch.set_num_threads(before)


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_config_checks_the_specialist_start():
    assert tiny().specialist_architecture == "mlp"
    assert tiny(specialist_model="mlp").specialist_model is None  # the switch's own: one spelling, one hash
    assert tiny(specialist_model="mlp").config_sha256() == tiny().config_sha256()
    with pytest.raises(ValueError, match="specialist_init"):
        tiny(specialist_model="small_cnn")  # the switch's weights do not fit another architecture
    with pytest.raises(ValueError, match="specialist_init"):
        tiny(specialist_init="imagenet")
    with pytest.raises(ValueError, match="specialist_model"):
        tiny(specialist_model="vgg", specialist_init="random")
    with pytest.raises(ValueError, match="ghn_steps"):
        tiny(ghn_steps=0, specialist_init="ghn")
    with pytest.raises(ValueError, match="specialist_nsn"):
        TrainConfig(model="nsn_mlp", specialist_nsn=True, specialist_init="random").check()


def test_new_fields_leave_earlier_runs_hashes_alone():
    # Runs written before issue 16 have none of these keys; at their defaults the hash must not move,
    # and ghn_steps counts only when a GHN is trained.
    assert not {"specialist_model", "specialist_init", "ghn_steps"} & set(tiny().identity())
    assert tiny(ghn_steps=50).config_sha256() == tiny().config_sha256()
    assert tiny(specialist_init="ghn", ghn_steps=50).config_sha256() != tiny(specialist_init="ghn").config_sha256()
    assert tiny(specialist_init="random").config_sha256() != tiny().config_sha256()


def test_random_start_is_the_architectures_own_seeded_init(digits, tmp_path):
    cfg = tiny(specialist_init="random")
    train(cfg, tmp_path / "run", splits=digits)
    mnn = load_mnn(tmp_path / "run", splits=digits)
    torch.manual_seed(cfg.seed + 1 + 6)
    start = build_model("mlp", 10, digits.input_shape).state_dict()
    assert_same_state(hand_fit(cfg, digits, tmp_path / "run", 6, start).state_dict(), mnn.specialists[6].state_dict())
    # Not the switch's weights: the paper's start gives another specialist.
    switch_start = hand_fit(cfg, digits, tmp_path / "run", 6, mnn.switch.state_dict()).state_dict()
    assert any(not torch.equal(v, switch_start[k]) for k, v in mnn.specialists[6].state_dict().items())


def test_ghn_start_is_the_runs_ghn_prediction_for_another_architecture(digits, ghn_run):
    cfg, run_dir = ghn_run
    mnn = load_mnn(run_dir, splits=digits)
    assert isinstance(mnn.switch, torch.nn.Sequential) and all(isinstance(s, SmallCNN) for s in mnn.specialists)
    ghn = load_run_ghn(run_dir)
    start = predicted_state(ghn, initial_specialist(cfg, digits), digits.input_shape)
    assert_same_state(hand_fit(cfg, digits, run_dir, 2, start).state_dict(), mnn.specialists[2].state_dict())
    assert "ghn.safetensors" in RunDir(run_dir).read_manifest()["files"]


def test_predicted_state_fills_parameters_keeps_buffers_and_the_model(digits):
    torch.manual_seed(0)
    ghn = GHN(hidden=8)
    model = build_model("small_cnn", 10, digits.input_shape)
    before = copy.deepcopy(model.state_dict())
    state = predicted_state(ghn, model, digits.input_shape)
    assert_same_state(model.state_dict(), before)  # the caller's module is untouched
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in before.items()}
    params = dict(model.named_parameters())
    assert any(not torch.equal(state[k], before[k]) for k in params)
    for k in set(state) - set(params):  # BatchNorm statistics: the GHN predicts none
        assert torch.equal(state[k], before[k]), k


def test_ghn_run_resumes_and_adopts_the_same_ghn(digits, ghn_run, tmp_path):
    cfg, run_dir = ghn_run
    files = {p: p.read_bytes() for p in RunDir(run_dir).root.rglob("*.safetensors")}
    train(cfg, run_dir, splits=digits)  # everything verified and reused
    assert {p: p.read_bytes() for p in files} == files
    # A second run (MLP specialists) adopting that GHN holds exactly it, and starts from its prediction.
    other = tiny(specialist_init="ghn")
    train(other, tmp_path / "mlp", splits=digits, ghn=load_run_ghn(run_dir))
    assert_same_state(load_run_ghn(tmp_path / "mlp").state_dict(), load_run_ghn(run_dir).state_dict())


def test_ghn_trained_by_a_run_is_the_same_from_the_config(digits, ghn_run, tmp_path):
    # Deterministic from the config (seed, split, ghn_steps, threads): adopting it changes no bit.
    cfg, run_dir = ghn_run
    train(tiny(specialist_init="ghn"), tmp_path / "own", splits=digits)
    assert_same_state(load_run_ghn(tmp_path / "own").state_dict(), load_run_ghn(run_dir).state_dict())


def test_an_architecture_the_ghn_cannot_read_is_refused_before_training(digits, tmp_path):
    cfg = tiny(specialist_model="mobilenet_v2", specialist_init="ghn")
    with pytest.raises(ValueError, match="specialist_init.*mobilenet_v2"):
        train(cfg, tmp_path / "run", splits=digits)
    assert not RunDir(tmp_path / "run").switch.exists()


def test_routed_specialist_accuracy_matches_a_plain_count(digits, ghn_run):
    _, run_dir = ghn_run
    mnn = load_mnn(run_dir, test_threshold=0.05, splits=digits)
    got = routed_specialist_accuracy(mnn, digits.test_x, digits.test_y)
    assert got == pytest.approx(reference_routed_accuracy(mnn, digits.test_x, digits.test_y, 0.05), abs=0)


def test_row_names_and_labels():
    assert mnn_row_name("ce") == "mnn_ce"  # the paper's specialists keep their name (earlier CSVs)
    assert mnn_row_name("ce", None, "ghn") == "mnn_ce_ghn"
    assert mnn_row_name("binary", "small_cnn", "random") == "mnn_binary_small_cnn_random"
    assert reporting.baseline_label("mnn_ce_small_cnn_ghn") == "MNN, small_cnn specialists from a GHN, cross-entropy"
    assert reporting.baseline_label("mnn_ce_random") == "MNN, specialists from random init, cross-entropy"


def test_baselines_with_specialist_starts(digits, tmp_path):
    cfg = tiny(train_fraction=0.5)
    starts = [(None, "switch"), (None, "ghn"), ("small_cnn", "ghn"), ("small_cnn", "random")]
    run_baselines(cfg, tmp_path / "out", seeds=[0], losses=["ce"], test_threshold=0.05, verbose=False, starts=starts)
    with open(tmp_path / "out" / "baselines.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_FIELDS
    names = ["switch", "switch_compute_matched", "mnn_ce", "mnn_ce_ghn", "mnn_ce_small_cnn_ghn",
             "mnn_ce_small_cnn_random"]
    assert [r["row"] for r in rows] == names
    by = {r["row"]: r for r in rows}
    # One switch, so one training budget for every MNN and the matched switch.
    assert len({by[n]["train_sample_passes"] for n in names[1:]}) == 1
    assert all(0.0 <= float(by[n]["specialist_accuracy"]) <= 1.0 for n in names[2:])
    assert by["switch"]["specialist_accuracy"] == ""
    runs = tmp_path / "out" / "runs"
    # Both GHN rows hold the one GHN the first of them trained.
    assert_same_state(load_run_ghn(runs / "seed0_ce_ghn").state_dict(),
                      load_run_ghn(runs / "seed0_ce_small_cnn_ghn").state_dict())
    assert "small_cnn specialists from a GHN" in (tmp_path / "out" / "baselines.md").read_text()
    with pytest.raises(ValueError, match="specialist_init"):
        run_baselines(cfg, tmp_path / "bad", seeds=[0], starts=[("small_cnn", "switch")], verbose=False)


def test_cli_specialist_start_arguments(capsys, tmp_path):
    assert main(["train", str(tmp_path / "r"), "--model", "mlp", "--specialist-model", "small_cnn"]) == 2
    assert "specialist_init" in capsys.readouterr().err
    assert main(["baselines", "--model", "mlp", "--specialist-models", "small_cnn", "--specialist-inits", "switch",
                 "--out", str(tmp_path / "b")]) == 2
    assert "specialist_inits" in capsys.readouterr().err
