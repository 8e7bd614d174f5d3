"""Every routing op of every CPU backend is bitwise equal (torch.equal) to the pure-PyTorch reference.

Reference first: ``mnn_fast.reference`` (``*_torch``); the naive loop is checked against it in
test_reference.py. Backends: the C++ kernels and the Triton kernels under TRITON_INTERPRET=1.
"""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import CPU_BACKENDS
from helpers import assert_routing_equal, make_scores, random_groups
from mnn_fast.engine import torch_ops as R
from mnn_fast.engine.backends import get_backend
from mnn_fast.engine.routing import group_tensors

NO_THRESHOLD = -math.inf


def reference_route(scores, threshold, top_k):
    return R.route_torch(scores, None if threshold == NO_THRESHOLD else threshold, top_k or None)


def check_route(backend, scores, threshold, top_k):
    got = get_backend(backend).route(scores, threshold, top_k)
    assert_routing_equal(got, reference_route(scores, threshold, top_k))
    return got


# Each case is an edge the kernels must get right:
ROUTE_CASES = [
    pytest.param(0, 4, 0.25, 0, id="B=0"),
    pytest.param(1, 1, 0.0, 0, id="B=1,E=1"),
    pytest.param(1, 7, 1.0, 0, id="threshold=1:no-expert-active"),
    pytest.param(50, 9, 0.0, 0, id="threshold=0:all-nonzero-active"),
    pytest.param(50, 9, NO_THRESHOLD, 9, id="top_k=E:all-active"),
    pytest.param(200, 1, 0.5, 0, id="E=1"),
    pytest.param(300, 12, 0.2, 0, id="threshold"),
    pytest.param(300, 12, NO_THRESHOLD, 3, id="top_k-only,ties"),
    pytest.param(300, 12, 0.05, 2, id="threshold+top_k,ties"),
    pytest.param(40, 1000, 0.001, 0, id="large-E"),
    pytest.param(40, 1000, NO_THRESHOLD, 7, id="large-E,top_k"),
    pytest.param(2000, 3, 0.1, 0, id="long-batch"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("batch,experts,threshold,top_k", ROUTE_CASES)
def test_route_matches_reference(backend, batch, experts, threshold, top_k):
    # Quantised scores create exact ties; NaN rows check "NaN is never active".
    scores = make_scores(batch, experts, seed=batch + experts, levels=16, nan_rows=batch // 10)
    check_route(backend, scores, threshold, top_k)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_route_one_expert_takes_everything(backend):
    scores = torch.zeros(257, 6)
    scores[:, 4] = 1.0
    r = check_route(backend, scores, 0.5, 0)
    assert r.counts.tolist() == [0, 0, 0, 0, 257, 0]
    assert torch.equal(r.perm, torch.arange(257))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_route_handles_infinities(backend):
    scores = torch.tensor([[math.inf, 0.5, -math.inf], [-math.inf, -math.inf, -math.inf], [0.2, math.inf, math.inf]])
    check_route(backend, scores, NO_THRESHOLD, 2)
    check_route(backend, scores, 0.3, 0)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("experts", [1, 2, 3, 5, 10, 15, 16, 17])
def test_route_narrow_rows_any_thread_count(experts, threads):
    # Rows narrower than the 16-score block are compared as one flat array per chunk of samples:
    # a sample's bits then straddle 64-bit words, and the batch splits into as many chunks as
    # threads; 16 and 17 take the block path beside it. A column slice (strided rows) must agree.
    scores = make_scores(6001, experts, seed=experts, levels=8, nan_rows=60)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for threshold in (0.0, 0.1, 0.4):
            check_route("cpp", scores, threshold, 0)
        wide = make_scores(6001, experts + 3, seed=threads)
        check_route("cpp", wide[:, 1:experts + 1], 0.1, 0)
    finally:
        torch.set_num_threads(before)


def _size_limit(backend):
    # The Triton interpreter runs kernels in Python; keep its random cases small.
    return 40_000 if backend == "triton" else 2_000_000


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(
    batch=st.integers(0, 3000),
    experts=st.sampled_from([1, 2, 3, 10, 31, 100, 257, 1000]),
    seed=st.integers(0, 2**20),
    levels=st.sampled_from([0, 4, 50]),
    threshold=st.sampled_from([0.0, 1.0, 0.02, 0.3, NO_THRESHOLD]),
    top_k=st.integers(0, 12),
)
def test_route_random_shapes(backend, batch, experts, seed, levels, threshold, top_k):
    batch = min(batch, _size_limit(backend) // experts)
    top_k = min(top_k, experts)
    if threshold == NO_THRESHOLD and top_k == 0:
        top_k = 1  # no rule at all is not a routing the API can express
    scores = make_scores(batch, experts, seed, levels=levels, nan_rows=batch // 50)
    check_route(backend, scores, threshold, top_k)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(
    batch=st.integers(0, 500),
    classes=st.integers(1, 40),
    experts=st.integers(1, 60),
    seed=st.integers(0, 2**20),
)
def test_group_scores_random(backend, batch, classes, experts, seed):
    probs = make_scores(batch, classes, seed)
    groups = random_groups(classes, experts, seed, max_size=6)
    offsets, members = group_tensors(tuple(map(tuple, groups)), probs.device)
    got = get_backend(backend).group_scores(probs, offsets, members)
    assert torch.equal(got, R.group_scores_torch(probs, offsets, members))


GATHER_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", GATHER_DTYPES, ids=str)
@pytest.mark.parametrize("batch,width,threshold", [(0, 8, 0.1), (1, 1, 0.0), (97, 64, 0.05), (33, 3072, 0.1), (500, 5, 1.0)])
def test_gather_matches_reference(backend, dtype, batch, width, threshold):
    r = reference_route(make_scores(batch, 10, seed=width), threshold, 0)
    x = torch.randn(batch, width).to(dtype)
    got = get_backend(backend).gather(x, r.perm)
    assert got.dtype == dtype
    assert torch.equal(got, R.gather_torch(x, r.perm))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(
    batch=st.integers(0, 400),
    classes=st.integers(1, 30),
    experts=st.integers(1, 40),
    seed=st.integers(0, 2**20),
    threshold=st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0]),
)
def test_combine_random(backend, batch, classes, experts, seed, threshold):
    scores = make_scores(batch, experts, seed, nan_rows=batch // 20)
    r = reference_route(scores, threshold, 0)
    gen = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(batch, classes, generator=gen), 1)
    logv = torch.randn(r.perm.numel(), classes, generator=gen) * 10  # large values make order matter
    got = get_backend(backend).combine(logp, logv, r.perm, r.sample_offsets, r.sample_rows)
    assert torch.equal(got, R.combine_torch(logp, logv, r.perm, r.sample_offsets, r.sample_rows))


# ------------------------------------------------------------------------------------- opcheck

OPCHECK_OPS = {"cpp": "", "triton": "triton_"}


def _opcheck_samples():
    scores = make_scores(40, 6, seed=3, levels=8)
    r = reference_route(scores, 0.1, 0)
    offsets, members = group_tensors(((0, 1), (2,), (3, 4, 5), (1, 5)), scores.device)
    logp = torch.log_softmax(torch.randn(40, 6), 1)
    return {
        "group_scores": [(scores, offsets, members)],
        "route": [(scores, 0.1, 0), (scores, NO_THRESHOLD, 2), (scores[:0], 0.5, 0)],
        "gather": [(torch.randn(40, 5, requires_grad=True), r.perm)],
        "combine": [(logp.requires_grad_(), torch.randn(r.perm.numel(), 6, requires_grad=True), r.perm, r.sample_offsets, r.sample_rows)],
    }


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b in OPCHECK_OPS])
@pytest.mark.parametrize("op", ["group_scores", "route", "gather", "combine"])
def test_opcheck(backend, op):
    get_backend(backend)  # imports the Triton ops
    target = getattr(torch.ops.mnn_fast, OPCHECK_OPS[backend] + op).default
    for args in _opcheck_samples()[op]:
        torch.library.opcheck(target, args)
