"""MetaNeuralNetwork equals the paper's naive loop bitwise on CPU, for every backend and model kind.

Reference: ``mnn_fast.reference.naive_forward`` (a plain Python loop over experts).
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import CPU_BACKENDS
from helpers import assert_routing_equal, random_groups
from models import cnn_mnn, mlp_mnn
from mnn_fast import MetaNeuralNetwork
from mnn_fast.reference import naive_forward


def assert_matches_naive(mnn, x, **route_args):
    with torch.no_grad():
        got, routing = mnn(x, return_routing=True)
        want, want_routing = naive_forward(mnn.switch, list(mnn.specialists), x, return_routing=True, **route_args)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got, want)
    assert_routing_equal(routing, want_routing)
    return got, routing


# Cases: the paper's default (one specialist per class) at several thresholds, top-k alone and with a
# threshold, overlapping multi-class groups, binary (width-1) specialists.
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("threshold,top_k", [(0.0, None), (0.05, None), (0.25, None), (1.0, None), (None, 2), (0.1, 3)])
def test_mlp_default_groups(backend, threshold, top_k):
    switch, specialists = mlp_mnn(10)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=threshold, top_k=top_k, backend=backend)
    x = torch.randn(333, 24)
    assert_matches_naive(mnn, x, threshold=threshold, top_k=top_k)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_overlapping_groups_and_binary_specialists(backend):
    groups = [[0, 1], [2], [3, 4, 5], [6], [1, 2, 7], [8, 9, 0]]
    widths = [10, 1, 10, 1, 10, 10]
    switch, specialists = mlp_mnn(10, experts=6, widths=widths, seed=1)
    mnn = MetaNeuralNetwork(switch, specialists, groups=groups, threshold=0.15, backend=backend)
    assert_matches_naive(mnn, torch.randn(200, 24), groups=groups, threshold=0.15)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cnn_specialists(backend):
    switch, specialists = cnn_mnn(5)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.1, backend=backend)
    assert_matches_naive(mnn, torch.randn(64, 3, 16, 16), threshold=0.1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_switch_fn_mask(backend):
    switch, specialists = mlp_mnn(6, seed=2)
    rule = lambda scores: scores > scores.mean(dim=1, keepdim=True)  # noqa: E731
    mnn = MetaNeuralNetwork(switch, specialists, switch_fn=rule, backend=backend)
    assert_matches_naive(mnn, torch.randn(90, 24), switch_fn=rule)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch_and_threshold_one(backend):
    switch, specialists = mlp_mnn(4, seed=3)
    mnn = MetaNeuralNetwork(switch, specialists, backend=backend)
    out = mnn(torch.randn(0, 24))
    assert out.shape == (0, 4) and out.dtype == torch.float32
    mnn.threshold = 1.0  # nothing active: the switch alone decides
    x = torch.randn(50, 24)
    with torch.no_grad():
        out, routing = mnn(x, return_routing=True)
        assert routing.perm.numel() == 0
        # The module's final log_softmax is the row op's (rowmath), applied to the switch's log-probs.
        assert torch.equal(out, mnn.ops.log_softmax_rows(mnn.ops.softmax_rows(switch(x))[0]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(
    batch=st.integers(0, 300),
    classes=st.integers(2, 12),
    experts=st.integers(1, 14),
    seed=st.integers(0, 2**16),
    threshold=st.sampled_from([0.0, 0.05, 0.2, 0.6, 1.0, None]),
    top_k=st.sampled_from([None, 1, 2, 5]),
)
def test_random_mnns_match_naive(backend, batch, classes, experts, seed, threshold, top_k):
    top_k = min(top_k, experts) if top_k else (1 if threshold is None else None)
    groups = random_groups(classes, experts, seed)
    widths = [1 if len(g) == 1 and (seed + e) % 2 else classes for e, g in enumerate(groups)]
    switch, specialists = mlp_mnn(classes, experts=experts, seed=seed, widths=widths)
    mnn = MetaNeuralNetwork(switch, specialists, groups=groups, threshold=threshold, top_k=top_k, backend=backend)
    x = torch.randn(batch, 24, generator=torch.Generator().manual_seed(seed))
    assert_matches_naive(mnn, x, groups=groups, threshold=threshold, top_k=top_k)


def test_half_and_bfloat16_inputs_route_identically():
    switch, specialists = mlp_mnn(8, seed=4)
    x = torch.randn(120, 24)
    for dtype, tol in [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)]:
        mnn = MetaNeuralNetwork(switch, specialists, threshold=0.1).to(dtype)
        with torch.no_grad():
            got, routing = mnn(x.to(dtype), return_routing=True)
            want, want_routing = naive_forward(mnn.switch, list(mnn.specialists), x.to(dtype), threshold=0.1, return_routing=True)
        assert got.dtype == torch.float32
        assert_routing_equal(routing, want_routing)
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_gradients_flow_to_switch_and_specialists():
    switch, specialists = mlp_mnn(5, seed=5)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.1)
    x = torch.randn(40, 24)
    mnn(x).sum().backward()
    assert switch[0].weight.grad is not None and switch[0].weight.grad.abs().sum() > 0
    assert any(s[0].weight.grad is not None and s[0].weight.grad.abs().sum() > 0 for s in specialists)


def test_auto_backend_explains_skips():
    switch, specialists = mlp_mnn(3)
    mnn = MetaNeuralNetwork(switch, specialists)
    assert mnn.backend == "cpp"  # the fastest CPU backend, when the extension is built
    torch_only = MetaNeuralNetwork(switch, specialists, backend="torch")
    assert torch_only.backend == "torch"
