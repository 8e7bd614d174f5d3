"""The :class:`Routing` layout, argument checks for groups, thresholds and top-k, and :func:`route`.

Routing (the routing layout, docs/how-it-works.md): scores ``s[i, e]`` = group probability sums -> active experts (threshold
and/or top-k) -> stable expert-major ``perm`` plus the sample-major view. Every check raises a
``ValueError``/``TypeError`` naming the argument, before any kernel runs.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = ["Routing", "route", "normalize_groups", "check_threshold", "check_top_k", "group_tensors", "is_identity",
           "check_probs"]


class Routing(NamedTuple):
    """Routing of a batch: expert-major layout plus the sample-major view (the routing layout, docs/how-it-works.md).

    All fields are ``int64`` on the scores' device. ``counts: Tensor[E]``, ``offsets: Tensor[E+1]``,
    ``perm: Tensor[N]`` (buffer row ``r`` holds sample ``perm[r]``), ``sample_offsets: Tensor[B+1]``,
    ``sample_rows: Tensor[N]`` (each sample's buffer rows in increasing expert order).
    """

    counts: Tensor
    offsets: Tensor
    perm: Tensor
    sample_offsets: Tensor
    sample_rows: Tensor

Groups = tuple[tuple[int, ...], ...]


def normalize_groups(groups, num_experts: int | None = None, num_classes: int | None = None) -> Groups:
    """Checks ``groups`` (one non-empty list of distinct class ids per expert) and returns tuples.

    ``None`` means one expert per class: ``num_experts`` (or ``num_classes``) groups ``[e]``.
    """
    if groups is None:
        n = num_experts if num_experts is not None else num_classes
        if n is None:
            raise ValueError("groups=None needs the number of experts or classes")
        if num_classes is not None and num_experts is not None and num_classes != num_experts:
            raise ValueError(
                f"groups=None means one specialist per class, but there are {num_experts} specialists "
                f"and C={num_classes} classes; pass groups= to say which classes each specialist covers"
            )
        return tuple((e,) for e in range(n))
    if isinstance(groups, (str, bytes, Tensor)) or not isinstance(groups, Sequence):
        raise TypeError(f"groups must be a list of lists of class indices, got {type(groups).__name__}")
    out = []
    for e, group in enumerate(groups):
        if isinstance(group, (str, bytes)) or not isinstance(group, Sequence):
            raise TypeError(f"groups[{e}] must be a list of class indices, got {type(group).__name__}")
        if len(group) == 0:
            raise ValueError(f"groups[{e}] is empty; every expert must cover at least one class")
        members = []
        for c in group:
            if isinstance(c, bool) or not isinstance(c, numbers.Integral):
                raise TypeError(f"groups[{e}] must hold integer class indices, got {c!r}")
            c = int(c)
            if c < 0 or (num_classes is not None and c >= num_classes):
                bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
                raise ValueError(f"groups[{e}] has class {c}, expected a class index in {bound}")
            members.append(c)
        if len(set(members)) != len(members):
            raise ValueError(f"groups[{e}] = {members} repeats a class; classes in a group must be distinct")
        out.append(tuple(members))
    if num_experts is not None and len(out) != num_experts:
        raise ValueError(f"groups has {len(out)} entries but there are {num_experts} specialists; expected one group per specialist")
    if not out:
        raise ValueError("groups is empty; expected at least one expert")
    return tuple(out)


def check_threshold(threshold, top_k=None) -> float | None:
    """``threshold`` as a float in ``[0, 1]`` (``None`` allowed only when ``top_k`` is given)."""
    if threshold is None:
        if top_k is None:
            raise ValueError("threshold=None needs top_k; give a threshold in [0, 1], a top_k, or both")
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold must be a float in [0, 1] or None, got {type(threshold).__name__}")
    threshold = float(threshold)
    if math.isnan(threshold) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return threshold


def check_top_k(top_k, num_experts: int) -> int | None:
    """``top_k`` as an int in ``[1, E]`` or ``None``."""
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"top_k must be an int in [1, {num_experts}] or None, got {type(top_k).__name__}")
    if not 1 <= int(top_k) <= num_experts:
        raise ValueError(f"top_k must be in [1, E={num_experts}], got {top_k}")
    return int(top_k)


def group_tensors(groups: Groups, device: torch.device) -> tuple[Tensor, Tensor]:
    """CSR form of ``groups``: ``(group_offsets: Tensor[E+1] int64, group_classes: Tensor[M] int64)``."""
    sizes = [len(g) for g in groups]
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    classes = [c for g in groups for c in g]
    return (
        torch.tensor(offsets, dtype=torch.long, device=device),
        torch.tensor(classes, dtype=torch.long, device=device),
    )


def is_identity(groups: Groups, num_classes: int) -> bool:
    """True for the default one-expert-per-class layout, where the scores are the probabilities."""
    return len(groups) == num_classes and all(g == (e,) for e, g in enumerate(groups))


def check_probs(probs, name: str = "probs") -> Tensor:
    if not isinstance(probs, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(probs).__name__}")
    if probs.dim() != 2:
        raise ValueError(f"{name} must have shape [B, C], got {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {probs.dtype}")
    return probs.float().contiguous()


def route(probs: Tensor, groups=None, threshold: float | None = 0.25, top_k: int | None = None, backend: str = "auto") -> Routing:
    """Routes a batch from the switch's probabilities ``probs: Tensor[B, C]`` (float, cast to float32).

    Returns a :class:`Routing` (``counts``, ``offsets``, ``perm``, ``sample_offsets``, ``sample_rows``,
    all int64). ``groups=None`` means one expert per class.
    """
    from .backends import get_backend, select_backend  # the backends build Routing values: import late

    probs = check_probs(probs)
    num_classes = probs.shape[1]
    groups = normalize_groups(groups, None, num_classes) if groups is not None else normalize_groups(None, num_classes=num_classes)
    top_k = check_top_k(top_k, len(groups))
    threshold = check_threshold(threshold, top_k)
    impl = get_backend(select_backend(backend, probs.device)[0])
    scores = probs if is_identity(groups, num_classes) else impl.group_scores(probs, *group_tensors(groups, probs.device))
    return impl.route(scores, -math.inf if threshold is None else threshold, top_k or 0)
