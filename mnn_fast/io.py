"""Crash-safe files: every write goes to a temporary file in the same directory, then an atomic rename.

Tensors are stored as safetensors (loading never unpickles) and configs as JSON; a truncated or
foreign file raises ``ValueError`` naming the path.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from torch import Tensor, nn

__all__ = ["atomic_write", "save_tensors", "load_tensors", "save_json", "load_json", "save_state", "load_state"]


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Saves ``{name: tensor}`` (moved to CPU, made contiguous) as a safetensors file, atomically."""
    from safetensors.torch import save

    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, save(clean, metadata=metadata))


def load_tensors(path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, metadata)`` from a safetensors file; ``ValueError`` if missing, truncated or foreign."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file; expected a safetensors file written by mnn_fast")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def save_json(path, obj) -> None:
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def load_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file; expected a JSON config written by mnn_fast")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def save_state(path, module: nn.Module, metadata: dict[str, str] | None = None) -> None:
    """A module's ``state_dict`` as safetensors (buffers such as BatchNorm statistics included)."""
    save_tensors(path, module.state_dict(), metadata)


def load_state(module: nn.Module, path) -> nn.Module:
    """Loads a :func:`save_state` file into ``module`` strictly; ``ValueError`` on any mismatch."""
    tensors, _ = load_tensors(path)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or extra or wrong:
        raise ValueError(
            f"{path}: does not match the architecture (missing {missing[:3]}, unexpected {extra[:3]}, "
            f"wrong shape {wrong[:3]})"
        )
    module.load_state_dict(tensors, strict=True)
    return module


