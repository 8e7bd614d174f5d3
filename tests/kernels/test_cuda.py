"""The same equivalence checks on a GPU: the CUDA and Triton kernels against the CPU reference.

Routing (integers) and combine/group_scores (left-to-right float adds) must be bitwise equal to
the CPU reference; module outputs within 1e-5 (cuBLAS/cuDNN arithmetic differs from CPU's).
Skipped, with the reason, on machines without a CUDA device.
"""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helpers import assert_routing_equal, make_scores, random_groups
from models import cnn_mnn, mlp_mnn
from mnn_fast import MetaNeuralNetwork
from mnn_fast.engine import torch_ops as R
from mnn_fast.engine.backends import backend_status, get_backend
from mnn_fast.engine.routing import group_tensors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
GPU_BACKENDS = ["cuda", "triton"]
NO_THRESHOLD = -math.inf


def _ops(backend):
    reason = backend_status("cuda")[backend]
    if reason:
        pytest.fail(f"{backend} should run on a CUDA machine: {reason}")
    return get_backend(backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@given(
    batch=st.integers(0, 5000),
    experts=st.sampled_from([1, 2, 10, 100, 1000]),
    seed=st.integers(0, 2**20),
    levels=st.sampled_from([0, 4, 50]),
    threshold=st.sampled_from([0.0, 1.0, 0.02, 0.3, NO_THRESHOLD]),
    top_k=st.integers(0, 12),
)
def test_route_gather_combine_on_gpu(backend, batch, experts, seed, levels, threshold, top_k):
    ops = _ops(backend)
    top_k = min(top_k, experts) or (1 if threshold == NO_THRESHOLD else 0)
    scores = make_scores(batch, experts, seed, levels=levels, nan_rows=batch // 50)
    want = R.route_torch(scores, None if threshold == NO_THRESHOLD else threshold, top_k or None)
    got = ops.route(scores.cuda(), threshold, top_k)
    assert_routing_equal(got, want)
    x = torch.randn(batch, 33)
    assert torch.equal(ops.gather(x.cuda(), got.perm).cpu(), R.gather_torch(x, want.perm))
    logp = torch.log_softmax(torch.randn(batch, 7), 1)
    logv = torch.randn(want.perm.numel(), 7) * 10
    acc = ops.combine(logp.cuda(), logv.cuda(), got.perm, got.sample_offsets, got.sample_rows)
    assert torch.equal(acc.cpu(), R.combine_torch(logp, logv, want.perm, want.sample_offsets, want.sample_rows))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_group_scores_on_gpu(backend):
    probs = make_scores(300, 12, seed=1)
    offsets, members = group_tensors(tuple(map(tuple, random_groups(12, 20, seed=1))), probs.device)
    got = _ops(backend).group_scores(probs.cuda(), offsets.cuda(), members.cuda())
    assert torch.equal(got.cpu(), R.group_scores_torch(probs, offsets, members))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_module_on_gpu(backend, kind):
    switch, specialists = mlp_mnn(6) if kind == "mlp" else cnn_mnn(4)
    x = torch.randn(128, 24) if kind == "mlp" else torch.randn(128, 3, 16, 16)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.1, backend=backend).cuda()
    with torch.no_grad():
        got, routing = mnn(x.cuda(), return_routing=True)
        want, want_routing = R.naive_forward(mnn.switch, list(mnn.specialists), x.cuda(), threshold=0.1, return_routing=True)
    assert_routing_equal(routing, want_routing)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_streams_executor_on_gpu(kind):
    # Experts on a pool of streams must join before combine reads their outputs; a missing event
    # shows as garbage or zeros in some rows, so compare against one-by-one on the default stream.
    switch, specialists = mlp_mnn(12) if kind == "mlp" else cnn_mnn(6)
    x = (torch.randn(512, 24) if kind == "mlp" else torch.randn(512, 3, 16, 16)).cuda()
    streams = MetaNeuralNetwork(switch, specialists, threshold=0.05, executor="streams").cuda()
    assert streams.executor == "streams", streams.executor_skipped
    sequential = MetaNeuralNetwork(streams.switch, list(streams.specialists), threshold=0.05, executor="sequential")
    with torch.no_grad():
        for _ in range(3):  # repeated calls reuse the pool; buffers must stay alive across them
            got = streams(x)
            want = sequential(x)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
