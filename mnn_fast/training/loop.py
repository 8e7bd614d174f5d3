"""The generic training loop: a loss (cross-entropy by default) with Adam/SGD under cosine decay,
prediction, accuracy.

Used by the MNN pipeline (switch and specialists) and by the auxiliary heads of label groups; it
knows nothing of run directories. Deterministic given the seed (shuffling and initial state).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .config import TrainConfig
from .data import batches

__all__ = ["make_optimizer", "minimise", "fit", "binary_group_loss", "predict_probs", "accuracy"]


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """``cfg.optimizer``: Adam, or SGD with momentum 0.9 and weight decay 5e-4 (the CIFAR recipe)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr)


def minimise(logits_fn, opt, x: Tensor, y: Tensor, epochs: int, batch_size: int, seed: int, desc: str, *,
             augment: bool = False, min_batch: int = 1, loss_fn=None, max_samples: int | None = None) -> int:
    """``loss_fn(logits_fn(x[b]), y[b])`` (default cross-entropy) minimised with ``opt`` under cosine decay.

    ``epochs`` passes over ``(x: Tensor[n, ...], y: Tensor[n] int64)`` in mini-batches shuffled from
    ``seed``; batches smaller than ``min_batch`` are skipped. ``max_samples``: stop once that many
    samples were trained on (the cosine schedule spans exactly those steps), for budgets that are not
    whole epochs. Returns the number of samples trained on. One tqdm bar over all steps.
    """
    loss_fn = nn.functional.cross_entropy if loss_fn is None else loss_fn
    per_epoch = (len(x) + batch_size - 1) // batch_size
    steps = epochs * per_epoch
    if max_samples is not None:
        # Whole epochs of full batches, then the rest of the budget in the next epoch's first batches.
        full, rest = divmod(max_samples, len(x)) if len(x) else (0, 0)
        steps = min(steps, full * per_epoch + (rest + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    seen = done = 0
    with tqdm(total=steps, desc=desc, leave=False, disable=steps == 0) as bar:
        for epoch in range(epochs):
            for xb, yb in batches(x, y, batch_size, shuffle=True, seed=seed * 1000 + epoch, augment=augment):
                if done == steps:
                    return seen
                if max_samples is not None and seen + len(xb) > max_samples:
                    xb, yb = xb[: max_samples - seen], yb[: max_samples - seen]
                done += 1  # a skipped batch still uses up its step, as in a plain epoch
                if len(xb) < min_batch:
                    continue
                opt.zero_grad()
                loss = loss_fn(logits_fn(xb), yb)
                loss.backward()
                opt.step()
                sched.step()
                seen += len(xb)
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return seen


def fit(model: nn.Module, x: Tensor, y: Tensor, epochs: int, cfg: TrainConfig, seed: int, desc: str, *,
        loss_fn=None, max_samples: int | None = None) -> nn.Module:
    """Trains ``model`` on ``(x: Tensor[n, ...] float32, y: Tensor[n] int64)``; deterministic given ``seed``.

    ``loss_fn(logits, y)``: default cross-entropy. ``max_samples``: a budget in samples (see :func:`minimise`).
    """
    torch.manual_seed(seed)
    opt = make_optimizer(cfg, model)
    model.train()
    # BatchNorm cannot train on a single sample.
    has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    minimise(model, opt, x, y, epochs, cfg.batch_size, seed, desc, augment=cfg.augment,
             min_batch=2 if has_batchnorm else 1, loss_fn=loss_fn, max_samples=max_samples)
    return model.eval()


def binary_group_loss(classes) -> "callable":
    """The original MNN code's specialist loss: binary cross-entropy of the softmax mass on the
    specialist's ``classes`` against ``1[y in classes]`` (for one class: its softmax output).

    Returns ``loss(logits: Tensor[b, C] float32, y: Tensor[b] int64) -> Tensor[] float32``, computed
    from log-sum-exps so a confident specialist gives a finite loss where ``BCELoss(softmax)`` clamps.
    """
    classes = sorted({int(c) for c in classes})
    if not classes:
        raise ValueError("classes: a specialist needs at least one class")

    def loss(logits: Tensor, y: Tensor) -> Tensor:
        C = logits.shape[1]
        inside = torch.zeros(C, dtype=torch.bool, device=logits.device)
        inside[classes] = True
        total = torch.logsumexp(logits, 1)
        log_p = torch.logsumexp(logits.masked_fill(~inside, float("-inf")), 1) - total
        target = inside[y]
        if bool(inside.all()):  # one group holds every class: every target is 1
            return -log_p.mean()
        log_q = torch.logsumexp(logits.masked_fill(inside, float("-inf")), 1) - total
        return -torch.where(target, log_p, log_q).mean()

    return loss


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
