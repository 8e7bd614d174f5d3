"""The MNN training pipeline (SPEC section 7), resumable and crash-safe.

1. Train the switch on the training set less a 10% validation split (fixed seed).
2. Write its softmax over the training set to ``train_probs.safetensors``.
3-4. Specialist ``e`` starts from the switch's weights and trains on the samples whose score for ``e``
   exceeds the dataset threshold; each is an independent job writing its own file, skipped on resume.
Every file is written to a temporary name and renamed, so a crash never leaves a partial file.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from . import io
from .data import Splits, batches, load_dataset, validation_split
from .models import build_model, load_pretrained_resnet
from .module import MetaNeuralNetwork
from .routing import check_threshold, normalize_groups, route

__all__ = ["TrainConfig", "train", "fit", "minimise", "specialist_subsets", "write_probs", "read_probs", "load_mnn", "RunDir"]


@dataclass
class TrainConfig:
    """Everything that determines a run; stored as ``config.json`` and checked again on resume."""

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
    cache_dir: str | None = field(default=None, metadata={"resume_free": True})

    def check(self) -> "TrainConfig":
        check_threshold(self.dataset_threshold)
        if self.normalization not in ("auto", "cifar", "imagenet"):
            raise ValueError(f"normalization must be 'auto', 'cifar' or 'imagenet', got {self.normalization!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        for name in ("switch_epochs", "specialist_epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "batch_size" else 0):
                raise ValueError(f"{name} must be a non-negative int (batch_size positive), got {value!r}")
        return self

    def identity(self) -> dict:
        """The fields a resumed run must share with the original (paths to caches excluded)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("resume_free")}


class RunDir:
    """Paths inside a run directory."""

    def __init__(self, root):
        self.root = Path(root)
        self.config = self.root / "config.json"
        self.switch = self.root / "switch.safetensors"
        self.probs = self.root / "train_probs.safetensors"

    def specialist(self, e: int) -> Path:
        return self.root / "specialists" / f"expert_{e:04d}.safetensors"


def _optimizer(cfg: TrainConfig, model: nn.Module):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr)


def minimise(logits_fn, opt, x: Tensor, y: Tensor, epochs: int, batch_size: int, seed: int, desc: str, *,
             augment: bool = False, min_batch: int = 1) -> None:
    """Cross-entropy of ``logits_fn(x[b])`` against ``y[b]`` minimised with ``opt`` under cosine decay.

    ``epochs`` passes over ``(x: Tensor[n, ...], y: Tensor[n] int64)`` in mini-batches shuffled from
    ``seed``; batches smaller than ``min_batch`` are skipped. One tqdm bar over all steps.
    """
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    with tqdm(total=steps, desc=desc, leave=False, disable=steps == 0) as bar:
        for epoch in range(epochs):
            for xb, yb in batches(x, y, batch_size, shuffle=True, seed=seed * 1000 + epoch, augment=augment):
                if len(xb) < min_batch:
                    continue
                opt.zero_grad()
                loss = nn.functional.cross_entropy(logits_fn(xb), yb)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")


def fit(model: nn.Module, x: Tensor, y: Tensor, epochs: int, cfg: TrainConfig, seed: int, desc: str) -> nn.Module:
    """Trains ``model`` on ``(x: Tensor[n, ...] float32, y: Tensor[n] int64)``; deterministic given ``seed``."""
    torch.manual_seed(seed)
    opt = _optimizer(cfg, model)
    model.train()
    # BatchNorm cannot train on a single sample.
    has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    minimise(model, opt, x, y, epochs, cfg.batch_size, seed, desc, augment=cfg.augment,
             min_batch=2 if has_batchnorm else 1)
    return model.eval()


@torch.no_grad()
def predict_probs(model: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """``Tensor[n, C] float32`` softmax of ``model`` over ``x`` in evaluation mode."""
    model.eval()
    parts = [torch.softmax(model(x[i : i + batch_size]).float(), 1) for i in range(0, len(x), batch_size)]
    return torch.cat(parts) if parts else x.new_zeros(0, 0)


def write_probs(path, probs: Tensor, labels: Tensor) -> None:
    """The switch's training-set probabilities ``Tensor[n, C] float32`` and labels, as safetensors."""
    io.save_tensors(path, {"probs": probs.float(), "labels": labels.long()}, {"kind": "mnn_fast.train_probs"})


def read_probs(path) -> tuple[Tensor, Tensor]:
    """``(probs: Tensor[n, C] float32, labels: Tensor[n] int64)`` from :func:`write_probs`."""
    tensors, meta = io.load_tensors(path)
    probs, labels = tensors.get("probs"), tensors.get("labels")
    if meta.get("kind") != "mnn_fast.train_probs" or probs is None or labels is None:
        raise ValueError(f"{path}: not a probability file written by mnn_fast (kind={meta.get('kind')!r})")
    if probs.dim() != 2 or probs.dtype != torch.float32 or labels.shape != probs.shape[:1]:
        raise ValueError(f"{path}: expected probs [n, C] float32 and labels [n], got {tuple(probs.shape)} and {tuple(labels.shape)}")
    return probs, labels


def specialist_subsets(probs: Tensor, groups, dataset_threshold: float) -> list[Tensor]:
    """Per expert, the training indices whose group score exceeds ``dataset_threshold`` (increasing).

    Exactly SPEC section 2 with ``t`` = the dataset threshold: the routing engine's expert-major
    ``perm`` split by ``offsets``.
    """
    r = route(probs, groups, threshold=dataset_threshold)
    bounds = r.offsets.tolist()
    return [r.perm[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _data(cfg: TrainConfig, splits: Splits | None) -> Splits:
    if splits is not None:
        return splits
    norm = cfg.normalization if cfg.normalization != "auto" else ("imagenet" if cfg.pretrained else "cifar")
    return load_dataset(cfg.dataset, cfg.data_path, cfg.seed, cache_dir=cfg.cache_dir, normalization=norm)


def _new_model(cfg: TrainConfig, splits: Splits) -> nn.Module:
    # Initialised from cfg.seed, not from whatever the global generator holds (which depends on
    # everything the process ran before): the same config trains the same switch every time.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_model(cfg.model, splits.num_classes, splits.input_shape)


def train(cfg: TrainConfig, run_dir, experts: list[int] | None = None, splits: Splits | None = None) -> RunDir:
    """Runs (or resumes) the pipeline in ``run_dir``; ``experts`` limits step 4 to those indices."""
    cfg.check()
    run = RunDir(run_dir)
    if run.config.exists():
        saved = TrainConfig(**io.load_json(run.config)).identity()  # fields added since: their defaults
        if saved != cfg.identity():
            diff = sorted(k for k in set(saved) | set(cfg.identity()) if saved.get(k) != cfg.identity().get(k))
            raise ValueError(f"run_dir {run.root} holds a different run (fields differ: {diff}); use a new directory")
    else:
        io.save_json(run.config, cfg.identity())
    splits = _data(cfg, splits)
    train_x, train_y, val_x, val_y = validation_split(splits.train_x, splits.train_y, cfg.val_fraction, cfg.seed)

    switch = _new_model(cfg, splits)
    if run.switch.exists():
        io.load_state(switch, run.switch)
    else:
        if cfg.pretrained:
            load_pretrained_resnet(switch, cfg.pretrained)
        fit(switch, train_x, train_y, cfg.switch_epochs, cfg, cfg.seed, "switch")
        io.save_state(run.switch, switch, {"val_accuracy": f"{accuracy(switch, val_x, val_y):.6f}"})
    switch.eval()

    if not run.probs.exists():
        write_probs(run.probs, predict_probs(switch, train_x), train_y)
    probs, labels = read_probs(run.probs)
    if not torch.equal(labels, train_y):
        raise ValueError(f"{run.probs}: labels do not match this dataset split; the run directory is stale")

    groups = normalize_groups(cfg.groups, None, splits.num_classes) if cfg.groups else None
    subsets = specialist_subsets(probs, groups, cfg.dataset_threshold)
    todo = range(len(subsets)) if experts is None else experts
    for e in tqdm(todo, desc="specialists"):
        if not 0 <= e < len(subsets):
            raise ValueError(f"experts: index {e} out of range for {len(subsets)} specialists")
        if run.specialist(e).exists():
            continue  # finished in an earlier (possibly interrupted) run
        specialist = copy.deepcopy(switch)  # SPEC 7.4: start from the switch's weights
        idx = subsets[e]
        fit(specialist, train_x[idx], train_y[idx], cfg.specialist_epochs, cfg, cfg.seed + 1 + e, f"expert {e}")
        io.save_state(run.specialist(e), specialist, {"train_samples": str(len(idx))})
    return run


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    model.eval()
    if len(x) == 0:
        return float("nan")
    correct = sum(int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum()) for i in range(0, len(x), batch_size))
    return correct / len(x)


def load_mnn(run_dir, test_threshold: float = 0.25, splits: Splits | None = None, **kwargs) -> MetaNeuralNetwork:
    """The trained :class:`MetaNeuralNetwork` of ``run_dir`` (every specialist must be finished)."""
    run = RunDir(run_dir)
    cfg = TrainConfig(**io.load_json(run.config))
    splits = _data(cfg, splits)
    switch = io.load_state(_new_model(cfg, splits), run.switch).eval()
    num_experts = len(cfg.groups) if cfg.groups else splits.num_classes
    missing = [e for e in range(num_experts) if not run.specialist(e).exists()]
    if missing:
        raise ValueError(f"run_dir {run.root}: specialists {missing[:10]} are not trained yet")
    specialists = [io.load_state(_new_model(cfg, splits), run.specialist(e)).eval() for e in range(num_experts)]
    return MetaNeuralNetwork(switch, specialists, groups=cfg.groups, threshold=test_threshold,
                             num_classes=splits.num_classes, **kwargs)
