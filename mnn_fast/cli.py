"""The ``mnn-fast`` command: train, sweep, baselines, eval, predict, bench, groups, nsn, nsn-sweep, ghn, export and demo.

Every sub-command's parser is here except ``ghn``'s, which its subpackage adds (``mnn_fast.ghn.cli``).

``mnn-fast train`` runs the resumable pipeline into a run directory (``--expert 3`` trains one
specialist, for job arrays); ``sweep`` writes CSV + PNG figures over thresholds without retraining;
``baselines`` sets the MNN against its switch and a compute-matched switch over seeds; ``eval``
reports accuracy at one test threshold; ``predict`` writes every sample's log-probabilities as CSV,
expert-parallel over ``--nproc`` processes; ``bench`` times the routing core against the
naive loop; ``groups`` learns label groups from confusions and compares auxiliary heads on them
with controls; ``ghn`` trains a graph hypernetwork and compares its predicted parameters with random
initialisation; ``demo`` is the short load_digits demonstration (``make demo``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="digits",
                   help="digits and mnist5k ship with their packages; cifar10, imagefolder (your images) and "
                        "arrays (your .npz) read --data-path")
    p.add_argument("--data-path", default=None,
                   help="imagefolder: a directory with train/<class>/ and test/<class>/ images; arrays: an .npz with "
                        "x_train, y_train, x_test, y_test; cifar10: a directory with train.tar.gz/test.tar.gz, "
                        "cifar-10-batches-py, or train/ and test/ image folders")
    p.add_argument("--cache-dir", default=None, help="where decoded CIFAR-10 pixels are cached (default ~/.cache/mnn_fast)")


def _run_dir(text: str) -> str:
    """argparse type of a run-directory argument: an empty one would put the run in the working
    directory (``Path("")`` is ``.``)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a non-empty directory path, got ''")
    return text


def _config(args):
    """The checked :class:`TrainConfig` of the training arguments (one-line errors naming the field)."""
    from .training.config import TrainConfig

    try:
        groups = json.loads(args.groups) if getattr(args, "groups", None) else None
    except json.JSONDecodeError as exc:
        raise ValueError(f"groups: not valid JSON ({exc}); expected e.g. \"[[0,1],[2]]\"") from None
    return TrainConfig(
        dataset=args.dataset, data_path=args.data_path, model=args.model, switch_epochs=args.switch_epochs,
        specialist_epochs=args.specialist_epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
        dataset_threshold=args.dataset_threshold, groups=groups, seed=args.seed, augment=args.augment,
        pretrained=args.pretrained, cache_dir=args.cache_dir, normalization=args.normalization,
        specialist_nsn=args.specialist_nsn, specialist_threads=args.specialist_threads,
        specialist_loss=args.specialist_loss, train_fraction=args.train_fraction,
        specialist_model=args.specialist_model, specialist_init=args.specialist_init, ghn_steps=args.ghn_steps,
    ).check()


def cmd_train(args) -> None:
    from .training.pipeline import train

    options = {}
    if args.launcher == "ray":
        options["address"] = args.ray_address
    elif args.launcher == "slurm":
        options = dict(cluster=args.slurm_cluster, partition=args.slurm_partition, timeout_min=args.slurm_timeout_min)
    run = train(_config(args), args.run_dir, experts=args.expert, workers=args.workers, launcher=args.launcher,
                launcher_options=options)
    print(f"run directory: {run.root}")


def cmd_baselines(args) -> None:
    """Per seed: the switch, the MNN with each specialist loss, and the switch trained for as many
    sample passes as the switch and all specialists together; test accuracy, mean ± std."""
    from .training.baselines import run_baselines

    cfg = _config(args)
    models = args.specialist_models or [cfg.specialist_architecture]
    # Starting from the switch's weights needs the switch's architecture: that pairing is skipped.
    starts = [(m, i) for m in models for i in (args.specialist_inits or [cfg.specialist_init])
              if i != "switch" or m == cfg.model]
    if not starts:
        raise ValueError(f"specialist_inits: 'switch' needs the switch's architecture {cfg.model!r} among "
                         f"specialist_models {models}; add 'ghn' or 'random'")
    run_baselines(cfg, args.out, args.seeds, args.specialist_losses, args.test_threshold, starts=starts)


def cmd_eval(args) -> None:
    """Switch-only and MNN test accuracy of a trained run, on the data the run records (or on the
    data given, which must be the same: a moved folder or file)."""
    from .training.loop import accuracy
    from .training.pipeline import load_mnn, run_data

    splits = run_data(args.run_dir, dataset=args.dataset, data_path=args.data_path, cache_dir=args.cache_dir)
    mnn = load_mnn(args.run_dir, args.test_threshold, splits=splits)
    print(f"switch alone: {accuracy(mnn.switch, splits.test_x, splits.test_y):.4f}")
    print(f"MNN at test threshold {args.test_threshold}: {accuracy(mnn, splits.test_x, splits.test_y):.4f}")


def cmd_predict(args) -> None:
    """Every sample's predicted class and every class's log-probability, as CSV (exact floats). With
    --nproc N the run is loaded expert-parallel over N local processes, each reading only its own
    specialists; the file is byte-identical for every N. Under torchrun each process is one rank."""
    from .distributed.prediction import predict

    out = predict(args.run_dir, args.data, args.nproc, out=args.out, batch_size=args.batch_size,
                  threshold=args.threshold, device=args.device, cache_dir=args.cache_dir)
    if out is not None:
        print(f"written: {out}")


def _refuse_conflicting_options(args, saved, command: str) -> None:
    """A training option given on the command line that contradicts the run's saved config is an
    error, not silently ignored: the command works on the run as it was trained."""
    import dataclasses

    parser = _sub_parser(command)
    given = {parser._option_string_actions[word.split("=", 1)[0]].dest for word in getattr(args, "argv", ())
             if word.split("=", 1)[0] in parser._option_string_actions}
    fields = {f.name for f in dataclasses.fields(saved)} & given
    if not fields:
        return
    wanted = _config(args)
    differ = sorted(f for f in fields if getattr(wanted, f) != getattr(saved, f))
    if differ:
        shown = ", ".join(f"--{f.replace('_', '-')} {getattr(wanted, f)!r} (the run has {getattr(saved, f)!r})"
                          for f in differ)
        raise ValueError(f"{shown}: {command} works on {args.run_dir} as it was trained; drop the option or use "
                         "a new run directory")


def _sub_parser(command: str) -> argparse.ArgumentParser:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def cmd_sweep(args) -> None:
    from .reporting import plot_heatmap, plot_lines, write_csv
    from .training.config import TrainConfig
    from .training.loop import accuracy
    from .training.pipeline import data_splits, load_mnn, run_data, train
    from .training.sweep import DEFAULT_TEST_THRESHOLDS, sweep_test_thresholds

    out = Path(args.out)
    saved = Path(args.run_dir) / "config.json"
    if saved.exists():  # a trained run: its config and its data, never the command line's defaults
        base = TrainConfig.load(saved)
        _refuse_conflicting_options(args, base, "sweep")
        splits = run_data(args.run_dir)
    else:
        base = _config(args)
        splits = data_splits(base)
    rows = []
    dataset_thresholds = args.dataset_thresholds or [base.dataset_threshold]
    for d in dataset_thresholds:
        cfg = TrainConfig.from_dict({**base.identity(), "dataset_threshold": d, "cache_dir": base.cache_dir},
                                    "--dataset-thresholds")
        run_dir = Path(args.run_dir) / f"dataset_threshold_{d:.2f}" if args.dataset_thresholds else Path(args.run_dir)
        # Trains what is missing; a file that is there but fails verification is refused, not redone.
        train(cfg, run_dir, splits=splits, repair=False)
        mnn = load_mnn(run_dir, splits=splits)
        for row in sweep_test_thresholds(mnn, splits.test_x, splits.test_y, args.test_thresholds or DEFAULT_TEST_THRESHOLDS):
            rows.append({"dataset_threshold": d, **row})
    switch_acc = accuracy(mnn.switch, splits.test_x, splits.test_y)
    write_csv(out / "sweep.csv", rows)
    plot_lines(out / "sweep_lines.png", rows, switch_acc)
    if len(dataset_thresholds) > 1:
        plot_heatmap(out / "sweep_heatmap.png", rows, switch_acc)
    best = max(rows, key=lambda r: r["accuracy"])
    print(f"switch alone: {switch_acc:.4f}")
    print(f"best MNN: {best['accuracy']:.4f} at dataset threshold {best['dataset_threshold']}, test threshold {best['test_threshold']}")
    print(f"written: {out / 'sweep.csv'} and figures in {out}")


def cmd_bench(args) -> None:
    from .engine.backends import backend_status
    from .benchmark import best_time, engine_core, make_workload, naive_core

    cases = [(256, 100, 64), (4096, 100, 64), (4096, 1000, 64), (4096, 10, 3072)] if args.quick else [
        (b, e, w) for b in (256, 4096, 65536) for e in (10, 100, 1000) for w in (64, 3072)]
    impls = ["torch"] + (["cpp"] if backend_status("cpu")["cpp"] is None else [])
    rows = []
    print(f"{'B':>6} {'E':>5} {'W':>5} {'naive ms':>9} " + " ".join(f"{i + ' ms':>9} {i + ' x':>8}" for i in impls))
    for case in cases:
        w = make_workload(*case)
        row = {"B": case[0], "E": case[1], "W": case[2], "naive_s": best_time(naive_core, w)}
        for impl in impls:
            row[f"{impl}_s"] = best_time(engine_core(impl), w)
            row[f"{impl}_speedup"] = row["naive_s"] / row[f"{impl}_s"]
        rows.append(row)
        print(f"{case[0]:>6} {case[1]:>5} {case[2]:>5} {row['naive_s']*1e3:>9.3f} "
              + " ".join(f"{row[i + '_s']*1e3:>9.3f} {row[i + '_speedup']:>7.1f}x" for i in impls))
    if args.json:
        from .io import atomic_write

        atomic_write(args.json, json.dumps(rows, indent=1).encode())
        print(f"written: {args.json}")


def cmd_nsn(args) -> None:
    from .nsn.experiment import run_nsn_experiment

    run_nsn_experiment(args.dataset, args.out, args.seeds, depth=args.depth, epochs=args.epochs, lr=args.lr,
                       threads=args.threads)
    print(f"\nwritten: {args.out}/nsn.csv, nsn.png, nsn.json")


def cmd_nsn_sweep(args) -> None:
    from .nsn.sweep import run_depth_sweep

    run_depth_sweep(args.dataset, args.out, seed=args.seed, switch_epochs=args.switch_epochs,
                    specialist_epochs=args.specialist_epochs, cutoffs=args.cutoffs)
    print(f"\nwritten: {args.out}/nsn_sweep.csv, nsn_sweep.png, nsn_sweep.json")


def cmd_export(args) -> None:
    """Writes the trained MNN of a run (or bundle) as one AOTInductor package (.pt2) with a dynamic
    batch, for mnn_fast.load_exported or C++ (examples/cpp). Tracing and compiling take minutes for a
    large model; phase lines go to stderr."""
    import time

    from .serving import export_run

    started = time.perf_counter()
    export_run(args.run_dir, args.out, max_batch=args.max_batch, test_threshold=args.test_threshold,
               progress=lambda line: print(f"mnn-fast export: {line}", file=sys.stderr, flush=True))
    print(f"written: {args.out} (export took {time.perf_counter() - started:.1f} s)")


def _add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="a trained MNN as an AOTInductor package (.pt2) for Python or C++ serving",
                       description=cmd_export.__doc__)
    p.add_argument("run_dir", type=_run_dir, help="a trained run directory (or a bundle directory)")
    p.add_argument("--out", required=True, help="the package to write (a .pt2 file)")
    # The literal is mnn_fast.serving.DEFAULT_MAX_BATCH (importing it here would import torch for --help).
    p.add_argument("--max-batch", type=int, default=1024, help="the largest batch the package takes")
    p.add_argument("--test-threshold", type=float, default=0.25,
                   help="a specialist runs on samples whose score exceeds this (runs; a bundle keeps its own)")
    p.set_defaults(func=cmd_export)


def cmd_demo(args) -> None:
    from .demo import main

    main(args.out, seed=args.seed)


def _add_groups_parser(subparsers) -> argparse.ArgumentParser:
    from .groups.heads import DEFAULT_HEAD_HIDDEN

    p = subparsers.add_parser("groups", help="label groups from confusions: auxiliary heads vs controls",
                              description="Do label groups learned from confusions help? Heads on groups vs controls.")
    p.add_argument("--dataset", default="digits",
                   help="digits and mnist5k ship with their packages; cifar10, imagefolder and arrays read --data-path")
    p.add_argument("--data-path", default=None, help="the data set's directory (cifar10, imagefolder) or .npz (arrays)")
    p.add_argument("--cache-dir", default=None, help="where decoded CIFAR-10 pixels are cached")
    p.add_argument("--model", default="small_cnn", help="mlp, small_cnn, resnet20, resnet56 or mobilenet_v2")
    p.add_argument("--pretrained", default=None, help="CIFAR ResNet checkpoint (.th) for the base (no training unless --base-epochs)")
    p.add_argument("--num-groups", type=int, default=3, help="label groups to learn from the confusions")
    p.add_argument("--k", type=int, default=2, help="top-k predictions counted as confusions / co-detections")
    p.add_argument("--epochs", type=int, default=10, help="epochs for the heads (and the base, unless --base-epochs)")
    p.add_argument("--base-epochs", type=int, default=None, help="epochs for the base (default: --epochs; 0 with --pretrained)")
    p.add_argument("--head-hidden", type=int, default=DEFAULT_HEAD_HIDDEN, help="hidden units per group head")
    p.add_argument("--head-depth", type=int, default=1, help="hidden layers per group head")
    p.add_argument("--batch-size", type=int, default=64, help="training mini-batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="the optimiser")
    p.add_argument("--with-mnn", action="store_true", help="also train MNNs with group and per-class specialists (slower)")
    p.add_argument("--dataset-threshold", type=float, default=0.1, help="MNN: specialist training-set threshold")
    p.add_argument("--test-threshold", type=float, default=0.25, help="MNN: test threshold")
    p.add_argument("--out", default="groups_out", help="where the tables, figures and JSON go")
    p.add_argument("--seed", type=int, default=0, help="seeds every initialisation, split and batch order")
    p.set_defaults(func=cmd_groups)
    return p


def cmd_groups(args) -> None:
    from .groups.report import run_groups_report

    run_groups_report(args.dataset, args.data_path, args.model, args.pretrained, args.num_groups, args.out,
                      k=args.k, epochs=args.epochs, base_epochs=args.base_epochs, head_hidden=args.head_hidden,
                      head_depth=args.head_depth, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                      with_mnn=args.with_mnn, dataset_threshold=args.dataset_threshold,
                      test_threshold=args.test_threshold, seed=args.seed, cache_dir=args.cache_dir)


class _Parser(argparse.ArgumentParser):
    """Every sub-command's help shows each option's default beside its text."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def version_text() -> str:
    """``mnn-fast --version``: the package, torch and Python versions, and which backends can run here
    (with the reason for each that cannot)."""
    import platform

    import torch

    from . import __version__
    from .engine.backends import backend_status

    lines = [f"mnn-fast {__version__} (torch {torch.__version__}, Python {platform.python_version()})"]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        status = backend_status(device)
        usable = [name for name, reason in status.items() if reason is None]
        lines.append(f"backends on {device}: {', '.join(usable) or 'none'}")
        lines += [f"  {name}: unavailable ({reason})" for name, reason in status.items()
                  if reason is not None and not (device == "cpu" and name == "cuda")]
        if device == "cpu" and status["cpp"] is None:
            lines += _cpu_isa_lines()
    if not torch.cuda.is_available():
        lines.append("cuda: no CUDA device visible to torch")
    return "\n".join(lines)


def _cpu_isa_lines() -> list[str]:
    """The cpp backend's SIMD instruction set in use, and why each better one is not."""
    from .engine.isa import cpu_isa, cpu_isa_status

    status = cpu_isa_status()
    note = status.pop("MNN_FAST_CPU_ISA", None)
    lines = [f"  cpp row kernels: {cpu_isa()} (of {', '.join(n for n, r in status.items() if r is None)})"]
    lines += [f"    {name}: unavailable ({reason})" for name, reason in status.items() if reason is not None]
    return lines + ([f"    {note}"] if note else [])


class _VersionAction(argparse.Action):
    # argparse's own "version" action formats its string when the parser is built; this one imports
    # torch only when --version is asked for, so `--help` stays fast.
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mnn-fast", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=_VersionAction,
                        help="print the version, torch's version and the backends usable here, then exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def training_args(p):
        _add_data_args(p)
        p.add_argument("--model", default="small_cnn", help="mlp, nsn_mlp, small_cnn, resnet20, resnet56 or mobilenet_v2")
        p.add_argument("--switch-epochs", type=int, default=10, help="epochs of the switch's training")
        p.add_argument("--specialist-epochs", type=int, default=5, help="epochs of each specialist's training")
        p.add_argument("--batch-size", type=int, default=64, help="training mini-batch size")
        p.add_argument("--lr", type=float, default=1e-3, help="learning rate (switch and specialists)")
        p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="the optimiser")
        p.add_argument("--dataset-threshold", type=float, default=0.1, help="a specialist trains on samples whose score exceeds this")
        p.add_argument("--groups", default=None, help='JSON list of class lists, one per specialist, e.g. "[[0,1],[2]]"')
        p.add_argument("--seed", type=int, default=0,
                       help="seeds every initialisation, split and batch order (same seed, same bytes)")
        p.add_argument("--augment", action="store_true", help="random crop + flip (CIFAR)")
        p.add_argument("--pretrained", default=None, help="CIFAR ResNet checkpoint (.th) to start the switch from")
        p.add_argument("--specialist-threads", type=int, default=1,
                       help="intra-op threads per training specialist (part of the config: it fixes the bits)")
        p.add_argument("--specialist-nsn", action="store_true",
                       help="train specialists as networks with sub-networks (needs --model nsn_mlp)")
        p.add_argument("--normalization", choices=["auto", "cifar", "imagenet"], default="auto",
                       help="CIFAR-10 input statistics; auto = imagenet with --pretrained (what those weights expect)")
        p.add_argument("--specialist-loss", choices=["ce", "binary"], default="ce",
                       help="ce: cross-entropy over all classes; binary: the original MNN code's binary cross-entropy "
                            "of the softmax mass on the specialist's classes")
        p.add_argument("--train-fraction", type=float, default=1.0,
                       help="keep this stratified fraction of the training split (quick experiments)")
        p.add_argument("--specialist-model", default=None,
                       help="the specialists' architecture (default: the switch's --model); another one needs "
                            "--specialist-init ghn or random")
        p.add_argument("--specialist-init", choices=["switch", "ghn", "random"], default="switch",
                       help="switch: the trained switch's weights (the paper); ghn: parameters a graph hypernetwork, "
                            "trained by the run on random small CNNs, predicts for the specialist architecture; "
                            "random: the architecture's own random init")
        p.add_argument("--ghn-steps", type=int, default=700, help="with --specialist-init ghn: GHN training steps")

    p = sub.add_parser("train", help="train the switch and specialists (resumable)", description=cmd_train.__doc__)
    p.add_argument("run_dir", type=_run_dir, help="the run directory: created, or resumed where it holds this config")
    training_args(p)
    p.add_argument("--expert", type=int, action="append", help="train only this specialist (repeatable; for job arrays)")
    p.add_argument("--workers", type=int, default=1,
                   help="train the specialists in this many worker processes (files byte-identical to --workers 1)")
    p.add_argument("--launcher", choices=["local", "ray", "slurm"], default="local",
                   help="local: worker processes on this machine; ray: Ray tasks (pip install 'mnn_fast[ray]'); "
                        "slurm: one job array through submitit (pip install 'mnn_fast[slurm]'), --workers caps it")
    p.add_argument("--ray-address", default="local",
                   help="with --launcher ray: 'local' (an embedded cluster on this machine, --workers CPUs) or a "
                        "cluster address ('auto', 'ray://head:10001')")
    p.add_argument("--slurm-cluster", choices=["slurm", "local"], default=None,
                   help="with --launcher slurm: submitit's executor (default: Slurm where sbatch exists, else local)")
    p.add_argument("--slurm-partition", default=None, help="with --launcher slurm: the Slurm partition")
    p.add_argument("--slurm-timeout-min", type=int, default=240, help="with --launcher slurm: minutes per array task")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="accuracy over dataset x test thresholds: CSV and PNG figures")
    p.add_argument("run_dir", type=_run_dir, help="a trained run directory (with --dataset-thresholds: one run per value inside it)")
    training_args(p)
    p.add_argument("--dataset-thresholds", type=float, nargs="*", default=None, help="train one set of specialists per value (grid)")
    p.add_argument("--test-thresholds", type=float, nargs="*", default=None, help="default: 0.00, 0.05, ..., 1.00")
    p.add_argument("--out", default="sweep_out", help="where sweep.csv and the figures go")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("baselines", help="MNN vs its switch vs a compute-matched switch over seeds (CSV, table, figure)",
                       description=cmd_baselines.__doc__)
    training_args(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one switch and its MNNs per seed")
    p.add_argument("--specialist-losses", nargs="+", choices=["ce", "binary"], default=["ce", "binary"],
                   help="one MNN row per specialist loss")
    p.add_argument("--specialist-models", nargs="+", default=None,
                   help="one MNN row per specialist architecture x --specialist-inits (default: --specialist-model)")
    p.add_argument("--specialist-inits", nargs="+", choices=["switch", "ghn", "random"], default=None,
                   help="one MNN row per init (default: --specialist-init); 'switch' only for the switch's architecture")
    p.add_argument("--test-threshold", type=float, default=0.25, help="the MNNs' test threshold")
    p.add_argument("--out", default="baselines_out", help="runs/ (resumable) and baselines.{csv,md,png,json} go here")
    p.set_defaults(func=cmd_baselines)

    p = sub.add_parser("eval", help="switch-only and MNN accuracy of a trained run at one test threshold",
                       description=cmd_eval.__doc__)
    p.add_argument("run_dir", type=_run_dir, help="a trained run directory")
    p.add_argument("--dataset", default=None,
                   help="read the data from here instead of the run's record (it must be the same data)")
    p.add_argument("--data-path", default=None, help="with --dataset: where that data is")
    p.add_argument("--cache-dir", default=None, help="where decoded CIFAR-10 pixels are cached")
    p.add_argument("--test-threshold", type=float, default=0.25,
                   help="a specialist runs on samples whose score exceeds this")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="a trained run's predictions and log-probabilities as CSV (expert-parallel "
                       "with --nproc)", description=cmd_predict.__doc__)
    p.add_argument("run_dir", type=_run_dir, help="a trained run directory")
    p.add_argument("--out", default="predictions.csv", help="the CSV: index, prediction, log_prob_0 ... log_prob_{C-1}")
    p.add_argument("--data", default=None,
                   help="default: the run's test split; an .npz with x (or x_test), used as given; or an image folder "
                        "(images in DIR/test/<class>/, else in DIR/<class>/ and DIR), normalised as the run's data was")
    p.add_argument("--nproc", type=int, default=1, help="local processes, each holding 1/N of the specialists")
    p.add_argument("--batch-size", type=int, default=256, help="rows per chunk (each chunk is one forward)")
    p.add_argument("--threshold", type=float, default=0.25, help="the test threshold")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cpu (gloo) or cuda (nccl, untested)")
    p.add_argument("--cache-dir", default=None, help="where decoded CIFAR-10 pixels are cached")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("bench", help="routing core: engine vs naive loop on the same inputs")
    p.add_argument("--quick", action="store_true", help="four shapes, well under a minute")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.set_defaults(func=cmd_bench)

    _add_groups_parser(sub)

    p = sub.add_parser("nsn", help="networks with sub-networks: NSN vs separate models vs layers removed (CSV + figure)")
    p.add_argument("--dataset", default="digits", choices=["digits", "mnist5k"], help="an embedded data set")
    p.add_argument("--out", default="nsn_out", help="where nsn.csv, nsn.png and nsn.json go")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one model of each kind per seed")
    p.add_argument("--depth", type=int, default=2, help="hidden layers of the base (sub-models: depths 0..depth)")
    p.add_argument("--epochs", type=int, default=150, help="training epochs of every model")
    p.add_argument("--lr", type=float, default=0.3, help="SGD learning rate")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads while training (small MLPs: 1 is fastest)")
    p.set_defaults(func=cmd_nsn)

    p = sub.add_parser("nsn-sweep", help="detachable MNN: accuracy vs multiply-adds over depth x test threshold")
    p.add_argument("--dataset", default="digits", choices=["digits", "mnist5k"], help="an embedded data set")
    p.add_argument("--out", default="nsn_sweep_out", help="runs/ (resumable), nsn_sweep.csv, .png and .json go here")
    p.add_argument("--seed", type=int, default=0, help="seeds every initialisation, split and batch order")
    p.add_argument("--switch-epochs", type=int, default=15, help="epochs of the switch's training")
    p.add_argument("--specialist-epochs", type=int, default=10, help="epochs of each specialist's training")
    p.add_argument("--cutoffs", type=float, nargs="+", default=[0.9, 0.6],
                   help="per-sample budget rule: top score >= cutoffs[0] -> depth 0, >= cutoffs[1] -> depth 1, else full")
    p.set_defaults(func=cmd_nsn_sweep)

    from .ghn.cli import add_ghn_parser

    add_ghn_parser(sub)

    _add_export_parser(sub)

    p = sub.add_parser("demo", help="train, sweep, time and plot on the embedded load_digits (under 3 minutes)")
    p.add_argument("--out", default="runs/demo", help="where sweep.csv, the figures and demo.json go")
    p.add_argument("--seed", type=int, default=0, help="seeds every initialisation, split and batch order")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    """Runs one sub-command; bad input, unusable files and a busy run directory print one line
    (``mnn-fast COMMAND: error: ...``) and return 2 instead of a traceback. Ctrl-C prints one line
    saying what was kept and returns 130."""
    from .io import BusyError

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # which options were typed, not defaulted
    try:
        args.func(args)
    except (ValueError, TypeError, OSError, BusyError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"mnn-fast {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nmnn-fast {args.command}: interrupted; {_kept(args)}", file=sys.stderr)
        return 130
    return 0


def _kept(args) -> str:
    """What an interrupted command leaves behind. Every file is written whole or not at all (a
    temporary name, then a rename), and the locks go with the process."""
    where = getattr(args, "run_dir", None) if args.command in ("train", "sweep") else getattr(args, "out", None)
    if args.command in ("train", "sweep", "baselines", "nsn-sweep", "demo") and where:
        return f"the finished files in {where} are kept, and the same command resumes from them"
    return "nothing was left half-written"


if __name__ == "__main__":
    sys.exit(main())
