"""``mnn_fast::triton_recombine`` (kernels/recombine.py) is bitwise equal to ``rowmath.recombine_torch``.

Runs under ``TRITON_INTERPRET=1`` (tests/conftest.py) on CPU, compiled where there is a GPU (against
the reference on CPU). The comparison is on the float32 bit patterns (stricter than ``torch.equal``, which takes -0.0 == 0.0); a case whose reference holds NaN
must hold it in the same places. Routings come from ``mnn_fast.route``, group tables from
``group_tensors`` / ``rowmath.log_spread_table``, as the engine builds them.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

import mnn_fast  # noqa: E402
from helpers import make_scores, random_groups  # noqa: E402
from mnn_fast.engine import rowmath  # noqa: E402
from mnn_fast.engine.routing import group_tensors  # noqa: E402
from mnn_fast.kernels import recombine as K  # noqa: E402

# The reference: the recombination's float32 arithmetic, step by step, in vectorised PyTorch (on CPU).
reference = rowmath.recombine_torch
# Where the kernel runs: compiled on a GPU when there is one, else the interpreter on CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_args(batch, classes, groups, *, seed, threshold=0.1, scale=1.0, binary=False, scores=None, ties=False,
              neg_inf=0.0):
    """The op's 8 arguments: ``groups`` (one class list per expert) routed by ``make_scores`` (or ``scores``)."""
    gen = torch.Generator().manual_seed(seed)
    if scores is None:
        scores = make_scores(batch, len(groups), seed)
    routing = mnn_fast.route(scores, groups=None, threshold=threshold)
    group_offsets, group_classes = group_tensors(tuple(tuple(g) for g in groups), torch.device("cpu"))
    log_spread = rowmath.log_spread_table(group_offsets, classes)
    rows = routing.perm.shape[0]
    logits = torch.randn(rows, 1 if binary else classes, generator=gen) * scale
    x = torch.randn(batch, classes, generator=gen) * 2
    if ties:  # whole numbers: equal maxima within a row, equal logits across rows
        logits, x = torch.round(logits), torch.round(x)
    if neg_inf:  # -inf at random places, never a whole row
        logits[(torch.rand(logits.shape, generator=gen) < neg_inf) & (torch.arange(logits.shape[1]) > 0)] = -math.inf
        x[(torch.rand(x.shape, generator=gen) < neg_inf) & (torch.arange(classes) > 0)] = -math.inf
    logp = torch.log_softmax(x, dim=1)
    return (logp, logits, routing.offsets, group_offsets, group_classes, log_spread, routing.sample_offsets,
            routing.sample_rows)


def assert_bitwise(got, want, allow_nan=False):
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    nan = torch.isnan(want)
    assert allow_nan or not nan.any(), "the reference has NaN: the case does not test what it says"
    assert torch.equal(torch.isnan(got), nan), "NaN in different places"
    got_bits, want_bits = got[~nan].view(torch.int32), want[~nan].view(torch.int32)
    bad = (got_bits != want_bits).nonzero()
    assert bad.numel() == 0, (
        f"{bad.numel()} of {want_bits.numel()} values differ, first at flat index {bad[0].item()}: "
        f"{got[~nan][bad[0]].item()!r} != {want[~nan][bad[0]].item()!r}"
    )


def check(args, allow_nan=False):
    got = K.triton_recombine(*(a.to(DEVICE) for a in args)).cpu()
    assert_bitwise(got, reference(*args), allow_nan)
    return got


def partition(classes):
    return [[c] for c in range(classes)]


# (batch, classes, groups, options): each case is an edge the kernel must get right.
CASES = [
    # C = 1: a one-column log_softmax (0 everywhere), and every group covers all classes (log_spread 0).
    pytest.param(40, 1, [[0]] * 3, {}, id="C=1"),
    # C below, at and above the 16 lanes; C=17 and 31 leave a partial second chunk.
    pytest.param(60, 2, random_groups(2, 3, 1, max_size=1), {}, id="C=2"),
    pytest.param(60, 3, random_groups(3, 5, 2), {}, id="C=3"),
    pytest.param(200, 10, partition(10), {}, id="C=10,one-class-groups"),
    pytest.param(200, 17, random_groups(17, 12, 3), {}, id="C=17"),
    pytest.param(150, 31, random_groups(31, 9, 4, max_size=8), {}, id="C=31"),
    pytest.param(120, 100, random_groups(100, 14, 5, max_size=30), {}, id="C=100"),
    # Logit scales: 10 and 1e4 push most exp terms below the -80 flush and to exact 0 / 1.
    pytest.param(100, 10, random_groups(10, 8, 6), {"scale": 10.0}, id="scale=10"),
    pytest.param(100, 31, random_groups(31, 8, 7), {"scale": 1e4}, id="scale=1e4"),
    # -inf logits and log-probabilities (never a whole row).
    pytest.param(100, 17, random_groups(17, 8, 8, max_size=6), {"neg_inf": 0.2}, id="-inf"),
    # Whole-number logits: tied maxima in a row (the max is taken twice), equal terms in the sums.
    pytest.param(150, 10, random_groups(10, 6, 9), {"ties": True}, id="ties"),
    # Binary specialists: logits [N, 1], one class per group, several experts on the same class.
    pytest.param(200, 10, partition(10), {"binary": True, "scale": 3.0}, id="binary"),
    pytest.param(100, 17, random_groups(17, 25, 10, max_size=1), {"binary": True, "scale": 30.0}, id="binary,E=25"),
    # Overlapping groups of sizes 1..C, one covering every class (no outside classes: log_spread 0).
    pytest.param(150, 17, random_groups(17, 10, 11, max_size=16) + [list(range(17))[::-1]], {}, id="overlap+full-group"),
    # Edges of the batch and the routing.
    pytest.param(0, 10, random_groups(10, 4, 12), {}, id="B=0"),
    pytest.param(1, 10, random_groups(10, 4, 13), {"threshold": 0.0}, id="B=1"),
    pytest.param(50, 10, random_groups(10, 4, 14), {"threshold": 1.0}, id="no-rows(N=0)"),
    pytest.param(40, 10, [[3, 1]], {"threshold": 0.0}, id="E=1"),
    pytest.param(60, 17, random_groups(17, 200, 15, max_size=6), {"threshold": 0.01}, id="E=200"),
    # More samples than one program holds under the interpreter (512 at C=100): two programs.
    pytest.param(600, 100, random_groups(100, 6, 16, max_size=20), {"threshold": 0.2}, id="two-programs"),
    # C=1000: a 64-chunk row under the GPU blocking, 1024 columns at once under the interpreter.
    pytest.param(5, 1000, random_groups(1000, 30, 17, max_size=200) + [list(range(1000))], {"threshold": 0.03},
                 id="C=1000"),
]


@pytest.mark.parametrize("batch,classes,groups,options", CASES)
def test_matches_reference(batch, classes, groups, options):
    check(make_args(batch, classes, groups, seed=batch + classes, **options))


def test_one_expert_takes_every_sample():
    # Every sample has one row, all in expert 2's slice of the buffer (the others are empty).
    scores = torch.zeros(70, 5)
    scores[:, 2] = 1.0
    args = make_args(70, 12, random_groups(12, 5, 20), seed=0, scores=scores, threshold=0.5)
    assert args[2].tolist() == [0, 0, 0, 70, 70, 70]
    check(args)


def test_outside_classes_all_neg_inf():
    # Expert 0's rows are -inf on every class outside its group: nothing to sum (log(1 - q) = -inf),
    # the shift falls back to 0, and those classes get -inf.
    groups = [[0, 1, 2, 3], [2, 3, 4, 5], [5, 0]]
    args = make_args(80, 6, groups, seed=21, threshold=0.2)
    logits, offsets = args[1], args[2]
    logits[offsets[0] : offsets[1], 4:] = -math.inf
    got = check(args)
    assert torch.isinf(got).any()


def test_gpu_blocking_under_the_interpreter(monkeypatch):
    # The GPU blocking (16 samples, chunks of 16 columns) runs other code paths than the
    # interpreter's (one wide chunk): check its arithmetic here too.
    monkeypatch.setattr(K, "_TILE", K._GPU_TILE)
    monkeypatch.setattr(K, "_MAX_K", K._GPU_MAX_K)
    assert K._recombine_config(100, 40) == {"BLOCK_B": 16, "K": 1}
    for batch, classes, groups, options in [
        (40, 100, random_groups(100, 9, 30, max_size=40) + [list(range(100))], {}),
        (40, 17, random_groups(17, 12, 31), {"neg_inf": 0.2}),
        (40, 10, partition(10), {"binary": True, "scale": 3.0}),
        (40, 31, random_groups(31, 6, 32), {"ties": True, "scale": 1e4}),
    ]:
        check(make_args(batch, classes, groups, seed=classes, **options))


def test_nan_stays_in_its_rows():
    # Not bitwise (NaN payloads), but NaN in the same places: a NaN input poisons its sample only.
    args = make_args(30, 10, random_groups(10, 5, 40), seed=3)
    args[0][4, 2] = math.nan
    args[1][0, 1] = math.nan
    got = check(args, allow_nan=True)
    assert torch.isnan(got[4]).all() and not torch.isnan(got[5]).any()


def test_kernel_constants_are_rowmath_constants():
    f32 = rowmath._f32
    pairs = [(K._LOG2E, rowmath._LOG2E), (K._LN2_HI, rowmath._LN2_HI), (K._LN2_LO, rowmath._LN2_LO),
             (K._SQRT2, rowmath._SQRT2), (K._EXP_FLUSH, rowmath.EXP_FLUSH)]
    pairs += list(zip((K._P0, K._P1, K._P2, K._P3, K._P4, K._P5), rowmath._EXP_P))
    pairs += list(zip((K._Q0, K._Q1, K._Q2, K._Q3, K._Q4, K._Q5, K._Q6, K._Q7, K._Q8), rowmath._LOG_Q))
    assert len(pairs) == 5 + len(rowmath._EXP_P) + len(rowmath._LOG_Q)
    for ours, theirs in pairs:
        assert ours.value == f32(theirs)


def test_checks_shapes():
    args = list(make_args(20, 10, random_groups(10, 4, 50), seed=5))
    with pytest.raises(RuntimeError, match="logits"):
        K.triton_recombine(args[0], args[1][:, :3], *args[2:])
    with pytest.raises(RuntimeError, match="sample_offsets"):
        K.triton_recombine(*args[:6], args[6][:-1], args[7])
    with pytest.raises(RuntimeError, match="log_spread"):
        K.triton_recombine(*args[:5], args[5].double(), *args[6:])


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(0, 200),
    classes=st.integers(1, 70),
    experts=st.integers(1, 40),
    max_size=st.integers(1, 70),
    binary=st.booleans(),
    scale=st.sampled_from([1.0, 10.0, 1e4]),
    threshold=st.sampled_from([0.0, 0.05, 0.2, 0.6]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(batch, classes, experts, max_size, binary, scale, threshold, seed):
    groups = random_groups(classes, experts, seed, max_size=1 if binary else max_size)
    check(make_args(batch, classes, groups, seed=seed, threshold=threshold, scale=scale, binary=binary))


@pytest.mark.parametrize(
    "classes,groups,options",
    [(10, random_groups(10, 6, 60), {}), (10, partition(10), {"binary": True})],
    ids=["softmax", "binary"],
)
def test_opcheck(classes, groups, options):
    args = make_args(24, classes, groups, seed=7, **options)
    torch.library.opcheck(torch.ops.mnn_fast.triton_recombine.default, tuple(a.to(DEVICE) for a in args))
