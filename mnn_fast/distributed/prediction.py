"""Predictions of a trained run as CSV, in one process or expert-parallel over N, byte for byte alike.

The samples are cut into chunks of ``batch_size`` rows; in round ``k`` rank ``r`` runs chunk
``k * N + r`` (an empty batch once out of chunks, since every rank must call the module as often as
the others) and rank 0 gathers the round's chunks and writes their rows in order. A chunk's rows
depend only on the chunk: ExpertParallel on a chunk is bitwise the whole module on it, so any N
writes the same file.
"""
from __future__ import annotations

import csv
import datetime
import math
import multiprocessing.connection
import os
import signal
import secrets
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from ..engine.routing import check_threshold
from ..launch.local import children_start_ignoring_sigint, quiet_on_interrupt
from ..training.inputs import load_inputs
from ..training.pipeline import load_mnn
from .loading import agree, read_local_shard

__all__ = ["predict", "read_predictions", "DEVICES"]

DEVICES = ("cpu", "cuda")  # gloo on the CPU, nccl on CUDA
TIMEOUT = datetime.timedelta(minutes=10)  # a spawned group's collectives give up after this


def predict(run, data=None, nproc: int = 1, *, out="predictions.csv", batch_size: int = 256,
            threshold: float = 0.25, device: str = "cpu", cache_dir=None, progress: bool = True) -> Path | None:
    """Writes ``out``: a header, then per sample its index, predicted class and every class's
    log-probability (``repr`` of the float32 value: :func:`read_predictions` gets the exact bits back).

    Args:
        run: a trained run directory.
        data: ``None`` (the run's test split), an ``.npz`` or an image folder
            (:func:`mnn_fast.training.inputs.load_inputs`).
        nproc: processes; ``N > 1`` spawns ``N`` local ranks (gloo on 127.0.0.1), each loading only its
            own specialists. Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) or inside an initialised
            default group, this process joins as one rank instead (``nproc`` must then be 1 or the
            world size). The file is the same, byte for byte, for every ``N``.
        batch_size: rows per chunk (a chunk's rows depend on how it is cut, so the same
            ``batch_size`` gives the same file).
        threshold: the test threshold.
        device: ``"cpu"`` (gloo) or ``"cuda"`` (nccl; untested).
        progress: a tqdm bar on rank 0.

    Every process computes with one intra-op thread. Returns ``out`` as a ``Path`` in the process that
    wrote it, ``None`` in the other ranks. One-line ``ValueError``/``TypeError`` for bad arguments,
    a missing run or unreadable data, before anything is spawned or written.
    """
    for name, value in (("nproc", nproc), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    threshold = check_threshold(threshold)
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"out: {str(out)!r} is a directory; expected the CSV file's path")
    settings = dict(batch_size=batch_size, threshold=threshold, device=device, progress=progress)
    if dist.is_available() and (dist.is_initialized() or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)):
        return _predict_joined(run, data, nproc, out, cache_dir, settings)
    x = load_inputs(run, data, cache_dir)  # checks the run too: a missing one is refused here
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(out)
    try:
        if nproc == 1:
            model = load_mnn(run, threshold).to(device)
            with _one_thread():
                _rounds(model, x, 0, 1, None, tmp, settings, model.num_classes)
        else:
            _spawn(run, x, nproc, tmp, settings)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def read_predictions(path) -> tuple[Tensor, Tensor, Tensor]:
    """``(index: Tensor[N] int64, prediction: Tensor[N] int64, log_probs: Tensor[N, C] float32)`` of a
    :func:`predict` file, the log-probabilities bit for bit as the module returned them."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:2] != ["index", "prediction"]:
        raise ValueError(f"{path}: not a predictions file (expected the header index,prediction,log_prob_0,...)")
    body = rows[1:]
    index = torch.tensor([int(r[0]) for r in body], dtype=torch.long)
    prediction = torch.tensor([int(r[1]) for r in body], dtype=torch.long)
    log_probs = torch.tensor([[float(v) for v in r[2:]] for r in body], dtype=torch.float32)
    return index, prediction, log_probs.reshape(len(body), len(rows[0]) - 2)


# ---------------------------------------------------------------------- the rounds (every rank)

def _rounds(model, x: Tensor, rank: int, world: int, group, tmp, settings: dict, num_classes: int) -> None:
    """Every rank: one call of ``model`` per round; rank 0 gathers each round and writes ``tmp``."""
    size, device = settings["batch_size"], settings["device"]
    chunks = math.ceil(len(x) / size)
    rounds = math.ceil(chunks / world)
    writer = open(tmp, "w", newline="") if rank == 0 else None
    bar = tqdm(total=len(x), desc="predict", unit="row", disable=rank != 0 or not settings["progress"])
    try:
        if writer:
            writer.write(",".join(["index", "prediction"] + [f"log_prob_{c}" for c in range(num_classes)]) + "\n")
        for k in range(rounds):
            mine = k * world + rank
            # A fresh allocation per chunk, whoever runs it: the same input alignment for every N.
            batch = x[mine * size: (mine + 1) * size].clone() if mine < chunks else x[:0].clone()
            with torch.no_grad():
                y = model(batch.to(device)).float()
            if world > 1:
                padded = torch.zeros(size, num_classes, device=y.device)
                padded[: len(y)] = y
                parts = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
                dist.gather(padded, parts, dst=0, group=group)
            else:
                parts = [y]
            if writer:
                for r, part in enumerate(parts):
                    chunk = k * world + r
                    if chunk < chunks:
                        start, rows = chunk * size, min(size, len(x) - chunk * size)
                        _write_rows(writer, start, part[:rows].cpu())
                        bar.update(rows)
        if writer:
            writer.flush()
            os.fsync(writer.fileno())
    finally:
        bar.close()
        if writer:
            writer.close()


def _write_rows(writer, start: int, log_probs: Tensor) -> None:
    predictions = log_probs.argmax(1).tolist() if log_probs.shape[1] else [0] * len(log_probs)
    lines = [f"{start + i},{p}," + ",".join(map(repr, row)) + "\n"
             for i, (p, row) in enumerate(zip(predictions, log_probs.tolist()))]
    writer.write("".join(lines))


def _in_group(run, x: Tensor | None, data, cache_dir, group, tmp, settings: dict,
              failure: Exception | None = None) -> None:
    """One rank of an initialised group: its inputs (when not given) and its shard, one agreement
    that every rank has both (and none had an earlier ``failure``), then the rounds."""
    build = None
    try:
        if failure is not None:
            raise failure
        if x is None:
            x = load_inputs(run, data, cache_dir)
        if settings["device"] == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank(group) % torch.cuda.device_count())))
        build = read_local_shard(run, group, test_threshold=settings["threshold"])
    except Exception as exc:  # noqa: BLE001 -- raised on every rank together by agree
        failure = exc
    agree(failure, group, "loading the run or the data")
    ep = build().to(settings["device"])
    with _one_thread():
        _rounds(ep, x, dist.get_rank(group), dist.get_world_size(group), group, tmp, settings, ep.shard.num_classes)


def _predict_joined(run, data, nproc, out: Path, cache_dir, settings) -> Path | None:
    """Under torchrun, or inside the caller's own group: this process is one rank."""
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if settings["device"] == "cuda" else "gloo")
    try:
        world, rank = dist.get_world_size(), dist.get_rank()
        if nproc not in (1, world):
            raise ValueError(f"nproc={nproc}, but this process is one rank of a group of {world}: pass nproc=1 "
                             f"(or {world}); the launcher started the processes")
        tmp, failure = None, None
        if rank == 0:
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = _temporary(out)
            except OSError as exc:  # raised by _in_group's agreement, on every rank together
                failure = exc
        try:
            _in_group(run, None, data, cache_dir, None, tmp, settings, failure)
            if rank == 0:
                os.replace(tmp, out)
        finally:
            if tmp:
                Path(tmp).unlink(missing_ok=True)
        return out if rank == 0 else None
    finally:
        if started:
            dist.destroy_process_group()


# ---------------------------------------------------------------------- spawned local ranks

def _spawn(run, x: Tensor, nproc: int, tmp: str, settings: dict) -> None:
    """Runs ``nproc`` ranks in spawned processes; raises the first rank's error here (its own type for
    ValueError/TypeError/OSError, so the command prints it in one line). Ctrl-C or a failed rank
    ends the others; they cannot be left waiting in a collective."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    interruptible = signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
    procs = [ctx.Process(target=_spawned_rank, args=(rank, nproc, port, run, x, tmp if rank == 0 else None,
                                                     settings, errors, interruptible)) for rank in range(nproc)]
    try:
        with children_start_ignoring_sigint():  # a Ctrl-C while a rank imports torch prints no traceback
            for p in procs:
                p.start()
        _wait(procs)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    reports = []
    while not errors.empty():
        reports.append(errors.get())
    if reports or any(p.exitcode != 0 for p in procs):
        _raise_first(reports, procs)


def _wait(procs, grace: float = 30.0) -> None:
    """Until every rank has exited; once one fails, the others get ``grace`` seconds (they raise too,
    having learnt of it in their next exchange), then are killed."""
    alive = list(procs)
    while alive:
        multiprocessing.connection.wait([p.sentinel for p in alive])
        alive = [p for p in alive if p.exitcode is None]
        if any(p.exitcode not in (None, 0) for p in procs):
            deadline = time.monotonic() + grace
            while alive and time.monotonic() < deadline:
                multiprocessing.connection.wait([p.sentinel for p in alive], timeout=deadline - time.monotonic())
                alive = [p for p in alive if p.exitcode is None]
            for p in alive:
                p.kill()
            return


def _raise_first(reports, procs) -> None:
    # The rank where it happened raised the error itself; the others say which rank failed.
    reports.sort(key=lambda r: (r[1] == "RuntimeError", r[0]))
    if reports:
        rank, kind, message = reports[0]
        cls = {"ValueError": ValueError, "TypeError": TypeError, "OSError": OSError}.get(kind)
        if cls is not None:
            raise cls(message)
        raise RuntimeError(f"rank {rank} failed: {kind}: {message}")
    codes = {rank: p.exitcode for rank, p in enumerate(procs) if p.exitcode != 0}
    raise RuntimeError(f"predict: rank(s) {sorted(codes)} exited with code(s) {sorted(set(codes.values()))} "
                       "without an error report (killed?)")


def _spawned_rank(rank, world, port, run, x, tmp, settings, errors, interruptible) -> None:
    quiet_on_interrupt(interruptible)
    torch.set_num_threads(1)
    try:
        backend = "nccl" if settings["device"] == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=TIMEOUT)
        try:
            _in_group(run, x, None, None, None, tmp, settings)
        finally:
            dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 -- the parent raises it
        errors.put((rank, type(exc).__name__, " ".join(str(exc).split())))
        raise SystemExit(1) from None


# ---------------------------------------------------------------------- small helpers

class _one_thread:
    """One intra-op thread inside the block: a GEMM's bits may depend on the thread count, and the
    file must not depend on how many processes share the cores."""

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def _temporary(out: Path) -> str:
    """A temporary file beside ``out`` (renamed over it when complete), named as ``io.atomic_write``'s
    so an interrupted run's leftover is recognisable."""
    while True:
        tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
        try:  # not mkstemp: its 0600 would outlive the rename, where the umask's permissions belong
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return str(tmp)
        except FileExistsError:
            continue


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
