"""``mnn-fast demo`` (= ``make demo``): the whole pipeline on scikit-learn's embedded digits.

Trains an MLP switch and, for each of a few dataset thresholds, ten specialists started from the
switch's weights (``mnn_fast.training``); sweeps 21 test thresholds without re-running the networks
(``mnn_fast.training.sweep``); prints switch-only vs best MNN accuracy and the engine's images/s against the
paper's naive loop on the same inputs; writes ``sweep.csv``, the heatmap, the line figure and
``demo.json`` into ``--out``.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from . import io
from .benchmark import best_time
from .reference import naive_forward
from .reporting import plot_heatmap, plot_lines, write_csv
from .training.config import TrainConfig
from .training.data import load_dataset
from .training.baselines import run_sample_passes, train_compute_matched_switch
from .training.loop import accuracy
from .training.pipeline import load_mnn, train
from .training.sweep import DEFAULT_TEST_THRESHOLDS, sweep_test_thresholds

DATASET_THRESHOLDS = (0.05, 0.1, 0.2, 0.3)


def run(out, dataset_thresholds=DATASET_THRESHOLDS, seed: int = 0, timing_batch_repeats: int = 8) -> dict:
    """Trains, sweeps and times; returns the numbers the table prints (also written to ``demo.json``)."""
    out = Path(out)
    splits = load_dataset("digits", seed=seed)
    rows, sweep_seconds, one_pass_seconds = [], 0.0, 0.0
    with tempfile.TemporaryDirectory() as tmp:  # a fresh run every time: the demo always trains
        for d in dataset_thresholds:
            cfg = TrainConfig(dataset="digits", model="mlp", switch_epochs=15, specialist_epochs=10,
                              batch_size=64, lr=3e-3, dataset_threshold=d, seed=seed)
            run_dir = Path(tmp) / f"dataset_threshold_{d:.2f}"
            train(cfg, run_dir, splits=splits)
            mnn = load_mnn(run_dir, splits=splits)
            start = time.perf_counter()
            rows += [{"dataset_threshold": d, **r}
                     for r in sweep_test_thresholds(mnn, splits.test_x, splits.test_y, DEFAULT_TEST_THRESHOLDS)]
            sweep_seconds += time.perf_counter() - start
            mnn.threshold = min(DEFAULT_TEST_THRESHOLDS)
            start = time.perf_counter()
            accuracy(mnn, splits.test_x, splits.test_y, batch_size=1024)
            one_pass_seconds += time.perf_counter() - start
        # The switch is trained the same way for every dataset threshold (same seed, same data).
        switch_acc = accuracy(mnn.switch, splits.test_x, splits.test_y)
        best = max(rows, key=lambda r: (r["accuracy"], -r["experts_per_sample"]))
        cfg_best = Path(tmp) / f"dataset_threshold_{best['dataset_threshold']:.2f}"
        mnn = load_mnn(cfg_best, best["test_threshold"], splits=splits)
        # The reference at equal training compute: the switch trained for as many sample passes as
        # the best MNN's switch and specialists together (mnn-fast baselines does it over seeds).
        passes = run_sample_passes(cfg_best, splits.num_classes)
        matched = train_compute_matched_switch(TrainConfig.load(cfg_best / "config.json"), splits, passes["total"])
        matched_acc = accuracy(matched, splits.test_x, splits.test_y)
        with torch.no_grad():
            out_engine = mnn(splits.test_x)
            out_naive = naive_forward(mnn.switch, list(mnn.specialists), splits.test_x, threshold=best["test_threshold"])
            batch = splits.test_x.repeat(timing_batch_repeats, 1, 1, 1)  # bigger than Python overhead
            t_engine = best_time(lambda: mnn(batch))
            t_naive = best_time(lambda: naive_forward(mnn.switch, list(mnn.specialists), batch, threshold=best["test_threshold"]))

    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "sweep.csv", rows)
    plot_heatmap(out / "sweep_heatmap.png", rows, switch_acc, "load_digits: MNN test accuracy")
    plot_lines(out / "sweep_lines.png", rows, switch_acc, "load_digits: accuracy over the test threshold")
    result = {
        "switch_acc": switch_acc,
        "best_mnn_acc": best["accuracy"],
        "compute_matched_switch_acc": matched_acc,
        "training_sample_passes": passes,
        "best_dataset_threshold": best["dataset_threshold"],
        "best_test_threshold": best["test_threshold"],
        "experts_per_sample": best["experts_per_sample"],
        "bitwise_equal_to_naive": bool(torch.equal(out_engine, out_naive)),
        "backend": mnn.backend,
        "batch": len(batch),
        "engine_images_per_s": len(batch) / t_engine,
        "naive_images_per_s": len(batch) / t_naive,
        "sweep_vs_one_pass": sweep_seconds / one_pass_seconds,
    }
    io.save_json(out / "demo.json", result)
    return result


def main(out="runs/demo", seed: int = 0) -> dict:
    """:func:`run`, then the summary table on stdout (what ``make demo`` prints); returns run's dict."""
    start = time.perf_counter()
    r = run(out, seed=seed)
    speedup = r["engine_images_per_s"] / r["naive_images_per_s"]
    print(f"\nload_digits test set ({len(DEFAULT_TEST_THRESHOLDS)} test thresholds x {len(DATASET_THRESHOLDS)} dataset thresholds)")
    print("| what | value |\n| --- | --- |")
    print(f"| switch-only accuracy | {r['switch_acc']:.4f} |")
    print(f"| best MNN accuracy | {r['best_mnn_acc']:.4f} (dataset threshold {r['best_dataset_threshold']}, "
          f"test threshold {r['best_test_threshold']}, {r['experts_per_sample']:.2f} specialists/sample) |")
    passes = r["training_sample_passes"]
    print(f"| switch alone, trained as long as the best MNN (compute-matched: {passes['total']:,} sample passes = "
          f"its switch's {passes['switch']:,} + its specialists' {passes['total'] - passes['switch']:,}) | "
          f"{r['compute_matched_switch_acc']:.4f} |")
    print(f"| MNN output == naive loop, bitwise | {r['bitwise_equal_to_naive']} |")
    print(f"| engine ({r['backend']}) images/s, batch {r['batch']} | {r['engine_images_per_s']:.0f} |")
    print(f"| naive loop images/s | {r['naive_images_per_s']:.0f} |")
    print(f"| engine speed-up over naive | {speedup:.2f}x |")
    print(f"| 21-threshold sweep / one pass | {r['sweep_vs_one_pass']:.2f}x |")
    print(f"\nwritten: {out}/sweep.csv, sweep_heatmap.png, sweep_lines.png, demo.json "
          f"({time.perf_counter() - start:.0f} s)")
    return r
