"""Your own data: an image folder and an .npz train, and every command reads the run's data again.

Each silent path a user met is here, now refused in one line or correct: a run trained on tensors
from Python is never scored on another data set, a sweep never trains digits in place of the run's
data, a path without a data set is refused, and bad data fails before anything is written.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mnn_fast import cli
from mnn_fast.training import Splits, TrainConfig, load_mnn, train
from mnn_fast.training.data import data_source, load_source
from mnn_fast.training.owndata import fingerprint, load_arrays, load_image_folder

FAST = ["--model", "mlp", "--switch-epochs", "1", "--specialist-epochs", "1"]
CLASSES = ("cat", "dog", "owl")


def make_folder(root, *, rgb=False, size=(6, 5), per_class=(6, 3), seed=0):
    """``root/{train,test}/<class>/*.png``: each class a different mean brightness, so it is learnable."""
    rng = np.random.default_rng(seed)
    for part, n in zip(("train", "test"), per_class):
        for k, c in enumerate(CLASSES):
            (root / part / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (size[1], size[0], 3) if rgb else (size[1], size[0])
                pixels = np.clip(rng.normal(60 + 70 * k, 20, shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / part / c / f"{i:03d}.png")
    return root


def make_arrays(n_train=40, n_test=12, features=7, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y_train = torch.arange(n_train) % classes
    y_test = torch.arange(n_test) % classes
    return dict(x_train=torch.randn(n_train, features, generator=g) + y_train[:, None],
                y_train=y_train, x_test=torch.randn(n_test, features, generator=g) + y_test[:, None], y_test=y_test)


def save_npz(path, **arrays):
    np.savez(path, **{k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in arrays.items()})
    return path


def one_line_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    # Progress bars redraw with carriage returns on stderr; the error is the one line after them.
    lines = [line.rsplit("\r", 1)[-1] for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("mnn-fast ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# --------------------------------------------------------------------------- reading the sources

def test_a_grayscale_folder_stays_one_channel_with_its_classes_and_statistics(tmp_path):
    s = load_image_folder(make_folder(tmp_path / "gray"))
    assert s.input_shape == (1, 5, 6) and s.classes == CLASSES and s.num_classes == 3
    assert s.train_y.tolist() == [0] * 6 + [1] * 6 + [2] * 6 and s.test_y.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    # Normalised by the training images' own statistics, which are recorded.
    assert abs(float(s.train_x.mean())) < 1e-5 and abs(float(s.train_x.std()) - 1) < 0.05
    assert len(s.normalization["mean"]) == 1 and s.source == {"dataset": "imagefolder", "data_path": str(tmp_path / "gray")}


def test_a_colour_folder_is_rgb(tmp_path):
    s = load_image_folder(make_folder(tmp_path / "rgb", rgb=True))
    assert s.input_shape == (3, 5, 6) and len(s.normalization["std"]) == 3


def test_one_channel_becomes_three_only_for_an_rgb_switch_and_says_so(tmp_path):
    make_folder(tmp_path / "gray")
    plain = load_source(data_source("imagefolder", tmp_path / "gray"))
    with pytest.warns(UserWarning, match="repeated to three channels"):
        rgb = load_source(data_source("imagefolder", tmp_path / "gray", rgb=True))
    assert rgb.input_shape == (3, 5, 6) and torch.equal(rgb.train_x[:, 2], plain.train_x[:, 0])
    assert rgb.source["rgb"] is True and fingerprint(rgb) != fingerprint(plain)


def test_flat_features_from_an_npz(tmp_path):
    path = save_npz(tmp_path / "d.npz", **make_arrays(), classes=np.array(["a", "b", "c", "d"]))
    s = load_arrays(path)
    assert s.input_shape == (7,) and s.classes == ("a", "b", "c", "d") and s.train_x.dtype == torch.float32
    assert fingerprint(s) == fingerprint(Splits.from_arrays(**make_arrays(), classes="abcd"))


def bad_folder(root, case):
    make_folder(root)
    if case == "unreadable image":
        (root / "train" / "cat" / "000.png").write_bytes(b"not a png")
    elif case == "sizes differ":
        Image.fromarray(np.zeros((9, 9), np.uint8)).save(root / "train" / "dog" / "000.png")
    elif case == "empty class":
        for f in (root / "train" / "owl").iterdir():
            f.unlink()
    elif case == "classes differ":
        (root / "test" / "owl").rename(root / "test" / "emu")
    elif case == "no test folder":
        for f in (root / "test").rglob("*.png"):
            f.unlink()
        for d in (root / "test").iterdir():
            d.rmdir()
        (root / "test").rmdir()


@pytest.mark.parametrize("case,message", [
    ("unreadable image", "cannot decode image"), ("sizes differ", "expected"), ("empty class", "holds no images"),
    ("classes differ", "classes of train/ and test/ differ"), ("no test folder", "needs train/<class>/ and test/<class>/"),
])
def test_bad_folders_are_refused_in_one_line_before_anything_is_written(case, message, tmp_path, capsys):
    bad_folder(tmp_path / "data", case)
    run = tmp_path / "run"
    err = one_line_error(capsys, ["train", str(run), "--dataset", "imagefolder", "--data-path", str(tmp_path / "data"), *FAST])
    assert message in err and not run.exists()


@pytest.mark.parametrize("change,message", [
    (lambda a: a.update(x_test=a["x_test"][:, :5]), "x_test: samples of shape (5,), expected (7,)"),
    (lambda a: a.update(y_train=a["y_train"][:-1]), "y_train: expected [40] labels"),
    (lambda a: a.update(y_test=a["y_test"] - 1), "labels must be >= 0"),
    (lambda a: a.update(classes=np.array(["a", "b"])), "label 3 out of range for 2 classes"),
    (lambda a: a.update(y_train=a["y_train"].clamp(max=2)), "no training samples of class(es) ['3']"),
    (lambda a: a.update(y_train=a["y_train"].float()), "expected integer labels"),
    (lambda a: a.update(x_train=a["x_train"].reshape(40, 7, 1), x_test=a["x_test"].reshape(12, 7, 1)), "add the channel axis"),
    (lambda a: a.pop("y_test"), "lacks key(s) ['y_test']"),
    (lambda a: a.update(x_train=np.array([object()] * 40)), "Object arrays cannot be loaded"),
])
def test_bad_arrays_are_refused_in_one_line_before_anything_is_written(change, message, tmp_path, capsys):
    arrays = make_arrays()
    change(arrays)
    path = save_npz(tmp_path / "d.npz", **arrays)
    run = tmp_path / "run"
    err = one_line_error(capsys, ["train", str(run), "--dataset", "arrays", "--data-path", str(path), *FAST])
    assert message in err and not run.exists()


def test_a_path_without_a_dataset_is_refused_not_trained_on_digits(tmp_path, capsys):
    make_folder(tmp_path / "data")
    err = one_line_error(capsys, ["train", str(tmp_path / "run"), "--data-path", str(tmp_path / "data"), *FAST])
    assert "data_path: dataset 'digits' ships inside its package" in err and not (tmp_path / "run").exists()


# ------------------------------------------------------------------- the run keeps its data

def test_a_folder_run_records_its_data_and_every_command_reads_it_again(tmp_path, capsys):
    data, run = make_folder(tmp_path / "data"), tmp_path / "run"
    assert cli.main(["train", str(run), "--dataset", "imagefolder", "--data-path", str(data), *FAST]) == 0
    record = json.loads((run / "data.json").read_text())
    assert record["classes"] == list(CLASSES) and record["input_shape"] == [1, 5, 6] and record["num_classes"] == 3
    assert record["source"]["dataset"] == "imagefolder" and len(record["normalization"]["mean"]) == 1
    assert record["fingerprint"] == fingerprint(load_image_folder(data))
    capsys.readouterr()

    assert cli.main(["eval", str(run)]) == 0
    switch, mnn = (float(line.rsplit(" ", 1)[1]) for line in capsys.readouterr().out.splitlines())
    assert 0 <= switch <= 1 and 0 <= mnn <= 1
    # A sweep grid on the run trains on the run's data (it once trained digits here, silently).
    out = tmp_path / "sweep"
    assert cli.main(["sweep", str(run), "--dataset-thresholds", "0.2", "--test-thresholds", "0.5",
                     "--out", str(out)]) == 0
    nested = json.loads((run / "dataset_threshold_0.20" / "data.json").read_text())
    assert nested["fingerprint"] == record["fingerprint"]
    capsys.readouterr()
    # The same data moved elsewhere is accepted; changed data is refused.
    moved = data.rename(tmp_path / "moved")
    assert cli.main(["eval", str(run), "--dataset", "imagefolder", "--data-path", str(moved)]) == 0
    capsys.readouterr()
    Image.fromarray(np.full((5, 6), 7, np.uint8)).save(moved / "test" / "cat" / "000.png")
    err = one_line_error(capsys, ["eval", str(run), "--dataset", "imagefolder", "--data-path", str(moved)])
    assert "was trained on imagefolder 'data'" in err and "not on the data given" in err


def test_sweep_refuses_options_that_contradict_the_run(tmp_path, capsys):
    path, run = save_npz(tmp_path / "d.npz", **make_arrays()), tmp_path / "run"
    assert cli.main(["train", str(run), "--dataset", "arrays", "--data-path", str(path), *FAST]) == 0
    capsys.readouterr()
    err = one_line_error(capsys, ["sweep", str(run), "--dataset", "digits", "--out", str(tmp_path / "o")])
    assert "--dataset 'digits' (the run has 'arrays')" in err


def test_load_mnn_reads_no_data(tmp_path, monkeypatch):
    path, run = save_npz(tmp_path / "d.npz", **make_arrays()), tmp_path / "run"
    train(TrainConfig(dataset="arrays", data_path=str(path), model="mlp", switch_epochs=1, specialist_epochs=1), run)
    import mnn_fast.training.data as data_module

    monkeypatch.setattr(data_module, "load_dataset", lambda *a, **k: pytest.fail("load_mnn decoded the data"))
    mnn = load_mnn(run).eval()
    assert len(mnn.specialists) == 4
    with torch.no_grad():
        assert mnn(torch.randn(3, 7)).shape == (3, 4)


def test_a_run_on_python_tensors_is_never_scored_on_other_data(tmp_path, capsys):
    own = Splits.from_arrays(**make_arrays(), name="mine")
    run = tmp_path / "run"
    # The config says digits (its default); the data handed over is what the run records.
    train(TrainConfig(model="mlp", switch_epochs=1, specialist_epochs=1), run, splits=own)
    assert json.loads((run / "data.json").read_text())["source"] is None
    err = one_line_error(capsys, ["eval", str(run)])
    assert "handed over from Python" in err
    err = one_line_error(capsys, ["sweep", str(run), "--dataset-thresholds", "0.2", "--out", str(tmp_path / "o")])
    assert "handed over from Python" in err and not (run / "dataset_threshold_0.20").exists()
    assert load_mnn(run, splits=own) is not None
    other = Splits.from_arrays(**make_arrays(seed=1), name="other")
    with pytest.raises(ValueError, match="not on the data given"):
        load_mnn(run, splits=other)
    # The same arrays saved to a file and named on the command line are accepted.
    path = save_npz(tmp_path / "mine.npz", **make_arrays())
    assert cli.main(["eval", str(run), "--dataset", "arrays", "--data-path", str(path)]) == 0


def test_resuming_with_other_data_is_refused(tmp_path):
    cfg = TrainConfig(model="mlp", switch_epochs=1, specialist_epochs=1)
    train(cfg, tmp_path / "run", splits=Splits.from_arrays(**make_arrays()))
    with pytest.raises(ValueError, match="not on the data given"):
        train(cfg, tmp_path / "run", splits=Splits.from_arrays(**make_arrays(seed=3)))


def test_baselines_take_your_own_data(tmp_path):
    from mnn_fast.training.baselines import run_baselines

    own = Splits.from_arrays(**make_arrays(), name="mine")
    cfg = TrainConfig(model="mlp", switch_epochs=1, specialist_epochs=1)
    result = run_baselines(cfg, tmp_path / "bl", seeds=[0], losses=["ce"], splits=own, verbose=False)
    assert {r["row"] for r in result["rows"]} >= {"switch", "switch_compute_matched"}
    runs = sorted((tmp_path / "bl" / "runs").glob("*/data.json"))
    assert runs and all(json.loads(p.read_text())["fingerprint"] == fingerprint(own) for p in runs)


def test_a_fingerprint_is_hashed_once_and_follows_every_change(monkeypatch):
    import mnn_fast.training.owndata as owndata

    s = Splits.from_arrays(**make_arrays())
    first = fingerprint(s)
    hashed = []
    real_sha256 = owndata.hashlib.sha256
    monkeypatch.setattr(owndata.hashlib, "sha256", lambda *a: hashed.append(1) or real_sha256(*a))
    assert fingerprint(s) == first and not hashed  # read, train and load check one object: one hash
    s.test_x[0, 0] += 1  # an in-place write bumps the tensor's version
    changed = fingerprint(s)
    assert changed != first and hashed
    s.train_y = s.train_y.clone()  # a new tensor object, equal bytes
    assert fingerprint(s) == changed and len(hashed) == 2


def test_an_npz_that_is_no_zip_archive_is_refused_in_one_line(tmp_path):
    # a pickle or any other file: np.load would try to unpickle it, which read_npz never lets it do
    path = tmp_path / "data.npz"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match=r"^data_path: .*data.npz' is not a readable .npz \(not a zip archive"):
        load_arrays(path)
