"""``mnn-fast``: every sub-command parses here; bad arguments are one line and exit 2, never a traceback."""
from __future__ import annotations

import csv
import json

import pytest

from mnn_fast import cli

TINY = ["--dataset", "digits", "--model", "mlp", "--switch-epochs", "1", "--specialist-epochs", "1"]


@pytest.mark.parametrize("command", ["train", "sweep", "eval", "predict", "bench", "groups", "demo"])
def test_every_sub_command_has_a_parser(command):
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0


@pytest.mark.parametrize("argv,message", [
    ([], "required"),  # no sub-command
    (["train"], "run_dir"),  # missing positional
    (["train", "r", "--seed", "abc"], "invalid int value"),
    (["train", "r", "--optimizer", "rmsprop"], "invalid choice"),
])
def test_argument_errors_exit_2_with_a_usage_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["train", "{run}", *TINY, "--groups", "[[0,"], "groups: not valid JSON"),
    (["train", "{run}", *TINY, "--dataset-threshold", "1.5"], "dataset_threshold"),
    (["eval", "{run}/missing"], "no such file"),
])
def test_value_errors_are_one_line_naming_the_field(argv, message, tmp_path, capsys):
    assert cli.main([a.format(run=tmp_path / "run") for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"mnn-fast {argv[0]}: error:") and message in err
    assert "Traceback" not in err


def test_train_eval_and_sweep_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", str(run), *TINY]) == 0
    assert sorted(p.name for p in (run / "specialists").iterdir()) == [f"expert_{e:04d}.safetensors" for e in range(10)]
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--test-threshold", "1.0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    switch, mnn = (float(line.rsplit(" ", 1)[1]) for line in lines)
    assert switch == mnn  # test threshold 1 activates nothing: the MNN is the switch alone
    out = tmp_path / "sweep"
    assert cli.main(["sweep", str(run), *TINY, "--test-thresholds", "0.1", "1.0", "--out", str(out)]) == 0
    with (out / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["test_threshold"]) for r in rows] == [0.1, 1.0]
    assert round(float(rows[1]["accuracy"]), 4) == switch  # eval prints 4 decimals
    assert float(rows[1]["experts_per_sample"]) == 0.0
    assert (out / "sweep_lines.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_quick_writes_rows_for_each_case(tmp_path, capsys, monkeypatch):
    from mnn_fast import benchmark

    # Tiny shapes: the command's plumbing, not its timings, is what is tested here.
    monkeypatch.setattr(benchmark, "best_time", lambda fn, w, *a, **k: (fn(w), 1e-3)[1])
    path = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert len(rows) == 4 and all(r["naive_s"] == 1e-3 and r["cpp_speedup"] == 1.0 for r in rows)


def _sub_parsers():
    import argparse

    action = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_the_sub_command_list_is_the_parser_s():
    # The parametrised tests below walk the parser itself, so a new sub-command is covered the day
    # it is added; this pins that the walk finds them all.
    assert {"train", "sweep", "baselines", "eval", "bench", "groups", "nsn", "nsn-sweep", "ghn", "demo"} <= set(_sub_parsers())


@pytest.mark.parametrize("command", sorted(_sub_parsers()))
def test_every_option_has_help_and_shows_its_default(command, capsys):
    import argparse

    parser = _sub_parsers()[command]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS, f"{command} {action.dest}: no help text"
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            assert f"(default: {action.default})" in shown, f"{command} {action.option_strings[0]}: default not shown"


def test_version_names_the_package_torch_and_the_backends(capsys):
    import torch

    import mnn_fast

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"mnn-fast {mnn_fast.__version__} (torch {torch.__version__}")
    usable = [name for name, reason in mnn_fast.backend_status("cpu").items() if reason is None]
    assert f"backends on cpu: {', '.join(usable)}" in out


def test_the_version_has_one_source():
    from importlib.metadata import version

    import mnn_fast
    from mnn_fast._version import __version__

    assert mnn_fast.__version__ == __version__ == version("mnn_fast")


@pytest.mark.parametrize("command", ["train", "eval", "sweep"])
def test_an_empty_run_directory_is_refused_and_nothing_is_written(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "", *(TINY if command != "eval" else [])])
    assert exit_.value.code == 2
    assert "argument run_dir: expected a non-empty directory path" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_empty_run_directory_is_refused_from_python_too(tmp_path, monkeypatch):
    from mnn_fast.training import TrainConfig, train

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="run_dir: expected a non-empty directory path"):
        train(TrainConfig(model="mlp", switch_epochs=1, specialist_epochs=1), "")
    assert list(tmp_path.iterdir()) == []


def test_groups_out_of_range_are_refused_before_anything_is_written(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", str(run), *TINY, "--groups", "[[0, 1], [12]]"]) == 2
    assert "12" in capsys.readouterr().err
    assert not run.exists()
    # The corrected command is a new run, not "a different run" in a directory the refusal left.
    assert cli.main(["train", str(run), *TINY, "--groups", "[[0, 1], [9]]"]) == 0
    assert sorted(p.name for p in (run / "specialists").iterdir()) == ["expert_0000.safetensors", "expert_0001.safetensors"]
