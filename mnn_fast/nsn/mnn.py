"""Detachable MNNs: NSN specialists run at a chosen depth through the ordinary engine.

One depth for all: each specialist becomes its depth-``d`` sub-network, an ``nn.Sequential`` sharing
the base's layers (a Linear stack, so the grouped executor runs it). Per sample: every (depth,
expert) pair is a virtual expert, depth-major, and a ``switch_fn`` activates for sample ``i`` only the
experts of its own depth, chosen by a budget rule from the switch's confidence.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..engine.module import MetaNeuralNetwork
from ..engine.routing import check_threshold, check_top_k
from ..engine.torch_ops import active_mask_torch
from .model import DetachableMLP, linear_macs

__all__ = ["sub_network", "detachable_mnn", "ConfidenceDepth", "expected_macs"]


def sub_network(model: DetachableMLP, depth: int) -> nn.Sequential:
    """The depth-``depth`` sub-model as ``Flatten, (Linear, ReLU) x depth, Linear`` sharing ``model``'s
    layers (no copy: training the base changes it); evaluation semantics (no dropout)."""
    model.check_depth(depth)
    parts: list[nn.Module] = [nn.Flatten()]
    for layer in model.hidden[model.depth - depth:]:
        parts += [layer, nn.ReLU()]
    parts.append(model.output)
    return nn.Sequential(*parts)


class ConfidenceDepth:
    """The budget rule: a confident switch needs less from its specialists.

    ``cutoffs`` (one per depth below the full one, descending in ``(0, 1]``): a sample whose largest
    expert score is at least ``cutoffs[0]`` runs its specialists at depth 0, below ``cutoffs[0]`` but at
    least ``cutoffs[1]`` at depth 1, ..., below every cutoff at full depth ``len(cutoffs)``.
    """

    def __init__(self, cutoffs: Sequence[float]):
        cutoffs = [float(c) for c in cutoffs]
        if any(not 0.0 < c <= 1.0 for c in cutoffs) or any(a <= b for a, b in zip(cutoffs, cutoffs[1:])):
            raise ValueError(f"cutoffs must be strictly decreasing values in (0, 1], got {cutoffs}")
        self.cutoffs = cutoffs

    @property
    def depth(self) -> int:
        return len(self.cutoffs)

    def depths(self, scores: Tensor) -> Tensor:
        """``Tensor[B] int64``: each sample's depth from its expert scores ``Tensor[B, E]``."""
        top = scores.amax(1) if scores.shape[1] else scores.new_zeros(scores.shape[0])
        cut = torch.tensor(self.cutoffs, dtype=scores.dtype, device=scores.device)
        return (top[:, None] < cut[None, :]).sum(1)


def detachable_mnn(switch: nn.Module, specialists: Sequence[DetachableMLP], depth: int | ConfidenceDepth,
                   groups=None, threshold: float | None = 0.25, top_k: int | None = None, **kwargs) -> MetaNeuralNetwork:
    """A :class:`~mnn_fast.MetaNeuralNetwork` whose NSN specialists run at ``depth`` (an int for all
    samples, or a :class:`ConfidenceDepth` rule per sample). ``kwargs`` go to the module."""
    specialists = list(specialists)
    if not specialists or not all(isinstance(s, DetachableMLP) for s in specialists):
        raise TypeError("specialists must be a non-empty list of DetachableMLP")
    if isinstance(depth, ConfidenceDepth):
        return _per_sample(switch, specialists, depth, groups, threshold, top_k, **kwargs)
    return MetaNeuralNetwork(switch, [sub_network(s, depth) for s in specialists], groups=groups, threshold=threshold,
                             top_k=top_k, **kwargs)


def _per_sample(switch, specialists, rule: ConfidenceDepth, groups, threshold, top_k, **kwargs) -> MetaNeuralNetwork:
    n = specialists[0].depth
    if rule.depth != n:
        raise ValueError(f"rule has cutoffs for {rule.depth + 1} depths but the specialists have {n + 1}")
    num_experts = len(specialists)
    top_k = check_top_k(top_k, num_experts)
    threshold = check_threshold(threshold, top_k)
    base_groups = [[e] for e in range(num_experts)] if groups is None else [list(g) for g in groups]
    experts = [sub_network(s, d) for d in range(n + 1) for s in specialists]  # depth-major

    def switch_fn(scores: Tensor) -> Tensor:
        real = scores[:, :num_experts]  # every depth block holds the same scores
        active = active_mask_torch(real, threshold, top_k)
        depth_of = rule.depths(real)
        return torch.cat([active & (depth_of == d)[:, None] for d in range(n + 1)], dim=1)

    num_classes = kwargs.pop("num_classes", None)
    if groups is None and num_classes is None:
        num_classes = num_experts
    # threshold/top_k act inside switch_fn; the module's own rule is unused when a switch_fn is given.
    return MetaNeuralNetwork(switch, experts, groups=base_groups * (n + 1), threshold=0.0, switch_fn=switch_fn,
                             num_classes=num_classes, **kwargs)


def expected_macs(switch_macs: int, experts_per_sample: float, in_features: int, num_classes: int, depth: int) -> float:
    """Mean multiply-adds per sample: the switch plus the active specialists at ``depth``."""
    return switch_macs + experts_per_sample * linear_macs(in_features, num_classes, depth)
