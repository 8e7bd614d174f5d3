"""An MNN as an AOTInductor package: ``torch.export`` with a dynamic batch, then AOTInductor.

1. trace: ``torch.export`` of the module in eval mode without autograd, the batch dimension dynamic
   (1..max batch); the routing ops (``mnn_fast::route`` and its siblings) stay calls into the op library.
2. compile: AOTInductor turns the graph into C++ and a shared library (minutes for a large model).
3. package: the ``.pt2`` zip plus the mnn_fast record (:mod:`.record`), written under a temporary
   name and renamed, so a failed or interrupted export leaves no package behind.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch._inductor  # aoti_* (not imported by `import torch`)

from .._version import __version__
from ..engine.compile import COMPILE_SETTINGS
from ..engine.module import MetaNeuralNetwork
from .record import FORMAT, RECORD_NAME, flat_metadata, run_fingerprint

__all__ = ["export_mnn", "export_run", "DEFAULT_MAX_BATCH", "INDUCTOR_CONFIGS"]

DEFAULT_MAX_BATCH = 1024
# No autotuning (it times kernel variants: minutes, and its choice may differ from machine to
# machine), and inductor's settings for routing (mnn_fast.compile: no channels-last rewrite).
INDUCTOR_CONFIGS = {"max_autotune": False, **COMPILE_SETTINGS["inductor"]}
_EXAMPLE_BATCH = 8  # the traced example's batch; any size in 2..max works (1 would be specialised)


def export_run(run, out, *, max_batch: int = DEFAULT_MAX_BATCH, test_threshold: float = 0.25,
               progress: Callable[[str], None] | None = None) -> dict:
    """Exports the trained MNN of ``run`` to the package ``out`` (``.pt2``); returns its record.

    ``run``: a run directory (``mnn-fast train``, loaded and verified by
    :func:`~mnn_fast.training.load_mnn` at ``test_threshold``) or a bundle directory
    (:func:`~mnn_fast.training.save_bundle`, with its own threshold). The package takes
    ``Tensor[B, *input_shape] float32`` for ``1 <= B <= max_batch``. ``progress`` receives one line
    per phase.
    """
    from ..training import RunDir, load_bundle, load_mnn
    from ..training.datarecord import read_data_record

    _check_out_and_batch(out, max_batch)  # before minutes of loading
    say = progress or (lambda line: None)
    root = Path(os.fspath(run))
    say(f"loading {root}")
    if (root / "weights.safetensors").exists():  # a bundle: its config holds shape and classes
        from .. import io

        mnn = load_bundle(root)
        config = io.load_json(root / "config.json")
        shape, classes = config["input_shape"], None
    else:
        mnn = load_mnn(root, test_threshold)
        record = read_data_record(RunDir(root))
        if record is None:  # a run from before data records: its data names the shape
            from ..training import run_data

            data = run_data(root)
            shape, classes = data.input_shape, list(data.classes)
        else:
            shape, classes = record["input_shape"], record["classes"]
    return export_mnn(mnn, out, shape, max_batch=max_batch, classes=classes, fingerprint=run_fingerprint(root),
                      progress=progress)


def export_mnn(mnn: MetaNeuralNetwork, out, input_shape, *, max_batch: int = DEFAULT_MAX_BATCH,
               classes=None, fingerprint: str | None = None, progress: Callable[[str], None] | None = None,
               inductor_configs: dict | None = None) -> dict:
    """Exports ``mnn`` (on the CPU) to the package ``out``; returns the record embedded in it.

    ``input_shape``: one sample's shape (the package takes ``Tensor[B, *input_shape] float32``,
    ``1 <= B <= max_batch``). ``classes``: the class names, recorded (default ``"0"..``).
    ``fingerprint``: the run's (:func:`~mnn_fast.serving.run_fingerprint`), which
    :func:`~mnn_fast.serving.load_exported` can check. ``inductor_configs`` are added to
    :data:`INDUCTOR_CONFIGS`.

    ``ValueError`` in one line for what cannot be exported: a ``switch_fn`` (a Python callable), a
    switch or specialist that ``torch.export`` cannot trace (Python branching on tensor values, for
    one), a module off the CPU; ``TypeError``/``ValueError`` naming the argument for bad arguments.
    """
    say = progress or (lambda line: None)
    shape, num_classes, classes = _check_arguments(mnn, out, input_shape, max_batch, classes)
    record = {
        "format": FORMAT, "mnn_fast_version": __version__, "torch_version": torch.__version__,
        "run_fingerprint": fingerprint, "num_classes": num_classes, "classes": classes, "input_shape": shape,
        "max_batch": max_batch, "threshold": mnn.threshold, "top_k": mnn.top_k,
        "groups": [list(g) for g in mnn.groups],
    }
    started = time.perf_counter()
    say(f"tracing with torch.export (batch 1..{max_batch}, input {list(shape)})")
    program = _trace(mnn, shape, max_batch)
    say("compiling with AOTInductor (C++ code and a shared library: minutes for a large model)")
    configs = {**INDUCTOR_CONFIGS, **(inductor_configs or {}), "aot_inductor.metadata": flat_metadata(record)}
    out = Path(os.fspath(out))
    with tempfile.TemporaryDirectory(prefix="mnn_fast_export_") as tmp:
        compiled = torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(tmp, "model.pt2"),
                                                           inductor_configs=configs)
        say(f"writing {out}")
        _write_package(compiled, out, record)
    say(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - started:.1f} s")
    return record


def _check_arguments(mnn, out, input_shape, max_batch, classes):
    if not isinstance(mnn, MetaNeuralNetwork):
        raise TypeError(f"mnn must be a mnn_fast.MetaNeuralNetwork, got {type(mnn).__name__}")
    if mnn.switch_fn is not None:
        raise ValueError("mnn.switch_fn: a Python callable cannot be exported (the package would freeze it and "
                         "whatever it reads as traced once); set switch_fn=None and route by threshold / top_k")
    if mnn.group_offsets.device.type != "cpu" or any(p.device.type != "cpu" for p in mnn.parameters()):
        raise ValueError("mnn: export runs on the CPU; move the module with mnn.cpu() first")
    if mnn.num_classes is None:
        raise ValueError("mnn.num_classes is unknown; build the module with num_classes= (the package needs C)")
    _check_out_and_batch(out, max_batch)
    try:
        shape = [int(s) for s in input_shape]
    except (TypeError, ValueError):
        raise TypeError(f"input_shape must be a sequence of ints, got {input_shape!r}") from None
    if not shape or min(shape) < 1:
        raise ValueError(f"input_shape must be one sample's shape of positive sizes, got {input_shape!r}")
    num_classes = mnn.num_classes
    classes = [str(c) for c in range(num_classes)] if classes is None else [str(c) for c in classes]
    if len(classes) != num_classes:
        raise ValueError(f"classes has {len(classes)} names but the module has {num_classes} classes")
    return shape, num_classes, classes


def _check_out_and_batch(out, max_batch) -> None:
    if not isinstance(out, (str, os.PathLike)) or not os.fspath(out).endswith(".pt2"):
        raise ValueError(f"out must be a path ending in .pt2, got {out!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")


def _trace(mnn: MetaNeuralNetwork, shape: list[int], max_batch: int) -> torch.export.ExportedProgram:
    """The exported program, batch dynamic; any tracing failure as one ``ValueError`` line."""
    # A Dim needs min < max: a max batch of 1 is traced for 1..2 and the loader enforces 1.
    batch = torch.export.Dim("batch", min=1, max=max(2, max_batch))
    example = torch.randn(min(_EXAMPLE_BATCH, max(2, max_batch)), *shape, generator=torch.Generator().manual_seed(0))
    was_training = mnn.training
    mnn.eval()
    try:
        # Stacked weights held eagerly: the graph reads each grouped layer's [E, out, in] stack as a
        # constant instead of stacking E parameters on every call.
        with torch.no_grad(), mnn.weights_stacked_for_compiled_calls():
            return torch.export.export(mnn, (example,), dynamic_shapes=({0: batch},))
    except Exception as exc:  # noqa: BLE001  (every tracing failure is reported the same way)
        raise ValueError(_untraceable(exc)) from None
    finally:
        mnn.train(was_training)


def _untraceable(exc: Exception) -> str:
    """One line: where in the user's code tracing failed, and why, from ``torch.export``'s error."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not _library_file(f.filename)]
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} ({(frames[-1].line or '').strip()!r})" if frames else ""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return (f"cannot export: torch.export could not trace the module{where}: {type(exc).__name__}: {first[:200]}. "
            "A switch or specialist whose forward branches in Python on tensor values (or is otherwise not "
            "traceable) can only run as the Python module")


def _library_file(filename: str) -> bool:
    path = os.path.abspath(filename)
    roots = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return path.startswith(roots) or "<" in filename  # torch, mnn_fast, generated code


def _write_package(compiled: str, out: Path, record: dict) -> None:
    """``compiled``'s archive plus the record, written to ``out`` atomically."""
    from torch.export.pt2_archive import PT2ArchiveReader, PT2ArchiveWriter

    out.parent.mkdir(parents=True, exist_ok=True)
    # Written in a hidden folder beside out under out's own name (the archive's root folder is
    # named after the file), then moved over out.
    folder = Path(tempfile.mkdtemp(prefix=".mnn_fast_export_", dir=out.parent))
    try:
        tmp = folder / out.name
        with PT2ArchiveReader(compiled) as reader, PT2ArchiveWriter(str(tmp)) as writer:
            for name in reader.get_file_names():
                if not name.startswith(".data/") and not writer.has_record(name):  # the writer adds its own
                    writer.write_bytes(name, reader.read_bytes(name))
            writer.write_string(f"extra/{RECORD_NAME}", json.dumps(record, sort_keys=True))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

