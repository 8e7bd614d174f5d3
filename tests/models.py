"""Small switch/specialist networks for the module tests (deterministic from a seed)."""
from __future__ import annotations

import torch
from torch import nn


def mlp(d_in: int, d_out: int, hidden: int = 32) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def cnn(classes: int, channels: int = 3) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, classes),
    )


def mlp_mnn(classes: int, experts: int | None = None, d_in: int = 24, seed: int = 0, widths=None):
    """A switch and ``experts`` MLP specialists; ``widths[e]`` (``C`` or 1) picks binary specialists."""
    torch.manual_seed(seed)
    experts = classes if experts is None else experts
    widths = widths or [classes] * experts
    switch = mlp(d_in, classes)
    specialists = [mlp(d_in, w) for w in widths]
    for m in [switch, *specialists]:
        m.eval()
    return switch, specialists


def cnn_mnn(classes: int, seed: int = 0):
    torch.manual_seed(seed)
    switch = cnn(classes).eval()
    return switch, [cnn(classes).eval() for _ in range(classes)]
