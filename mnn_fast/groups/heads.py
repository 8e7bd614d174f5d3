"""Auxiliary group heads on a frozen network (docs/experiments/label-groups.md, Warde-Farley et al. 2014).

The trained base is split at its final ``nn.Linear`` into a frozen feature extractor and a classifier.
Each group ``G_g`` gets a parallel stack ``depth x (Linear + ReLU)`` on the features whose output
``Linear(h, |G_g|)`` is added only to the logits of ``G_g``'s classes; the classifier is retrained.
"""
from __future__ import annotations

import copy
import math
import numbers

import torch
from torch import Tensor, nn

from ..engine.routing import normalize_groups
from ..training.loop import minimise

__all__ = ["AuxHeadNet", "train_heads", "base_features", "count_macs", "head_overhead", "find_classifier", "DEFAULT_HEAD_HIDDEN"]

# Width of each group's hidden layers. Heads cost E*F*h + (depth-1)*E*h^2 + h*sum|G_g| multiply-adds
# per sample (E groups, F features); for a partition of C classes that grows with E, so C singleton
# groups are the worst case. CIFAR ResNet-20 (F = 64, C = 10, ~41M MACs): 10 * (64*256 + 256) = 166k
# MACs, 0.4% at depth 1 and still under 5% at depth 3 -- heads stay an augmentation, not a new network.
DEFAULT_HEAD_HIDDEN = 256


def find_classifier(base: nn.Module) -> tuple[str, nn.Linear]:
    """``(name, layer)`` of the last ``nn.Linear`` registered in ``base``: the classifier of every
    :func:`~mnn_fast.training.models.build_model` architecture (``MLP``'s last layer, ``SmallCNN``'s head,
    ``CifarResNet.linear``, MobileNetV2's ``classifier[1]``)."""
    found = None
    for name, module in base.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    if found is None:
        raise ValueError(f"base: {type(base).__name__} has no nn.Linear layer to use as its classifier")
    return found


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


class AuxHeadNet(nn.Module):
    """A frozen base plus one auxiliary head per label group.

    Args:
        base: a trained ``nn.Module`` whose final operation is an ``nn.Linear`` classifier (true for
            every ``build_model`` architecture); it is deep-copied, so the caller's module never
            changes. ``classifier`` names that layer when it is not the last ``nn.Linear`` registered.
        groups: ``E`` lists of class ids in ``[0, C)`` (distinct within a group; groups may overlap
            and need not cover every class).
        hidden: width ``h`` of each head's hidden layers (default ``DEFAULT_HEAD_HIDDEN``).
        depth: number of ``Linear + ReLU`` hidden layers per head (``>= 1``).

    ``forward(x: Tensor[B, ...]) -> Tensor[B, C]`` logits ``= classifier(f) + sum_g scatter(head_g(f),
    G_g)`` where ``f = features(x): Tensor[B, F]`` is the input of the base's classifier. The classifier
    starts as a copy of the base's and each head's output layer starts at zero, so an untrained
    ``AuxHeadNet`` computes exactly the base's logits. The feature extractor (``body``) is frozen
    (``requires_grad=False``) and stays in eval mode whatever ``train()`` is called with, so
    BatchNorm statistics never move.
    """

    def __init__(self, base: nn.Module, groups, hidden: int = DEFAULT_HEAD_HIDDEN, depth: int = 1, *,
                 classifier: str | None = None):
        super().__init__()
        if not isinstance(base, nn.Module):
            raise TypeError(f"base must be an nn.Module, got {type(base).__name__}")
        for name, value in (("hidden", hidden), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if classifier is None:
            classifier, layer = find_classifier(base)
        else:
            layer = base.get_submodule(classifier) if classifier else base
            if not isinstance(layer, nn.Linear):
                raise ValueError(f"classifier: {classifier!r} is a {type(layer).__name__}, not an nn.Linear")
        num_classes, num_features = layer.out_features, layer.in_features
        self.groups = [list(g) for g in normalize_groups(groups, None, num_classes)]
        self.num_classes, self.num_features = num_classes, num_features
        self.hidden, self.depth = int(hidden), int(depth)

        if classifier:
            body = copy.deepcopy(base)
            _replace(body, classifier, nn.Identity())  # the copy now returns the classifier's input
        else:
            body = nn.Identity()  # base is itself the classifier
        self.body = body.requires_grad_(False).eval()
        self.classifier = copy.deepcopy(layer).requires_grad_(True)
        self.heads = nn.ModuleList(self._head(len(g)) for g in self.groups)
        for e, g in enumerate(self.groups):
            self.register_buffer(f"_group_idx_{e}", torch.tensor(g, dtype=torch.long), persistent=False)
        ref = next(layer.parameters())
        self.heads.to(device=ref.device, dtype=ref.dtype)

    def _head(self, width: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for i in range(self.depth):
            layers += [nn.Linear(self.num_features if i == 0 else self.hidden, self.hidden), nn.ReLU()]
        out = nn.Linear(self.hidden, width)
        nn.init.zeros_(out.weight)  # start as a no-op: training begins from the base's exact output
        nn.init.zeros_(out.bias)
        return nn.Sequential(*layers, out)

    def train(self, mode: bool = True) -> "AuxHeadNet":
        super().train(mode)
        self.body.eval()  # frozen means frozen: no BatchNorm statistics updates, no dropout
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The retrained classifier's parameters, then every head's (the base is frozen)."""
        return list(self.classifier.parameters()) + list(self.heads.parameters())

    def features(self, x: Tensor) -> Tensor:
        """``Tensor[B, F]``: the base's classifier input for ``x: Tensor[B, ...]``."""
        f = self.body(x)
        if not isinstance(f, Tensor) or f.dim() != 2 or f.shape[1] != self.num_features:
            shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(f"base: the classifier's input should be [B, {self.num_features}] but the base "
                             f"without it returned {shape}; is the classifier the base's last operation? "
                             "(pass classifier= to name it)")
        return f

    def head_logits(self, f: Tensor) -> Tensor:
        """``Tensor[B, C]`` logits from features ``f: Tensor[B, F]``; heads are added in group order."""
        z = self.classifier(f)
        for e, head in enumerate(self.heads):
            z = z.index_add(1, getattr(self, f"_group_idx_{e}"), head(f))
        return z

    def forward(self, x: Tensor) -> Tensor:
        return self.head_logits(self.features(x))

    def head_macs(self) -> int:
        """Multiply-adds per sample of all heads (their ``nn.Linear`` layers), counted analytically."""
        return sum(m.in_features * m.out_features for m in self.heads.modules() if isinstance(m, nn.Linear))

    def extra_repr(self) -> str:
        return (f"groups={len(self.groups)}, classes={self.num_classes}, features={self.num_features}, "
                f"hidden={self.hidden}, depth={self.depth}")


@torch.no_grad()
def base_features(net: AuxHeadNet, x: Tensor, batch_size: int = 512) -> Tensor:
    """``Tensor[n, F]``: the frozen base's features of ``x: Tensor[n, ...]``, in batches. Every
    ``AuxHeadNet`` built on the same base gives the same features, so they can be shared."""
    net.eval()
    return torch.cat([net.features(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def train_heads(net: AuxHeadNet, x: Tensor, y: Tensor, epochs: int = 10, lr: float = 1e-3,
                batch_size: int = 64, seed: int = 0, *, classifier_only: bool = False,
                features: Tensor | None = None) -> AuxHeadNet:
    """Trains ``net``'s classifier and heads with Adam + cosine decay on cross-entropy; returns ``net``
    in eval mode. ``x: Tensor[n, ...] float32``, ``y: Tensor[n] int64``. Deterministic given ``seed``.

    The base is frozen and in eval mode, so its features are a fixed function of ``x``: they are
    computed once (one forward pass over ``x``) and every epoch runs only the small layers on them;
    ``features`` passes them in precomputed (:func:`base_features`), to share one pass between nets
    on the same base. ``classifier_only=True`` retrains the classifier and leaves the heads at zero: the control that
    tells what the heads add beyond refitting the last layer on the same data.
    """
    if not isinstance(net, AuxHeadNet):
        raise TypeError(f"net must be an AuxHeadNet, got {type(net).__name__}")
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or len(x) != len(y):
        raise ValueError(f"y: expected one label per row of x, got {len(y)} labels for {len(x)} rows")
    for name, value, low in (("epochs", epochs, 0), ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not isinstance(lr, numbers.Real) or not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    torch.manual_seed(seed)
    if features is None:
        feats = base_features(net, x)
    elif not isinstance(features, Tensor) or tuple(features.shape) != (len(x), net.num_features):
        got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features: expected the base's features of x, shape [{len(x)}, {net.num_features}], got {got}")
    else:
        feats = features
    y = y.to(feats.device)
    params = list(net.classifier.parameters()) if classifier_only else net.trainable_parameters()
    opt = torch.optim.Adam(params, lr=lr)
    net.train()
    minimise(net.head_logits, opt, feats, y, epochs, batch_size, seed, "heads")
    return net.eval()


def count_macs(model: nn.Module, input_shape) -> int:
    """Multiply-adds of one ``model`` forward on zeros of ``input_shape`` (batch dimension included,
    e.g. ``(1, 3, 32, 32)``), in eval mode, as counted by ``torch.utils.flop_counter.FlopCounterMode``.

    FlopCounterMode counts 2 flops per multiply-add of matmuls and convolutions, so MACs = flops / 2;
    element-wise work (BatchNorm, ReLU, pooling, additions, the heads' scatter-add) is not counted.
    The model's training mode is restored afterwards.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    try:
        shape = tuple(int(s) for s in input_shape)
    except TypeError:
        raise TypeError(f"input_shape must be a sequence of ints, got {input_shape!r}") from None
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"input_shape must be [B, ...] with positive sizes, got {input_shape!r}")
    ref = next(model.parameters(), None)
    x = torch.zeros(shape, device=ref.device if ref is not None else None,
                    dtype=ref.dtype if ref is not None and ref.is_floating_point() else torch.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // 2


def head_overhead(net: AuxHeadNet, input_shape) -> dict:
    """``{"base_macs", "total_macs", "head_macs", "overhead"}`` for one forward of ``input_shape``:
    the base (frozen body + classifier), the whole ``net``, their difference and ``head/base``."""
    base = count_macs(nn.Sequential(net.body, net.classifier).eval(), input_shape)
    net.train(net.training)  # the wrapper shares the classifier; put its mode back
    total = count_macs(net, input_shape)
    return {"base_macs": base, "total_macs": total, "head_macs": total - base,
            "overhead": (total - base) / base if base else math.inf}
