"""``mnn-fast demo`` (``make demo``): trains, sweeps, checks the engine against the naive loop, writes files."""
import csv
import json

from mnn_fast import demo


def test_a_one_threshold_demo_writes_its_files_and_agrees_with_the_naive_loop(tmp_path):
    r = demo.run(tmp_path, dataset_thresholds=(0.1,), timing_batch_repeats=1)
    assert r["bitwise_equal_to_naive"] is True
    assert 0.5 < r["switch_acc"] <= 1.0 and r["best_mnn_acc"] >= 0.5
    passes = r["training_sample_passes"]
    assert passes["total"] > passes["switch"] > 0 and 0.5 < r["compute_matched_switch_acc"] <= 1.0
    with (tmp_path / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(demo.DEFAULT_TEST_THRESHOLDS)
    assert max(float(row["accuracy"]) for row in rows) == r["best_mnn_acc"]
    assert json.loads((tmp_path / "demo.json").read_text()) == r
    for name in ("sweep_heatmap.png", "sweep_lines.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_main_prints_the_summary_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "DATASET_THRESHOLDS", (0.1,))
    monkeypatch.setattr(demo, "run", lambda out, seed=0: {
        "switch_acc": 0.9, "best_mnn_acc": 0.95, "best_dataset_threshold": 0.1, "best_test_threshold": 0.25,
        "experts_per_sample": 1.1, "compute_matched_switch_acc": 0.93,
        "training_sample_passes": {"switch": 100, "specialists": 150, "total": 250}, "bitwise_equal_to_naive": True, "backend": "cpp", "batch": 10,
        "engine_images_per_s": 200.0, "naive_images_per_s": 100.0, "sweep_vs_one_pass": 1.2})
    demo.main(tmp_path)
    out = capsys.readouterr().out
    assert "| best MNN accuracy | 0.9500" in out and "(compute-matched: 250 sample passes = its switch's 100 + its specialists' 150) | 0.9300 |" in out and "| engine speed-up over naive | 2.00x |" in out
