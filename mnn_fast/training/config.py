"""``TrainConfig``: everything that determines a training run, validated field by field.

Stored as a run's ``config.json``; read back (eval, sweep, resume) through :meth:`TrainConfig.from_dict`,
which refuses unknown keys, so a config from CLI arguments and one from the file hash alike.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .. import io
from ..engine.routing import normalize_groups
from . import fields as F
from .data import DATA_PATH_NEEDS, DATASET_NAMES, PATH_DATASETS
from .models import MODEL_NAMES

__all__ = ["TrainConfig", "SPECIALIST_LOSSES", "SPECIALIST_INITS"]

SPECIALIST_LOSSES = ("ce", "binary")
# Where a specialist starts: the trained switch's weights (docs/training.md, the paper), parameters a graph
# hypernetwork predicts for its architecture (mnn_fast.ghn), or the architecture's own random init.
SPECIALIST_INITS = ("switch", "ghn", "random")

# A field added after runs were already written: at its default it is left out of the identity, so
# the config hash of every earlier run (which never had the field) stays valid and resumes.
ADDED_LATER = {"omit_default": True}


@dataclass
class TrainConfig:
    """Everything that determines a run; stored as ``config.json`` and checked again on resume.

    :meth:`check` validates every field (type and range) and normalises numbers and groups, so a
    config built from CLI arguments and one read back from ``config.json`` compare and hash alike.
    """

    dataset: str = "digits"
    data_path: str | None = None
    model: str = "small_cnn"
    switch_epochs: int = 10
    specialist_epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"  # "adam" or "sgd" (momentum 0.9, weight decay 5e-4: the CIFAR recipe)
    dataset_threshold: float = 0.1
    groups: list | None = None
    val_fraction: float = 0.1
    seed: int = 0
    augment: bool = False
    pretrained: str | None = None  # a CIFAR ResNet checkpoint to start the switch from
    # "auto": ImageNet statistics when starting from a pretrained CIFAR ResNet (what it was trained
    # with), CIFAR's otherwise; only CIFAR-10 is normalised (digits/mnist5k stay in [0, 1]).
    normalization: str = "auto"
    # Train specialists as networks with sub-networks (paired gradients, mnn_fast.nsn): needs model
    # "nsn_mlp"; the trained specialists can then run at any depth (mnn_fast.nsn.detachable_mnn).
    specialist_nsn: bool = False
    # Intra-op threads while a specialist trains: part of the config because a GEMM's bits depend on
    # them, so checkpoints are byte-identical however many --workers run them. Small models on 2 busy
    # cores trained 4-17x faster with 1 thread than with 2.
    specialist_threads: int = field(default=1, metadata=ADDED_LATER)
    # "ce": 10-class cross-entropy on the specialist's subset (this project's default); "binary": the
    # original MNN code's loss, binary cross-entropy of the softmax mass on the specialist's classes
    # against 1[label in them] (mnn_fast.training.loop.binary_group_loss).
    specialist_loss: str = field(default="ce", metadata=ADDED_LATER)
    # Keep this stratified fraction of the training split (seeded), for experiments that must finish
    # in minutes on CIFAR-10; the test split is never cut.
    train_fraction: float = field(default=1.0, metadata=ADDED_LATER)
    # The specialists' architecture (None: the switch's). Another architecture needs specialist_init
    # "ghn" or "random": the switch's weights fit only its own.
    specialist_model: str | None = field(default=None, metadata=ADDED_LATER)
    specialist_init: str = field(default="switch", metadata=ADDED_LATER)
    # With specialist_init "ghn": the run trains its GHN this many meta-batches on its own training
    # split (mnn_fast.ghn.train_ghn_on_data, the settings of mnn-fast ghn), with specialist_threads threads.
    ghn_steps: int = field(default=700, metadata=ADDED_LATER)
    cache_dir: str | None = field(default=None, metadata={"resume_free": True})

    def check(self) -> "TrainConfig":
        """Validates and normalises every field in place; ``TypeError``/``ValueError`` naming the field."""
        self.dataset = F.check_choice("dataset", self.dataset, DATASET_NAMES)
        self.data_path = F.check_optional_str("data_path", self.data_path)
        if self.dataset in PATH_DATASETS and not self.data_path:
            raise ValueError(f"data_path: dataset {self.dataset!r} needs data_path, {DATA_PATH_NEEDS[self.dataset]}")
        if self.dataset not in PATH_DATASETS and self.data_path is not None:
            # Training on the embedded set while recording a path would be a silent fallback.
            raise ValueError(f"data_path: dataset {self.dataset!r} ships inside its package and reads no path; "
                             "for your own data use dataset 'imagefolder' (a folder) or 'arrays' (an .npz)")
        self.model = F.check_choice("model", self.model, MODEL_NAMES)
        self.switch_epochs = F.check_int("switch_epochs", self.switch_epochs, 0)
        self.specialist_epochs = F.check_int("specialist_epochs", self.specialist_epochs, 0)
        self.batch_size = F.check_int("batch_size", self.batch_size, 1)
        self.lr = F.check_real("lr", self.lr, 0.0, lo_open=True)
        self.optimizer = F.check_choice("optimizer", self.optimizer, ("adam", "sgd"))
        self.dataset_threshold = F.check_real("dataset_threshold", self.dataset_threshold, 0.0, 1.0)
        if self.groups is not None:
            self.groups = [list(g) for g in normalize_groups(self.groups)]
        self.val_fraction = F.check_real("val_fraction", self.val_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
        self.seed = F.check_int("seed", self.seed, 0, 2**32 - 1)  # numpy's seeding range
        self.augment = F.check_bool("augment", self.augment)
        self.pretrained = F.check_optional_str("pretrained", self.pretrained)
        self.normalization = F.check_choice("normalization", self.normalization, ("auto", "cifar", "imagenet"))
        self.cache_dir = F.check_optional_str("cache_dir", self.cache_dir)
        self.specialist_nsn = F.check_bool("specialist_nsn", self.specialist_nsn)
        self.specialist_threads = F.check_int("specialist_threads", self.specialist_threads, 1, 1024)
        self.specialist_loss = F.check_choice("specialist_loss", self.specialist_loss, SPECIALIST_LOSSES)
        self.train_fraction = F.check_real("train_fraction", self.train_fraction, 0.0, 1.0, lo_open=True)
        self.specialist_model = F.check_optional_str("specialist_model", self.specialist_model)
        if self.specialist_model is not None:
            self.specialist_model = F.check_choice("specialist_model", self.specialist_model, MODEL_NAMES)
            if self.specialist_model == self.model:
                self.specialist_model = None  # one spelling of "the switch's architecture", one hash
        self.specialist_init = F.check_choice("specialist_init", self.specialist_init, SPECIALIST_INITS)
        self.ghn_steps = F.check_int("ghn_steps", self.ghn_steps, 1)
        if self.specialist_init == "switch" and self.specialist_model is not None:
            raise ValueError(f"specialist_init: 'switch' starts specialists from the switch's weights, which fit only "
                             f"its architecture {self.model!r}, not specialist_model {self.specialist_model!r}; "
                             f"use 'ghn' or 'random'")
        if self.specialist_nsn and (self.specialist_model is not None or self.specialist_init != "switch"):
            raise ValueError("specialist_nsn: NSN specialists start from the switch (specialist_model unset, "
                             f"specialist_init 'switch'), got {self.specialist_model!r} / {self.specialist_init!r}")
        if self.specialist_nsn and self.specialist_loss != "ce":
            raise ValueError(f"specialist_loss: NSN specialists train with cross-entropy (paired gradients), got "
                             f"{self.specialist_loss!r}")
        if self.specialist_nsn and self.model != "nsn_mlp":
            raise ValueError(f"specialist_nsn: NSN specialists need model 'nsn_mlp' (a detachable base), got {self.model!r}")
        return self

    @classmethod
    def from_dict(cls, values: dict, where: str = "config") -> "TrainConfig":
        """A checked config from ``values`` (e.g. ``config.json``); fields missing take their defaults
        (fields added since the file was written), unknown ones are refused. Errors start with ``where``."""
        F.check_keys(where, values, [f.name for f in dataclasses.fields(cls)])
        try:
            return cls(**values).check()
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}: {exc}") from None

    @classmethod
    def load(cls, path) -> "TrainConfig":
        """The checked config stored at ``path`` (a run's ``config.json``)."""
        return cls.from_dict(io.load_json(path), str(path))

    def identity(self) -> dict:
        """The fields a resumed run must share with the original (paths to caches excluded; fields
        added later only when they differ from their default)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("resume_free")
                  and not (f.metadata.get("omit_default") and getattr(self, f.name) == f.default)}
        if self.specialist_init != "ghn":
            values.pop("ghn_steps", None)  # no GHN is trained: its budget changes nothing
        return values

    @property
    def specialist_architecture(self) -> str:
        """The specialists' model name: ``specialist_model``, or the switch's ``model`` when unset."""
        return self.specialist_model or self.model

    def config_sha256(self) -> str:
        """Hex sha256 of :meth:`identity`: what every file of the run records."""
        return io.config_sha256(self.identity())
