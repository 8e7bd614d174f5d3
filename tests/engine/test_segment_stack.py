"""``mnn_fast::segment_stack``: each expert's whole Linear/activation stack, a tile of rows per core.

Reference: :func:`stack_reference`, each expert's layers called on its rows with ``torch.nn.functional``
(the naive loop's arithmetic). The op runs one-thread GEMMs on row tiles, which round differently
from the expert's whole GEMM, so it is checked within the README's tolerance for
``grouped_parallel`` (1e-5 relative and absolute), never bitwise; the routing around it stays exact.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from mnn_fast import MetaNeuralNetwork
from mnn_fast.engine.executors import stack_plan
from mnn_fast.reference import naive_forward

segment_stack = torch.ops.mnn_fast.segment_stack
TOL = dict(rtol=1e-5, atol=1e-5)  # README, "Exactness": grouped_parallel's stated tolerance

ACTIVATIONS = {
    "none": lambda h, a: h,
    "relu": lambda h, a: F.relu(h),
    "leaky_relu": lambda h, a: F.leaky_relu(h, a),
    "tanh": lambda h, a: torch.tanh(h),
    "sigmoid": lambda h, a: torch.sigmoid(h),
    "silu": lambda h, a: F.silu(h),
    "gelu": lambda h, a: F.gelu(h),
    "gelu_tanh": lambda h, a: F.gelu(h, approximate="tanh"),
    "elu": lambda h, a: F.elu(h, a),
}


def stack_reference(x, weights, biases, activations, args, offsets, perm=None):
    rows = x if perm is None else x[perm]
    bounds = offsets.tolist()
    parts = []
    for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        h = rows[a:b]
        for w, bias, act, arg in zip(weights, biases, activations, args):
            h = ACTIVATIONS[act](F.linear(h, w[e], None if bias is None else bias[e]), arg)
        parts.append(h)
    return torch.cat(parts) if parts else rows.new_empty(0, weights[-1].shape[1])


def make_case(counts, widths, activations, with_bias=True, perm_rows=None, seed=0, dtype=torch.float32):
    """Random inputs: ``widths = [K, M1, ..., ML]``; ``perm_rows``: x's row count when the rows are
    read through a random perm (repeats and skipped rows included), ``None`` for x = the buffer."""
    gen = torch.Generator().manual_seed(seed)
    n, experts = sum(counts), len(counts)
    x = torch.randn(n if perm_rows is None else perm_rows, widths[0], generator=gen, dtype=dtype)
    perm = None if perm_rows is None else torch.randint(0, max(perm_rows, 1), (n,), generator=gen)
    weights = [torch.randn(experts, m, k, generator=gen, dtype=dtype) / k ** 0.5 for k, m in zip(widths, widths[1:])]
    biases = [torch.randn(experts, m, generator=gen, dtype=dtype) if with_bias else None for m in widths[1:]]
    args = [0.1 if a in ("leaky_relu", "elu") else 0.0 for a in activations]
    offsets = torch.tensor([0] + list(counts)).cumsum(0)
    return x, weights, biases, list(activations), args, offsets, perm


# Each counts case is an edge of the tiling: empty experts between full ones, nothing routed (N = 0),
# one expert taking every row, a single expert (E = 1), many small experts (E = 300).
COUNTS = [[3, 0, 5, 2], [0, 0, 0, 0], [40, 0, 0, 0], [17], [1, 2, 0, 3] * 75]


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("through_perm", [False, True])
# tile_rows: chosen by the kernel, one row a tile (every tile boundary), 4 (tiles cutting experts
# unevenly), larger than any expert.
@pytest.mark.parametrize("tile_rows", [0, 1, 4, 1000])
def test_stack_matches_each_experts_layers(counts, through_perm, tile_rows, threads):
    case = make_case(counts, [13, 9, 5], ["relu", "none"], perm_rows=7 if through_perm else None)
    got = segment_stack(*case, tile_rows=tile_rows)
    assert got.shape == (sum(counts), 5)
    torch.testing.assert_close(got, stack_reference(*case), **TOL)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_every_activation_and_a_trailing_one(activation):
    # Three Linears (two hidden buffers taking turns), the activation after each, odd widths.
    case = make_case([6, 0, 11, 4], [21, 7, 3, 5], [activation] * 3, perm_rows=15, seed=3)
    torch.testing.assert_close(segment_stack(*case, tile_rows=4), stack_reference(*case), **TOL)


def test_without_biases_and_in_float64():
    case = make_case([5, 9, 0, 2], [10, 6, 4], ["tanh", "none"], with_bias=False, perm_rows=12, seed=4,
                     dtype=torch.float64)
    got = segment_stack(*case, tile_rows=3)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, stack_reference(*case), rtol=1e-12, atol=1e-12)


@settings(max_examples=40)
@given(
    counts=st.lists(st.integers(0, 40), min_size=1, max_size=12),
    widths=st.lists(st.integers(1, 70), min_size=2, max_size=4),
    activation=st.sampled_from(sorted(ACTIVATIONS)),
    through_perm=st.booleans(),
    with_bias=st.booleans(),
    tile_rows=st.integers(0, 50),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_the_reference(counts, widths, activation, through_perm, with_bias, tile_rows, seed):
    layers = len(widths) - 1
    case = make_case(counts, widths, [activation] * layers, with_bias, perm_rows=(seed % 30 + 1) if through_perm else None,
                     seed=seed)
    torch.testing.assert_close(segment_stack(*case, tile_rows=tile_rows), stack_reference(*case), **TOL)


@pytest.mark.parametrize("through_perm", [False, True])
def test_opcheck(through_perm):
    case = make_case([3, 0, 4], [8, 6, 3], ["gelu", "none"], perm_rows=5 if through_perm else None)
    torch.library.opcheck(segment_stack, case)
    torch.library.opcheck(segment_stack, case, {"tile_rows": 2})


def test_refuses_inputs_that_require_grad():
    x, weights, *rest = make_case([3, 2], [4, 3, 2], ["relu", "none"])
    with pytest.raises(NotImplementedError, match="inference-only"):
        segment_stack(x.clone().requires_grad_(), weights, *rest)
    with pytest.raises(NotImplementedError, match="inference-only"):
        segment_stack(x, [weights[0], weights[1].clone().requires_grad_()], *rest)


def test_strided_inputs_and_a_bias_on_some_layers_only():
    # x a column slice (not contiguous), weights padded between experts as the grouped executor's
    # 64-byte slabs are (each expert's [M, K] dense), the first layer without a bias.
    x, weights, biases, acts, args, offsets, perm = make_case([4, 0, 6], [7, 5, 3], ["silu", "none"], perm_rows=9)
    wide = torch.randn(9, 12)
    wide[:, 2:9] = x
    padded = torch.zeros(3, 5 * 7 + 13)
    padded[:, :35] = weights[0].reshape(3, 35)
    w0 = padded[:, :35].view(3, 5, 7)
    assert not wide[:, 2:9].is_contiguous() and not w0.is_contiguous()
    case = (wide[:, 2:9], [w0, weights[1]], [None, biases[1]], acts, args, offsets, perm)
    torch.testing.assert_close(segment_stack(*case, tile_rows=2), stack_reference(*case), **TOL)


@pytest.mark.parametrize("threads", [2, 3], indirect=True)
def test_runs_under_inference_mode_on_every_thread(threads):
    # Worker threads must see the caller's inference mode: without it, an addmm into the output
    # from a worker was refused as an in-place update of an inference tensor.
    case = make_case([40, 30, 50, 20], [13, 9, 5], ["relu", "none"], perm_rows=60)
    with torch.inference_mode():
        got = segment_stack(*case, tile_rows=8)
        parallel_linear = torch.ops.mnn_fast.segment_linear(case[0], case[1][0], case[2][0], case[5], True, case[6])
    torch.testing.assert_close(got, stack_reference(*case), **TOL)
    first_linear = stack_reference(case[0], case[1][:1], case[2][:1], ["none"], [0.0], case[5], case[6])
    torch.testing.assert_close(parallel_linear, first_linear, **TOL)


def test_refuses_bad_input_naming_the_argument():
    x, weights, biases, acts, args, offsets, perm = make_case([3, 2], [4, 3, 2], ["relu", "none"])
    with pytest.raises(ValueError, match="activations must each be one of .*got 'softmax'"):
        segment_stack(x, weights, biases, ["softmax", "none"], args, offsets)
    with pytest.raises(ValueError, match="activations and activation_args must have one entry per weight, 2"):
        segment_stack(x, weights, biases, ["relu"], args, offsets)
    with pytest.raises(ValueError, match="biases must have one entry"):
        segment_stack(x, weights, biases[:1], acts, args, offsets)
    with pytest.raises(ValueError, match=r"weights\[1\] must be a 3-D tensor \[E, M, K\] with E = 2 and K = 3"):
        segment_stack(x, [weights[0], weights[1][:, :, :2]], biases, acts, args, offsets)
    with pytest.raises(ValueError, match=r"biases\[0\] must be a 2-D tensor \[E, M\] = \[2, 3\]"):
        segment_stack(x, weights, [biases[0][:, :2], biases[1]], acts, args, offsets)
    with pytest.raises(TypeError, match=r"weights\[0\] must have x's dtype float32"):
        segment_stack(x, [weights[0].double(), weights[1]], biases, acts, args, offsets)
    with pytest.raises(ValueError, match="weights must hold at least one"):
        segment_stack(x, [], [], [], [], offsets)
    with pytest.raises(ValueError, match="x must be a 2-D tensor"):
        segment_stack(x[None], weights, biases, acts, args, offsets)
    with pytest.raises(ValueError, match="offsets must run from 0 to N = 5"):
        segment_stack(x, weights, biases, acts, args, torch.tensor([0, 2, 4]))
    with pytest.raises(ValueError, match="perm values must be row indices of x in \\[0, 5\\)"):
        segment_stack(x, weights, biases, acts, args, offsets, torch.tensor([0, 1, 2, 3, 5]))
    with pytest.raises(ValueError, match="tile_rows must be >= 0"):
        segment_stack(x, weights, biases, acts, args, offsets, tile_rows=-1)


def test_stack_plan_describes_what_the_op_runs():
    assert stack_plan([nn.Flatten(), nn.Linear(4, 3), nn.ELU(0.5), nn.Dropout(0.2), nn.Linear(3, 2), nn.Tanh()]) == (
        ["elu", "tanh"], [0.5, 0.0])
    assert stack_plan([nn.Linear(4, 3), nn.GELU("tanh"), nn.Identity(), nn.Linear(3, 2)]) == (["gelu_tanh", "none"],
                                                                                           [0.0, 0.0])
    # Two activations after one Linear: the op applies one, so the stack runs layer by layer.
    assert stack_plan([nn.Linear(4, 3), nn.ReLU(), nn.Tanh(), nn.Linear(3, 2)]) is None


def _module(hidden_layers, seed=0, classes=6, d_in=29):
    torch.manual_seed(seed)
    switch = nn.Sequential(nn.Linear(d_in, 16), nn.ReLU(), nn.Linear(16, classes))
    experts = [nn.Sequential(*hidden_layers(), nn.Linear(11, classes)) for _ in range(classes)]
    return switch, experts, torch.randn(300, d_in)


def _spy(mnn):
    calls = []
    stack = mnn._grouped.segment_stack
    mnn._grouped.segment_stack = lambda *a, **k: calls.append(1) or stack(*a, **k)
    return calls


@pytest.mark.parametrize("threads", [1, 3], indirect=True)
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_grouped_parallel_runs_the_stack_op_within_tolerance_of_the_naive_loop(threads, mode):
    switch, experts, x = _module(lambda: [nn.Linear(29, 11), nn.SiLU(), nn.Dropout(0.3)])
    mnn = MetaNeuralNetwork(switch, experts, threshold=0.05, executor="grouped_parallel").eval()
    calls = _spy(mnn)
    with mode():
        got, routing = mnn(x, return_routing=True)
        want = naive_forward(switch, experts, x, threshold=0.05)
    assert calls and routing.perm.numel() > 0
    torch.testing.assert_close(got, want, **TOL)


def test_grouped_parallel_falls_back_layer_by_layer_where_the_op_does_not_apply():
    # Two activations after one Linear (no plan), and a Dropout in training mode (random per call).
    switch, experts, x = _module(lambda: [nn.Linear(29, 11), nn.ReLU(), nn.Tanh()], seed=1)
    mnn = MetaNeuralNetwork(switch, experts, threshold=0.05, executor="grouped_parallel").eval()
    assert mnn._grouped._plan is None
    with torch.no_grad():
        torch.testing.assert_close(mnn(x), naive_forward(switch, experts, x, threshold=0.05), **TOL)
    switch, experts, x = _module(lambda: [nn.Linear(29, 11), nn.ReLU(), nn.Dropout(0.0)], seed=2)
    mnn = MetaNeuralNetwork(switch, experts, threshold=0.05, executor="grouped_parallel").eval()
    calls = _spy(mnn)
    for expert in experts:
        expert.train()  # p = 0: a training-mode Dropout that changes nothing, so the result is checkable
    with torch.no_grad():
        got = mnn(x)
    assert not calls
    torch.testing.assert_close(got, naive_forward(switch, experts, x, threshold=0.05), **TOL)


def test_grouped_parallel_compiles_with_the_stack_op():
    switch, experts, x = _module(lambda: [nn.Linear(29, 11), nn.ReLU()], seed=3)
    mnn = MetaNeuralNetwork(switch, experts, threshold=0.05, executor="grouped_parallel").eval()
    calls = _spy(mnn)  # traced once: the compiled graph holds the op itself
    compiled = torch.compile(mnn, fullgraph=True)
    with torch.no_grad():
        got = compiled(x)
        want = naive_forward(switch, experts, x, threshold=0.05)
    assert calls
    torch.testing.assert_close(got, want, **TOL)


def test_a_bitwise_stack_never_takes_the_op():
    from mnn_fast.engine.executors import GroupedLinearStack

    experts = [nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)) for _ in range(2)]
    stack = GroupedLinearStack(experts, torch.ops.mnn_fast.segment_linear, bitwise=True, segment_stack=segment_stack)
    assert stack._plan is None
