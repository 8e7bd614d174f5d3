"""The generic training loop: cross-entropy with Adam/SGD under cosine decay, prediction, accuracy.

Used by the MNN pipeline (switch and specialists) and by the auxiliary heads of label groups; it
knows nothing of run directories. Deterministic given the seed (shuffling and initial state).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .config import TrainConfig
from .data import batches

__all__ = ["make_optimizer", "minimise", "fit", "predict_probs", "accuracy"]


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """``cfg.optimizer``: Adam, or SGD with momentum 0.9 and weight decay 5e-4 (the CIFAR recipe)."""
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
    opt = make_optimizer(cfg, model)
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


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    model.eval()
    if len(x) == 0:
        return float("nan")
    correct = sum(int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum()) for i in range(0, len(x), batch_size))
    return correct / len(x)
