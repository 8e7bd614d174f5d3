"""The contribution math (SPEC section 4): the formula, the vectorised pass, the path choice.

Reference first: the section-4 formula written in plain torch below (log_softmax, logsumexp); the
engine's per-expert ``expert_log_contribution`` must match it, and the all-rows pass must be
bitwise the per-expert one.
"""
import math

import pytest
import torch

from mnn_fast.engine.contributions import (class_tables, expert_log_contribution, specialist_contributions,
                                           vectorised_contribution)


def formula(y, group, num_classes):
    """SPEC section 4 literally: log_softmax, logsumexp over the group / over the rest, even spread."""
    rest_cols = [c for c in range(num_classes) if c not in group]
    out = torch.empty(y.shape[0], num_classes)
    if y.shape[1] == 1:
        out[:, group] = torch.nn.functional.logsigmoid(y)
        log_not_q = torch.nn.functional.logsigmoid(-y)
    else:
        ls = torch.log_softmax(y.float(), 1)
        out[:, group] = ls[:, group]
        log_not_q = torch.logsumexp(ls[:, rest_cols], 1, keepdim=True) if rest_cols else None
    if rest_cols:
        out[:, rest_cols] = log_not_q - math.log(len(rest_cols))
    return out


@pytest.mark.parametrize("group", [[2], [0, 3, 6], list(range(7)), [6, 1]])
def test_expert_contribution_matches_the_formula(group):
    y = torch.randn(50, 7) * 5
    torch.testing.assert_close(expert_log_contribution(y, group, 7), formula(y, group, 7), rtol=0, atol=2e-6)


def test_binary_contribution_matches_the_formula():
    y = torch.randn(50, 1) * 5
    torch.testing.assert_close(expert_log_contribution(y, [4], 7), formula(y, [4], 7), rtol=0, atol=2e-6)


def test_contribution_sums_to_one_and_keeps_group_log_probs():
    y = torch.randn(6, 7)
    for group in ([2], [0, 3, 6], list(range(7))):
        v = expert_log_contribution(y, group, 7)
        assert torch.allclose(v.exp().sum(1), torch.ones(6), atol=1e-5)
        assert torch.equal(v[:, group], torch.log_softmax(y, 1)[:, group])
    binary = expert_log_contribution(y[:, :1], [4], 7)
    assert torch.allclose(binary[:, 4], torch.nn.functional.logsigmoid(y[:, 0]))
    assert torch.allclose(binary.exp().sum(1), torch.ones(6), atol=1e-5)
    assert torch.allclose(binary[:, 0], torch.nn.functional.logsigmoid(-y[:, 0]) - math.log(6))


# Group width g picks the path: shifts for g <= 8 (one, two, unsorted several), masked_select above,
# nothing outside at g = C. Rows per expert vary, including experts with no rows.
@pytest.mark.parametrize("g", [1, 2, 5, 8, 9, 12])
def test_vectorised_contribution_bitwise_per_expert(g):
    gen = torch.Generator().manual_seed(g)
    C, E = 12, 7
    groups = [torch.randperm(C, generator=gen)[:g].tolist() for _ in range(E)]  # unsorted on purpose
    counts = torch.randint(0, 6, (E,), generator=gen)
    counts[2] = 0
    y = torch.randn(int(counts.sum()), C, generator=gen) * 20
    y[::4, 0] = -1e30  # a class pushed to probability 0
    expert_of_row = torch.repeat_interleave(torch.arange(E), counts)
    got = vectorised_contribution(y, expert_of_row, torch.tensor(groups))
    want = torch.cat([expert_log_contribution(part, groups[e], C)
                      for e, part in enumerate(torch.split(y, counts.tolist()))])
    assert torch.equal(got, want)


# The path choice: mixed widths (binary + width C) and unequal group sizes go expert by expert;
# one grouped tensor of width C takes the all-rows pass. All must agree bitwise with per-expert calls.
@pytest.mark.parametrize("case", ["uniform", "uneven_groups", "binary_mix", "grouped_tensor"])
def test_specialist_contributions_bitwise_per_expert_on_every_path(case):
    gen = torch.Generator().manual_seed(7)
    C = 6
    groups = [[0], [1], [2, 3], [4]] if case == "uneven_groups" else [[0], [1], [2], [4]]
    counts = torch.tensor([3, 0, 4, 2])
    outputs = [torch.randn(int(n), C, generator=gen) if n else None for n in counts]
    if case == "binary_mix":
        outputs[3] = torch.randn(2, 1, generator=gen)
    want = torch.cat([expert_log_contribution(y, groups[e], C) for e, y in enumerate(outputs) if y is not None])
    given = torch.cat([y for y in outputs if y is not None]) if case == "grouped_tensor" else outputs
    got = specialist_contributions(given, counts, groups, class_tables(groups, C, torch.device("cpu")))
    assert torch.equal(got, want)


def test_specialist_contributions_with_no_rows_is_empty_width_c():
    groups = [[0], [1]]
    got = specialist_contributions([None, None], torch.tensor([0, 0]), groups, class_tables(groups, 3, torch.device("cpu")))
    assert got.shape == (0, 3) and got.dtype == torch.float32
