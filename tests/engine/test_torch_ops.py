"""The torch backend (vectorised routing ops) against the naive loop, and the routing invariants.

Reference first: ``mnn_fast.reference`` (the naive loop, mask by mask); the kernels are tested
against the torch backend in tests/kernels/test_ops.py, so it is checked here against the loop and
against the definitions (SPEC sections 2-3) written out independently.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import assert_routing_equal, make_scores, random_groups
from mnn_fast import reference
from mnn_fast.engine import torch_ops as R


def check_invariants(r, scores, threshold, top_k):
    batch, experts = scores.shape
    active = R.active_mask_torch(scores, threshold, top_k)
    assert int(r.counts.sum()) == r.perm.numel() == r.sample_rows.numel()
    assert torch.equal(r.offsets[1:] - r.offsets[:-1], r.counts)
    for e in range(experts):
        seg = r.perm[r.offsets[e] : r.offsets[e + 1]]
        # stable expert-major: each expert's samples strictly increasing and exactly its active set
        assert torch.all(seg[1:] > seg[:-1])
        assert torch.equal(seg, active[:, e].nonzero().squeeze(1))
    for i in range(batch):
        rows = r.sample_rows[r.sample_offsets[i] : r.sample_offsets[i + 1]]
        assert torch.all(r.perm[rows] == i)  # the two views agree
        experts_of_i = torch.searchsorted(r.offsets, rows, right=True) - 1
        assert torch.equal(experts_of_i, active[i].nonzero().squeeze(1))


def test_topk_definition_ties_go_to_lower_index():
    scores = torch.tensor([[0.3, 0.3, 0.1, 0.3], [float("nan")] * 4, [0.0, 0.5, 0.5, 0.0]])
    mask = R.active_mask_torch(scores, None, 2)
    assert mask.tolist() == [[True, True, False, False], [False] * 4, [False, True, True, False]]


def test_threshold_is_strict():
    scores = torch.tensor([[0.25, 0.5, 0.25]])
    assert R.active_mask_torch(scores, 0.25, None).tolist() == [[False, True, False]]


@pytest.mark.parametrize("threshold,top_k", [(0.1, None), (None, 2), (0.05, 3), (0.0, 1)])
def test_masks_of_the_backend_and_the_reference_agree(threshold, top_k):
    # Written separately (the reference must not share code with the fast path): same semantics.
    scores = make_scores(200, 7, seed=3, levels=10, nan_rows=20)
    assert torch.equal(R.active_mask_torch(scores, threshold, top_k), reference.active_mask(scores, threshold, top_k))


# Cases: default one-per-class, ties, NaN rows, thresholds at both ends, top-k with and without threshold.
@pytest.mark.parametrize("batch,experts", [(0, 3), (1, 1), (17, 5), (64, 40)])
@pytest.mark.parametrize("threshold,top_k", [(0.0, None), (1.0, None), (0.1, None), (None, 2), (0.05, 3)])
def test_naive_and_vectorised_routing_agree(batch, experts, threshold, top_k):
    top_k = min(top_k, experts) if top_k else None  # top_k > E is rejected by the public API
    probs = make_scores(batch, experts, seed=batch * 31 + experts, levels=20, nan_rows=batch // 8)
    want = reference.naive_route(probs, None, threshold, top_k)
    got = R.route_torch(probs, threshold, top_k)
    assert_routing_equal(got, want)
    check_invariants(got, probs, threshold, top_k)


@given(
    batch=st.integers(0, 60),
    classes=st.integers(1, 12),
    experts=st.integers(1, 15),
    seed=st.integers(0, 10_000),
    threshold=st.sampled_from([0.0, 0.1, 0.3, 1.0]),
)
def test_group_scores_and_combine_match_loops(batch, classes, experts, seed, threshold):
    probs = make_scores(batch, classes, seed)
    groups = random_groups(classes, experts, seed)
    offsets = torch.tensor([0] + [sum(len(g) for g in groups[: e + 1]) for e in range(experts)])
    members = torch.tensor([c for g in groups for c in g])
    scores = R.group_scores_torch(probs, offsets, members)
    loop = torch.stack([reference.group_score_loop(probs, g) for g in groups], 1)
    assert torch.equal(scores, loop)
    r = R.route_torch(scores, threshold, None)
    check_invariants(r, scores, threshold, None)
    logp = torch.log_softmax(torch.randn(batch, classes), 1)
    logv = torch.randn(r.perm.numel(), classes)
    acc = R.combine_torch(logp, logv, r.perm, r.sample_offsets, r.sample_rows)
    want = logp.clone()
    for e in range(experts):  # the paper's order: expert by expert
        rows = torch.arange(int(r.offsets[e]), int(r.offsets[e + 1]))
        want[r.perm[rows]] = want[r.perm[rows]] + logv[rows]
    assert torch.equal(acc, want)
