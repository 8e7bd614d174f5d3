"""Training (docs/training.md): the run-directory pipeline, its config, the generic loop, sweeps, bundles.

pipeline: switch -> probability file -> specialists on their dataset-threshold subsets, resumable and
verified (rundir: lock, manifest). loop: the cross-entropy loop shared with the label-group heads.
sweep: accuracy over test thresholds without re-running networks. data/models: what runs train on.
"""
from .bundle import load_bundle, save_bundle
from .config import TrainConfig
from .data import Splits, load_dataset
from .loop import accuracy, fit, minimise, predict_probs
from .models import build_model
from .pipeline import data_splits, load_mnn, read_probs, run_data, specialist_subsets, train, write_probs
from .rundir import RunDir
from .sweep import DEFAULT_TEST_THRESHOLDS, log_softmax_argmax, sweep_test_thresholds

__all__ = ["TrainConfig", "train", "load_mnn", "run_data", "data_splits", "specialist_subsets", "write_probs", "read_probs",
           "RunDir", "fit", "minimise", "predict_probs", "accuracy", "sweep_test_thresholds", "log_softmax_argmax",
           "DEFAULT_TEST_THRESHOLDS", "Splits", "load_dataset", "build_model", "save_bundle", "load_bundle"]
