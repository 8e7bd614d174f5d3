"""The record an exported package carries, and the fingerprint that ties it to its run.

A package is a zip (torch's ``.pt2`` archive); ``extra/mnn_fast.json`` in it records the mnn_fast
version, the run's fingerprint, the classes, input shape, threshold and max batch. It is read with
the zip's CRC checks before any compiled code is loaded. The same fields, as strings under
``mnn_fast.*`` keys, are in AOTInductor's own metadata, which C++ reads without Python.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from .. import io

__all__ = ["FORMAT", "RECORD_NAME", "run_fingerprint", "read_record", "flat_metadata"]

FORMAT = "mnn_fast.aoti/1"
RECORD_NAME = "mnn_fast.json"  # under the archive's extra/ folder
_KEYS = ("format", "mnn_fast_version", "torch_version", "run_fingerprint", "num_classes", "classes",
         "input_shape", "max_batch", "threshold", "top_k", "groups")


def run_fingerprint(path) -> str:
    """Hex sha256 naming the trained model in ``path``: a run directory (``mnn-fast train``) or a
    bundle (:func:`~mnn_fast.training.save_bundle`).

    It hashes the config's sha256 and the sha256 of each weight file the model is built from, as the
    directory's manifest records them (no file is read but the manifest; the loaders verify the files
    against it): another config, a retrained specialist or another run gives another fingerprint.
    ``ValueError`` naming the path when it is neither.
    """
    root = Path(os.fspath(path))
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"{root}: not a run directory or bundle (no manifest.json)")
    manifest = io.load_json(manifest_path)
    files = manifest.get("files")
    kind, config_sha = manifest.get("format"), manifest.get("config_sha256")
    if kind not in ("mnn_fast.run/1", "mnn_fast.bundle/1") or not isinstance(files, dict) or not isinstance(config_sha, str):
        raise ValueError(f"{manifest_path}: not an mnn_fast run or bundle manifest (format {kind!r})")
    # The model's own files: not the probabilities or the GHN, which only shaped the training.
    weights = {name: entry.get("sha256") for name, entry in files.items() if isinstance(entry, dict)
               and (name in ("switch.safetensors", "weights.safetensors") or name.startswith("specialists/"))}
    if not weights:
        raise ValueError(f"{manifest_path}: records no weight files (is the run trained?)")
    return io.config_sha256({"format": kind, "config_sha256": config_sha, "files": weights})


def flat_metadata(record: dict) -> dict[str, str]:
    """``record`` as AOTInductor metadata: ``mnn_fast.<key>`` -> str (lists comma-joined, JSON for
    the nested ones), what the C++ loader's ``get_metadata()`` returns."""
    out = {}
    for key, value in record.items():
        if key in ("input_shape",):
            text = ",".join(str(v) for v in value)
        elif isinstance(value, (list, dict)):
            text = json.dumps(value, separators=(",", ":"))
        else:
            text = "" if value is None else str(value)
        out["mnn_fast." + ("version" if key == "mnn_fast_version" else key)] = text
    return out


def read_record(path) -> dict:
    """The checked record of the package at ``path``, read without loading its compiled code.

    ``ValueError`` in one line naming ``path``: missing, not a zip or truncated, a member whose bytes
    fail their CRC (a flipped bit), no mnn_fast record (a package mnn_fast did not write), or a record
    of another format.
    """
    path = Path(os.fspath(path))
    if not path.is_file():
        raise ValueError(f"{path}: no such package file")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every member: a truncated or bit-flipped file fails here
            if bad is not None:
                raise ValueError(f"{path}: corrupted package ({bad} fails its CRC check); export it again")
            names = [n for n in archive.namelist() if n.split("/")[1:] == ["extra", RECORD_NAME]]
            if len(names) != 1:
                raise ValueError(f"{path}: not a package written by mnn_fast (no extra/{RECORD_NAME} record); "
                                 "export it with `mnn-fast export`")
            raw = archive.read(names[0])
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as exc:
        raise ValueError(f"{path}: corrupted or truncated package ({' '.join(str(exc).split())}); "
                         "export it again") from None
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path}: its mnn_fast record is not valid JSON; export it again") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        got = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{path}: record format {got!r}, expected {FORMAT!r} (written by another mnn_fast version?)")
    missing = [k for k in _KEYS if k not in record]
    if missing:
        raise ValueError(f"{path}: its mnn_fast record lacks {missing}; export it again")
    return record
