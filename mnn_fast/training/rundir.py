"""A run directory's layout, lock and manifest: what lets ``eval`` trust the files it finds.

``manifest.json`` records the config (and its sha256) plus, for every tensor file, its sha256 and
each tensor's dtype and shape. Every tensor file also carries the config's sha256 in its safetensors
metadata, and files derived from the switch (probabilities, specialists) carry the switch file's
sha256, so a file written under another config or from another switch is recognised even when
the manifest was rewritten. ``RUN/.lock`` (``flock``) keeps two runs out of one directory;
``RUN/.write.lock`` serialises the short shared steps (config, switch, probabilities, manifest
updates) between ``--expert`` jobs that train specialists side by side.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from torch import Tensor

from .. import io

__all__ = ["RunDir", "FORMAT", "CONFIG_KEY", "SWITCH_KEY"]

log = logging.getLogger("mnn_fast.training")

FORMAT = "mnn_fast.run/1"
CONFIG_KEY = "mnn_fast.config_sha256"  # safetensors metadata: the config the file was written under
SWITCH_KEY = "mnn_fast.switch_sha256"  # safetensors metadata: the switch file a derived file came from


class RunDir:
    """Paths inside a run directory, its locks and its manifest."""

    def __init__(self, root):
        try:
            text = os.fspath(root)
        except TypeError:
            raise TypeError(f"run_dir: expected a path (str or os.PathLike), got {type(root).__name__}") from None
        if not text:
            # Path("") is the working directory: a run would scatter its files there.
            raise ValueError("run_dir: expected a non-empty directory path, got ''")
        self.root = Path(text)
        self.config = self.root / "config.json"
        self.switch = self.root / "switch.safetensors"
        self.probs = self.root / "train_probs.safetensors"
        self.ghn = self.root / "ghn.safetensors"  # only with specialist_init "ghn"
        self.manifest = self.root / "manifest.json"
        self.data = self.root / "data.json"  # what the run trained on (mnn_fast.training.datarecord)
        self.lock_path = self.root / ".lock"
        self.write_lock_path = self.root / ".write.lock"
        self._writing = 0  # nesting depth: a second flock of ours on a new descriptor would deadlock

    def specialist(self, e: int) -> Path:
        return self.root / "specialists" / f"expert_{e:04d}.safetensors"

    def _rel(self, path: Path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    # -------------------------------------------------------------------------------------- locks

    @contextlib.contextmanager
    def lock(self, shared: bool = False):
        """Holds ``RUN/.lock`` for the ``with`` block; :class:`io.BusyError` naming the directory if taken.

        A whole run holds it exclusively. ``shared=True`` (``--expert`` jobs) lets other shared
        holders in, but never alongside an exclusive one. Whoever gets it exclusively first removes
        temporary files a crashed writer left (nobody else can be writing then).
        """
        lock = io.FileLock(self.lock_path)
        try:
            if lock.acquire(shared=False):
                removed = io.remove_temporaries(self.root) + io.remove_temporaries(self.root / "specialists")
                if removed:
                    log.warning("%s: removed %d temporary file(s) left by an interrupted run: %s",
                                self.root, len(removed), [p.name for p in removed])
                ok = not shared or lock.acquire(shared=True)
            else:
                ok = shared and lock.acquire(shared=True)
            if not ok:
                raise io.BusyError(
                    f"run directory {self.root} is in use by another mnn-fast process (lock {self.lock_path} is "
                    "held); wait for it to finish or use another directory")
            yield self
        finally:
            lock.release()

    @contextlib.contextmanager
    def writing(self):
        """Holds ``RUN/.write.lock`` (waiting for it): one writer of shared files at a time. Re-entrant."""
        if self._writing:
            self._writing += 1
            try:
                yield self
            finally:
                self._writing -= 1
            return
        with io.FileLock(self.write_lock_path) as lock:
            lock.acquire(blocking=True)
            self._writing = 1
            try:
                yield self
            finally:
                self._writing = 0

    # ----------------------------------------------------------------------------------- manifest

    def read_manifest(self, required: bool = True) -> dict | None:
        """The manifest, checked for form; ``None`` if absent and not ``required``."""
        if not self.manifest.exists() and not required:
            return None
        m = io.load_json(self.manifest)
        if (m.get("format") != FORMAT or not isinstance(m.get("config"), dict)
                or not isinstance(m.get("config_sha256"), str) or not isinstance(m.get("files"), dict)):
            raise ValueError(f"{self.manifest}: not an mnn_fast run manifest (format {m.get('format')!r})")
        return m

    def check_config(self, identity: dict) -> None:
        """``ValueError`` unless the manifest records this config (``config.json`` edited after training)."""
        m = self.read_manifest()
        if m["config_sha256"] != io.config_sha256(identity):
            diff = sorted(k for k in set(identity) | set(m["config"]) if identity.get(k) != m["config"].get(k))
            raise ValueError(
                f"{self.config}: differs from the config the files were trained under (recorded in {self.manifest.name}; "
                f"fields differ: {diff}); restore it or train into a new directory")

    def start_manifest(self, identity: dict) -> None:
        """A manifest for ``identity`` with no files yet (call under :meth:`writing`)."""
        io.save_json(self.manifest, {"format": FORMAT, "config": identity,
                                     "config_sha256": io.config_sha256(identity), "files": {}})

    def record(self, path: Path, tensors: dict[str, Tensor], sha: str | None = None) -> str:
        """Adds the just-written ``path`` (its sha256, as returned by ``io.save_tensors``, or read
        from the file, and its tensor summary) to the manifest; returns the sha256."""
        sha = sha or io.sha256_file(path)
        with self.writing():
            m = self.read_manifest()
            m["files"][self._rel(path)] = {"sha256": sha, "tensors": io.tensor_summary(tensors)}
            io.save_json(self.manifest, m)
        return sha

    def verify(self, path: Path, config_sha: str, switch_sha: str | None = None) -> tuple[dict, dict, str]:
        """``(tensors, metadata, sha256)`` of ``path`` once it is shown to belong to this run.

        ``ValueError`` naming the file and what differs: unreadable, written under another config or
        from another switch, not in the manifest, or bytes/tensors unlike what the manifest records.
        """
        tensors, meta, sha = io.read_tensors(path)
        if CONFIG_KEY not in meta:
            raise ValueError(f"{path}: records no config hash (written by an older mnn_fast or another tool)")
        if meta.get(CONFIG_KEY) != config_sha:
            raise ValueError(f"{path}: written under another config (config sha256 {meta.get(CONFIG_KEY)!r}, "
                             f"this run's {config_sha!r}); the run directory mixes runs")
        if switch_sha is not None and meta.get(SWITCH_KEY) != switch_sha:
            raise ValueError(f"{path}: derived from another switch (switch sha256 {meta.get(SWITCH_KEY)!r}, "
                             f"this run's {switch_sha!r})")
        entry = self.read_manifest()["files"].get(self._rel(path))
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: not recorded in {self.manifest}")
        if entry.get("sha256") != sha:
            raise ValueError(f"{path}: sha256 {sha} differs from {entry.get('sha256')!r} in {self.manifest.name} "
                             "(the file was changed or replaced)")
        if entry.get("tensors") != io.tensor_summary(tensors):
            raise ValueError(f"{path}: tensor names, shapes or dtypes differ from {self.manifest.name}")
        return tensors, meta, sha
