"""Run directories users can trust (issue 10): one run per directory, files tied to their config,
dtypes checked, resume that verifies what it skips, one-line config errors, the user's umask.

Tiny digits runs (MLP, one epoch each) so the file runs in well under a minute; only the race test
starts real ``mnn-fast train`` processes.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mnn_fast import cli, io
from mnn_fast.training.bundle import load_bundle, save_bundle
from mnn_fast.training.data import load_dataset
from mnn_fast.training.models import build_model
from mnn_fast.engine.module import MetaNeuralNetwork
from mnn_fast.reporting import write_csv
from mnn_fast.training import RunDir, TrainConfig, load_mnn, read_probs, train, write_probs

REPO = Path(__file__).resolve().parents[2]
TINY = ["--dataset", "digits", "--model", "mlp", "--switch-epochs", "1", "--specialist-epochs", "1"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def tiny(**kw):
    return TrainConfig(**{"model": "mlp", "switch_epochs": 1, "specialist_epochs": 1, **kw})


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs") / "a"
    train(tiny(), root, splits=digits)
    return root


@pytest.fixture
def run(trained, tmp_path):
    """A private copy of the trained run, free to damage."""
    return RunDir(shutil.copytree(trained, tmp_path / "run"))


def cli_error(capsys, *argv) -> str:
    """Runs ``mnn-fast argv`` in-process; asserts a one-line error and exit status 2; returns the line."""
    capsys.readouterr()
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# ----------------------------------------------------------------- 3. one run per directory

def test_two_train_processes_with_different_configs_one_is_refused(tmp_path):
    root = tmp_path / "race"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Enough switch epochs (~3 s) that the second process arrives while the first holds the lock.
    cmd = [sys.executable, "-m", "mnn_fast.cli", "train", str(root), *TINY]
    cmd[cmd.index("--switch-epochs") + 1] = "60"
    logs = [tmp_path / f"seed{seed}.err" for seed in (0, 1)]  # files, not pipes: tqdm fills a pipe
    procs = [subprocess.Popen(cmd + ["--seed", str(seed)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=log.open("w")) for seed, log in zip((0, 1), logs)]
    results = [(p.wait(timeout=300), log.read_text()) for p, log in zip(procs, logs)]
    assert sorted(rc == 0 for rc, _ in results) == [False, True], results
    (winner,) = [seed for seed, (rc, _) in enumerate(results) if rc == 0]
    rc, err = results[1 - winner]
    assert rc == 2 and "Traceback" not in err
    assert f"mnn-fast train: error: run directory {root} is in use" in err or f"run_dir {root} holds a different run" in err
    # Nothing of the refused run is in the directory: it loads whole, under the winner's seed.
    assert TrainConfig.load(root / "config.json").seed == winner
    load_mnn(root)
    assert not list(root.rglob("*.tmp"))


def test_a_held_lock_refuses_a_whole_run_but_lets_expert_jobs_share(digits, tmp_path, capsys):
    run = RunDir(tmp_path / "locked")
    with run.lock():
        with pytest.raises(io.BusyError, match=f"run directory {run.root} is in use .*{run.lock_path.name}"):
            train(tiny(), run.root, splits=digits)
        line = cli_error(capsys, "train", run.root, *TINY)
        assert str(run.root) in line and ".lock" in line
    with run.lock(shared=True):  # another --expert job of the same run
        train(tiny(), run.root, experts=[2], splits=digits)
        with pytest.raises(io.BusyError):
            train(tiny(), run.root, splits=digits)
    assert run.specialist(2).exists() and not run.specialist(1).exists()


def test_eval_refuses_a_file_written_under_another_config(digits, run, tmp_path, capsys):
    other = train(tiny(seed=1), tmp_path / "other", experts=[3], splits=digits)
    shutil.copy(other.specialist(3), run.specialist(3))
    line = cli_error(capsys, "eval", run.root)
    assert "expert_0003.safetensors: written under another config" in line
    # Even with the manifest rewritten to match the foreign bytes, the file's own config hash tells.
    manifest = json.loads(run.manifest.read_text())
    manifest["files"]["specialists/expert_0003.safetensors"] = json.loads(other.manifest.read_text())["files"][
        "specialists/expert_0003.safetensors"]
    run.manifest.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="expert_0003.safetensors: written under another config"):
        load_mnn(run.root, splits=digits)


# ----------------------------------------------------------------- 4. files tied to their config

def test_editing_groups_after_training_is_refused_by_eval_and_sweep(run, capsys, tmp_path):
    edit_json(run.config, groups=[[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]])
    for argv in (["eval", run.root], ["sweep", run.root, "--out", tmp_path / "out", "--test-thresholds", "0.2"]):
        line = cli_error(capsys, *argv)
        assert "config.json: differs from the config the files were trained under" in line and "['groups']" in line
    assert not (tmp_path / "out").exists()


def test_run_files_changed_after_training_are_refused(digits, run):
    tensors, meta = io.load_tensors(run.specialist(5))
    tensors = {k: v.clone() for k, v in tensors.items()}
    next(iter(tensors.values())).view(-1)[0] += 1  # same names, shapes, dtypes and metadata
    io.save_tensors(run.specialist(5), tensors, meta)
    with pytest.raises(ValueError, match=r"expert_0005.safetensors: sha256 .* differs .* manifest.json"):
        load_mnn(run.root, splits=digits)


@pytest.fixture
def bundle(tmp_path):
    torch.manual_seed(0)
    shape, groups = (1, 8, 8), [[0, 1], [2, 3, 4], [5], [6, 7, 8, 9]]
    mnn = MetaNeuralNetwork(build_model("mlp", 10, shape), [build_model("mlp", 10, shape) for _ in groups],
                            groups=groups, threshold=0.15, num_classes=10).eval()
    return save_bundle(tmp_path / "b", mnn, "mlp", "mlp", shape)


def resave_weights(path: Path, change) -> None:
    """Rewrites the bundle's weights through ``change(tensors)`` with a manifest that agrees, so only
    the structural checks can object."""
    tensors, meta = io.load_tensors(path / "weights.safetensors")
    change(tensors)
    io.save_tensors(path / "weights.safetensors", tensors, meta)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["weights.safetensors"] = {"sha256": io.sha256_file(path / "weights.safetensors"),
                                                "tensors": io.tensor_summary(tensors)}
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_bundle_with_groups_cut_to_three_is_refused(bundle):
    edit_json(bundle / "config.json", groups=[[0, 1], [2, 3, 4], [5, 6, 7, 8, 9]])
    with pytest.raises(ValueError, match="unexpected tensors .*specialists.3"):
        load_bundle(bundle)


def test_bundle_config_edits_and_changed_weights_are_refused(bundle):
    edit_json(bundle / "config.json", threshold=0.5)
    with pytest.raises(ValueError, match=r"config.json: differs from the config .*\['threshold'\]"):
        load_bundle(bundle)
    edit_json(bundle / "config.json", threshold=0.15)
    load_bundle(bundle)
    weights = bundle / "weights.safetensors"
    tensors, meta = io.load_tensors(weights)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1  # same names, shapes, dtypes and metadata: only the bytes differ
    io.save_tensors(weights, tensors, meta)
    with pytest.raises(ValueError, match=r"weights.safetensors: sha256 .* differs .* manifest.json"):
        load_bundle(bundle)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update(extra=torch.zeros(3)), r"unexpected tensors \['extra'\]"),
    (lambda t: t.pop(sorted(k for k in t if k.startswith("specialists.2."))[0]), "under 'specialists.2.' .*missing"),
])
def test_bundle_extra_or_missing_tensors_are_refused(bundle, change, message):
    resave_weights(bundle, change)
    with pytest.raises(ValueError, match=message):
        load_bundle(bundle)


# ----------------------------------------------------------------- 5. dtypes

@pytest.mark.parametrize("dtype", [torch.int8, torch.float16])
def test_a_switch_of_another_dtype_is_refused(digits, run, capsys, dtype):
    tensors, meta = io.load_tensors(run.switch)
    io.save_tensors(run.switch, {k: v.to(dtype) for k, v in tensors.items()}, meta)
    run.record(run.switch, io.load_tensors(run.switch)[0])  # the manifest agrees: only the dtype is wrong
    with pytest.raises(ValueError, match=f"switch.safetensors: does not match the architecture .*wrong dtype.*{dtype}"):
        io.load_state(build_model("mlp", 10, (1, 8, 8)), run.switch)
    assert "wrong dtype" in cli_error(capsys, "eval", run.root)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float16])
def test_a_bundle_of_another_dtype_is_refused(bundle, dtype):
    resave_weights(bundle, lambda t: t.update({k: v.to(dtype) for k, v in t.items() if k.startswith("specialists.1.")}))
    with pytest.raises(ValueError, match="under 'specialists.1.' .*wrong dtype"):
        load_bundle(bundle)


def test_load_state_refuses_shape_and_extra_tensors(tmp_path):
    model = build_model("mlp", 10, (1, 8, 8))
    state = model.state_dict()
    io.save_tensors(tmp_path / "extra.safetensors", {**state, "x": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected \['x'\]"):
        io.load_state(model, tmp_path / "extra.safetensors")
    k = next(iter(state))
    io.save_tensors(tmp_path / "shape.safetensors", {**state, k: state[k][:1]})
    with pytest.raises(ValueError, match="wrong shape"):
        io.load_state(model, tmp_path / "shape.safetensors")


# ----------------------------------------------------------------- 6. resume verifies what it skips

@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign"])
def test_resume_retrains_a_damaged_specialist(digits, run, tmp_path, caplog, damage):
    path = run.specialist(3)
    good = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x07" * 100)
    else:
        shutil.copy(train(tiny(seed=1), tmp_path / "other", experts=[3], splits=digits).specialist(3), path)
    untouched = run.specialist(4).stat().st_mtime_ns
    train(tiny(), run.root, splits=digits)
    assert "retraining expert 3" in caplog.text
    assert path.read_bytes() == good  # retrained deterministically: the same file again
    assert run.specialist(4).stat().st_mtime_ns == untouched  # verified, skipped
    load_mnn(run.root, splits=digits)


def _bad_probs(run, kind):
    (probs, labels), meta = read_probs(run.probs), io.load_tensors(run.probs)[1]
    if kind == "nan":
        probs = torch.full_like(probs, float("nan"))
    elif kind == "columns":
        probs = probs[:, :4]
    elif kind == "rows":
        probs, labels = probs[:-7], labels[:-7]
    if kind == "garbage":
        run.probs.write_bytes(b"not a safetensors file")
        return
    # Written with this run's hashes and recorded in the manifest: only the content is wrong.
    io.save_tensors(run.probs, {"probs": probs, "labels": labels}, meta)
    run.record(run.probs, {"probs": probs, "labels": labels})


@pytest.mark.parametrize("kind", ["nan", "columns", "rows", "garbage"])
def test_resume_recomputes_a_bad_probability_file(digits, run, caplog, kind):
    good = read_probs(run.probs)
    _bad_probs(run, kind)
    specialist = run.specialist(0).stat().st_mtime_ns
    train(tiny(), run.root, splits=digits)
    assert "recomputing the probabilities" in caplog.text
    probs, labels = read_probs(run.probs)
    assert torch.equal(probs, good[0]) and torch.equal(labels, good[1])
    assert run.specialist(0).stat().st_mtime_ns == specialist  # same switch: specialists stay valid


def test_read_probs_refuses_non_finite_values(tmp_path):
    write_probs(tmp_path / "p.safetensors", torch.full((5, 3), float("nan")), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="p.safetensors: probabilities must be finite"):
        read_probs(tmp_path / "p.safetensors")


def test_leftover_temporary_files_are_removed_when_a_run_starts(digits, run):
    leftovers = [run.root / ".switch.safetensors.k2j3h.tmp", run.specialist(2).parent / ".expert_0002.safetensors.x.tmp"]
    for p in leftovers:
        p.write_bytes(b"half a file")
    train(tiny(), run.root, experts=[0], splits=digits)
    assert not any(p.exists() for p in leftovers)


def test_a_given_switch_is_recorded_as_the_runs_own(digits, tmp_path):
    # How the groups report shares one base between runs: the run adopts it, hashes and all.
    torch.manual_seed(3)
    base = build_model("mlp", 10, (1, 8, 8)).eval()
    run = train(tiny(), tmp_path / "g", experts=[0], splits=digits, switch=base)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in io.load_tensors(run.switch)[0].items())
    train(tiny(), run.root, splits=digits, switch=base)  # resumes: the recorded switch verifies
    assert load_mnn(run.root, splits=digits).specialists[0] is not None
    with pytest.raises(ValueError, match="differs from the switch passed"):
        train(tiny(), run.root, splits=digits, switch=build_model("mlp", 10, (1, 8, 8)))


def test_sweep_refuses_rather_than_repairs(digits, run):
    run.specialist(6).write_bytes(b"junk")
    with pytest.raises(ValueError, match="expert_0006.safetensors: not a readable safetensors file"):
        train(tiny(), run.root, splits=digits, repair=False)


# ----------------------------------------------------------------- 7. one-line config errors

BAD_FIELDS = [
    ({"bogus": 1}, "unknown field"), ({"seed": "0"}, "seed"), ({"seed": 1.5}, "seed"), ({"seed": -1}, "seed"),
    ({"groups": "[[0, 1]]"}, "groups"), ({"groups": [[0, 0]]}, "groups"), ({"groups": [[]]}, "groups"),
    ({"dataset_threshold": "0.1"}, "dataset_threshold"), ({"dataset_threshold": 1.5}, "dataset_threshold"),
    ({"lr": 0}, "lr"), ({"lr": -1e-3}, "lr"), ({"lr": "fast"}, "lr"), ({"lr": True}, "lr"),
    ({"val_fraction": 0}, "val_fraction"), ({"val_fraction": 1.0}, "val_fraction"), ({"batch_size": 0}, "batch_size"),
    ({"switch_epochs": 2.0}, "switch_epochs"), ({"model": "nope"}, "model"), ({"dataset": 3}, "dataset"),
    ({"augment": "yes"}, "augment"), ({"optimizer": "lbfgs"}, "optimizer"), ({"data_path": 5}, "data_path"),
]


@pytest.mark.parametrize("change, field", BAD_FIELDS)
def test_eval_names_a_bad_config_field_in_one_line(run, capsys, change, field):
    edit_json(run.config, **change)
    line = cli_error(capsys, "eval", run.root)
    assert line.startswith(f"mnn-fast eval: error: {run.config}: ") and field in line
    with pytest.raises((TypeError, ValueError), match=field):
        TrainConfig.from_dict({**tiny().identity(), **change})


@pytest.mark.parametrize("argv, field", [
    (["--lr", "0"], "lr"), (["--lr", "-1"], "lr"), (["--lr", "nan"], "lr"), (["--groups", "abc"], "groups"),
    (["--groups", '"abc"'], "groups"), (["--groups", "[[0, 1], []]"], "groups"), (["--dataset-threshold", "2"], "dataset_threshold"),
    (["--seed", "-1"], "seed"), (["--model", "nope"], "model"), (["--dataset", "nope"], "dataset"), (["--batch-size", "0"], "batch_size"),
])
def test_train_names_a_bad_argument_in_one_line(tmp_path, capsys, argv, field):
    line = cli_error(capsys, "train", tmp_path / "r", *TINY, *argv)
    assert field in line
    assert not (tmp_path / "r").exists()  # refused before anything is written


@pytest.mark.parametrize("change, field", [({"num_classes": True}, "num_classes"), ({"num_classes": 1e9}, "num_classes"),
                                           ({"num_classes": "10"}, "num_classes"), ({"input_shape": "1x8x8"}, "input_shape"),
                                           ({"top_k": 0}, "top_k"), ({"threshold": "0.1"}, "threshold"), ({"extra": 1}, "unknown")])
def test_bundle_names_a_bad_config_field(bundle, change, field):
    edit_json(bundle / "config.json", **change)
    with pytest.raises((TypeError, ValueError), match=f"config.json: .*{field}"):
        load_bundle(bundle)


def test_a_bundle_with_a_huge_class_count_is_refused_without_allocating(bundle):
    edit_json(bundle / "config.json", num_classes=10**9)
    with pytest.raises(ValueError, match="wrong shape"):
        load_bundle(bundle)


# ----------------------------------------------------------------- 8. the user's umask, atomic outputs

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_follow_the_umask(digits, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        io.atomic_write(tmp_path / "f.bin", b"x")
        run = train(tiny(), tmp_path / "run", experts=[0], splits=digits)
        write_csv(tmp_path / "sweep.csv", [{"a": 1}])
    finally:
        os.umask(old)
    for p in [tmp_path / "f.bin", tmp_path / "sweep.csv", run.config, run.switch, run.probs, run.manifest, run.specialist(0)]:
        assert p.stat().st_mode & 0o777 == mode, p
