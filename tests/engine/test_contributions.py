"""The contribution math (SPEC section 4): the formula and the path choice.

Reference first: the section-4 formula written in plain torch below (log_softmax, logsumexp); the
differentiable ``expert_log_contribution`` must match it, and every path through the row ops must
be bitwise the op on each expert's rows alone (tests/engine/test_rowmath.py tests the ops themselves).
"""
import math

import pytest
import torch

from mnn_fast.engine.backends import get_backend
from mnn_fast.engine.contributions import (class_tables, contribution_formula, expert_log_contribution,
                                           specialist_contributions)


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


# The backward's form: all experts' rows at once, no per-expert slice. Cases: an expert with no rows
# (offsets repeat), a group holding every class (no outside term: must not turn gradients to NaN),
# binary specialists, and logits of +-1e4 where the out-of-group mass underflows.
@pytest.mark.parametrize("case", ["mixed_groups", "empty_expert", "whole_group", "binary", "extreme"])
def test_contribution_formula_is_each_experts_contribution_with_its_gradient(case):
    torch.manual_seed(11)
    groups = {"mixed_groups": [[2], [0, 3, 6], [1, 4], [5]], "empty_expert": [[0, 1], [2], [3, 4, 5, 6]],
              "whole_group": [[1], list(range(7)), [0, 6]], "binary": [[3], [0], [6]],
              "extreme": [[2], [0, 3, 6], [1, 4, 5]]}[case]
    sizes = [9, 0, 6] if case == "empty_expert" else [5 + 3 * e for e in range(len(groups))]
    width = 1 if case == "binary" else 7
    y = torch.randn(sum(sizes), width) * (1e4 if case == "extreme" else 4)
    tables = class_tables(groups, 7, torch.device("cpu"))
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    grad = torch.randn(y.shape[0], 7)
    got_y = y.clone().requires_grad_()
    got = contribution_formula(got_y, offsets, tables.group_offsets, tables.group_classes, tables.log_spread, 7)
    got.backward(grad)
    want_y = y.clone().requires_grad_()
    parts = torch.split(want_y, sizes)
    want = torch.cat([expert_log_contribution(part, group, 7) for part, group in zip(parts, groups)])
    want.backward(grad)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    assert torch.isfinite(got_y.grad).all()
    torch.testing.assert_close(got_y.grad, want_y.grad, rtol=1e-5, atol=1e-5)


# The path choice: one tensor of all rows (uniform width, any group sizes) takes one row-op call;
# mixed widths (binary + width C) go expert by expert. Rows are rows: both must give the same bits
# as the op on each expert's rows alone, on every CPU backend.
@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("case", ["uniform", "uneven_groups", "binary_mix", "grouped_tensor"])
def test_specialist_contributions_bitwise_per_expert_on_every_path(case, backend):
    gen = torch.Generator().manual_seed(7)
    C = 6
    ops = get_backend(backend)
    groups = [[0], [1], [2, 3], [4]] if case == "uneven_groups" else [[0], [1], [2], [4]]
    counts = torch.tensor([3, 0, 4, 2])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    outputs = [torch.randn(int(n), C, generator=gen) if n else None for n in counts]
    if case == "binary_mix":
        outputs[3] = torch.randn(2, 1, generator=gen)
    tables = class_tables(groups, C, torch.device("cpu"))
    want = torch.cat([ops.contributions(y, torch.tensor([0, y.shape[0]]), torch.tensor([0, len(groups[e])]),
                                        torch.tensor(groups[e]), tables.log_spread[e : e + 1], C)
                      for e, y in enumerate(outputs) if y is not None])
    given = torch.cat([y for y in outputs if y is not None]) if case == "grouped_tensor" else outputs
    got = specialist_contributions(given, offsets, tables, ops)
    assert torch.equal(got, want)
    # ... and within float32 rounding of the section-4 formula.
    formula_rows = torch.cat([formula(y, groups[e], C) for e, y in enumerate(outputs) if y is not None])
    torch.testing.assert_close(got, formula_rows, rtol=0, atol=2e-6)


def test_specialist_contributions_with_no_rows_is_empty_width_c():
    groups = [[0], [1]]
    got = specialist_contributions([None, None], torch.tensor([0, 0, 0]), class_tables(groups, 3, torch.device("cpu")),
                                   get_backend("cpp"))
    assert got.shape == (0, 3) and got.dtype == torch.float32


def test_recombine_formula_is_the_module_output_to_rounding():
    # The backward differentiates recombine_formula, so it must be the function the op computes.
    from mnn_fast import route
    from mnn_fast.engine.contributions import recombine_formula

    gen = torch.Generator().manual_seed(3)
    B, C = 40, 5
    groups = [[0], [1, 2], [3], [4, 0]]
    tables = class_tables(groups, C, torch.device("cpu"))
    r = route(torch.rand(B, 4, generator=gen), groups=None, threshold=0.3)
    logits = torch.randn(r.perm.numel(), C, generator=gen) * 4
    logp = torch.log_softmax(torch.randn(B, C, generator=gen), 1)
    args = (logp, [logits], r.offsets, tables.group_offsets, tables.group_classes, tables.log_spread,
            r.sample_offsets, r.sample_rows)
    torch.testing.assert_close(get_backend("cpp").recombine(*args), recombine_formula(*args), rtol=0, atol=3e-6)
