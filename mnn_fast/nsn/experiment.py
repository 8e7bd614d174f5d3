"""``mnn-fast nsn``: NSN sub-networks vs separately trained models vs a normal base with layers removed.

Per seed: one NSN base (all depths trained together), one separately trained model per depth, and
the separately trained full-depth model evaluated with its input-side layers removed. Test accuracy
of each at each depth, from the epoch with the best validation accuracy (10% of the training split
held out; the paper reports its best test epoch instead). Writes ``nsn.csv``, ``nsn.png``, ``nsn.json``.
"""
from __future__ import annotations

import statistics

import torch

from .. import io, reporting
from ..training.data import load_dataset, validation_split
from .model import DetachableMLP, linear_macs
from .train import depth_accuracy, train_detachable

__all__ = ["run_nsn_experiment", "summary_rows", "NSN_DATASETS", "CSV_FIELDS"]

NSN_DATASETS = ("digits", "mnist5k")
CSV_FIELDS = ("model", "layers_removed", "seed", "accuracy")
MODELS = ("nsn", "separate", "removed")


def run_nsn_experiment(dataset: str = "digits", out="nsn_out", seeds=(0, 1, 2), *, depth: int = 2, epochs: int = 150,
                       lr: float = 0.3, batch_size: int = 32, dropout: float = 0.2, weight_decay: float = 1e-4,
                       threads: int = 1, verbose: bool = True) -> dict:
    """Runs the comparison; returns ``{"rows", "summary", "table", "config"}`` (also written to ``out``).

    ``threads``: intra-op threads while training; these MLPs are small, and on 2 busy cores two
    threads ran 4-17x slower than one, so one is the default (the caller's setting is restored).
    """
    if dataset not in NSN_DATASETS:
        raise ValueError(f"dataset must be one of {NSN_DATASETS} (flat MLP inputs), got {dataset!r}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds is empty; expected at least one seed")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = []
        for seed in seeds:
            rows += _one_seed(dataset, seed, depth=depth, epochs=epochs, lr=lr, batch_size=batch_size,
                              dropout=dropout, weight_decay=weight_decay)
    finally:
        torch.set_num_threads(before)
    splits = load_dataset(dataset, seed=seeds[0])
    features = int(splits.train_x[0].numel())
    summary = summary_rows(rows, features, splits.num_classes, depth)
    config = dict(dataset=dataset, seeds=seeds, depth=depth, epochs=epochs, lr=lr, batch_size=batch_size,
                  dropout=dropout, weight_decay=weight_decay, threads=threads)
    result = {"config": config, "rows": rows, "summary": summary, "table": reporting.nsn_markdown_table(summary, MODELS)}
    _write(out, result, dataset)
    if verbose:
        print(f"{dataset}: test accuracy, mean ± std over seeds {seeds} (validation-chosen epoch)\n")
        print(result["table"])
    return result


def _one_seed(dataset: str, seed: int, *, depth: int, epochs: int, lr: float, batch_size: int, dropout: float,
              weight_decay: float) -> list[dict]:
    splits = load_dataset(dataset, seed=seed)
    x, y, val_x, val_y = validation_split(splits.train_x.flatten(1), splits.train_y, 0.1, seed)
    test_x, test_y = splits.test_x.flatten(1), splits.test_y
    features, classes = x.shape[1], splits.num_classes
    train = dict(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay, seed=seed)
    rows = []
    torch.manual_seed(seed)
    nsn = train_detachable(DetachableMLP(features, classes, depth, dropout), x, y, val_x, val_y, nsn=True,
                           desc=f"nsn seed {seed}", **train).model
    for removed in range(depth + 1):
        rows.append(_row("nsn", removed, seed, depth_accuracy(nsn, test_x, test_y, depth - removed)))
    for removed in range(depth + 1):
        torch.manual_seed(seed)
        model = train_detachable(DetachableMLP(features, classes, depth - removed, dropout), x, y, val_x, val_y,
                                 nsn=False, desc=f"separate depth {depth - removed} seed {seed}", **train).model
        rows.append(_row("separate", removed, seed, depth_accuracy(model, test_x, test_y)))
        if removed == 0:  # the normally trained base, its input-side layers then taken off
            rows += [_row("removed", r, seed, depth_accuracy(model.detach_layers(r), test_x, test_y))
                     for r in range(depth + 1)]
    return rows


def _row(model: str, removed: int, seed: int, accuracy: float) -> dict:
    return {"model": model, "layers_removed": removed, "seed": seed, "accuracy": accuracy}


def summary_rows(rows: list[dict], features: int, classes: int, depth: int) -> list[dict]:
    """Per (model, layers removed): mean and sample std of the accuracy over seeds, and the multiply-adds."""
    out = []
    for model in MODELS:
        for removed in range(depth + 1):
            accs = [r["accuracy"] for r in rows if r["model"] == model and r["layers_removed"] == removed]
            if not accs:
                continue
            out.append({"model": model, "layers_removed": removed, "mean": statistics.fmean(accs),
                        "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "seeds": len(accs),
                        "macs": linear_macs(features, classes, depth - removed)})
    return out


def _write(out, result: dict, dataset: str) -> None:
    from pathlib import Path

    out = Path(out)
    reporting.save_csv(out / "nsn.csv", result["rows"], CSV_FIELDS)
    io.save_json(out / "nsn.json", {k: v for k, v in result.items() if k != "rows"})
    reporting.plot_accuracy_by_depth(out / "nsn.png", result["summary"], f"{dataset}: sub-networks by depth "
                                     "(mean ± std over seeds)", MODELS)
