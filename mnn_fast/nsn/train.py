"""Training a network with sub-networks: every sub-model's loss, gradients shared by neighbouring pairs.

Per mini-batch each sub-model ``k = 0..n`` is run with its own cross-entropy. Layer ``L_j``'s
gradient is the mean of the two smallest sub-models holding it (``k = n - j`` and ``n - j + 1``);
the base's input layer ``L_0`` only lives in the base and takes its own. Update: ``V <- 0.9 V + 0.1 G``,
``W <- W - lr V`` (the paper's momentum format), L2 on the weights, dropout on hidden layers.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .model import DetachableMLP

__all__ = ["PaperMomentum", "paired_gradients", "train_detachable", "depth_accuracy", "TrainResult"]


class PaperMomentum(torch.optim.Optimizer):
    """``V <- momentum V + (1 - momentum) G``; ``W <- W - lr V`` (``V`` starts at 0), with L2
    ``weight_decay`` added to the gradient of every parameter with more than one dimension (weights)."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"] and p.dim() > 1:
                    g = g.add(p, alpha=group["weight_decay"])
                v = self.state[p].setdefault("velocity", torch.zeros_like(p))
                v.mul_(group["momentum"]).add_(g, alpha=1.0 - group["momentum"])
                p.sub_(v, alpha=group["lr"])


def paired_gradients(model: DetachableMLP, x: Tensor, y: Tensor) -> list[Tensor]:
    """Sets ``p.grad`` of every parameter by the pairing rule; returns the sub-models' losses
    (``Tensor[]`` each, index = depth)."""
    n = model.depth
    layers = model.layers()
    losses = [nn.functional.cross_entropy(model(x, depth=k), y) for k in range(n + 1)]
    grads: dict[int, list[Tensor]] = {}
    for k, loss in enumerate(losses):
        held = layers[n - k:]  # sub-model k holds L_{n-k} .. L_n
        params = [p for layer in held for p in layer.parameters()]
        grads[k] = list(torch.autograd.grad(loss, params))
    for j, layer in enumerate(layers):
        owners = [k for k in (n - j, n - j + 1) if k <= n]
        per_owner = []
        for k in owners:
            offset = sum(len(list(lay.parameters())) for lay in layers[n - k:j])
            per_owner.append(grads[k][offset: offset + len(list(layer.parameters()))])
        for i, p in enumerate(layer.parameters()):
            p.grad = sum(g[i] for g in per_owner) / len(per_owner)
    return [loss.detach() for loss in losses]


def _own_gradients(model: DetachableMLP, x: Tensor, y: Tensor, depth: int) -> list[Tensor]:
    loss = nn.functional.cross_entropy(model(x, depth=depth), y)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [loss.detach()]


@torch.no_grad()
def depth_accuracy(model: nn.Module, x: Tensor, y: Tensor, depth: int | None = None) -> float:
    """Accuracy of ``model`` (a :class:`DetachableMLP` at ``depth``, or any module) on ``(x, y)``."""
    was_training = model.training
    model.eval()
    logits = model(x, depth=depth) if isinstance(model, DetachableMLP) else model(x)
    model.train(was_training)
    return float((logits.argmax(1) == y).float().mean()) if len(y) else 0.0


@dataclass
class TrainResult:
    """The validation-chosen epoch (1-based), its validation accuracy per trained depth, and the model
    restored to that epoch's weights."""

    best_epoch: int
    val_accuracy: dict[int, float]
    model: DetachableMLP


def train_detachable(model: DetachableMLP, x: Tensor, y: Tensor, val_x: Tensor, val_y: Tensor, *, epochs: int,
                     lr: float = 0.1, batch_size: int = 32, weight_decay: float = 1e-4, seed: int = 0,
                     nsn: bool = True, desc: str = "nsn") -> TrainResult:
    """Trains ``model`` on ``(x: Tensor[n, D], y: Tensor[n] int64)``; keeps the epoch whose mean
    validation accuracy (over every depth when ``nsn``, else the full depth alone) is highest.

    ``nsn=True``: all sub-models with paired gradients (:func:`paired_gradients`); ``False``: plain
    training of the full-depth model (a separately trained model, or a normally trained base).
    """
    gen = torch.Generator().manual_seed(seed)
    opt = PaperMomentum(model.parameters(), lr=lr, weight_decay=weight_decay)
    depths = list(range(model.depth + 1)) if nsn else [model.depth]
    best = (-1.0, 0, {}, copy.deepcopy(model.state_dict()))
    for epoch in tqdm(range(1, epochs + 1), desc=desc, leave=False):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            idx = order[start: start + batch_size]
            if nsn:
                paired_gradients(model, x[idx], y[idx])
            else:
                _own_gradients(model, x[idx], y[idx], model.depth)
            opt.step()
        accs = {d: depth_accuracy(model, val_x, val_y, d) for d in depths}
        score = sum(accs.values()) / len(accs)
        if score > best[0]:
            best = (score, epoch, accs, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[3])
    return TrainResult(best[1], best[2], model.eval())
