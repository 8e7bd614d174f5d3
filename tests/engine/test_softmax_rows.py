"""softmax_rows: the switch's log-probabilities and probabilities from one exp pass per row.

References first: ``rowmath.softmax_rows`` (PyTorch; the bits every CPU backend must give) and, for
accuracy, the float64 softmax of the float32 shifted logits ``x - max``. ``log_probs`` must be
bitwise ``log_softmax_rows``; ``probs`` as accurate as torch's own float32 softmax.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mnn_fast.engine import rowmath
from mnn_fast.engine.backends import get_backend

CPP = torch.ops.mnn_fast


def float64_softmax(x):
    """``(probs: Tensor float64, flushed: Tensor bool)``: the exact softmax of the float32 shifted
    logits; ``flushed`` where ``x - max < -80``, which rowmath's exp flushes to 0 by design."""
    shifted = (x - x.amax(1, keepdim=True)).double()
    e = shifted.exp()
    return e / e.sum(1, keepdim=True), shifted < rowmath.EXP_FLUSH


def relative_error(got, want):
    """Largest ``|got - want| / want`` in units of 2**-24 (at most one ulp of ``want`` each)."""
    return ((got.double() - want).abs() / (want * 2.0**-24)).max().item()


def logits(rows, classes, scale, seed):
    """Random logits with the cases softmaxes get wrong: ties at the maximum, classes at -inf."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, classes, generator=gen) * scale
    x[::7, 0] = x[::7].amax(1)
    if classes > 2:
        x[1::5, 1] = -math.inf
    return x


# ------------------------------------------------------------------------------ accuracy


# C = 2 is the smallest softmax, 17 leaves a partial lane block, 5000 is a long sum; at scale 1e4
# every non-maximal term is flushed (exactly 0, as below 2**-115 torch's own results are subnormal).
@pytest.mark.parametrize("classes", [2, 3, 17, 100, 1000, 5000])
@pytest.mark.parametrize("scale", [1.0, 10.0, 1e4])
def test_probs_are_as_accurate_as_torchs_float32_softmax(classes, scale):
    x = logits(256, classes, scale, seed=classes)
    want, flushed = float64_softmax(x)
    log_probs, probs = rowmath.softmax_rows(x)
    ours = relative_error(probs[~flushed], want[~flushed])
    theirs = relative_error(torch.softmax(x, 1)[~flushed], want[~flushed])
    assert ours <= theirs + 2, (ours, theirs)
    assert torch.equal(probs[flushed], torch.zeros_like(probs[flushed]))
    assert torch.equal(log_probs, rowmath.log_softmax_rows(x))


def test_probs_sum_to_one_and_order_like_the_logits():
    x = torch.randn(500, 37) * 4
    _, probs = rowmath.softmax_rows(x)
    torch.testing.assert_close(probs.sum(1), torch.ones(500), rtol=0, atol=4e-6)
    # exp and the scaling are monotone, so a larger logit never gets a smaller probability.
    order = x.argsort(1)
    assert (probs.gather(1, order).diff(dim=1) >= 0).all()


def test_non_finite_rows_follow_torch():
    # A NaN, a +inf or a row of only -inf has no distribution: NaN throughout, as torch.softmax.
    x = torch.tensor([[0.0, math.nan, 1.0], [math.inf, 0.0, 1.0], [-math.inf] * 3, [-math.inf, 0.0, -math.inf]])
    log_probs, probs = rowmath.softmax_rows(x)
    assert probs[:3].isnan().all() and log_probs[:3].isnan().all()
    assert torch.equal(probs[3], torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(log_probs[3], torch.tensor([-math.inf, 0.0, -math.inf]))
    assert torch.equal(torch.softmax(x, 1)[:3].isnan(), probs[:3].isnan())


# ------------------------------------------------------------------ C++ == the PyTorch reference


def same(a, b):
    """``torch.equal`` with NaN equal to NaN (a NaN row is NaN throughout)."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])


def assert_cpp_is_the_reference(x):
    got = CPP.softmax_rows(x)
    want = rowmath.softmax_rows(x)
    assert same(got[0], want[0]) and same(got[1], want[1])
    assert same(got[0], CPP.log_softmax_rows(x))


# Widths 1-17 and 31/33/70/130 cover every transposed 8x8 block and its scalar tail; B = 0, 1, 7, 8,
# 9 and 40 cover empty, partial and several eight-row tiles.
@pytest.mark.parametrize("classes", [1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 70, 130])
@pytest.mark.parametrize("batch", [0, 1, 7, 8, 9, 40])
def test_cpp_is_bitwise_the_reference(classes, batch):
    assert_cpp_is_the_reference(logits(batch, classes, 8.0, seed=classes * 7 + batch))


@pytest.mark.parametrize("scale", [1e-3, 30.0, 1e4])
def test_cpp_is_bitwise_the_reference_on_extreme_and_non_finite_logits(scale):
    x = logits(50, 12, scale, seed=3)
    x[3] = -math.inf
    x[4, 5] = math.nan
    x[5, 2] = math.inf
    assert_cpp_is_the_reference(x)


def test_cpp_is_bitwise_the_reference_at_zero_width_and_a_thousand_classes():
    assert [t.shape for t in CPP.softmax_rows(torch.empty(5, 0))] == [(5, 0), (5, 0)]
    assert_cpp_is_the_reference(torch.randn(19, 1000) * 5)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(0, 40), classes=st.integers(1, 90), scale=st.sampled_from([0.1, 3.0, 50.0]),
       seed=st.integers(0, 10**6))
def test_cpp_is_bitwise_the_reference_on_random_shapes(batch, classes, scale, seed):
    assert_cpp_is_the_reference(logits(batch, classes, scale, seed))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_a_rows_result_depends_on_nothing_but_the_row(threads):
    # The same rows in a larger batch, at every memory offset and at 1-3 threads: the same bits as
    # one row at a time.
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = logits(301, 23, 6.0, seed=threads)
        full = CPP.softmax_rows(x)
        for shift in range(1, 5):
            moved = torch.empty(x.numel() + shift)[shift:].view_as(x).copy_(x)
            for a, b in zip(CPP.softmax_rows(moved), full):
                assert torch.equal(a, b)
        alone = [CPP.softmax_rows(x[i : i + 1]) for i in range(0, 301, 3)]
        assert torch.equal(torch.cat([a[1] for a in alone]), full[1][::3])
        assert torch.equal(torch.cat([a[0] for a in alone]), full[0][::3])
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------- op contract and backward


def test_opcheck():
    x = logits(30, 6, 3.0, seed=9)
    for prefix in ("", "torch_"):
        torch.library.opcheck(getattr(CPP, prefix + "softmax_rows").default, (x,))


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_backward_is_the_gradient_of_torchs_pair(backend):
    x = torch.randn(25, 7, requires_grad=True)
    g_log, g_prob = torch.randn(25, 7), torch.randn(25, 7)
    log_probs, probs = get_backend(backend).softmax_rows(x)
    got = torch.autograd.grad((log_probs * g_log).sum() + (probs * g_prob).sum(), x)[0]
    want = torch.autograd.grad((torch.log_softmax(x, 1) * g_log).sum() + (torch.softmax(x, 1) * g_prob).sum(), x)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Only one output used (the other's gradient arrives as None or zeros): each alone.
    for k, ref in ((0, torch.log_softmax), (1, torch.softmax)):
        g = (g_log, g_prob)[k]
        got = torch.autograd.grad((get_backend(backend).softmax_rows(x)[k] * g).sum(), x)[0]
        want = torch.autograd.grad((ref(x, 1) * g).sum(), x)[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("bad,exc,match", [
    (torch.randn(4, 3, dtype=torch.float64), TypeError, "x must be a 2-D float32"),
    (torch.randn(12), ValueError, "x must be a 2-D"),
])
def test_bad_input_names_the_argument(backend, bad, exc, match):
    with pytest.raises(exc, match=f"softmax_rows: {match}"):
        get_backend(backend).softmax_rows(bad)
