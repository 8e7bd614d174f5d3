"""Meta-batched GHN training and safetensors checkpoints.

Each step draws ``nets_per_step`` architectures from a fixed pool and one mini-batch of images, lets
the GHN predict every parameter of every drawn net, runs each net on the batch with those parameters
(``torch.func.functional_call``: the predicted tensors stay in the autograd graph), and takes one Adam
step on the mean cross-entropy, so gradients reach the GHN through the predicted parameters. The nets
run in training mode (BatchNorm on batch statistics: the GHN does not predict running statistics).

A checkpoint holds the GHN's state dict as safetensors and its hyperparameters as JSON in the
metadata; loading parses that JSON and the tensors only (no pickle, nothing executed).
"""
from __future__ import annotations

import json
import random
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm import tqdm

from .. import io
from .graph import ArchGraph
from .model import GHN, HYPERPARAMETERS

__all__ = ["train_ghn", "meta_loss", "save_ghn", "load_ghn", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "mnn_fast.ghn/1"


def meta_loss(ghn: GHN, nets: Sequence[tuple[nn.Module, ArchGraph]], x: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy over ``nets`` (``(module, its graph)`` pairs) of ``x: Tensor[B, C, H, W]``,
    ``y: Tensor[B] int64``, each net run with the GHN's predicted parameters; ``Tensor[]``, differentiable."""
    predicted = ghn([g for _, g in nets])
    losses = [nn.functional.cross_entropy(functional_call(net.train(), params, (x,)), y)
              for (net, _), params in zip(nets, predicted)]
    return torch.stack(losses).mean()


def train_ghn(ghn: GHN, pool: Sequence[tuple[nn.Module, ArchGraph]], x: Tensor, y: Tensor, *, steps: int,
              nets_per_step: int = 4, batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 1e-5,
              clip: float = 5.0, seed: int = 0, desc: str = "ghn", progress: bool = True) -> list[float]:
    """Trains ``ghn`` in place on ``(x: Tensor[N, C, H, W] float32, y: Tensor[N] int64)``; returns the
    loss of every step. Adam with cosine decay to 0 and gradient-norm clipping at ``clip`` (GHN-2's)."""
    if not pool:
        raise ValueError("pool: expected at least one (module, graph) pair")
    if steps < 1 or nets_per_step < 1 or batch_size < 1:
        raise ValueError(f"steps, nets_per_step, batch_size: expected positive ints, got "
                         f"{steps}, {nets_per_step}, {batch_size}")
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(ghn.parameters(), lr=lr, weight_decay=weight_decay, foreach=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    ghn.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, leave=False, disable=not progress)
    for step in bar:
        idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=gen)
        nets = rng.sample(list(pool), min(nets_per_step, len(pool)))
        loss = meta_loss(ghn, nets, x[idx], y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(ghn.parameters(), clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    ghn.eval()
    return losses


def save_ghn(path, ghn: GHN, metadata: dict[str, str] | None = None) -> str:
    """Writes ``ghn`` to ``path`` (safetensors, atomically); extra string ``metadata`` is kept. Returns the sha256."""
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    meta.update(format=CHECKPOINT_FORMAT, hyperparameters=json.dumps(ghn.hyperparameters(), sort_keys=True))
    return io.save_tensors(path, ghn.state_dict(), meta)


def load_ghn(path) -> tuple[GHN, dict[str, str]]:
    """``(ghn, metadata)`` from a :func:`save_ghn` file; ``ValueError`` naming the path for a missing,
    foreign or mismatched file."""
    tensors, meta = io.load_tensors(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a GHN checkpoint (metadata format {meta.get('format')!r}, "
                         f"expected {CHECKPOINT_FORMAT!r})")
    try:
        hp = json.loads(meta["hyperparameters"])
        if not isinstance(hp, dict) or set(hp) != set(HYPERPARAMETERS):
            raise ValueError(f"expected the keys {sorted(HYPERPARAMETERS)}")
        ghn = GHN(**hp)
    except (KeyError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad GHN hyperparameters in the metadata ({e})") from None
    io.load_state_tensors(ghn, tensors, str(path))
    return ghn.eval(), meta
