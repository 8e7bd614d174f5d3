"""A trained MNN as one directory: ``weights.safetensors`` plus ``config.json``. Loading never unpickles.

The config names the architectures (``mnn_fast.models`` names), the classes, groups, test threshold
and top-k; the weights file holds ``switch.<param>`` and ``specialists.<e>.<param>`` tensors.
"""
from __future__ import annotations

from pathlib import Path

from . import io
from .models import MODEL_NAMES, build_model
from .module import MetaNeuralNetwork

__all__ = ["save_bundle", "load_bundle"]

FORMAT = "mnn_fast.bundle/1"


def save_bundle(path, mnn: MetaNeuralNetwork, switch_arch: str, specialist_arch: str, input_shape) -> Path:
    """Writes ``mnn`` to directory ``path`` (both files atomically); returns the path."""
    for name, arch in (("switch_arch", switch_arch), ("specialist_arch", specialist_arch)):
        if arch not in MODEL_NAMES:
            raise ValueError(f"{name} must be one of {MODEL_NAMES}, got {arch!r}")
    if mnn.num_classes is None:
        raise ValueError("mnn.num_classes is unknown; build the module with num_classes= or run one batch first")
    path = Path(path)
    tensors = {f"switch.{k}": v for k, v in mnn.switch.state_dict().items()}
    for e, s in enumerate(mnn.specialists):
        tensors.update({f"specialists.{e}.{k}": v for k, v in s.state_dict().items()})
    io.save_tensors(path / "weights.safetensors", tensors, {"format": FORMAT})
    io.save_json(path / "config.json", {
        "format": FORMAT,
        "switch_arch": switch_arch,
        "specialist_arch": specialist_arch,
        "input_shape": [int(s) for s in input_shape],
        "num_classes": mnn.num_classes,
        "groups": [list(g) for g in mnn.groups],
        "threshold": mnn.threshold,
        "top_k": mnn.top_k,
    })
    return path


def load_bundle(path, **module_kwargs) -> MetaNeuralNetwork:
    """The :class:`MetaNeuralNetwork` saved by :func:`save_bundle` (evaluation mode).

    ``ValueError`` naming the file for a missing, truncated or foreign bundle.
    """
    path = Path(path)
    cfg = io.load_json(path / "config.json")
    needed = ("switch_arch", "specialist_arch", "input_shape", "num_classes", "groups", "threshold", "top_k")
    if cfg.get("format") != FORMAT or any(k not in cfg for k in needed):
        raise ValueError(f"{path / 'config.json'}: not an mnn_fast bundle config (format {cfg.get('format')!r}, keys {sorted(cfg)})")
    tensors, meta = io.load_tensors(path / "weights.safetensors")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path / 'weights.safetensors'}: not an mnn_fast bundle (format {meta.get('format')!r})")
    num_classes, shape = cfg["num_classes"], cfg["input_shape"]
    switch = build_model(cfg["switch_arch"], num_classes, shape)
    specialists = [build_model(cfg["specialist_arch"], num_classes, shape) for _ in cfg["groups"]]
    _load_prefixed(switch, tensors, "switch.", path)
    for e, s in enumerate(specialists):
        _load_prefixed(s, tensors, f"specialists.{e}.", path)
    mnn = MetaNeuralNetwork(switch, specialists, groups=cfg["groups"], threshold=cfg["threshold"],
                            top_k=cfg["top_k"], num_classes=num_classes, **module_kwargs)
    return mnn.eval()


def _load_prefixed(module, tensors: dict, prefix: str, path: Path) -> None:
    own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    expected = module.state_dict()
    if set(own) != set(expected) or any(own[k].shape != expected[k].shape for k in expected):
        missing = sorted(set(expected) - set(own))[:3]
        wrong = sorted(k for k in set(own) & set(expected) if own[k].shape != expected[k].shape)[:3]
        raise ValueError(f"{path / 'weights.safetensors'}: tensors under {prefix!r} do not match the architecture "
                         f"(missing {missing}, wrong shape {wrong})")
    module.load_state_dict(own, strict=True)
