"""``mnn-fast baselines``: does the MNN help at equal training compute?

Per seed: the pipeline's switch and MNN (one specialist set per ``--specialist-losses`` value and per
specialist start: architecture x initialisation; all from the same switch), and a
*compute-matched* switch: the same model from the same start (the same seed, the same pretrained
weights) trained for as many sample passes as the switch and all specialists together, in one cosine
schedule. Test accuracy of each at one test threshold, and of the specialists on the test samples
routed to them, written as ``baselines.csv``, ``baselines.md``, ``baselines.png`` and ``baselines.json``.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import io, reporting
from .config import SPECIALIST_INITS, SPECIALIST_LOSSES, TrainConfig
from .data import Splits, validation_split
from .loop import accuracy, fit
from .models import build_model, load_pretrained_resnet
from .pipeline import (config_groups, data_splits, initial_switch, load_mnn, load_run_ghn, read_probs,
                       specialist_subsets, train)
from .rundir import RunDir

__all__ = ["run_baselines", "training_sample_passes", "run_sample_passes", "train_compute_matched_switch", "summarise",
           "routed_specialist_accuracy", "mnn_row_name", "CSV_FIELDS"]

CSV_FIELDS = ("seed", "row", "accuracy", "train_sample_passes", "forward_passes_per_sample", "specialist_accuracy")
MATCHED = "switch_compute_matched"


def training_sample_passes(cfg: TrainConfig, num_train: int, subset_sizes) -> dict[str, int]:
    """Samples seen in training: ``{"switch": epochs x n, "specialists": epochs x sum of subsets, "total"}``.

    ``num_train``: the switch's training samples (the training split less validation); ``subset_sizes``:
    each specialist's training set size. Forward and backward each count once per sample pass.
    """
    switch = cfg.switch_epochs * int(num_train)
    specialists = cfg.specialist_epochs * sum(int(n) for n in subset_sizes)
    return {"switch": switch, "specialists": specialists, "total": switch + specialists}


def run_sample_passes(run_dir, num_classes: int, switch_epochs: int | None = None) -> dict[str, int]:
    """:func:`training_sample_passes` of a trained run directory, from its config and probability file.

    ``switch_epochs``: the epochs its switch really trained, when it was adopted from elsewhere
    (``train(..., switch=...)`` records a config whose ``switch_epochs`` did not train it).
    """
    run = RunDir(run_dir)
    cfg = TrainConfig.load(run.config)
    probs, _ = read_probs(run.probs)
    groups = config_groups(cfg, num_classes)
    sizes = [len(s) for s in specialist_subsets(probs, groups, cfg.dataset_threshold)]
    if switch_epochs is not None:
        cfg = dataclasses.replace(cfg, switch_epochs=switch_epochs)
    return training_sample_passes(cfg, len(probs), sizes)


def train_compute_matched_switch(cfg: TrainConfig, splits: Splits, sample_passes: int) -> nn.Module:
    """The switch of ``cfg`` (same initialisation, pretrained start and data) trained for exactly
    ``sample_passes`` samples under one cosine schedule; returned in eval mode."""
    train_x, train_y, _, _ = validation_split(splits.train_x, splits.train_y, cfg.val_fraction, cfg.seed)
    model = initial_switch(cfg, splits)
    if cfg.pretrained:
        load_pretrained_resnet(model, cfg.pretrained)
    epochs = math.ceil(sample_passes / max(len(train_x), 1))
    return fit(model, train_x, train_y, epochs, cfg, cfg.seed, "compute-matched switch", max_samples=sample_passes)


def _matched_switch(path: Path, cfg: TrainConfig, splits: Splits, sample_passes: int) -> nn.Module:
    """The compute-matched switch, reused from ``path`` when it was written for this config and budget."""
    tag = {"kind": "mnn_fast.compute_matched_switch", "config_sha256": cfg.config_sha256(),
           "sample_passes": str(sample_passes)}
    model = build_model(cfg.model, splits.num_classes, splits.input_shape)
    if path.exists():
        try:
            tensors, meta = io.load_tensors(path)
            if all(meta.get(k) == v for k, v in tag.items()):
                return io.load_state_tensors(model, tensors, str(path)).eval()
        except ValueError:
            pass  # unreadable: train it again
    model = train_compute_matched_switch(cfg, splits, sample_passes)
    io.save_state(path, model, tag)
    return model


def mnn_row_name(loss: str, model: str | None = None, init: str = "switch") -> str:
    """A row's name: ``mnn_<loss>`` for the paper's specialists (the switch's architecture, started from
    its weights), ``mnn_<loss>_<init>`` for another start, ``mnn_<loss>_<model>_<init>`` for another
    architecture (``model``: ``None`` when it is the switch's)."""
    return "_".join(["mnn", loss] + ([model] if model else []) + ([init] if model or init != "switch" else []))


@torch.no_grad()
def routed_specialist_accuracy(mnn, x: Tensor, y: Tensor) -> float:
    """Accuracy of the specialists on the samples routed to them: over every (sample, specialist) pair
    the routing selects on ``x: Tensor[B, ...]``, the fraction where the specialist alone predicts ``y``
    (``nan`` when nothing is routed)."""
    _, routing = mnn(x, return_routing=True)
    bounds = routing.offsets.tolist()
    correct = 0
    for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        idx = routing.perm[a:b]
        for i in range(0, len(idx), 1000):
            part = idx[i:i + 1000]
            correct += int((mnn.specialists[e](x[part]).argmax(1) == y[part]).sum())
    return correct / bounds[-1] if bounds[-1] else float("nan")


def _one_seed(base: TrainConfig, seed: int, losses, starts, test_threshold: float, out: Path,
              given: Splits | None) -> list[dict]:
    cfg = dataclasses.replace(base, seed=seed, specialist_loss=losses[0], specialist_model=None,
                              specialist_init="switch").check()
    splits = data_splits(cfg, given)
    test = (splits.test_x, splits.test_y)
    rows, switch, ghn, passes = [], None, None, None
    for model, init in starts:
        for loss in losses:
            cfg_l = dataclasses.replace(cfg, specialist_loss=loss, specialist_model=model, specialist_init=init).check()
            name = mnn_row_name(loss, cfg_l.specialist_model, init)
            run_dir = out / "runs" / f"seed{seed}_{name[len('mnn_'):]}"
            # Later rows adopt the first run's switch, and the first GHN (same seed and split: the same GHN).
            train(cfg_l, run_dir, splits=splits, switch=switch, ghn=ghn if init == "ghn" else None)
            mnn = load_mnn(run_dir, test_threshold, splits=splits)
            if init == "ghn" and ghn is None:
                ghn = load_run_ghn(run_dir)
            if switch is None:
                switch = mnn.switch
                passes = run_sample_passes(run_dir, splits.num_classes)
                rows.append(_row(seed, "switch", accuracy(switch, *test), passes["switch"], 1.0))
            with torch.no_grad():
                _, routing = mnn(splits.test_x, return_routing=True)
            per_sample = 1.0 + int(routing.counts.sum()) / max(len(splits.test_y), 1)
            rows.append(_row(seed, name, accuracy(mnn, *test), passes["total"], per_sample,
                             routed_specialist_accuracy(mnn, *test)))
    matched = _matched_switch(out / "runs" / f"seed{seed}_{MATCHED}.safetensors", cfg, splits, passes["total"])
    rows.insert(1, _row(seed, MATCHED, accuracy(matched, *test), passes["total"], 1.0))
    return rows


def _row(seed, name, acc, sample_passes, forward_passes, specialist_acc=None) -> dict:
    return {"seed": seed, "row": name, "accuracy": round(acc, 6), "train_sample_passes": int(sample_passes),
            "forward_passes_per_sample": round(forward_passes, 4),
            "specialist_accuracy": "" if specialist_acc is None else round(specialist_acc, 6)}


def summarise(rows: list[dict]) -> list[dict]:
    """Per row name (first-seen order): mean and sample std of accuracy over seeds, and, for the MNN
    rows, the paired difference to the switch and to the compute-matched switch (same seed)."""
    by = {}
    for r in rows:
        by.setdefault(r["row"], {})[r["seed"]] = r
    out = []
    for name, per_seed in by.items():
        accs = [r["accuracy"] for r in per_seed.values()]
        s = {"row": name, "seeds": len(accs), "mean": statistics.fmean(accs),
             "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
             "train_sample_passes": statistics.fmean(r["train_sample_passes"] for r in per_seed.values()),
             "forward_passes_per_sample": statistics.fmean(r["forward_passes_per_sample"] for r in per_seed.values())}
        specialist = [r["specialist_accuracy"] for r in per_seed.values() if r.get("specialist_accuracy", "") != ""]
        if specialist:
            s["specialist_mean"] = statistics.fmean(specialist)
            s["specialist_std"] = statistics.stdev(specialist) if len(specialist) > 1 else 0.0
        for ref in ("switch", MATCHED):
            if name.startswith("mnn_") and ref in by:
                diffs = [r["accuracy"] - by[ref][seed]["accuracy"] for seed, r in per_seed.items() if seed in by[ref]]
                s[f"minus_{ref}"] = statistics.fmean(diffs)
                s[f"minus_{ref}_std"] = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        out.append(s)
    return out


def run_baselines(cfg: TrainConfig, out, seeds=(0, 1, 2), losses=SPECIALIST_LOSSES, test_threshold: float = 0.25,
                  verbose: bool = True, starts=((None, "switch"),), splits: Splits | None = None) -> dict:
    """Trains and evaluates every row for each seed (resumable: runs live under ``out/runs``); returns
    ``{"rows", "summary", "table", "config", "seconds"}``, also written to ``out``.

    ``cfg``: the pipeline's config (its ``seed``, ``specialist_loss``, ``specialist_model`` and
    ``specialist_init`` are replaced per row). ``starts``: the specialists' ``(architecture, init)``
    pairs, one MNN row each per loss (architecture ``None``: the switch's; init in
    ``SPECIALIST_INITS``; "switch" only for the switch's architecture). ``splits``: your own data
    (e.g. :meth:`Splits.from_arrays`), the same for every seed; by default each seed reads the data
    ``cfg`` names (digits and mnist5k draw their test split from the seed).
    """
    cfg = cfg.check()
    seeds = [int(s) for s in seeds]
    losses = list(dict.fromkeys(losses))
    if not seeds:
        raise ValueError("seeds is empty; expected at least one seed")
    if not losses or any(loss not in SPECIALIST_LOSSES for loss in losses):
        raise ValueError(f"losses must be a non-empty list of {SPECIALIST_LOSSES}, got {losses!r}")
    starts = list(dict.fromkeys((None if m in (None, cfg.model) else m, i) for m, i in starts))
    if not starts or any(i not in SPECIALIST_INITS for _, i in starts):
        raise ValueError(f"starts must be a non-empty list of (model, init) pairs with init in {SPECIALIST_INITS}, "
                         f"got {starts!r}")
    for m, i in starts:  # every pairing checked now, not after the first seed's training
        dataclasses.replace(cfg, specialist_model=m, specialist_init=i).check()
    if not 0.0 <= test_threshold <= 1.0:
        raise ValueError(f"test_threshold must be in [0, 1], got {test_threshold!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = []
    for seed in seeds:
        rows += _one_seed(cfg, seed, losses, starts, test_threshold, out, splits)
    summary = summarise(rows)
    title = (f"{splits.name if splits is not None else cfg.dataset} / {cfg.model}: test accuracy over seeds {seeds}, test threshold {test_threshold}")
    result = {"config": {**cfg.identity(), "seeds": seeds, "losses": losses, "test_threshold": test_threshold,
                         "starts": [list(st) for st in starts]},
              "rows": rows, "summary": summary, "table": reporting.baselines_markdown_table(summary),
              "seconds": round(time.perf_counter() - start, 1)}
    reporting.save_csv(out / "baselines.csv", rows, CSV_FIELDS)
    io.atomic_write(out / "baselines.md", (f"{title}\n\n{result['table']}\n").encode())
    reporting.plot_baselines(out / "baselines.png", rows, title)
    io.save_json(out / "baselines.json", result)
    if verbose:
        print(f"{title} (mean ± std)\n\n{result['table']}\n\n{result['seconds']:.0f} s")
    return result
