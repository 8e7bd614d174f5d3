"""Random small CNNs: the architectures a GHN trains on and is evaluated on.

An ``ArchSpec`` fixes one network: per conv layer its width, kernel size (1 or 3), whether a residual
sum adds the layer's input (only where the width is unchanged) and whether a 2x2 max-pool follows;
for the whole net BatchNorm or not (conv biases only without it), the activation (ReLU or GELU), and
the head (adaptive average pool to 1x1 or 2x2, a third of the time a hidden linear layer as wide as
the space's widest conv, the classifier). Widths repeat the previous layer's half the time so residual
sums are common; 3x3 kernels are twice as likely as 1x1.
``SearchSpace`` draws specs; ``SPACES`` holds the three of the experiment:

- ``in_distribution``: 1-4 conv layers, widths {8, 16, 24, 32} (the GHN trains on this space);
- ``deeper``: 5-8 conv layers, same widths (deeper than any training net);
- ``wider``: 1-4 conv layers, widths {48, 64} (wider than any training net, beyond the decoder's tile).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ArchSpec", "SearchSpace", "SPACES", "SampledCNN", "sample_architectures"]


@dataclass(frozen=True)
class ArchSpec:
    """One sampled CNN (hashable, JSON-able through ``vars``). Per-layer tuples have one entry per conv layer."""

    widths: tuple[int, ...]
    kernels: tuple[int, ...]
    residual: tuple[bool, ...]
    pools: tuple[bool, ...]
    batch_norm: bool
    activation: str
    head_pool: int
    head_hidden: int

    def code(self) -> str:
        """A short readable id, e.g. ``c16k3-c16k3r-c32k1p_bn_relu_h2_f0``: ``r`` residual, ``p`` pooled."""
        layers = "-".join(f"c{w}k{k}{'r' if r else ''}{'p' if p else ''}"
                          for w, k, r, p in zip(self.widths, self.kernels, self.residual, self.pools))
        return f"{layers}_{'bn' if self.batch_norm else 'nobn'}_{self.activation}_h{self.head_pool}_f{self.head_hidden}"


@dataclass(frozen=True)
class SearchSpace:
    """Inclusive range of conv layers ``depths``, the ``widths`` to draw from, and the other choices."""

    depths: tuple[int, int]
    widths: tuple[int, ...]
    kernels: tuple[int, ...] = (1, 3, 3)  # 3x3 twice as likely: 1x1-only stacks see no spatial context
    activations: tuple[str, ...] = ("relu", "gelu")

    def sample(self, rng: random.Random, image_size: int) -> ArchSpec:
        """One spec for square inputs of side ``image_size`` (at most ``log2(side) - 1`` pools, so at
        least a 2x2 map reaches the head)."""
        depth = rng.randint(*self.depths)
        widths = [rng.choice(self.widths)]
        for _ in range(depth - 1):  # keep the width half the time, so residual sums are possible
            widths.append(widths[-1] if rng.random() < 0.5 else rng.choice(self.widths))
        max_pools = max(0, min(depth, int(math.log2(image_size)) - 1))
        pooled = set(rng.sample(range(depth), rng.randint(0, max_pools)))
        residual = [i > 0 and widths[i] == widths[i - 1] and rng.random() < 0.5 for i in range(depth)]
        return ArchSpec(widths=tuple(widths), kernels=tuple(rng.choice(self.kernels) for _ in range(depth)),
                        residual=tuple(residual), pools=tuple(i in pooled for i in range(depth)),
                        batch_norm=rng.random() < 0.5, activation=rng.choice(self.activations),
                        head_pool=rng.choice((1, 2)), head_hidden=rng.choice((0, 0, max(self.widths))))


SPACES = {
    "in_distribution": SearchSpace(depths=(1, 4), widths=(8, 16, 24, 32)),
    "deeper": SearchSpace(depths=(5, 8), widths=(8, 16, 24, 32)),
    "wider": SearchSpace(depths=(1, 4), widths=(48, 64)),
}


def sample_architectures(space: SearchSpace, n: int, seed: int, image_size: int,
                         exclude=frozenset()) -> list[ArchSpec]:
    """``n`` distinct specs drawn from ``space`` with ``random.Random(seed)``, none of them in ``exclude``."""
    rng = random.Random(seed)
    out: list[ArchSpec] = []
    seen = set(exclude)
    for _ in range(1000 * max(n, 1)):
        if len(out) == n:
            return out
        spec = space.sample(rng, image_size)
        if spec not in seen:
            seen.add(spec)
            out.append(spec)
    raise ValueError(f"n: could not draw {n} distinct architectures from {space} (got {len(out)})")


class SampledCNN(nn.Module):
    """``ArchSpec`` as a module: ``Tensor[B, C, H, W] float32`` -> logits ``Tensor[B, num_classes]``.

    Layer i: ``y = bn(conv(h))`` (``+ h`` if residual), then the activation, then the optional 2x2
    max-pool; head: adaptive average pool, flatten, [linear, activation], linear.
    """

    def __init__(self, spec: ArchSpec, in_channels: int, num_classes: int):
        super().__init__()
        self.spec = spec
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        width = in_channels
        for w, k in zip(spec.widths, spec.kernels):
            self.convs.append(nn.Conv2d(width, w, k, padding=k // 2, bias=not spec.batch_norm))
            self.norms.append(nn.BatchNorm2d(w) if spec.batch_norm else nn.Identity())
            width = w
        features = width * spec.head_pool ** 2
        self.hidden = nn.Linear(features, spec.head_hidden) if spec.head_hidden else None
        self.classifier = nn.Linear(spec.head_hidden or features, num_classes)

    def _act(self, x: Tensor) -> Tensor:
        return F.relu(x) if self.spec.activation == "relu" else F.gelu(x)

    def forward(self, x: Tensor) -> Tensor:
        for conv, norm, residual, pool in zip(self.convs, self.norms, self.spec.residual, self.spec.pools):
            y = norm(conv(x))
            x = self._act(y + x if residual else y)
            if pool:
                x = F.max_pool2d(x, 2)
        x = F.adaptive_avg_pool2d(x, self.spec.head_pool).flatten(1)
        if self.hidden is not None:
            x = self._act(self.hidden(x))
        return self.classifier(x)
