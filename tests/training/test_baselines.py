"""Issue 14, items 5-6: the binary specialist loss, sample budgets, the compute-matched switch and
``mnn-fast baselines``. Digits with one-epoch MLPs, so the file takes seconds.
"""
import csv
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mnn_fast import io
from mnn_fast.cli import main
from mnn_fast.training import TrainConfig, load_mnn, read_probs, specialist_subsets, train
from mnn_fast.training.baselines import (CSV_FIELDS, run_baselines, summarise, train_compute_matched_switch,
                                         training_sample_passes)
from mnn_fast.training.data import load_dataset, validation_split
from mnn_fast.training.loop import binary_group_loss, fit
from mnn_fast.training.models import build_model
from mnn_fast.training.pipeline import RunDir, SpecialistJob, cut_training_split, train_specialist


def reference_binary_loss(logits, y, classes):
    """The original MNN code's loss, written plainly: BCE of the softmax mass on ``classes``."""
    p = torch.softmax(logits.double(), 1)[:, classes].sum(1).clamp(max=1.0)  # a sum of all can round past 1
    target = torch.isin(y, torch.tensor(classes)).double()
    return F.binary_cross_entropy(p, target)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def tiny(**kw):
    return TrainConfig(**{**dict(model="mlp", switch_epochs=1, specialist_epochs=1, dataset_threshold=0.1), **kw}).check()


# One class (the paper's case), a group, and a group that is every class (every target is 1).
@pytest.mark.parametrize("classes", [[3], [0, 2, 7], list(range(10))])
def test_binary_loss_matches_the_plain_formula(classes):
    gen = torch.Generator().manual_seed(len(classes))
    logits = torch.randn(64, 10, generator=gen) * 4
    y = torch.randint(0, 10, (64,), generator=gen)
    got = binary_group_loss(classes)(logits, y)
    torch.testing.assert_close(got.double(), reference_binary_loss(logits, y, classes), rtol=1e-5, atol=1e-6)


def test_binary_loss_stays_finite_where_softmax_saturates():
    # Logits +-1e4: the softmax is exactly 0 or 1 in float32, where BCELoss(softmax) clamps to 100.
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]], requires_grad=True)
    y = torch.tensor([1, 1])  # the first row is confidently wrong for class 1
    loss = binary_group_loss([1])(logits, y)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(1e4, rel=1e-3)
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_binary_loss_refuses_no_classes():
    with pytest.raises(ValueError, match="classes"):
        binary_group_loss([])


def test_specialist_loss_is_a_checked_config_field():
    assert tiny().specialist_loss == "ce"
    with pytest.raises(ValueError, match="specialist_loss"):
        tiny(specialist_loss="hinge")
    with pytest.raises(ValueError, match="specialist_loss"):
        TrainConfig(model="nsn_mlp", specialist_nsn=True, specialist_loss="binary").check()
    assert tiny().config_sha256() != tiny(specialist_loss="binary").config_sha256()


def test_fields_added_later_keep_earlier_runs_hashes():
    # A run written before specialist_loss / train_fraction / specialist_threads existed has no such
    # keys; at their defaults the identity (and so the hash every file records) must not change.
    added = {"specialist_loss", "train_fraction", "specialist_threads"}
    assert not added & set(tiny().identity())
    old = {k: v for k, v in tiny().identity().items() if k not in added}
    assert TrainConfig.from_dict(old).config_sha256() == tiny().config_sha256()
    assert tiny(train_fraction=0.5).identity()["train_fraction"] == 0.5


def test_binary_specialists_train_with_the_binary_loss(digits, tmp_path):
    # The run's specialist 4 must be exactly a fit with the binary loss on class 4's subset.
    cfg = tiny(specialist_loss="binary")
    run = train(cfg, tmp_path / "run", splits=digits)
    mnn = load_mnn(tmp_path / "run", splits=digits)
    probs, labels = read_probs(run.probs)
    idx = specialist_subsets(probs, None, cfg.dataset_threshold)[4]
    train_x, train_y, _, _ = validation_split(digits.train_x, digits.train_y, cfg.val_fraction, cfg.seed)
    model = build_model("mlp", 10, digits.input_shape)
    model.load_state_dict(mnn.switch.state_dict())
    before = torch.get_num_threads()
    torch.set_num_threads(cfg.specialist_threads)  # the bits depend on it
    try:
        fit(model, train_x[idx], train_y[idx], cfg.specialist_epochs, cfg, cfg.seed + 1 + 4, "check",
            loss_fn=binary_group_loss([4]))
    finally:
        torch.set_num_threads(before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, mnn.specialists[4].state_dict()[k]), k
    ce = train_specialist(SpecialistJob(4, dataclasses.asdict(tiny()), mnn.switch.state_dict(), 10,
                                        tuple(digits.input_shape), train_x[idx], train_y[idx], (4,)))
    assert any(not torch.equal(v, ce[k]) for k, v in model.state_dict().items())  # the loss changed something


def test_sample_budget_of_whole_epochs_is_the_plain_run(digits):
    x, y = digits.train_x[:300], digits.train_y[:300]
    cfg = tiny(batch_size=64)
    a = fit(build_model("mlp", 10, digits.input_shape), x, y, 2, cfg, 5, "a")
    b = fit(build_model("mlp", 10, digits.input_shape), x, y, 2, cfg, 5, "b", max_samples=600)
    c = fit(build_model("mlp", 10, digits.input_shape), x, y, 3, cfg, 5, "c", max_samples=600)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]) and torch.equal(v, c.state_dict()[k]), k


@pytest.mark.parametrize("budget", [1, 63, 64, 299, 300, 301, 450])  # inside, at and across batch/epoch ends
def test_sample_budget_is_met_exactly(digits, budget):
    from mnn_fast.training.loop import minimise

    model = build_model("mlp", 10, digits.input_shape)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = minimise(model, opt, digits.train_x[:300], digits.train_y[:300], 2, 64, 0, "b", max_samples=budget)
    assert seen == budget


def test_compute_matched_switch_at_the_switch_budget_is_the_switch(digits, tmp_path):
    cfg = tiny(switch_epochs=2)
    train(cfg, tmp_path / "run", splits=digits)
    switch = load_mnn(tmp_path / "run", splits=digits).switch
    n = len(validation_split(digits.train_x, digits.train_y, cfg.val_fraction, cfg.seed)[0])
    matched = train_compute_matched_switch(cfg, digits, 2 * n)
    for k, v in switch.state_dict().items():
        assert torch.equal(v, matched.state_dict()[k]), k


def test_training_sample_passes_counts_every_specialist_sample(digits, tmp_path):
    cfg = tiny(specialist_epochs=3)
    run = train(cfg, tmp_path / "run", splits=digits)
    probs, _ = read_probs(run.probs)
    recorded = [int(io.load_tensors(run.specialist(e))[1]["train_samples"]) for e in range(10)]
    passes = training_sample_passes(cfg, len(probs), [len(s) for s in specialist_subsets(probs, None, 0.1)])
    assert passes["specialists"] == 3 * sum(recorded)
    assert passes["switch"] == len(probs) and passes["total"] == passes["switch"] + passes["specialists"]


def test_train_fraction_keeps_a_stratified_seeded_part(digits):
    cut = cut_training_split(digits, 0.25, seed=3)
    assert len(cut.train_y) == pytest.approx(0.25 * len(digits.train_y), abs=10)
    assert torch.equal(cut.test_x, digits.test_x)
    counts = torch.bincount(cut.train_y, minlength=10).float() / torch.bincount(digits.train_y, minlength=10)
    assert ((counts - 0.25).abs() < 0.02).all()
    assert torch.equal(cut_training_split(digits, 0.25, seed=3).train_y, cut.train_y)
    assert not torch.equal(cut_training_split(digits, 0.25, seed=4).train_x, cut.train_x)
    assert cut_training_split(digits, 1.0, seed=3) is digits
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="train_fraction"):
            tiny(train_fraction=bad)


def test_summary_pairs_each_seed_with_its_own_references():
    rows = [{"seed": s, "row": r, "accuracy": a, "train_sample_passes": 10, "forward_passes_per_sample": 1.0}
            for s, r, a in [(0, "switch", 0.90), (0, "switch_compute_matched", 0.92), (0, "mnn_ce", 0.93),
                            (1, "switch", 0.80), (1, "switch_compute_matched", 0.85), (1, "mnn_ce", 0.84)]]
    summary = {s["row"]: s for s in summarise(rows)}
    assert summary["mnn_ce"]["mean"] == pytest.approx(0.885)
    assert summary["mnn_ce"]["minus_switch"] == pytest.approx((0.03 + 0.04) / 2)
    assert summary["mnn_ce"]["minus_switch_compute_matched"] == pytest.approx((0.01 - 0.01) / 2)
    assert summary["mnn_ce"]["minus_switch_compute_matched_std"] == pytest.approx(0.0002 ** 0.5, rel=1e-6)
    assert summary["switch"]["std"] == pytest.approx(0.0707107, rel=1e-5)
    assert "minus_switch" not in summary["switch"]


def test_baselines_run_writes_every_row_and_resumes(digits, tmp_path):
    cfg = tiny(train_fraction=0.5)
    # A one-epoch switch is unsure: a low test threshold makes sure specialists run.
    result = run_baselines(cfg, tmp_path / "out", seeds=[0, 1], test_threshold=0.05, verbose=False)
    with open(tmp_path / "out" / "baselines.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_FIELDS
    assert [(r["seed"], r["row"]) for r in rows] == [(str(s), n) for s in (0, 1) for n in
                                                     ("switch", "switch_compute_matched", "mnn_ce", "mnn_binary")]
    for s in (0, 1):
        by = {r["row"]: r for r in rows if r["seed"] == str(s)}
        # Equal compute: the matched switch and both MNNs trained on as many samples; the switch on fewer.
        assert by["switch_compute_matched"]["train_sample_passes"] == by["mnn_ce"]["train_sample_passes"] \
            == by["mnn_binary"]["train_sample_passes"]
        assert int(by["switch"]["train_sample_passes"]) < int(by["mnn_ce"]["train_sample_passes"])
        assert float(by["mnn_ce"]["forward_passes_per_sample"]) > 1.0
        assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in by.values())
    # Both losses share the first run's switch; the binary run's specialists differ.
    runs = tmp_path / "out" / "runs"
    assert RunDir(runs / "seed0_ce").switch.read_bytes() != b""
    # The runs trained on half of digits' training split: load_mnn builds them from their data record.
    ce, binary = (load_mnn(runs / f"seed0_{k}") for k in ("ce", "binary"))
    with pytest.raises(ValueError, match="not on the data given"):
        load_mnn(runs / "seed0_ce", splits=digits)
    assert all(torch.equal(v, binary.switch.state_dict()[k]) for k, v in ce.switch.state_dict().items())
    assert any(not torch.equal(v, binary.specialists[0].state_dict()[k]) for k, v in ce.specialists[0].state_dict().items())
    assert (tmp_path / "out" / "baselines.png").stat().st_size > 0
    assert "compute-matched" in (tmp_path / "out" / "baselines.md").read_text()
    again = run_baselines(cfg, tmp_path / "out", seeds=[0, 1], test_threshold=0.05, verbose=False)  # every network reused
    assert again["rows"] == result["rows"]


def test_cli_baselines_refuses_bad_arguments(capsys, tmp_path):
    assert main(["baselines", "--model", "mlp", "--test-threshold", "2", "--out", str(tmp_path)]) == 2
    assert "test_threshold" in capsys.readouterr().err
    assert main(["baselines", "--model", "mlp", "--train-fraction", "0", "--out", str(tmp_path)]) == 2
    assert "train_fraction" in capsys.readouterr().err
