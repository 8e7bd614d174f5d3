"""The reference's own definitions (SPEC section 2): everything else is tested against this module.

The switch-function mask is written out by hand here, so the reference is checked against the
SPEC's words and not against the engine.
"""
import pytest
import torch

from mnn_fast import reference


def test_topk_ties_go_to_the_lower_index_and_nan_is_never_active():
    scores = torch.tensor([[0.3, 0.3, 0.1, 0.3], [float("nan")] * 4, [0.0, 0.5, 0.5, 0.0]])
    mask = reference.active_mask(scores, None, 2)
    assert mask.tolist() == [[True, True, False, False], [False] * 4, [False, True, True, False]]


def test_threshold_is_strict_and_combines_with_top_k():
    scores = torch.tensor([[0.25, 0.5, 0.25], [0.4, 0.35, 0.25]])
    assert reference.active_mask(scores, 0.25, None).tolist() == [[False, True, False], [True, True, False]]
    assert reference.active_mask(scores, 0.3, 1).tolist() == [[False, True, False], [True, False, False]]


def test_group_score_sums_in_listed_order():
    probs = torch.tensor([[1e-8, 1.0, 1e-8]])
    # (1e-8 + 1.0) + 1e-8 rounds differently from 1e-8 + 1e-8 + 1.0 in float32: order is part of the spec.
    assert torch.equal(reference.group_score_loop(probs, [0, 1, 2]), (probs[:, 0] + probs[:, 1]) + probs[:, 2])
    assert torch.equal(reference.group_score_loop(probs, [0, 2, 1]), (probs[:, 0] + probs[:, 2]) + probs[:, 1])


def test_naive_route_layout_on_a_hand_made_case():
    probs = torch.tensor([[0.6, 0.4, 0.0], [0.1, 0.1, 0.8], [0.5, 0.0, 0.5]])
    r = reference.naive_route(probs, threshold=0.3)
    assert r.counts.tolist() == [2, 1, 2]
    assert r.perm.tolist() == [0, 2, 0, 1, 2]  # expert-major, samples increasing within an expert
    assert r.sample_offsets.tolist() == [0, 2, 3, 5]
    assert r.sample_rows.tolist() == [0, 2, 3, 1, 4]  # each sample's rows in increasing expert order


# user_loop_forward is what speed is measured against: SPEC section 4 with torch's exp and log, so
# within float32 rounding of the naive loop (not bitwise) and the same prediction.
@pytest.mark.parametrize("case", ["one class each", "overlapping groups", "binary specialists", "a group of every class",
                                  "nothing active", "empty batch"])
def test_user_loop_agrees_with_the_naive_loop(case):
    from torch import nn

    gen = torch.Generator().manual_seed(len(case))
    classes, batch, threshold = 6, 40, 0.1
    groups = {"one class each": None, "overlapping groups": [[0, 1], [1, 2, 3], [5], [4, 0]],
              "binary specialists": [[0], [3], [5]], "a group of every class": [list(range(classes)), [2]],
              "nothing active": None, "empty batch": None}[case]
    if case == "nothing active":
        threshold = 1.0
    if case == "empty batch":
        batch = 0
    width = 1 if case == "binary specialists" else classes
    count = classes if groups is None else len(groups)
    switch = nn.Linear(8, classes)
    specialists = [nn.Linear(8, width) for _ in range(count)]
    x = torch.randn(batch, 8, generator=gen) * 3
    got = reference.user_loop_forward(switch, specialists, x, groups=groups, threshold=threshold)
    want = reference.naive_forward(switch, specialists, x, groups=groups, threshold=threshold)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(1), want.argmax(1))
