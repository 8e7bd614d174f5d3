"""Crash-safe files: every write goes to a temporary file in the same directory, then an atomic rename.

Tensors are stored as safetensors (loading never unpickles) and configs as JSON; a truncated or
foreign file raises ``ValueError`` naming the path. Files get the permissions the user's umask
allows (as ``open`` would give), not the 0600 of a bare ``mkstemp``. Also here: sha256 and tensor
summaries for manifests, strict state loading (names, shapes and dtypes) and advisory file locks.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path

from torch import Tensor, nn

__all__ = ["atomic_write", "save_tensors", "load_tensors", "read_tensors", "save_json", "load_json", "save_state", "load_state",
           "load_state_tensors", "state_mismatch", "sha256_file", "config_sha256", "tensor_summary",
           "remove_temporaries", "FileLock", "BusyError"]

_umask_lock = threading.Lock()


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    # Elsewhere the only way to read it is to set it; the lock keeps our own threads from
    # interleaving two such reads (which would leave the umask at 0).
    with _umask_lock:
        old = os.umask(0o077)
        os.umask(old)
    return old


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that readers see the old file or the whole new one, never a part.

    The temporary file is ``.NAME.<random>.tmp`` next to ``path`` (what :func:`remove_temporaries`
    cleans after a crash); the final file has mode ``0o666 & ~umask``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600 files: shared (group) run directories need the umask's permissions.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_temporaries(directory) -> list[Path]:
    """Deletes the ``.NAME.*.tmp`` files :func:`atomic_write` leaves when a process dies mid-write.

    Only call this while no other process can be writing into ``directory`` (hold its lock).
    """
    directory = Path(directory)
    removed = []
    for p in sorted(directory.glob(".*.tmp")) if directory.is_dir() else []:
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def save_tensors(path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> str:
    """Saves ``{name: tensor}`` (moved to CPU, made contiguous) as a safetensors file, atomically;
    returns the sha256 of the bytes written."""
    from safetensors.torch import save

    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    blob = _sorted_metadata(save(clean, metadata=metadata))
    atomic_write(path, blob)
    return hashlib.sha256(blob).hexdigest()


def _sorted_metadata(blob: bytes) -> bytes:
    """``blob`` with its header's metadata keys sorted: safetensors keeps them in a hash map, whose
    order changes from process to process, and the same run must write the same bytes (and sha256)."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8-byte alignment with spaces
    return len(text).to_bytes(8, "little") + text + blob[8 + n :]


def load_tensors(path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, metadata)`` from a safetensors file; ``ValueError`` if missing, truncated or foreign."""
    tensors, metadata, _ = read_tensors(path)
    return tensors, metadata


def read_tensors(path) -> tuple[dict[str, Tensor], dict[str, str], str]:
    """``(tensors, metadata, sha256 of the bytes parsed)``; ``ValueError`` if missing, truncated or foreign.

    The file is read into memory once: the hash is of exactly the bytes the tensors came from, and
    the tensors are not backed by a memory map that a later in-place truncation of the file would
    turn into a crash (SIGBUS) when they are read.
    """
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file; expected a safetensors file written by mnn_fast")
    blob = path.read_bytes()
    try:
        tensors = load(blob)
        n = int.from_bytes(blob[:8], "little")
        metadata = json.loads(blob[8 : 8 + n]).get("__metadata__") or {}
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    return tensors, dict(metadata), hashlib.sha256(blob).hexdigest()


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


# ------------------------------------------------------------------- integrity: hashes and states

def sha256_file(path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def config_sha256(config: dict) -> str:
    """Hex sha256 of a JSON-able config in canonical form (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def tensor_summary(tensors: dict[str, Tensor]) -> dict[str, dict]:
    """``{name: {"dtype": "float32", "shape": [..]}}``: what a manifest records of each tensor."""
    return {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)} for k, v in sorted(tensors.items())}


def state_mismatch(expected: dict[str, Tensor], got: dict[str, Tensor]) -> str | None:
    """``None`` if ``got`` has exactly ``expected``'s names, shapes and dtypes; else what differs."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    common = sorted(set(expected) & set(got))
    shape = [f"{k} {tuple(got[k].shape)} != {tuple(expected[k].shape)}" for k in common if got[k].shape != expected[k].shape]
    dtype = [f"{k} {got[k].dtype} != {expected[k].dtype}" for k in common if got[k].dtype != expected[k].dtype]
    parts = [f"{what} {items[:3]}{' ...' if len(items) > 3 else ''}"
             for what, items in (("missing", missing), ("unexpected", extra), ("wrong shape", shape), ("wrong dtype", dtype))
             if items]
    return ", ".join(parts) or None


def load_state_tensors(module: nn.Module, tensors: dict[str, Tensor], where: str) -> nn.Module:
    """Loads ``tensors`` into ``module`` after checking names, shapes and dtypes against its state.

    ``load_state_dict`` would silently cast an int8 or float16 file; here that is a ``ValueError``
    starting with ``where``.
    """
    problem = state_mismatch(module.state_dict(), tensors)
    if problem:
        raise ValueError(f"{where}: does not match the architecture ({problem})")
    module.load_state_dict(tensors, strict=True)
    return module


def save_state(path, module: nn.Module, metadata: dict[str, str] | None = None) -> str:
    """A module's ``state_dict`` as safetensors (buffers such as BatchNorm statistics included);
    returns the file's sha256."""
    return save_tensors(path, module.state_dict(), metadata)


def load_state(module: nn.Module, path) -> nn.Module:
    """Loads a :func:`save_state` file into ``module`` strictly; ``ValueError`` on any mismatch
    (missing or extra tensors, shapes, dtypes)."""
    tensors, _ = load_tensors(path)
    return load_state_tensors(module, tensors, str(path))


# ------------------------------------------------------------------------------------------ locks

class BusyError(RuntimeError):
    """Another process holds the lock on a run directory."""


class FileLock:
    """An advisory ``fcntl.flock`` on ``path`` (the file is created if needed), released on close.

    Exclusive or shared, never blocking unless asked: a second writer is refused at once rather than
    left waiting for a run that may take hours. Locks belong to the open file, so they vanish when
    the process dies (no stale lock files to clean).
    """

    def __init__(self, path):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, shared: bool = False, blocking: bool = False) -> bool:
        """Takes (or converts to) the lock; ``False`` if it is held elsewhere and ``blocking`` is false."""
        import fcntl

        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(self._fd, flags)
        except BlockingIOError:
            return False
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
