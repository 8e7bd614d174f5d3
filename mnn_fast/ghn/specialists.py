"""A GHN as the starting point of MNN specialists of any architecture.

``train_ghn_on_data`` trains a GHN on a seeded pool of random small CNNs (``SPACES["in_distribution"]``)
and one dataset's training images, exactly as ``mnn-fast ghn`` trains each seed's GHN.
``predicted_state`` is a specialist's initial ``state_dict``: every parameter as the GHN predicts it
for that architecture (never in the pool, so unseen), buffers (BatchNorm statistics) as the freshly
built module holds them, since the GHN predicts none and training re-estimates them.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .graph import ArchGraph, extract_graph
from .model import GHN, assign_parameters
from .sampler import SPACES, SampledCNN, sample_architectures
from .train import train_ghn

__all__ = ["training_pool", "train_ghn_on_data", "predicted_state", "GHN_TRAINING"]

# GHN training settings of ``mnn-fast ghn`` (its CLI defaults), shared so both train the same GHN.
GHN_TRAINING = {"pool_size": 256, "nets_per_step": 8, "batch_size": 32, "lr": 3e-3, "hidden": 32,
                "virtual_distance": 5}


def training_pool(seed: int, pool_size: int, input_shape, num_classes: int) -> list[tuple[nn.Module, ArchGraph]]:
    """``pool_size`` distinct in-distribution CNNs drawn from ``100 * seed`` with their graphs, for
    inputs ``[B, *input_shape]`` (``(C, H, W)``, square enough for one 2x2 pool)."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        raise ValueError(f"input_shape: the GHN's training CNNs need (C, H, W) inputs, got {input_shape!r}")
    specs = sample_architectures(SPACES["in_distribution"], pool_size, 100 * seed, min(shape[1:]))
    return [(net, extract_graph(net, shape)) for net in (SampledCNN(s, shape[0], num_classes) for s in specs)]


def train_ghn_on_data(x: Tensor, y: Tensor, input_shape, num_classes: int, *, steps: int, seed: int,
                      progress: bool = True, **settings) -> tuple[GHN, list[float]]:
    """``(trained GHN in eval mode, loss per step)`` from ``x: Tensor[N, C, H, W] float32``, ``y: Tensor[N]
    int64``: a GHN initialised from ``seed`` and trained ``steps`` meta-batches on :func:`training_pool`.

    ``settings`` override :data:`GHN_TRAINING` (unknown keys: ``TypeError``). Deterministic given the
    seed and the thread count.
    """
    unknown = set(settings) - set(GHN_TRAINING)
    if unknown:
        raise TypeError(f"settings: unknown GHN training settings {sorted(unknown)}; expected {sorted(GHN_TRAINING)}")
    s = {**GHN_TRAINING, **settings}
    pool = training_pool(seed, s["pool_size"], input_shape, num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ghn = GHN(hidden=s["hidden"], virtual_distance=s["virtual_distance"])
    losses = train_ghn(ghn, pool, x, y, steps=steps, nets_per_step=s["nets_per_step"], batch_size=s["batch_size"],
                       lr=s["lr"], seed=seed, desc=f"ghn seed {seed}", progress=progress)
    return ghn, losses


@torch.no_grad()
def predicted_state(ghn: GHN, model: nn.Module, input_shape) -> dict[str, Tensor]:
    """``model.state_dict()`` with every parameter predicted by ``ghn`` for inputs ``[B, *input_shape]``
    (detached CPU tensors; ``model`` itself is left unchanged). ``ValueError`` for an architecture
    the graph extractor cannot read."""
    graph = extract_graph(model, input_shape)
    target = copy.deepcopy(model)
    assign_parameters(target, ghn.eval()([graph])[0])
    return {k: v.detach().cpu().clone() for k, v in target.state_dict().items()}
