"""The recombination's row arithmetic (rowmath): accurate, identical on every CPU backend, row-wise.

References first: float64 torch for exp / log1p / log_softmax, and SPEC section 4 in float32 torch
(``torch.log_softmax``, ``logsumexp``, ``logsigmoid``: ``formula``). The row ops must stay within 2
ulp of the float32 formula (ulps counted at magnitude >= 1, the scale of the log-normaliser every
entry subtracts), and the C++ ops must be bitwise the PyTorch reference (``rowmath.*_torch``) for
every shape, thread count and memory offset.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mnn_fast import route
from mnn_fast.engine import rowmath
from mnn_fast.engine.backends import get_backend
from mnn_fast.engine.contributions import class_tables, expert_log_contribution, recombine_formula

CPP = torch.ops.mnn_fast


def formula(y, group, num_classes):
    """SPEC section 4 in float32 torch, one expert's rows."""
    return expert_log_contribution(y, group, num_classes)


def ulps(got, want):
    """Largest ``|got - want|`` in ulps of ``max(|want|, 1)``; non-finite entries must match exactly."""
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)
    assert torch.equal(got[~finite], want[~finite])
    if not finite.any():
        return 0.0
    g, w = got[finite].double(), want[finite].double()
    unit = torch.exp2(torch.floor(torch.log2(w.abs().clamp_min(1.0))) - 23)
    return ((g - w).abs() / unit).max().item()


def tables_for(groups, num_classes):
    t = class_tables(groups, num_classes, torch.device("cpu"))
    return t.group_offsets, t.group_classes, t.log_spread


def extreme_logits(rows, classes, scale, seed):
    """Random logits at ``scale`` with the cases that break naive formulas: ties at the maximum,
    a class at -inf, and (for C > 4) a row whose classes beyond the third are all -inf."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(rows, classes, generator=gen) * scale
    y[::7, 0] = y[::7].amax(1)
    if classes > 2:
        y[1::5, 1] = -math.inf
    if classes > 4:
        y[2, 3:] = -math.inf
    return y


# ------------------------------------------------------------------------------- scalar functions


def test_exp_is_within_one_ulp_of_float64_and_exact_at_zero():
    t = torch.cat([-torch.rand(200_000) * 80, torch.tensor([0.0, -0.0, -1e-30, -80.0])])
    got = rowmath.exp_nonpositive(t).double()
    want = torch.exp(t.double())
    assert ((got - want).abs() / (want * 2.0**-23)).max() <= 1.0
    assert rowmath.exp_nonpositive(torch.tensor([0.0])).item() == 1.0
    # Below the flush point the result is 0, as documented (2**n would be subnormal).
    assert torch.equal(rowmath.exp_nonpositive(torch.tensor([-80.01, -1e4, -math.inf])), torch.zeros(3))


def test_log1p_is_within_one_ulp_of_float64_including_tiny_arguments():
    u = torch.cat([torch.rand(200_000) * 5000, torch.rand(1000) * 1e-6, torch.tensor([0.0, 1e-30, 2.0**-24, 1.0])])
    got = rowmath.log1p_nonnegative(u).double()
    want = torch.log1p(u.double())
    assert ((got - want).abs() / (want.abs() * 2.0**-23).clamp_min(1e-45)).max() <= 1.0


def test_log_positive_is_within_one_ulp_of_float64():
    # log(s_out) of the one-pass log(1 - q): s_out runs from ONE_PASS_MIN (2**-60) up to C.
    x = torch.cat([torch.rand(200_000) * 5000, torch.rand(1000) * 1e-17 + 2.0**-60,
                   torch.tensor([2.0**-60, 0.5, 1.0, 2.0, 3.0e38])])
    got = rowmath.log_positive(x).double()
    want = torch.log(x.double())
    assert ((got - want).abs() / (want.abs() * 2.0**-23).clamp_min(1e-45)).max() <= 1.0
    assert rowmath.log_positive(torch.tensor([1.0])).item() == 0.0


def test_lane_sum_follows_the_documented_order():
    v = torch.rand(3, 37)
    lanes = torch.zeros(3, 16)
    for c in range(37):
        lanes[:, c % 16] = lanes[:, c % 16] + v[:, c]
    h = 8
    while h:
        lanes = lanes[:, :h] + lanes[:, h : 2 * h]
        h //= 2
    assert torch.equal(rowmath.lane_sum(v), lanes[:, 0])


# ---------------------------------------------------------------- accuracy against the formula


# C = 2 and 3 are the smallest softmaxes; 17 and 1000 leave a partial last lane block; scale 1e4
# makes every non-maximal term underflow, so only the shifts matter.
@pytest.mark.parametrize("classes", [2, 3, 10, 17, 100, 1000])
@pytest.mark.parametrize("scale", [1.0, 10.0, 1e4])
def test_row_ops_are_within_two_ulp_of_the_float32_formula(classes, scale):
    y = extreme_logits(256, classes, scale, seed=classes)
    assert ulps(rowmath.log_softmax_rows(y), torch.log_softmax(y, 1)) <= 2
    groups = [[0], [classes - 1, 0], list(range(classes))]
    go, gc, spread = tables_for(groups, classes)
    offsets = torch.tensor([0, 100, 180, 256])
    got = rowmath.contributions_torch(y, offsets, go, gc, spread)
    for e, group in enumerate(groups):
        a, b = offsets[e], offsets[e + 1]
        assert ulps(got[a:b], formula(y[a:b], group, classes)) <= 2, f"group {group}"


def test_binary_contributions_are_within_two_ulp_of_logsigmoid():
    y = torch.cat([torch.randn(5000, 1) * 30, torch.tensor([[0.0], [1e4], [-1e4], [20.0], [-20.0], [-math.inf]])])
    go, gc, spread = tables_for([[2]], 5)
    got = rowmath.contributions_torch(y, torch.tensor([0, y.shape[0]]), go, gc, spread, 5)
    assert ulps(got, formula(y, [2], 5)) <= 2


def test_at_five_thousand_classes_no_less_accurate_than_torch():
    # Long rows: torch's own float32 log_softmax drifts from the float64 value by a few ulp, and
    # the two float32 results may differ by more than 2 ulp; neither may be worse than the other +1.
    y = torch.randn(64, 5000) * 10
    truth = torch.log_softmax(y.double(), 1).float()
    ours = ulps(rowmath.log_softmax_rows(y), truth)
    assert ours <= ulps(torch.log_softmax(y, 1), truth) + 1


def one_and_two_pass_rows(classes, seed):
    """Width-C rows whose group (class 0) holds the maximum and whose outside classes sit ``gap``
    below it, so the outside sum ``s_out ~ exp(-gap)`` falls on either side of ONE_PASS_MIN = 2**-60
    (gap = 60 ln 2 = 41.59): one-pass rows, second-pass rows and rows at the boundary, interleaved
    so that eight-row tiles hold both kinds. Gaps past 80 flush every outside term (s_out = 0)."""
    gen = torch.Generator().manual_seed(seed)
    boundary = 60 * math.log(2)
    gaps = torch.tensor([5.0, 41.0, boundary - 1e-5, boundary, boundary + 1e-5, 42.0, 79.0, 85.0, 200.0])
    gaps = gaps.repeat(7)[torch.randperm(63, generator=gen)]
    y = torch.randn(63, classes, generator=gen) * 0.01 - gaps[:, None]
    y[:, 0] = 0.0
    return y


# The one-pass log(1 - q) = log(s_out) - log(s) holds where s_out >= 2**-60; below it (outside terms
# flushed, or tiny) the second pass over ls takes over. Both kinds in one tile, and the boundary.
@pytest.mark.parametrize("classes", [2, 9, 40])
def test_one_pass_and_second_pass_rows_are_accurate_and_bitwise(classes):
    y = one_and_two_pass_rows(classes, seed=classes)
    go, gc, spread = tables_for([[0]], classes)
    offsets = torch.tensor([0, y.shape[0]])
    got = rowmath.contributions_torch(y, offsets, go, gc, spread)
    # Accurate on both sides: finite where the outside classes are (even when every term is flushed).
    assert ulps(got, formula(y, [0], classes)) <= 2
    assert torch.isfinite(got).all()
    assert torch.equal(CPP.contributions(y, offsets, go, gc, spread, classes), got)
    r = route(torch.ones(y.shape[0], 1), groups=None, threshold=0.5)  # every row to the one expert
    logp = torch.log_softmax(torch.randn(y.shape[0], classes), 1)
    _assert_cpp_equals_reference((logp, y, r.offsets, go, gc, spread, r.sample_offsets, r.sample_rows))


def test_contributions_are_distributions_that_keep_the_group_log_probs():
    y = torch.randn(30, 7) * 3
    groups = [[2], [0, 3, 6]]
    go, gc, spread = tables_for(groups, 7)
    v = rowmath.contributions_torch(y, torch.tensor([0, 15, 30]), go, gc, spread)
    torch.testing.assert_close(v.exp().sum(1), torch.ones(30), rtol=0, atol=1e-5)
    ls = rowmath.log_softmax_rows(y)
    assert torch.equal(v[:15, 2], ls[:15, 2]) and torch.equal(v[15:, [0, 3, 6]], ls[15:, [0, 3, 6]])


# ------------------------------------------------------------------ C++ == the PyTorch reference


def _routed_case(batch, classes, experts, seed, binary=False, max_group=3):
    gen = torch.Generator().manual_seed(seed)
    groups = [[e % classes] for e in range(experts)] if binary else [
        torch.randperm(classes, generator=gen)[: int(torch.randint(1, max_group + 1, (1,), generator=gen))].tolist()
        for _ in range(experts)]
    r = route(torch.rand(batch, experts, generator=gen), groups=None, threshold=0.6)
    width = 1 if binary else classes
    logits = torch.randn(r.perm.numel(), width, generator=gen) * 8
    logp = torch.log_softmax(torch.randn(batch, classes, generator=gen), 1)
    go, gc, spread = tables_for(groups, classes)
    return (logp, logits, r.offsets, go, gc, spread, r.sample_offsets, r.sample_rows)


def op_args(args):
    """``args`` with the logits as the op takes them: a list (one buffer-order tensor)."""
    return (args[0], [args[1]], *args[2:])


def _assert_cpp_equals_reference(args):
    logp, logits, offsets, go, gc, spread, so, sr = args
    classes = logp.shape[1]
    want = rowmath.recombine_torch(*op_args(args))
    assert torch.equal(CPP.recombine(*op_args(args)), want)
    # One tensor per expert (the sequential executor's outputs, read in place): the same bits.
    per_expert = list(torch.split(logits, (offsets[1:] - offsets[:-1]).tolist()))
    assert torch.equal(CPP.recombine(logp, per_expert, *args[2:]), want)
    assert torch.equal(CPP.contributions(logits, offsets, go, gc, spread, classes),
                       rowmath.contributions_torch(logits, offsets, go, gc, spread, classes))
    assert torch.equal(CPP.log_softmax_rows(logp), rowmath.log_softmax_rows(logp))


# Widths 1..70 cover every partial lane block and SIMD tail; B = 0 / 1, E = 1 and E = 200 are the edges.
@pytest.mark.parametrize("classes", [1, 2, 5, 16, 17, 31, 33, 70])
@pytest.mark.parametrize("batch,experts", [(0, 3), (1, 3), (64, 1), (97, 7), (40, 200)])
def test_cpp_ops_are_bitwise_the_reference(classes, batch, experts):
    _assert_cpp_equals_reference(_routed_case(batch, classes, experts, seed=classes * 31 + experts))


@pytest.mark.parametrize("classes", [2, 9, 40])
def test_cpp_ops_are_bitwise_the_reference_for_binary_specialists(classes):
    _assert_cpp_equals_reference(_routed_case(50, classes, 6, seed=classes, binary=True))


def test_cpp_ops_are_bitwise_the_reference_on_extreme_logits():
    args = list(_routed_case(80, 12, 5, seed=1))
    args[1] = extreme_logits(args[1].shape[0], 12, 1e4, seed=2)
    _assert_cpp_equals_reference(tuple(args))


# The AVX2 kernel runs eight buffer rows at a time, one per SIMD lane, and fixes up each row's group
# columns by hand: groups as large as C (nothing outside them), every expert active for a sample (a
# block of eight holds many rows of one sample, whose rows also straddle blocks), partial blocks.
@pytest.mark.parametrize("classes", [1, 3, 8, 19])
@pytest.mark.parametrize("batch", [1, 7, 9, 90])
def test_cpp_ops_are_bitwise_the_reference_with_large_groups_and_many_rows_per_sample(classes, batch):
    args = _routed_case(batch, classes, 11, seed=classes + batch, max_group=classes)
    _assert_cpp_equals_reference(args)
    gen = torch.Generator().manual_seed(batch)
    groups = [torch.randperm(classes, generator=gen)[: 1 + e % classes].tolist() for e in range(11)]
    go, gc, spread = tables_for(groups, classes)
    r = route(torch.rand(batch, 11, generator=gen), groups=None, threshold=0.0)  # every expert, every sample
    logits = torch.randn(r.perm.numel(), classes, generator=gen) * 8
    logp = torch.log_softmax(torch.randn(batch, classes, generator=gen), 1)
    _assert_cpp_equals_reference((logp, logits, r.offsets, go, gc, spread, r.sample_offsets, r.sample_rows))


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(0, 60), classes=st.integers(1, 90), experts=st.integers(1, 12), seed=st.integers(0, 10**6),
       binary=st.booleans())
def test_cpp_ops_are_bitwise_the_reference_on_random_shapes(batch, classes, experts, seed, binary):
    _assert_cpp_equals_reference(_routed_case(batch, classes, experts, seed, binary=binary and classes > 1))


def test_cpp_exp_is_the_reference_exp_across_its_domain():
    # The AVX2 exp takes its floor from the rounding instruction and clamps with max: equal to
    # rowmath's scalar steps only on its domain (t <= 0 or NaN). Rows [0, t] put exp(t) in a lane for
    # t over [-100, 0], densely, and at the points where the floor's argument t*log2(e) + 0.5 is an
    # integer (the rounding boundaries) plus or minus a few ulp, and at the flush threshold -80.
    k = torch.arange(-116, 1, dtype=torch.float64)
    edges = ((k - 0.5) / math.log2(math.e)).float()
    near = torch.cat([torch.nextafter(edges, torch.full_like(edges, d)) for d in (-1e9, 1e9)] + [edges])
    t = torch.cat([torch.linspace(-100, 0, 200_001), near, torch.tensor([-80.0, -79.99999, -80.00001, -0.0, 0.0])])
    t = t[t <= 0]
    rows = torch.stack([torch.zeros_like(t), t], 1)
    assert torch.equal(CPP.log_softmax_rows(rows), rowmath.log_softmax_rows(rows))
    wide = torch.cat([rows, torch.full((rows.shape[0], 15), -math.inf)], 1)  # the exp lane of an AVX2 block's tail
    assert torch.equal(CPP.log_softmax_rows(wide), rowmath.log_softmax_rows(wide))


# ------------------------------------------------------------------------------ row independence


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_rows_result_depends_on_nothing_but_the_row(threads):
    # The same rows computed in a larger batch, at every memory offset (views into a bigger buffer
    # start at any alignment), and at 1-3 threads, give the same bits as one row at a time.
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        args = _routed_case(300, 23, 9, seed=5)
        logp, logits, offsets, go, gc, spread, so, sr = args
        full = CPP.recombine(*op_args(args))
        for shift in range(1, 5):
            buf = torch.empty(logits.numel() + shift)
            moved = buf[shift:].view_as(logits).copy_(logits)
            assert torch.equal(CPP.recombine(logp, [moved], offsets, go, gc, spread, so, sr), full)
        alone = torch.cat([CPP.log_softmax_rows(logp[i : i + 1]) for i in range(logp.shape[0])])
        assert torch.equal(alone, CPP.log_softmax_rows(logp))
        v = CPP.contributions(logits, offsets, go, gc, spread, 23)
        bounds = offsets.tolist()
        for e in range(len(bounds) - 1):
            a, b = bounds[e], bounds[e + 1]
            for r in range(a, b, 7):
                one = CPP.contributions(logits[r : r + 1].clone(), torch.tensor([0, 1]), go[e : e + 2] - go[e],
                                        gc[go[e] : go[e + 1]], spread[e : e + 1], 23)
                assert torch.equal(one, v[r : r + 1])
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------- op contract and backward


def test_opcheck_row_ops():
    args = _routed_case(30, 6, 4, seed=9)
    logp, logits, offsets, go, gc, spread, so, sr = args
    for prefix in ("", "torch_"):
        torch.library.opcheck(getattr(CPP, prefix + "recombine").default, op_args(args))
        per_expert = list(torch.split(logits, (offsets[1:] - offsets[:-1]).tolist()))
        torch.library.opcheck(getattr(CPP, prefix + "recombine").default, (logp, per_expert, *args[2:]))
        torch.library.opcheck(getattr(CPP, prefix + "contributions").default, (logits, offsets, go, gc, spread, 6))
        torch.library.opcheck(getattr(CPP, prefix + "log_softmax_rows").default, (logp,))


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_recombine_backward_is_the_formulas_gradient(backend):
    logp, logits, *rest = _routed_case(25, 5, 4, seed=4)
    grad = torch.randn(25, 5)
    got = torch.autograd.grad(get_backend(backend).recombine(logp.requires_grad_(), [logits.requires_grad_()], *rest),
                              (logp, logits), grad)
    want = torch.autograd.grad(recombine_formula(logp, [logits], *rest), (logp, logits), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def _shifted_split(logits, offsets):
    sizes = (offsets[1:] - offsets[:-1]).tolist()
    assert sizes[0] > 0
    sizes[0] -= 1
    sizes[1] += 1
    return list(torch.split(logits, sizes))


BAD_INPUTS = {
    # One tensor per expert, the right total but one row moved from expert 0 to expert 1.
    "per-expert row count": (ValueError, "logits\\[0\\] must have the expert's",
                             lambda a: (a[0], _shifted_split(a[1], a[2]), *a[2:])),
    "logits width": (ValueError, "logits must have C = 6", lambda a: (a[0], a[1][:, :4], *a[2:])),
    "logits dtype": (TypeError, "logits must be a 2-D float32", lambda a: (a[0], a[1].double(), *a[2:])),
    "offsets end": (ValueError, "offsets must run from 0 to N", lambda a: (a[0], a[1][1:], *a[2:])),
    "group_offsets length": (ValueError, "group_offsets must have E\\+1", lambda a: (*a[:3], a[3][:-1], *a[4:])),
    "group class out of range": (ValueError, "group_classes values must be in \\[0, C\\)",
                                 lambda a: (*a[:4], a[4] + 6, *a[5:])),
    "log_spread dtype": (TypeError, "log_spread must be a 1-D float32", lambda a: (*a[:5], a[5].double(), *a[6:])),
    "sample_rows length": (ValueError, "sample_rows must have", lambda a: (*a[:7], a[7][1:])),
}


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_recombine_input_names_the_argument(backend, case):
    exc, match, make = BAD_INPUTS[case]
    args = _routed_case(20, 6, 4, seed=2)
    with pytest.raises(exc, match=f"recombine: {match}"):
        bad = make(args)
        get_backend(backend).recombine(*(bad if isinstance(bad[1], list) else op_args(bad)))
