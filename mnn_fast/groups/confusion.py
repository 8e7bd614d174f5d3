"""Label groups from a network's own confusions (docs/experiments/label-groups.md, Warde-Farley et al. 2014).

On held-out data: ``A[i, j]`` = how often class ``i`` is in the top-k predictions for examples of true
class ``j`` (or, without labels, how often ``i`` and ``j`` are detected together). ``S = A^T A`` is
a class-by-class similarity; spectral clustering on ``S`` partitions the classes into groups ``G_e``.
"""
from __future__ import annotations

import numbers
import warnings

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["confusion_matrix", "codetection_matrix", "similarity", "spectral_groups", "learn_groups",
           "order_by_groups", "GROUP_KINDS"]

GROUP_KINDS = ("confusion", "codetection")
# Added to every normalised affinity (largest entry = 1) before clustering. It connects a graph
# that falls apart into components, so the Laplacian's spectrum is well posed and sklearn has
# nothing to warn about, yet it is far below any affinity a real confusion produces.
_AFFINITY_EPS = 1e-6


# ------------------------------------------------------------------------------------ checks

def _check_int(value, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _check_scores(scores, name: str) -> Tensor:
    if not isinstance(scores, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [n, C], got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {scores.dtype}")
    if scores.dim() != 2 or scores.shape[1] < 1:
        raise ValueError(f"{name} must have shape [n, C] with C >= 1, got {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError(f"{name} contains NaN; the top-k ranking is undefined")
    return scores.detach().cpu()


def _topk_mask(scores: Tensor, k: int) -> Tensor:
    """``Tensor[n, C] bool``: the ``k`` largest entries of each row; ties go to the lower class
    (a stable descending sort), the tie rule of the switch function, docs/how-it-works.md."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros(scores.shape, dtype=torch.bool).scatter_(1, order, True)


def _per_column(counts: Tensor, totals: Tensor) -> Tensor:
    """``counts[:, j] / totals[j]``, with a zero column where ``totals[j] == 0`` (no evidence)."""
    safe = torch.where(totals > 0, totals, torch.ones_like(totals))
    return torch.where(totals > 0, counts / safe, torch.zeros_like(counts))


# ------------------------------------------------------------------------------------ matrices

def confusion_matrix(probs_or_logits: Tensor, labels: Tensor, k: int = 1) -> Tensor:
    """Top-k confusion matrix ``Tensor[C, C] float64``.

    ``A[i, j]`` = fraction of the examples of true class ``j`` whose ``k`` highest scores include class
    ``i``; each non-empty column sums to ``k``. A class with no examples gets a column of zeros.

    Args:
        probs_or_logits: ``Tensor[n, C]`` floating point; only the per-row ranking matters (softmax
            is monotonic), ties go to the lower class. NaN raises ``ValueError``.
        labels: ``Tensor[n]`` integer class ids in ``[0, C)`` (int64 expected; any integer dtype is
            accepted, floats and bools raise ``TypeError``).
        k: ``>= 1``; a ``k`` larger than ``C`` is clamped to ``C`` (every class is then in the top-k,
            so every non-empty column is all ones).
    """
    scores = _check_scores(probs_or_logits, "probs_or_logits")
    n, num_classes = scores.shape
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor [n] of int64, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (int64), got {labels.dtype}")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape [n={n}] to match probs_or_logits, got {tuple(labels.shape)}")
    labels = labels.detach().cpu().long()
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be class ids in [0, {num_classes}), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    k = min(_check_int(k, "k"), num_classes)
    in_topk = _topk_mask(scores, k).double()                                   # [n, C]
    truth = nn.functional.one_hot(labels, num_classes).double()                # [n, C]
    return _per_column(in_topk.t() @ truth, truth.sum(0))


def codetection_matrix(probs: Tensor, k: int = 2) -> Tensor:
    """Top-k co-detection matrix ``Tensor[C, C] float64``; needs no labels.

    ``A[i, j]`` = (number of examples with both ``i`` and ``j`` in their top-k) / (number with ``j`` in
    their top-k): the fraction of ``j``'s detections in which ``i`` is detected too, i.e. the empirical
    ``P(i in top-k | j in top-k)``. Normalising per column, as :func:`confusion_matrix` does per true
    class, keeps rarely detected classes from vanishing in ``S = A^T A``. ``A[j, j] = 1`` for every
    detected class; a class never in any top-k gets a column of zeros. ``k`` larger than ``C`` is
    clamped to ``C``; ``k = 1`` gives the identity on detected classes (no co-detections).

    Args:
        probs: ``Tensor[n, C]`` floating point (probabilities or logits: only the ranking matters).
        k: ``>= 1``.
    """
    scores = _check_scores(probs, "probs")
    k = min(_check_int(k, "k"), scores.shape[1])
    m = _topk_mask(scores, k).double()
    together = m.t() @ m                                                       # [C, C] counts
    return _per_column(together, together.diagonal().clone())


def similarity(A: Tensor) -> Tensor:
    """``S = A^T A``, ``Tensor[C, C] float64``: ``S[j, j']`` is large when true classes ``j`` and ``j'``
    are confused with the same classes. ``A``: ``Tensor[C, C]`` real, finite."""
    a = _as_square(A, "A")
    return torch.from_numpy(a.T @ a)


def _as_square(m, name: str) -> np.ndarray:
    """``m`` (Tensor or ndarray) as a finite float64 ``[C, C]`` numpy array, or a clear error."""
    if isinstance(m, Tensor):
        if m.is_complex() or m.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got {m.dtype}")
        arr = m.detach().cpu().double().numpy()
    elif isinstance(m, np.ndarray):
        if not (np.issubdtype(m.dtype, np.floating) or np.issubdtype(m.dtype, np.integer)):
            raise TypeError(f"{name} must hold real numbers, got dtype {m.dtype}")
        arr = m.astype(np.float64)
    else:
        raise TypeError(f"{name} must be a torch.Tensor (or numpy array) [C, C], got {type(m).__name__}")
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square matrix [C, C], got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite entries")
    return arr


# ------------------------------------------------------------------------------------ clustering

def spectral_groups(S, num_groups: int, seed: int = 0) -> list[list[int]]:
    """Partition the ``C`` classes into exactly ``num_groups`` groups by spectral clustering of ``S``.

    ``S``: ``Tensor[C, C]`` (or ndarray) of non-negative finite affinities, e.g. :func:`similarity`;
    it is symmetrised as ``(S + S^T) / 2``. Returns ``list[list[int]]``: a partition of
    ``range(C)``, each group increasing, groups ordered by their smallest class. Deterministic given
    ``seed`` (sklearn ``SpectralClustering(affinity="precomputed", random_state=seed)``).

    What real matrices do, and what happens then:

    * A class with an all-zero row (no held-out examples, or never in any top-k) carries no
      information: it is left out of the clustering and then joins the smallest group (ties: the
      group with the lowest class). If fewer than ``num_groups`` classes are informative, the
      uninformative ones (lowest first) found the missing groups.
    * A disconnected graph (classes never confused across blocks): every normalised affinity gets
      ``1e-6`` added, which connects the graph without changing any real structure; components are
      then kept whole when ``num_groups`` allows.
    * If k-means finds fewer distinct clusters than asked (indistinguishable classes, e.g. ``S``
      constant), the largest group repeatedly gives its least-attached class (lowest summed affinity
      to the rest of its group; ties: the highest class) to a new group.
    * ``num_groups == 1`` and ``num_groups == C`` are answered without clustering.

    Raises ``ValueError`` naming ``num_groups`` unless ``1 <= num_groups <= C``, and naming ``S`` for
    a non-square, non-finite or negative matrix; ``TypeError`` for wrong types.
    """
    w = _as_square(S, "S")
    num_classes = w.shape[0]
    num_groups = _check_int(num_groups, "num_groups")
    if num_groups > num_classes:
        raise ValueError(f"num_groups must be <= C = {num_classes} (the number of classes), got {num_groups}")
    seed = _check_int(seed, "seed", low=0)
    if (w < 0).any():
        raise ValueError("S must be non-negative (an affinity matrix); got negative entries")
    w = (w + w.T) / 2.0
    informative = [c for c in range(num_classes) if w[c].sum() > 0]
    idle = [c for c in range(num_classes) if w[c].sum() == 0]

    n_clustered = min(num_groups, len(informative))
    groups = _cluster(w[np.ix_(informative, informative)], n_clustered, seed)
    groups = [[informative[i] for i in g] for g in groups]
    # Uninformative classes: first found any groups still missing, then balance the sizes.
    while len(groups) < num_groups:
        groups.append([idle.pop(0)])
    for c in idle:
        smallest = min(range(len(groups)), key=lambda g: (len(groups[g]), min(groups[g])))
        groups[smallest].append(c)
    return sorted((sorted(g) for g in groups), key=lambda g: g[0])


def _cluster(w: np.ndarray, num_groups: int, seed: int) -> list[list[int]]:
    """Index groups of the ``[m, m]`` affinity ``w`` (every row non-zero), exactly ``num_groups``."""
    m = w.shape[0]
    if num_groups == 0:
        return []
    if num_groups == 1:
        return [list(range(m))]
    if num_groups == m:
        return [[i] for i in range(m)]
    from sklearn.cluster import SpectralClustering
    from sklearn.exceptions import ConvergenceWarning

    affinity = w / w.max() + _AFFINITY_EPS
    model = SpectralClustering(n_clusters=num_groups, affinity="precomputed", random_state=seed)
    with warnings.catch_warnings():
        # Too few distinct points for k-means is repaired below; nothing is silently wrong.
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels = model.fit_predict(affinity)
    groups = [list(np.flatnonzero(labels == g)) for g in np.unique(labels)]
    groups = [[int(i) for i in g] for g in groups if g]
    while len(groups) < num_groups:
        big = max(range(len(groups)), key=lambda g: (len(groups[g]), -min(groups[g])))
        members = groups[big]
        attach = [(w[i, members].sum() - w[i, i], -i) for i in members]
        leaving = members[min(range(len(members)), key=lambda j: attach[j])]
        members.remove(leaving)
        groups.append([leaving])
    return groups


def order_by_groups(groups) -> list[int]:
    """The classes listed group after group (each group increasing): a row/column order for plots."""
    return [c for g in groups for c in sorted(g)]


# ------------------------------------------------------------------------------------ helper

def learn_groups(model: nn.Module, x_val: Tensor, y_val: Tensor, num_groups: int, k: int = 2,
                 kind: str = "confusion", seed: int = 0, return_similarity: bool = False):
    """Groups from a trained ``model``'s predictions on held-out ``(x_val, y_val)``.

    ``x_val: Tensor[n, ...] float32``, ``y_val: Tensor[n] int64`` (unused for ``kind="codetection"``).
    ``kind="confusion"``: ``S = similarity(confusion_matrix(probs, y_val, k))``; ``"codetection"``:
    ``S = similarity(codetection_matrix(probs, k))``. Then :func:`spectral_groups` with ``seed``.
    ``k=2`` by default: with ``k = 1`` a well-trained network's confusion matrix is nearly diagonal
    and co-detection sees nothing, so the runner-up prediction carries the signal.
    Returns ``list[list[int]]``, or ``(groups, S: Tensor[C, C] float64)`` with ``return_similarity``.
    """
    from ..training.loop import predict_probs

    if kind not in GROUP_KINDS:
        raise ValueError(f"kind must be one of {GROUP_KINDS}, got {kind!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x_val, Tensor) or len(x_val) == 0:
        raise ValueError("x_val must be a non-empty tensor [n, ...] of held-out inputs")
    probs = predict_probs(model, x_val)
    if kind == "confusion":
        A = confusion_matrix(probs, y_val, k)
    else:
        A = codetection_matrix(probs, k)
    S = similarity(A)
    groups = spectral_groups(S, num_groups, seed)
    return (groups, S) if return_similarity else groups
