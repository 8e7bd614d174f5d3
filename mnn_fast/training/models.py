"""Network architectures for switches and specialists, built by name with ``build_model``.

"mlp", "small_cnn" (digits, MNIST), the CIFAR ResNets "resnet20"/"resnet56" (He et al. 2016, option A)
whose parameter names match Yerlan Idelbayev's pretrained checkpoints (``load_pretrained_resnet``), and
"mobilenet_v2" adapted to 32x32 inputs. Nothing downloads weights.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import IMAGENET_MEAN, IMAGENET_STD

MODEL_NAMES = ("mlp", "nsn_mlp", "small_cnn", "resnet20", "resnet56", "mobilenet_v2")
# The pretrained ResNet files were trained on inputs normalised with ImageNet's statistics, not
# CIFAR's (the reference trainer.py); re-normalise to these to evaluate them at their best.
PRETRAINED_RESNET_MEAN = IMAGENET_MEAN
PRETRAINED_RESNET_STD = IMAGENET_STD


def build_model(name: str, num_classes: int, input_shape) -> nn.Module:
    """A freshly initialised ``nn.Module`` mapping ``Tensor[B, *input_shape] float32`` to logits
    ``Tensor[B, num_classes] float32``. ``input_shape`` is ``(C, H, W)`` (``mlp`` accepts any shape)."""
    if name not in MODEL_NAMES:
        raise ValueError(f"name: unknown model {name!r}; expected one of {MODEL_NAMES}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive integer, got {num_classes!r}")
    shape = tuple(int(s) for s in input_shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"input_shape: expected positive sizes, got {input_shape!r}")
    if name == "mlp":
        return MLP(math.prod(shape), num_classes)
    if name == "nsn_mlp":  # a detachable base: two hidden layers of the input's width (mnn_fast.nsn)
        from ..nsn.model import DetachableMLP

        return DetachableMLP(math.prod(shape), num_classes, depth=2, dropout=0.2)
    if len(shape) != 3:
        raise ValueError(f"input_shape: {name} needs (C, H, W), got {input_shape!r}")
    if name == "small_cnn":
        return SmallCNN(shape[0], num_classes)
    if name in ("resnet20", "resnet56"):
        return CifarResNet({"resnet20": 3, "resnet56": 9}[name], num_classes, shape[0])
    return mobilenet_v2_cifar(num_classes, shape[0])


class MLP(nn.Sequential):
    """Flatten -> Linear(in_features, hidden) -> ReLU -> Linear(hidden, num_classes)."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 256):
        super().__init__(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


class SmallCNN(nn.Sequential):
    """Two 3x3 conv blocks (32, 64 channels, BN, ReLU, one 2x2 max-pool) and a linear head. Adaptive
    pooling to 2x2 makes the head independent of the input size (8x8 digits, 28x28 MNIST)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(
            nn.Conv2d(in_channels, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64 * 4, num_classes),
        )


class PadShortcut(nn.Module):
    """Option-A shortcut: keep every other pixel (``x[:, :, ::2, ::2]``) and zero-pad the channels
    ``[B, C, H, W] -> [B, C + 2 * pad, H/2, W/2]``; parameter-free, so checkpoints have no key for it."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # Option A of the paper doubles channels and halves resolution together, so planes // 4 on
        # each side of the channel axis is exactly the missing half.
        self.shortcut = (PadShortcut(planes // 4) if stride != 1 or in_planes != planes
                         else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR (He et al. 2016, section 4.2): a 16-channel 3x3 stem, three stages of
    ``n`` basic blocks with 16/32/64 channels (stride 2 at the start of stages 2 and 3), global average
    pooling and ``linear``. Module names (conv1, bn1, layer1..3, linear) match the pretrained files."""

    def __init__(self, n: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, 1)
        self.layer2 = self._stage(16, 32, n, 2)
        self.layer3 = self._stage(32, 64, n, 2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():  # the reference implementation's initialisation
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        return nn.Sequential(*[BasicBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1)
                               for i in range(n)])

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def mobilenet_v2_cifar(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """``torchvision.models.mobilenet_v2(weights=None)`` for 32x32 inputs.

    Changes from torchvision: the stem conv ``features[0][0]`` has stride 1 instead of 2 (so a 32x32
    image ends at 2x2 instead of 1x1 before pooling) and takes ``in_channels`` inputs. Everything else,
    the dropout-0.2 classifier included, is torchvision's.
    """
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2(weights=None, num_classes=num_classes)
    old = model.features[0][0]
    stem = nn.Conv2d(in_channels, old.out_channels, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(stem.weight, mode="fan_out")  # torchvision's conv init
    model.features[0][0] = stem
    return model


def load_pretrained_resnet(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a checkpoint such as ``resnet20-12fca82f.th`` into ``model`` strictly; returns ``model``.

    The file is a dict whose ``'state_dict'`` has keys prefixed ``module.`` (saved from DataParallel);
    a bare state dict is accepted too. BatchNorm's ``num_batches_tracked`` counters, absent from these
    files, keep the model's values: they do not affect inference. The weights expect inputs normalised
    with ``PRETRAINED_RESNET_MEAN``/``PRETRAINED_RESNET_STD``. Raises ``ValueError`` for a missing
    or unreadable file and for any missing, unexpected or mis-shaped parameter.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"path: no checkpoint file at {str(p)!r}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, EOFError...)
        raise ValueError(f"path: {str(p)!r} is not a PyTorch checkpoint: {e}") from e
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"path: {str(p)!r} holds no state dict (expected a dict of tensors, or a dict "
                         "with a 'state_dict' entry)")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    own = model.state_dict()
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = v
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        def few(xs):
            return ", ".join(xs[:4]) + (f" (+{len(xs) - 4} more)" if len(xs) > 4 else "")
        problems = [f"{label}: {few(xs)}" for label, xs in
                    (("missing", missing), ("unexpected", unexpected), ("shape (file vs model)", shapes))
                    if xs]
        raise ValueError(f"path: {str(p)!r} does not match the {type(model).__name__} architecture; "
                         + "; ".join(problems))
    model.load_state_dict(sd, strict=True)
    return model
