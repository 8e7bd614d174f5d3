"""``mnn-fast nsn-sweep``: a detachable MNN's accuracy against its compute, depth x test threshold.

Two runs of the training pipeline on one switch recipe: NSN specialists (``specialist_nsn``) and
ordinary ones (the plain MNN). The NSN run is evaluated with its specialists at each depth over the
test thresholds, and with the per-sample :class:`~mnn_fast.nsn.mnn.ConfidenceDepth` rule; each point is
(mean multiply-adds per sample, test accuracy). The switch alone, the switch trained as many sample
passes as the plain MNN (compute-matched) and the plain MNN are the references.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import io, reporting
from ..training.baselines import run_sample_passes, train_compute_matched_switch
from ..training.config import TrainConfig
from ..training.loop import accuracy
from ..training.pipeline import data_splits, load_mnn, train
from ..training.sweep import DEFAULT_TEST_THRESHOLDS, sweep_test_thresholds
from .mnn import ConfidenceDepth, detachable_mnn, expected_macs
from .model import linear_macs

__all__ = ["run_depth_sweep", "CSV_FIELDS"]

CSV_FIELDS = ("kind", "depth", "test_threshold", "accuracy", "experts_per_sample", "macs")


def run_depth_sweep(dataset: str = "digits", out="nsn_sweep_out", *, seed: int = 0, switch_epochs: int = 15,
                    specialist_epochs: int = 10, thresholds=DEFAULT_TEST_THRESHOLDS, cutoffs=(0.9, 0.6),
                    budget_threshold: float = 0.25, verbose: bool = True) -> dict:
    """Trains both runs under ``out/runs`` (resumable), sweeps, writes ``nsn_sweep.{csv,png,json}``."""
    out = Path(out)
    common = dict(dataset=dataset, model="nsn_mlp", switch_epochs=switch_epochs, specialist_epochs=specialist_epochs,
                  batch_size=64, lr=3e-3, seed=seed)
    splits = data_splits(TrainConfig(**common).check())
    x, y = splits.test_x, splits.test_y
    features, classes = int(x[0].numel()), splits.num_classes
    runs = {}
    for kind, nsn in (("nsn", True), ("plain", False)):
        train(TrainConfig(**common, specialist_nsn=nsn).check(), out / "runs" / kind, splits=splits)
        runs[kind] = load_mnn(out / "runs" / kind, splits=splits)
    switch, specialists = runs["nsn"].switch, list(runs["nsn"].specialists)
    depth = specialists[0].depth
    switch_macs = linear_macs(features, classes, switch.depth)
    rows = [{"kind": "switch", "depth": "", "test_threshold": "", "accuracy": accuracy(switch, x, y),
             "experts_per_sample": 0.0, "macs": float(switch_macs)}]
    # Equal training compute: the switch trained for as many sample passes as the plain MNN. (An NSN
    # specialist's pass costs more: every sub-model's loss each batch.)
    passes = run_sample_passes(out / "runs" / "plain", classes)
    matched = train_compute_matched_switch(TrainConfig(**common).check(), splits, passes["total"])
    rows.append({"kind": "switch_compute_matched", "depth": "", "test_threshold": "", "accuracy": accuracy(matched, x, y),
                 "experts_per_sample": 0.0, "macs": float(switch_macs)})
    with torch.no_grad():
        for d in range(depth + 1):
            rows += _swept("nsn", d, detachable_mnn(switch, specialists, d).eval(), x, y, thresholds,
                           lambda eps, d=d: expected_macs(switch_macs, eps, features, classes, d))
        rows += _swept("plain", depth, runs["plain"], x, y, thresholds,
                       lambda eps: expected_macs(switch_macs, eps, features, classes, depth))
        rows.append(_budget_row(switch, specialists, ConfidenceDepth(cutoffs), budget_threshold, x, y, switch_macs,
                                features, classes))
    table = reporting.depth_sweep_markdown_table(rows, budget_threshold)
    result = {"config": {**common, "thresholds": list(thresholds), "cutoffs": list(cutoffs),
                         "budget_threshold": budget_threshold}, "rows": rows, "table": table,
              "plain_mnn_training_sample_passes": passes}
    _write(out, result, dataset)
    if verbose:
        print(table)
    return result


def _swept(kind, depth, mnn, x, y, thresholds, macs_of) -> list[dict]:
    return [{"kind": kind, "depth": depth, "test_threshold": r["test_threshold"], "accuracy": r["accuracy"],
             "experts_per_sample": r["experts_per_sample"], "macs": macs_of(r["experts_per_sample"])}
            for r in sweep_test_thresholds(mnn, x, y, thresholds)]


def _budget_row(switch, specialists, rule: ConfidenceDepth, threshold: float, x, y, switch_macs: int, features: int,
                classes: int) -> dict:
    mnn = detachable_mnn(switch, specialists, rule, threshold=threshold).eval()
    out, routing = mnn(x, return_routing=True)
    per_depth = routing.counts.view(rule.depth + 1, len(specialists)).sum(1).tolist()
    spent = sum(n * linear_macs(features, classes, d) for d, n in enumerate(per_depth))
    return {"kind": f"budget {rule.cutoffs}", "depth": "per sample", "test_threshold": threshold,
            "accuracy": float((out.argmax(1) == y).float().mean()), "experts_per_sample": sum(per_depth) / len(y),
            "macs": switch_macs + spent / len(y)}


def _write(out: Path, result: dict, dataset: str) -> None:
    reporting.save_csv(out / "nsn_sweep.csv", result["rows"], CSV_FIELDS)
    io.save_json(out / "nsn_sweep.json", result)
    reporting.plot_accuracy_vs_macs(out / "nsn_sweep.png", result["rows"], f"{dataset}: detachable MNN, accuracy vs compute")
