"""Label groups from confusions (SPEC section 8): matrices, spectral grouping, group specialists.

Definitions the tests hold the code to (written out here as plain loops):
- confusion: ``A[i, j]`` = (# examples of true class ``j`` with ``i`` among their top-k scores) /
  (# examples of class ``j``); zero column for a class without examples. Top-k ties: lower class first.
- co-detection: ``A[i, j]`` = (# examples with ``i`` and ``j`` both in the top-k) / (# with ``j`` in it).
- ``S = A^T A``; ``spectral_groups(S, G)`` is a partition of ``range(C)`` into exactly ``G`` groups,
  each increasing, ordered by smallest class.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from helpers import assert_partition
from mnn_fast import MetaNeuralNetwork
from mnn_fast.groups.confusion import codetection_matrix, confusion_matrix, learn_groups, similarity, spectral_groups
from mnn_fast.reference import naive_forward
from mnn_fast.training.loop import predict_probs


# ------------------------------------------------------------------------------ reference loops

def topk_of(row, k):
    """The top-k classes of one score row, ties to the lower class (SPEC section 2's rule)."""
    return sorted(range(len(row)), key=lambda c: (-float(row[c]), c))[:min(k, len(row))]


def brute_confusion(scores, labels, k):
    n, num_classes = scores.shape
    hits = [[0] * num_classes for _ in range(num_classes)]
    count = [0] * num_classes
    for r in range(n):
        j = int(labels[r])
        count[j] += 1
        for i in topk_of(scores[r], k):
            hits[i][j] += 1
    return torch.tensor([[hits[i][j] / count[j] if count[j] else 0.0 for j in range(num_classes)]
                         for i in range(num_classes)], dtype=torch.float64)


def brute_codetection(scores, k):
    n, num_classes = scores.shape
    both = [[0] * num_classes for _ in range(num_classes)]
    for r in range(n):
        top = topk_of(scores[r], k)
        for i in top:
            for j in top:
                both[i][j] += 1
    return torch.tensor([[both[i][j] / both[j][j] if both[j][j] else 0.0 for j in range(num_classes)]
                         for i in range(num_classes)], dtype=torch.float64)


def planted_confusion(sizes, noise, seed):
    """A confusion-like matrix with strong blocks on a hidden random grouping, plus uniform noise."""
    g = torch.Generator().manual_seed(seed)
    num_classes = sum(sizes)
    perm = torch.randperm(num_classes, generator=g).tolist()
    A = noise * torch.rand(num_classes, num_classes, generator=g, dtype=torch.float64)
    groups, start = [], 0
    for n in sizes:
        members = perm[start:start + n]
        start += n
        groups.append(sorted(members))
        for i in members:
            for j in members:
                A[i, j] = 0.3 + 0.7 * float(torch.rand((), generator=g, dtype=torch.float64))
    return A, sorted(groups)


# Four examples, C = 3; class 1 has no examples. Top-2 sets: {0,1}, {1,2}, {1,2}, {0,1}.
HAND_PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
HAND_LABELS = torch.tensor([0, 0, 2, 2])


# ------------------------------------------------------------------------------ matrices

def test_confusion_matrix_hand_computed():
    # Worked out on paper, so the definition (rows = predicted, columns = true class) is pinned down.
    k1 = torch.tensor([[0.5, 0, 0.5], [0.5, 0, 0], [0, 0, 0.5]], dtype=torch.float64)
    k2 = torch.tensor([[0.5, 0, 0.5], [1, 0, 1], [0.5, 0, 0.5]], dtype=torch.float64)
    got1 = confusion_matrix(HAND_PROBS, HAND_LABELS, k=1)
    assert got1.dtype == torch.float64 and torch.equal(got1, k1)
    assert torch.equal(confusion_matrix(HAND_PROBS, HAND_LABELS, k=2), k2)
    # Ties go to the lower class, as everywhere in the engine.
    assert confusion_matrix(torch.tensor([[0.4, 0.4, 0.2]]), torch.tensor([2]))[:, 2].tolist() == [1, 0, 0]


def test_codetection_matrix_hand_computed():
    # Detections: class 0 twice, 1 four times, 2 twice; 0 and 2 never together.
    want = torch.tensor([[1, 0.5, 0], [1, 1, 1], [0, 0.5, 1]], dtype=torch.float64)
    assert torch.equal(codetection_matrix(HAND_PROBS, k=2), want)


@pytest.mark.parametrize("k", [1, 2, 3, 6])
@pytest.mark.parametrize("seed", [0, 1])
def test_matrices_match_brute_force_loops(k, seed):
    # Random scores quantised to few levels so top-k ties are frequent; labels skip class 5 entirely.
    g = torch.Generator().manual_seed(seed)
    logits = torch.round(torch.randn(120, 6, generator=g) * 2) / 2
    labels = torch.randint(0, 5, (120,), generator=g)
    assert torch.equal(confusion_matrix(logits, labels, k), brute_confusion(logits, labels, k))
    assert torch.equal(codetection_matrix(logits, k), brute_codetection(logits, k))
    # Only the ranking counts, so logits and probabilities agree when softmax keeps values distinct.
    distinct = torch.randn(120, 6, generator=g)
    assert torch.equal(confusion_matrix(distinct, labels, k), confusion_matrix(torch.softmax(distinct, 1), labels, k))


def test_k_larger_than_classes_is_clamped():
    # The documented choice: k > C means "every class", the same as k = C, not an error.
    assert torch.equal(confusion_matrix(HAND_PROBS, HAND_LABELS, k=10), confusion_matrix(HAND_PROBS, HAND_LABELS, k=3))
    assert confusion_matrix(HAND_PROBS, HAND_LABELS, k=10)[:, [0, 2]].eq(1).all()
    assert codetection_matrix(HAND_PROBS, k=99).eq(1).all()


def test_similarity_is_ata():
    A = torch.rand(5, 5, dtype=torch.float64)
    S = similarity(A)
    assert S.dtype == torch.float64 and torch.allclose(S, A.t() @ A) and torch.equal(S, S.t())


# ------------------------------------------------------------------------------ spectral grouping

@settings(max_examples=12)
@given(sizes=st.lists(st.integers(1, 4), min_size=2, max_size=4), noise=st.sampled_from([0.0, 0.05, 0.15]),
       seed=st.integers(0, 2**16))
def test_planted_blocks_are_recovered(sizes, noise, seed):
    # The point of the method: classes confused with each other end up together. noise = 0 is also
    # the disconnected-graph case (no affinity at all between blocks).
    A, planted = planted_confusion(sizes, noise, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sklearn's "graph not connected" must not leak
        assert spectral_groups(similarity(A), len(sizes), seed=seed % 7) == planted


def test_disconnected_graph_keeps_components_whole():
    # Exact zeros between blocks: the graph falls apart; each component must stay in one group.
    S = torch.block_diag(torch.ones(3, 3), torch.ones(2, 2), torch.ones(4, 4)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert spectral_groups(S, 3) == [[0, 1, 2], [3, 4], [5, 6, 7, 8]]
        merged = spectral_groups(S, 2)
    assert_partition(merged, 9, 2)
    for component in ([0, 1, 2], [3, 4], [5, 6, 7, 8]):
        assert sum(set(component) <= set(g) for g in merged) == 1


def test_classes_without_information():
    # A class with no held-out examples has a zero column in A, hence a zero row/column in S: it is
    # left out of the clustering and joins the smallest group (documented rule).
    S = torch.block_diag(torch.ones(3, 3), torch.ones(2, 2), torch.zeros(1, 1)).double()
    assert spectral_groups(S, 2) == [[0, 1, 2], [3, 4, 5]]
    # No information at all: the first classes found the groups, the rest fill the smallest ones.
    assert spectral_groups(torch.zeros(5, 5), 3) == [[0, 3], [1, 4], [2]]
    # A realistic matrix: class 4 is never predicted (zero row of A), class 5 has no examples.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 6, generator=g)
    logits[:, 4] = -10
    labels = torch.randint(0, 5, (200,), generator=g)
    A = confusion_matrix(logits, labels, k=2)
    assert A[4].eq(0).all() and A[:, 5].eq(0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for n in range(1, 7):
            assert_partition(spectral_groups(similarity(A), n, seed=1), 6, n)


def test_too_few_kmeans_clusters_are_repaired(monkeypatch):
    # k-means may find fewer distinct clusters than asked (indistinguishable classes); the documented
    # repair splits off the least-attached classes so the answer still has num_groups groups.
    from sklearn.cluster import SpectralClustering

    monkeypatch.setattr(SpectralClustering, "fit_predict", lambda self, X: [0] * len(X))
    S = torch.block_diag(torch.ones(2, 2), torch.ones(3, 3)).double()
    assert spectral_groups(S, 3) == [[0], [1], [2, 3, 4]]


@pytest.mark.parametrize("num_groups", [1, 2, 4, 7, 8])
def test_partition_sorted_and_deterministic(num_groups):
    # Whatever S looks like, the answer has the promised shape and depends only on the seed.
    S = similarity(torch.rand(8, 8, generator=torch.Generator().manual_seed(num_groups), dtype=torch.float64))
    got = spectral_groups(S, num_groups, seed=3)
    assert_partition(got, 8, num_groups)
    assert spectral_groups(S.numpy(), num_groups, seed=3) == got  # numpy input too
    assert spectral_groups(S, num_groups, seed=3) == got


def test_bad_arguments_are_named():
    # Every refusal names the offending argument, before any clustering runs.
    S = torch.eye(4)
    with pytest.raises(ValueError, match="num_groups"):
        spectral_groups(S, 5)
    with pytest.raises(ValueError, match="num_groups"):
        spectral_groups(S, 0)
    with pytest.raises(TypeError, match="num_groups"):
        spectral_groups(S, 2.0)
    with pytest.raises(ValueError, match="S must be a non-empty square"):
        spectral_groups(torch.ones(3, 4), 2)
    with pytest.raises(ValueError, match="S contains NaN"):
        spectral_groups(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1)
    with pytest.raises(ValueError, match="S must be non-negative"):
        spectral_groups(-torch.eye(3), 2)
    with pytest.raises(TypeError, match="S must be a torch.Tensor"):
        spectral_groups([[1.0]], 1)
    with pytest.raises(TypeError, match="labels must be an integer"):
        confusion_matrix(HAND_PROBS, HAND_LABELS.float())
    with pytest.raises(ValueError, match="labels must have shape"):
        confusion_matrix(HAND_PROBS, HAND_LABELS[:3])
    with pytest.raises(ValueError, match="labels must be class ids"):
        confusion_matrix(HAND_PROBS, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="k must be >= 1"):
        confusion_matrix(HAND_PROBS, HAND_LABELS, k=0)
    with pytest.raises(ValueError, match="k must be >= 1"):
        codetection_matrix(HAND_PROBS, k=0)
    with pytest.raises(ValueError, match="probs_or_logits contains NaN"):
        confusion_matrix(torch.full((2, 3), float("nan")), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="probs must be a floating-point"):
        codetection_matrix(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="A must be a non-empty square"):
        similarity(torch.ones(2, 3))


# ------------------------------------------------------------------------------ group specialists

def tiny_mlp(inputs, outputs, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, 16), nn.ReLU(), nn.Linear(16, outputs)).eval()


def test_learn_groups_uses_held_out_predictions():
    # learn_groups is the documented composition, for both kinds, and refuses unknown kinds.
    model = tiny_mlp(5, 6, 0)
    x, y = torch.randn(90, 5), torch.randint(0, 6, (90,))
    probs = predict_probs(model, x)
    want = spectral_groups(similarity(confusion_matrix(probs, y, 2)), 3, 0)
    groups, S = learn_groups(model, x, y, 3, return_similarity=True)
    assert groups == want and torch.equal(S, similarity(confusion_matrix(probs, y, 2)))
    assert learn_groups(model, x, y, 3, k=3, kind="codetection", seed=1) == \
        spectral_groups(similarity(codetection_matrix(probs, 3)), 3, 1)
    with pytest.raises(ValueError, match="kind"):
        learn_groups(model, x, y, 3, kind="bogus")


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("singleton_width", ["C", "binary"])
def test_group_specialist_mnn_equals_naive_loop(backend, singleton_width):
    # SPEC 5 holds for learned groups too: the module and the paper's loop agree bit for bit. The
    # planted grouping has a one-class group, served by a width-C or by a binary (width-1) specialist.
    num_classes, inputs = 6, 5
    A, planted = planted_confusion([1, 2, 3], 0.05, seed=4)
    groups = spectral_groups(similarity(A), 3)
    assert groups == planted and sorted(map(len, groups)) == [1, 2, 3]
    switch = tiny_mlp(inputs, num_classes, 0)
    experts = [tiny_mlp(inputs, 1 if len(g) == 1 and singleton_width == "binary" else num_classes, 1 + e)
               for e, g in enumerate(groups)]
    x = torch.randn(64, inputs, generator=torch.Generator().manual_seed(7)) * 3
    mnn = MetaNeuralNetwork(switch, experts, groups=groups, threshold=0.2, backend=backend)
    out, routing = mnn(x, return_routing=True)
    want, want_routing = naive_forward(switch, experts, x, groups=groups, threshold=0.2, return_routing=True)
    assert (routing.counts > 0).all()  # every specialist actually ran
    assert torch.equal(out, want)
    assert torch.equal(routing.perm, want_routing.perm) and torch.equal(routing.offsets, want_routing.offsets)
