"""``load_exported``: runs a package from ``mnn-fast export`` in Python.

The package is checked before any of its compiled code is loaded (zip CRCs, the mnn_fast record,
the torch and mnn_fast versions it was built with, and, when asked, the run it came from); the
mnn_fast op library is loaded next (the compiled model calls its routing ops), then the model. Each
call checks the input against the record (float32, the input shape, 1 <= B <= max batch).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch._inductor  # aoti_* (not imported by `import torch`)
from torch import Tensor

from .._version import __version__
from .record import read_record, run_fingerprint

__all__ = ["ExportedMNN", "load_exported"]

_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


class ExportedMNN:
    """A loaded package: ``model(x: Tensor[B, *input_shape] float32) -> Tensor[B, C] float32``
    log-probabilities, ``1 <= B <= max_batch``, on the CPU.

    ``record`` is the package's mnn_fast record; ``input_shape``, ``num_classes``, ``classes``,
    ``max_batch``, ``threshold`` and ``run_fingerprint`` are its fields.
    """

    def __init__(self, runner, record: dict, path: Path):
        self._runner = runner
        self.record = record
        self.path = path
        self.input_shape = tuple(record["input_shape"])
        self.num_classes = int(record["num_classes"])
        self.classes = list(record["classes"])
        self.max_batch = int(record["max_batch"])
        self.threshold = record["threshold"]
        self.run_fingerprint = record["run_fingerprint"]

    def __call__(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype != torch.float32:
            raise TypeError(f"x must be float32, got {x.dtype}")
        if x.device.type != "cpu":
            raise ValueError(f"x is on {x.device}; the package runs on the CPU")
        if x.dim() != 1 + len(self.input_shape) or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, self.input_shape))}], got {tuple(x.shape)}")
        if not 1 <= x.shape[0] <= self.max_batch:
            raise ValueError(f"x has batch {x.shape[0]}; this package takes 1 to {self.max_batch} rows "
                             "(split the batch, or export with a larger --max-batch)")
        return self._runner(x.contiguous())

    forward = __call__

    def __repr__(self) -> str:
        return (f"ExportedMNN({str(self.path)!r}, input_shape={self.input_shape}, classes={self.num_classes}, "
                f"max_batch={self.max_batch}, threshold={self.threshold})")


def load_exported(path, expected_run=None) -> ExportedMNN:
    """The package at ``path`` (written by ``mnn-fast export`` / :func:`~mnn_fast.serving.export_run`),
    ready to call.

    ``expected_run``: a run or bundle directory, or its :func:`~mnn_fast.serving.run_fingerprint`;
    the package must have been exported from it. ``ValueError`` in one line naming ``path`` for a
    missing, truncated or corrupted file, a package mnn_fast did not write, one from another run,
    or one built with another torch or mnn_fast version (export it again);
    ``ImportError`` when the mnn_fast op library is not built.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(os.fspath(path))
    record = read_record(path)
    if expected_run is not None:
        _check_run(path, record, expected_run)
    built = record["torch_version"].split("+")[0].split(".")[:2]
    if built != torch.__version__.split("+")[0].split(".")[:2]:
        raise ValueError(f"{path}: built with torch {record['torch_version']}, this is torch {torch.__version__}; "
                         "export it again with this torch")
    if record["mnn_fast_version"] != __version__:
        raise ValueError(f"{path}: built with mnn_fast {record['mnn_fast_version']}, this is {__version__} (its op "
                         "library may differ); export it again")
    from ..engine import ops  # registers the mnn_fast ops the compiled model calls

    if ops.EXTENSION_ERROR is not None:
        raise ImportError(f"load_exported needs the mnn_fast op library: {ops.EXTENSION_ERROR}")
    try:
        runner = torch._inductor.aoti_load_package(str(path))
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ValueError(f"{path}: its compiled model cannot be loaded here ({first[:300]})") from None
    # The record travels beside the compiled code; the code carries its own copy: they must agree.
    meta = runner.get_metadata()
    if meta.get("mnn_fast.run_fingerprint") != (record["run_fingerprint"] or ""):
        raise ValueError(f"{path}: its record and its compiled model disagree on the run (a record from another "
                         "package?); export it again")
    return ExportedMNN(runner, record, path)


def _check_run(path: Path, record: dict, expected_run) -> None:
    if isinstance(expected_run, str) and _FINGERPRINT.fullmatch(expected_run) and not os.path.exists(expected_run):
        want = expected_run
    elif isinstance(expected_run, (str, os.PathLike)):
        want = run_fingerprint(expected_run)
    else:
        raise TypeError(f"expected_run must be a run directory, a bundle or a fingerprint string, "
                        f"got {type(expected_run).__name__}")
    got = record["run_fingerprint"]
    if got != want:
        raise ValueError(f"{path}: exported from another run (fingerprint {str(got)[:12]}..., expected_run's "
                         f"{want[:12]}...)")
