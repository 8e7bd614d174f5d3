"""A trained MNN as one directory: ``weights.safetensors``, ``config.json`` and ``manifest.json``.

The config names the architectures (``mnn_fast.training.models`` names), the classes, groups, test threshold
and top-k; the weights file holds ``switch.<param>`` and ``specialists.<e>.<param>`` tensors and the
config's sha256 in its metadata; the manifest records the config (and its sha256) and the weights
file's sha256 and tensors (dtype, shape). Loading never unpickles and checks all of it: a config
edited after saving, missing or extra tensors, or a changed dtype or shape is a ``ValueError``
naming the file and what differs.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import fields as F
from .. import io
from .models import MODEL_NAMES, build_model
from ..engine.module import MetaNeuralNetwork
from ..engine.routing import check_threshold, check_top_k, normalize_groups

__all__ = ["save_bundle", "load_bundle"]

FORMAT = "mnn_fast.bundle/1"
CONFIG_KEYS = ("format", "switch_arch", "specialist_arch", "input_shape", "num_classes", "groups", "threshold", "top_k")


def save_bundle(path, mnn: MetaNeuralNetwork, switch_arch: str, specialist_arch: str, input_shape) -> Path:
    """Writes ``mnn`` to directory ``path`` (each file atomically, the manifest last); returns the path."""
    for name, arch in (("switch_arch", switch_arch), ("specialist_arch", specialist_arch)):
        if arch not in MODEL_NAMES:
            raise ValueError(f"{name} must be one of {MODEL_NAMES}, got {arch!r}")
    if mnn.num_classes is None:
        raise ValueError("mnn.num_classes is unknown; build the module with num_classes=")
    path = Path(path)
    config = _check_config({
        "format": FORMAT,
        "switch_arch": switch_arch,
        "specialist_arch": specialist_arch,
        "input_shape": [int(s) for s in input_shape],
        "num_classes": mnn.num_classes,
        "groups": [list(g) for g in mnn.groups],
        "threshold": mnn.threshold,
        "top_k": mnn.top_k,
    }, "config")
    config_sha = io.config_sha256(config)
    tensors = {f"switch.{k}": v for k, v in mnn.switch.state_dict().items()}
    for e, s in enumerate(mnn.specialists):
        tensors.update({f"specialists.{e}.{k}": v for k, v in s.state_dict().items()})
    sha = io.save_tensors(path / "weights.safetensors", tensors, {"format": FORMAT, "mnn_fast.config_sha256": config_sha})
    io.save_json(path / "config.json", config)
    io.save_json(path / "manifest.json", {
        "format": FORMAT, "config": config, "config_sha256": config_sha,
        "files": {"weights.safetensors": {"sha256": sha,
                                          "tensors": io.tensor_summary(tensors)}},
    })
    return path


def load_bundle(path, **module_kwargs) -> MetaNeuralNetwork:
    """The :class:`MetaNeuralNetwork` saved by :func:`save_bundle` (evaluation mode).

    ``ValueError``/``TypeError`` naming the file for a missing, truncated, foreign, edited or
    inconsistent bundle.
    """
    path = Path(path)
    weights_path = path / "weights.safetensors"
    cfg = io.load_json(path / "config.json")
    if cfg.get("format") != FORMAT or any(k not in cfg for k in CONFIG_KEYS):
        raise ValueError(f"{path / 'config.json'}: not an mnn_fast bundle config (format {cfg.get('format')!r}, keys {sorted(cfg)})")
    cfg = _check_config(cfg, str(path / "config.json"))
    tensors, meta, sha = io.read_tensors(weights_path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{weights_path}: not an mnn_fast bundle (format {meta.get('format')!r})")
    num_classes, shape, num_experts = cfg["num_classes"], cfg["input_shape"], len(cfg["groups"])
    # Architecture first, built on the meta device: nothing is allocated for a config whose sizes
    # are absurd (num_classes 10**9), and a wrong size is reported before anything else.
    with torch.device("meta"):
        expected = {f"switch.{k}": v for k, v in build_model(cfg["switch_arch"], num_classes, shape).state_dict().items()}
        own = build_model(cfg["specialist_arch"], num_classes, shape).state_dict()
    for e in range(num_experts):
        expected.update({f"specialists.{e}.{k}": v for k, v in own.items()})
    for prefix in ["switch."] + [f"specialists.{e}." for e in range(num_experts)]:
        problem = io.state_mismatch({k: v for k, v in expected.items() if k.startswith(prefix)},
                                    {k: v for k, v in tensors.items() if k.startswith(prefix)})
        if problem:
            raise ValueError(f"{weights_path}: tensors under {prefix!r} do not match the architecture ({problem})")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ValueError(f"{weights_path}: unexpected tensors {extra[:3]}{' ...' if len(extra) > 3 else ''} "
                         f"(the config has {num_experts} specialists)")
    _check_manifest(path, cfg, tensors, meta, sha)

    switch = build_model(cfg["switch_arch"], num_classes, shape)
    specialists = [build_model(cfg["specialist_arch"], num_classes, shape) for _ in range(num_experts)]
    for prefix, module in [("switch.", switch)] + [(f"specialists.{e}.", s) for e, s in enumerate(specialists)]:
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    mnn = MetaNeuralNetwork(switch, specialists, groups=cfg["groups"], threshold=cfg["threshold"],
                            top_k=cfg["top_k"], num_classes=num_classes, **module_kwargs)
    return mnn.eval()


def _check_config(cfg: dict, where: str) -> dict:
    """``cfg`` with every field checked (one-line errors starting with ``where``) and normalised."""
    F.check_keys(where, cfg, CONFIG_KEYS)
    try:
        out = dict(cfg)
        for name in ("switch_arch", "specialist_arch"):
            out[name] = F.check_choice(name, cfg[name], MODEL_NAMES)
        shape = cfg["input_shape"]
        if not isinstance(shape, list) or not 1 <= len(shape) <= 4:
            raise TypeError(f"input_shape must be a list of 1 to 4 positive integers, got {shape!r}")
        out["input_shape"] = [F.check_int(f"input_shape[{i}]", s, 1) for i, s in enumerate(shape)]
        out["num_classes"] = F.check_int("num_classes", cfg["num_classes"], 1)
        out["groups"] = [list(g) for g in normalize_groups(cfg["groups"], None, out["num_classes"])]
        out["top_k"] = check_top_k(cfg["top_k"], len(out["groups"]))
        out["threshold"] = check_threshold(cfg["threshold"], out["top_k"])
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{where}: {exc}") from None
    return out


def _check_manifest(path: Path, cfg: dict, tensors: dict, meta: dict, sha: str) -> None:
    """The manifest must record this config and exactly these weights (bytes, names, dtypes, shapes)."""
    manifest_path, weights_path = path / "manifest.json", path / "weights.safetensors"
    m = io.load_json(manifest_path)
    entry = m.get("files", {}).get("weights.safetensors") if isinstance(m.get("files"), dict) else None
    if m.get("format") != FORMAT or not isinstance(m.get("config"), dict) or not isinstance(entry, dict):
        raise ValueError(f"{manifest_path}: not an mnn_fast bundle manifest (format {m.get('format')!r})")
    config_sha = io.config_sha256(cfg)
    if m.get("config_sha256") != config_sha:
        diff = sorted(k for k in set(cfg) | set(m["config"]) if cfg.get(k) != m["config"].get(k))
        raise ValueError(f"{path / 'config.json'}: differs from the config the weights were saved with "
                         f"(recorded in {manifest_path.name}; fields differ: {diff})")
    if meta.get("mnn_fast.config_sha256") != config_sha:
        raise ValueError(f"{weights_path}: saved with another config (config sha256 {meta.get('mnn_fast.config_sha256')!r}, "
                         f"expected {config_sha!r})")
    if entry.get("sha256") != sha:
        raise ValueError(f"{weights_path}: sha256 {sha} differs from {entry.get('sha256')!r} in {manifest_path.name}")
    if entry.get("tensors") != io.tensor_summary(tensors):
        raise ValueError(f"{weights_path}: tensor names, shapes or dtypes differ from {manifest_path.name}")
