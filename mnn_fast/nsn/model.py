"""A network with sub-networks (NSN, Fuengfusin and Tamukoh 2020): an MLP whose input-side layers detach.

The base has ``n`` hidden layers of the input's width and an output layer: ``L_0 .. L_{n-1}, L_n``.
Sub-model ``k`` (``k`` hidden layers) is the base with its first ``n - k`` layers removed; it reads
the raw input, which fits because every hidden layer keeps the input's width. Sub-model 0 is softmax
regression. All sub-models share the base's layers, so "each sub-model is the last layers of the next
bigger one" (the paper copies parameters every mini-batch to keep this) holds by construction.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

__all__ = ["DetachableMLP", "linear_macs"]


class DetachableMLP(nn.Module):
    """``x: Tensor[B, D]`` (or ``[B, ...]``, flattened) -> logits ``Tensor[B, C]`` at any depth.

    Args:
        in_features: ``D``, also the width of every hidden layer.
        num_classes: ``C``.
        depth: ``n``, the base's number of hidden layers (``n + 1`` sub-models, depths ``0..n``).
        dropout: applied after each hidden ReLU while training.
    """

    def __init__(self, in_features: int, num_classes: int, depth: int = 2, dropout: float = 0.0):
        super().__init__()
        for name, value in (("in_features", in_features), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be a non-negative int, got {depth!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.depth = depth
        self.hidden = nn.ModuleList(nn.Linear(in_features, in_features) for _ in range(depth))
        self.output = nn.Linear(in_features, num_classes)
        self.dropout = nn.Dropout(dropout)

    def layers(self) -> list[nn.Linear]:
        """``[L_0, ..., L_n]``: the hidden layers, input side first, then the output layer."""
        return [*self.hidden, self.output]

    def check_depth(self, depth: int) -> int:
        if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= self.depth:
            raise ValueError(f"depth must be an int in [0, {self.depth}] (hidden layers kept), got {depth!r}")
        return depth

    def forward(self, x: Tensor, depth: int | None = None) -> Tensor:
        """Logits of sub-model ``depth`` (hidden layers kept; ``None`` = the whole base)."""
        depth = self.depth if depth is None else self.check_depth(depth)
        h = x.flatten(1)
        for layer in self.hidden[self.depth - depth:]:
            h = self.dropout(torch.relu(layer(h)))
        return self.output(h)

    def detach_layers(self, removed: int) -> nn.Sequential:
        """A standalone copy of the base with its ``removed`` input-side layers taken off (evaluation
        mode, no dropout): ``Flatten, (Linear, ReLU) x (n - removed), Linear``."""
        if isinstance(removed, bool) or not isinstance(removed, int) or not 0 <= removed <= self.depth:
            raise ValueError(f"removed must be an int in [0, {self.depth}] (input-side layers taken off), got {removed!r}")
        depth = self.depth - removed
        parts: list[nn.Module] = [nn.Flatten()]
        for layer in self.hidden[self.depth - depth:]:
            parts += [copy.deepcopy(layer), nn.ReLU()]
        parts.append(copy.deepcopy(self.output))
        return nn.Sequential(*parts).eval()


def linear_macs(in_features: int, num_classes: int, depth: int) -> int:
    """Multiply-adds per sample of a depth-``depth`` sub-model (equal to its weight count)."""
    return depth * in_features * in_features + in_features * num_classes
