"""``mnn-fast groups``: do label groups learned from confusions help? Heads on groups vs controls.

Train (or load) a base on the training split less validation; learn groups on the held-out validation
split (confusions and co-detections, docs/experiments/label-groups.md); train auxiliary heads on each grouping and on a
random grouping of the same sizes; report test accuracy and multiply-adds per grouping.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .. import io, reporting
from ..training.baselines import run_sample_passes, train_compute_matched_switch
from ..training.config import TrainConfig
from ..training.data import Splits, validation_split
from ..training.loop import accuracy, fit, predict_probs
from ..training.models import load_pretrained_resnet
from ..training.pipeline import data_splits, initial_switch
from .confusion import codetection_matrix, confusion_matrix, similarity, spectral_groups
from .heads import DEFAULT_HEAD_HIDDEN, AuxHeadNet, base_features, count_macs, train_heads

__all__ = ["run_groups_report", "random_groups_like", "CSV_FIELDS"]

CSV_FIELDS = ("row", "test_accuracy", "macs", "overhead_pct", "num_groups", "experts_per_sample", "groups")


def random_groups_like(groups, num_classes: int, seed: int) -> list[list[int]]:
    """A random partition of ``range(num_classes)`` with the same group sizes as ``groups`` (in order),
    drawn from ``torch.Generator().manual_seed(seed)``; sorted like :func:`spectral_groups`' output.
    The control that separates "these groups" from "any groups of these sizes"."""
    sizes = [len(g) for g in groups]
    if sum(sizes) != num_classes:
        raise ValueError(f"groups: sizes {sizes} do not add up to num_classes={num_classes}; expected a partition")
    perm = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()
    bounds = np.cumsum([0] + sizes)
    out = [sorted(perm[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return sorted(out, key=lambda g: g[0])


def _write_csv(path: Path, rows: list[dict]) -> None:
    reporting.save_csv(path, [{**{k: r.get(k, "") for k in CSV_FIELDS},
                        "groups": "" if r["groups"] is None else json.dumps(r["groups"])} for r in rows], CSV_FIELDS)


def _mnn_row(name, cfg: TrainConfig, base, splits: Splits, run_dir: Path, test_threshold: float,
             base_macs: int, shape) -> dict:
    """Train specialists (``cfg.groups``) around ``base`` as the switch; accuracy and mean MACs."""
    from ..training.sweep import sweep_test_thresholds
    from ..training.pipeline import load_mnn, train

    if run_dir.exists():
        shutil.rmtree(run_dir)  # this report's own scratch directory; a stale one would refuse the config
    # Both MNNs share the report's base as their switch (written and recorded as the run's switch).
    train(cfg, run_dir, splits=splits, switch=base)
    mnn = load_mnn(run_dir, test_threshold, splits=splits)
    (res,) = sweep_test_thresholds(mnn, splits.test_x, splits.test_y, [test_threshold])
    # Every specialist is a copy of the base: a sample costs the switch plus one base per active expert.
    macs = base_macs * (1 + res["experts_per_sample"])
    return {"row": name, "groups": [list(g) for g in mnn.groups], "test_accuracy": res["accuracy"], "macs": macs,
            "overhead_pct": 100.0 * (macs - base_macs) / base_macs, "num_groups": len(mnn.groups),
            "experts_per_sample": res["experts_per_sample"]}


def _compute_matched_row(name, cfg: TrainConfig, base_epochs: int, splits: Splits, run_dir: Path,
                         base_macs: int) -> dict:
    """The base trained, from the same start, for as many sample passes as the MNN of ``run_dir``
    (base epochs plus every specialist's): the reference at equal training compute."""
    passes = run_sample_passes(run_dir, splits.num_classes, switch_epochs=base_epochs)
    matched = train_compute_matched_switch(dataclasses.replace(cfg, switch_epochs=base_epochs), splits,
                                           passes["total"])
    return {"row": f"base_compute_matched_to_{name}", "groups": None,
            "test_accuracy": accuracy(matched, splits.test_x, splits.test_y), "macs": base_macs,
            "overhead_pct": 0.0, "num_groups": "", "experts_per_sample": 0.0, "train_sample_passes": passes["total"]}


def run_groups_report(dataset: str = "digits", data_path: str | None = None, model: str = "small_cnn",
                      pretrained: str | None = None, num_groups: int = 3, out_dir="groups_out", *, k: int = 2,
                      epochs: int = 10, base_epochs: int | None = None, head_hidden: int = DEFAULT_HEAD_HIDDEN,
                      head_depth: int = 1, batch_size: int = 64, lr: float = 1e-3, optimizer: str = "adam",
                      with_mnn: bool = False, dataset_threshold: float = 0.1, test_threshold: float = 0.25,
                      seed: int = 0, cache_dir: str | None = None, splits: Splits | None = None,
                      verbose: bool = True) -> dict:
    """Runs the controls and writes ``groups.csv``, ``groups.json`` and ``similarity.png`` in ``out_dir``.

    Rows: ``base``; ``classifier_refit`` (the classifier retrained as the heads' classifier is, no
    heads: what the extra training alone buys); ``heads_confusion`` (heads on the confusion groups); ``heads_random`` (heads on a
    random partition with the same group sizes); ``heads_codetection``; with ``with_mnn`` also
    ``mnn_group_specialists`` (one specialist per confusion group) and ``mnn_class_specialists`` (one
    per class), both with the base as their switch, each followed by ``base_compute_matched_to_<row>``: the
    base trained for as many sample passes as that MNN (its base and specialists together). Each row: test accuracy, multiply-adds per sample
    (batch 1; for an MNN the mean over the test set) and overhead over the base in percent.

    Splits: the base trains on the training split less a 10% validation split (``seed``), the groups
    come from the base's predictions on that held-out validation split, heads train on the training
    split, accuracy is measured on the test split. ``base_epochs`` (default: ``epochs``, or 0 with
    ``pretrained``, i.e. no fine-tuning) trains the base; ``epochs`` trains heads and specialists.
    Returns ``{"rows", "groups", "similarity", "val_accuracy", "config", ...}``.
    """
    cfg = TrainConfig(dataset=dataset, data_path=data_path, model=model, switch_epochs=0, specialist_epochs=epochs,
                      batch_size=batch_size, lr=lr, optimizer=optimizer, dataset_threshold=dataset_threshold,
                      seed=seed, pretrained=pretrained, cache_dir=cache_dir).check()
    if base_epochs is None:
        base_epochs = 0 if pretrained else epochs
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = data_splits(cfg, splits)
    num_classes, shape = splits.num_classes, (1, *splits.input_shape)
    train_x, train_y, val_x, val_y = validation_split(splits.train_x, splits.train_y, cfg.val_fraction, seed)

    base = initial_switch(cfg, splits)  # the start the compute-matched rows train from too
    if pretrained:
        load_pretrained_resnet(base, pretrained)
    fit(base, train_x, train_y, base_epochs, cfg, seed, "base")
    base.eval()
    base_macs = count_macs(base, shape)
    val_probs = predict_probs(base, val_x)

    S, groups = _learn_groupings(val_probs, val_y, k, num_groups, num_classes, seed)
    heads = dict(hidden=head_hidden, depth=head_depth, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    rows = _head_rows(base, groups, train_x, train_y, splits, base_macs, shape, heads)
    if with_mnn:
        for name, g in (("mnn_group_specialists", groups["confusion"]), ("mnn_class_specialists", None)):
            run_cfg = dataclasses.replace(cfg, groups=g)
            rows.append(_mnn_row(name, run_cfg, base, splits, out / name, test_threshold, base_macs, shape))
            rows.append(_compute_matched_row(name, run_cfg, base_epochs, splits, out / name, base_macs))

    config = {"dataset": dataset, "model": model, "pretrained": pretrained, "num_groups": num_groups, "k": k,
              "epochs": epochs, "base_epochs": base_epochs, "head_hidden": head_hidden, "head_depth": head_depth,
              "batch_size": batch_size, "lr": lr, "optimizer": optimizer, "with_mnn": with_mnn,
              "dataset_threshold": dataset_threshold, "test_threshold": test_threshold, "seed": seed}
    result = {"config": config, "rows": rows, "groups": groups, "classes": list(splits.classes),
              "val_accuracy": accuracy(base, val_x, val_y),
              "similarity": {kind: s.tolist() for kind, s in S.items()}}
    _write(out, result, S, k, list(splits.classes) or None)
    if verbose:
        print(f"{dataset} / {model}: base validation accuracy {result['val_accuracy']:.4f}, "
              f"{num_groups} groups from top-{k} predictions on {len(val_y)} held-out samples\n")
        print(result["table"])
        print(f"\nwritten: {out / 'groups.csv'}, {out / 'groups.json'}, {out / 'similarity.png'}")
    return result


def _learn_groupings(val_probs: Tensor, val_y: Tensor, k: int, num_groups: int, num_classes: int, seed: int):
    """``(S, groups)``: similarities and groups from confusions and co-detections, plus a random
    grouping with the confusion groups' sizes (the control)."""
    S = {"confusion": similarity(confusion_matrix(val_probs, val_y, k)),
         "codetection": similarity(codetection_matrix(val_probs, k))}
    groups = {"confusion": spectral_groups(S["confusion"], num_groups, seed),
              "codetection": spectral_groups(S["codetection"], num_groups, seed)}
    groups["random"] = random_groups_like(groups["confusion"], num_classes, seed)
    return S, groups


def _head_rows(base, groups: dict, train_x: Tensor, train_y: Tensor, splits: Splits, base_macs: int, shape,
               heads: dict) -> list[dict]:
    """The base, the classifier-refit control and heads on each grouping, as report rows."""
    def row(name, net, groups_of_row, macs):
        return {"row": name, "groups": groups_of_row, "test_accuracy": accuracy(net, splits.test_x, splits.test_y),
                "macs": macs, "overhead_pct": 100.0 * (macs - base_macs) / base_macs,
                "num_groups": len(groups_of_row) if groups_of_row else "", "experts_per_sample": ""}

    train = dict(epochs=heads["epochs"], lr=heads["lr"], batch_size=heads["batch_size"], seed=heads["seed"])
    rows = [row("base", base, None, base_macs)]  # before any head trains
    refit = AuxHeadNet(base, groups["confusion"], hidden=heads["hidden"], depth=heads["depth"])
    feats = base_features(refit, train_x)  # one pass of the frozen base, shared by every row below
    train_heads(refit, train_x, train_y, classifier_only=True, features=feats, **train)
    rows.append(row("classifier_refit", refit, None, base_macs))
    for kind in ("confusion", "random", "codetection"):
        net = AuxHeadNet(base, groups[kind], hidden=heads["hidden"], depth=heads["depth"])
        train_heads(net, train_x, train_y, features=feats, **train)
        rows.append(row(f"heads_{kind}", net, groups[kind], count_macs(net, shape)))
    return rows


def _write(out: Path, result: dict, S: dict, k: int, class_names) -> None:
    """``groups.csv``, ``groups.json`` (what the CSV flattens, too) and ``similarity.png``; adds the table."""
    groups = result["groups"]
    _write_csv(out / "groups.csv", result["rows"])
    io.save_json(out / "groups.json", result)
    reporting.plot_similarity(out / "similarity.png", [
        (f"S = A^T A, top-{k} confusions, ordered by confusion groups", S["confusion"], groups["confusion"]),
        (f"S = A^T A, top-{k} co-detections, ordered by co-detection groups", S["codetection"], groups["codetection"])],
        class_names)
    result["table"] = reporting.groups_markdown_table(result["rows"])
