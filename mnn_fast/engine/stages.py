"""The engine's forward as public stages; ``MetaNeuralNetwork.forward`` is these five calls in order.

switch_scores -> route_batch -> gather_rows -> run_specialists -> recombine_log_probs (one fused op:
contributions, accumulation, final log_softmax). Each stage takes the :class:`~.backends.Backend` whose
ops it runs, so the sweep, benchmarks and tests drive the same code the module does.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from .backends import Backend
from .alignment import as_fresh_aligned
from .contributions import ClassTables, buffer_logits, specialist_contributions
from .executors import recording_grad, run_on_streams
from .ops import expert_sizes as traced_sizes
from .routing import Routing

__all__ = ["SwitchScores", "switch_scores", "route_batch", "route_args", "gather_rows", "gather_expert_rows", "run_specialists",
           "combine_log_probs",
           "recombine_log_probs", "check_specialist_output", "expert_sizes"]


class SwitchScores(NamedTuple):
    """``log_probs: Tensor[B, C] float32`` (``log_softmax`` of the switch, ``Backend.softmax_rows``), ``scores: Tensor[B, E] float32``
    (group probability sums; the probabilities themselves for one-class-per-expert groups)."""

    log_probs: Tensor
    scores: Tensor


def switch_scores(logits: Tensor, ops: Backend, group_offsets: Tensor | None = None,
                  group_classes: Tensor | None = None) -> SwitchScores:
    """From the switch's ``logits: Tensor[B, C]`` (any float dtype, used as float32).

    ``group_offsets: Tensor[E+1]`` / ``group_classes: Tensor[M]`` int64 (CSR groups) give each expert's
    score as its classes' probabilities summed in listed order; ``None`` = one expert per class.
    """
    # One op for both (one exp pass on CPU); the naive loop calls the same one, so routing agrees.
    logp, probs = ops.softmax_rows(logits.float())
    if group_offsets is None:
        return SwitchScores(logp, probs)
    return SwitchScores(logp, ops.group_scores(probs, group_offsets, group_classes))


def route_batch(scores: Tensor, ops: Backend, threshold: float | None, top_k: int | None,
                switch_fn: Callable[[Tensor], Tensor] | None = None) -> Routing:
    """The :class:`Routing` of ``scores: Tensor[B, E] float32`` (the switch function and routing layout, docs/how-it-works.md).

    ``threshold=None`` = no threshold (top-k alone); ``switch_fn(scores) -> Tensor[B, E] bool``
    replaces the rule when given.
    """
    return ops.route(*route_args(scores, threshold, top_k, switch_fn))


def route_args(scores: Tensor, threshold: float | None, top_k: int | None,
               switch_fn: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, float, int]:
    """``(scores, threshold, top_k)`` as the ``route`` op takes them (``-inf`` / ``0`` for "off") for
    :func:`route_batch`'s arguments; with ``switch_fn``, its checked mask as float scores."""
    if switch_fn is not None:
        mask = switch_fn(scores)
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != scores.shape:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"switch_fn must return a bool tensor of shape {tuple(scores.shape)}, got {got}")
        # 1.0 > 0.5 exactly where the mask is set: the threshold kernel routes the mask as is.
        return mask.float(), 0.5, 0
    return scores, -math.inf if threshold is None else threshold, top_k or 0


def gather_rows(x: Tensor, perm: Tensor, ops: Backend, workspace: Tensor | None = None) -> Tensor:
    """``x[perm]``: ``Tensor[N, ...]`` from ``x: Tensor[B, ...]`` and ``perm: Tensor[N] int64``, one
    contiguous buffer (expert ``e``'s rows are ``offsets[e]:offsets[e+1]``).

    ``workspace``: a 1-D tensor of ``x``'s dtype and device with at least ``N * prod(x.shape[1:])``
    elements to write into instead of a fresh buffer (no autograd through it): a large fresh buffer
    pays a page fault per 4 KiB on its first touch, which can cost more than the copy itself.
    """
    width = math.prod(x.shape[1:])
    flat = x.reshape(x.shape[0], width)  # not -1: B may be 0
    if workspace is None:
        return ops.gather(flat.contiguous(), perm).view(-1, *x.shape[1:])
    out = workspace[: perm.shape[0] * width].view(perm.shape[0], width)
    return torch.index_select(flat, 0, perm, out=out).view(-1, *x.shape[1:])


def gather_expert_rows(x: Tensor, perm: Tensor, offsets: Tensor, ops: Backend) -> list[Tensor]:
    """Per expert ``e`` a fresh ``Tensor[n_e, ...]`` holding ``x[perm[offsets[e]:offsets[e+1]]]`` (the
    tensors the naive loop's ``x[idx]`` makes), by ``ops.gather_split`` (C++, CPU): a segment cut from
    one gathered buffer starts on any byte, and the sequential executor would copy it again to give
    the specialist a fresh tensor's alignment. ``x: Tensor[B, ...]``, ``perm: Tensor[N]``, ``offsets:
    Tensor[E+1]`` int64."""
    if x.dim() == 2:  # rows come back in x's shape: no view per expert (E of them, ~2 us each)
        return ops.gather_split(x, perm, offsets)
    width = math.prod(x.shape[1:])
    flat = x.reshape(x.shape[0], width)  # not -1: B may be 0
    return [rows.view(rows.shape[0], *x.shape[1:]) for rows in ops.gather_split(flat, perm, offsets)]


def run_specialists(specialists: Sequence[nn.Module], xg: Tensor | list[Tensor], counts: Tensor,
                    sizes: Sequence[int] | None = None, *, grouped=None,
                    streams: list | None = None) -> list[Tensor | None] | Tensor:
    """The specialists' logits on their rows of ``xg: Tensor[N, ...]``, or of ``xg`` given as each
    expert's own fresh tensor (:func:`gather_expert_rows`; the sequential executor only).

    ``counts: Tensor[E] int64``; ``sizes``: the same counts as Python ints, read from ``counts`` here
    when not given and only on the per-expert path (under ``torch.compile`` each host read makes new
    symbols, one per expert). Returns per expert ``Tensor[n_e, C or 1]`` (``None`` for an expert with
    no rows, which is not called, as in the paper's loop; a ``ValueError`` names an expert returning
    another number of rows), or one ``Tensor[N, C or 1]`` in buffer order when ``grouped`` (a grouped
    executor, :mod:`.executors`) ran them. Grouped executors serve inference: with autograd recording
    the experts run one by one, so training never re-stacks weights every step.
    """
    if isinstance(xg, list):
        sizes = [rows.shape[0] for rows in xg]
        chunks = xg  # fresh tensors already, as the naive loop's: nothing to realign
    elif grouped is not None and not recording_grad(specialists):
        outputs = grouped(xg, counts)
        return [None] * len(specialists) if outputs is None else outputs  # None: the vmap form had no rows
    else:
        sizes = expert_sizes(counts) if sizes is None else list(sizes)
        chunks = torch.split(xg, sizes)
    if torch.compiler.is_compiling():
        # Under torch.compile a count is a symbol that may be 0, and some layers (BatchNorm, for
        # one) branch on "is the batch empty?", which cannot be traced. Each expert runs on its
        # rows plus one padding row, a batch provably non-empty, whose output is dropped.
        outputs = [expert(torch.cat([rows, rows.new_zeros(1, *rows.shape[1:])])).narrow(0, 0, n)
                   for expert, n, rows in zip(specialists, sizes, chunks)]
    else:
        # Each expert sees its rows where the naive loop's fresh x[idx] would be: on the allocator's
        # alignment (a segment of one buffer may start anywhere), or BLAS may round differently. CPU
        # only: that is where the bitwise promise is made, and on a GPU it would be a copy per expert.
        if not isinstance(xg, list) and xg.is_cpu:
            chunks = [as_fresh_aligned(rows) for rows in chunks]
        if streams is not None:
            outputs = run_on_streams(specialists, chunks, streams)
        else:
            # One loop and one try for all E calls (a helper frame per call was ~0.3 us each); the
            # expert that raised is the next one, outputs[len(outputs)].
            outputs = []
            try:
                for expert, n, rows in zip(specialists, sizes, chunks):
                    outputs.append(expert(rows) if n else None)
            except ValueError as exc:
                explain_expert_error(specialists[len(outputs)], chunks[len(outputs)], exc)
                raise
    check_row_counts(outputs, sizes)
    return outputs


def check_row_counts(outputs: Sequence, sizes: Sequence[int]) -> None:
    """``ValueError`` naming the first specialist whose output (``None`` for one without rows) is not
    a tensor of its ``sizes[e]`` rows."""
    for e, (y, n) in enumerate(zip(outputs, sizes)):
        if y is not None and not (isinstance(y, Tensor) and y.dim() >= 1 and y.shape[0] == n):
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"specialists[{e}] must return one row of logits per input row ({n}), got {shape}")


def expert_sizes(counts: Tensor) -> list[int]:
    """``counts: Tensor[E] int64`` as Python ints, each marked a size (``>= 0``) for ``torch.compile``."""
    # Traced: an op whose fake kernel makes the sizes symbols, so plain torch.compile needs no
    # capture_scalar_outputs (traced_sizes); eager: tolist, without the dispatcher's overhead.
    sizes = traced_sizes(counts) if torch.compiler.is_compiling() else counts.tolist()
    for n in sizes:
        torch._check(n >= 0)  # the data-dependent counts are sizes
    return sizes


def explain_expert_error(expert: nn.Module, rows: Tensor, exc: ValueError) -> None:
    """Raises ``exc`` explained where the cause is the routing's, else returns (the caller re-raises)."""
    # An expert may get a single row; in training mode BatchNorm refuses that.
    if expert.training and rows.shape[0] == 1 and "more than 1 value per channel" in str(exc):
        raise ValueError(f"{exc}. A specialist received one row while in training mode; call mnn.eval() "
                         "for inference") from exc


def check_specialist_output(outputs, xg: Tensor, groups: Sequence[Sequence[int]], num_classes: int) -> None:
    """``ValueError`` naming the specialist whose output is not ``Tensor[n_e, C]`` (or ``[n_e, 1]`` for
    a one-class group); ``outputs`` and ``xg`` as :func:`run_specialists` takes and returns them (which
    checked each expert's row count already)."""
    if isinstance(outputs, Tensor):
        _check_one(outputs, "the grouped specialists", xg.shape[0], num_classes)
        if outputs.shape[1] == 1 and any(len(g) != 1 for g in groups):
            raise ValueError("the grouped specialists return one logit (binary) but some groups have several classes")
        return
    for e, y in enumerate(outputs):
        # run_specialists checked each is a tensor with one row per input row; the usual [n, C]
        # output costs one comparison here (E of them a forward).
        if y is None or (isinstance(y, Tensor) and y.dim() == 2 and y.shape[1] == num_classes):
            continue
        _check_one(y, f"specialists[{e}]", y.shape[0], num_classes)
        if y.shape[1] == 1 and len(groups[e]) != 1:
            raise ValueError(f"specialists[{e}] returns one logit (binary) but its group has {len(groups[e])} classes")


def _check_one(y, who: str, n, num_classes: int) -> None:
    width = y.shape[1] if isinstance(y, Tensor) and y.dim() == 2 else -1
    if not isinstance(y, Tensor) or y.dim() != 2 or y.shape[0] != n or width not in (num_classes, 1):
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"{who} must return logits of shape [n, C={num_classes}] (or [n, 1]), got {shape}")


def combine_log_probs(log_probs: Tensor, logv: Tensor, routing: Routing, ops: Backend) -> Tensor:
    """``Tensor[B, C] float32``: ``log_softmax(logP[i] + sum of i's rows of logv in increasing expert order)``.

    ``log_probs: Tensor[B, C]`` from :func:`switch_scores`, ``logv: Tensor[N, C]`` in buffer order.
    """
    acc = ops.combine(log_probs, logv, routing.perm, routing.sample_offsets, routing.sample_rows)
    return ops.log_softmax_rows(acc)


def recombine_log_probs(log_probs: Tensor, outputs, routing: Routing, tables: ClassTables, ops: Backend,
                        recombine: Callable | None = None) -> Tensor:
    """``Tensor[B, C] float32``: the module's output from the switch's ``log_probs: Tensor[B, C]`` and the
    specialists' logits ``outputs`` (as :func:`run_specialists` returns them).

    One ``ops.recombine`` call (or ``recombine``, the same op at another entry: the serving path's
    direct one) reads every logits row once, from the specialists' own outputs (no ``[N, C]``
    temporaries); specialists of mixed widths (binary and width ``C``) take contributions expert by
    expert, then :func:`combine_log_probs`, which is the same arithmetic per row.
    """
    logits = buffer_logits(outputs, tables.num_classes, log_probs.device)
    if logits is None:
        logv = specialist_contributions(outputs, routing.offsets, tables, ops)
        return combine_log_probs(log_probs, logv, routing, ops)
    return (recombine or ops.recombine)(log_probs, logits, routing.offsets, tables.group_offsets,
                                        tables.group_classes, tables.log_spread, routing.sample_offsets,
                                        routing.sample_rows)
