"""The Triton grouped Linear kernel (issue 13, item 3) under ``TRITON_INTERPRET=1``, and the grouped
executor built on it: per segment ``x[perm[r]] @ W[e]^T + b[e]``, the gather fused into the GEMM.

A GEMM tile sums in another order than BLAS, so results are compared with the float64 reference
within float32 rounding (16-bit types: within their own rounding), not bitwise; ``docs/ops.md``.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mnn_fast
from mnn_fast.engine.executors import GroupedLinearStack
from mnn_fast.reference import naive_forward

kernels = pytest.importorskip("mnn_fast.kernels")
from kernels import segment_linear as sl  # noqa: E402


def reference(x, weight, bias, offsets, perm):
    """Plainly, in float64: each segment's rows (through ``perm``) times its expert's weight."""
    rows = x.double() if perm is None else x.double()[perm]
    out = []
    for e in range(weight.shape[0]):
        a, b = int(offsets[e]), int(offsets[e + 1])
        y = rows[a:b] @ weight[e].double().T
        out.append(y if bias is None else y + bias[e].double())
    return torch.cat(out) if out else rows.new_zeros(0, weight.shape[1])


def problem(counts, k, m, batch=None, dtype=torch.float32, bias=True, gather=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.tensor(counts, dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    n = int(offsets[-1])
    batch = batch if batch is not None else max(n, 1)
    x = torch.randn(batch if gather else n, k, generator=gen).to(dtype)
    weight = torch.randn(len(counts), m, k, generator=gen).to(dtype)
    b = torch.randn(len(counts), m, generator=gen).to(dtype) if bias else None
    perm = torch.randint(0, batch, (n,), generator=gen) if gather else None
    return x, weight, b, offsets, perm


def run(*args):
    return torch.ops.mnn_fast.triton_segment_linear(*args)


def assert_matches(out, x, weight, bias, offsets, perm):
    want = reference(x, weight, bias, offsets, perm)
    assert out.dtype == x.dtype and out.shape == want.shape
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[x.dtype]
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol * max(1.0, float(want.abs().max()) if want.numel() else 0.0))


@pytest.fixture
def small_tiles(monkeypatch):
    """16 x 16 tiles and 16-wide K steps: several row tiles per expert, column tiles and K steps,
    which the interpreter's one-tile default would not exercise."""
    monkeypatch.setattr(sl, "_segment_linear_config", lambda k, m, dtype: {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})


# Why each case: zeros between non-empty experts; E=1; one expert takes everything; an expert with
# one row; widths 1 and 7 (smaller than a tile, odd); 33 and 70 (cross tile edges at 16); large E
# with most experts empty; no rows at all.
CASES = [
    ([3, 0, 17, 1, 9], 24, 10),
    ([40], 7, 5),
    ([0, 0, 37, 0], 33, 70),
    ([1, 1, 1], 1, 1),
    ([2] * 10 + [0] * 90 + [5], 16, 16),
    ([0, 0, 0], 8, 4),
]


@pytest.mark.parametrize("counts, k, m", CASES)
@pytest.mark.parametrize("gather, bias", [(True, True), (False, True), (True, False)])
def test_matches_reference(small_tiles, counts, k, m, gather, bias):
    args = problem(counts, k, m, batch=13, gather=gather, bias=bias)
    assert_matches(run(*args), *args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_types_accumulate_in_float32(small_tiles, dtype):
    args = problem([5, 0, 30, 2], 40, 20, batch=17, dtype=dtype)
    assert_matches(run(*args), *args)


def test_default_tiles_match_too():
    # The interpreter's own tile sizes (one tile over a small problem), as the module launches it.
    args = problem([3, 0, 70, 1], 50, 12, batch=20)
    assert_matches(run(*args), *args)


@settings(max_examples=25, deadline=None)
@given(counts=st.lists(st.integers(0, 40), min_size=1, max_size=12), k=st.integers(1, 40), m=st.integers(1, 40),
       batch=st.integers(1, 30), seed=st.integers(0, 2**16))
def test_random_shapes(counts, k, m, batch, seed):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sl, "_segment_linear_config", lambda k, m, dtype: {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})
        args = problem(counts, k, m, batch=batch, seed=seed)
        assert_matches(run(*args), *args)


def test_every_row_is_written_once_by_its_own_expert(small_tiles):
    # Identity weights with a per-expert bias of e: output row r must be its input row plus its expert.
    counts = [4, 0, 19, 1, 33]
    x, _, _, offsets, perm = problem(counts, 8, 8, batch=11)
    weight = torch.eye(8).repeat(len(counts), 1, 1)
    bias = torch.arange(len(counts), dtype=torch.float32)[:, None].repeat(1, 8)
    out = run(x, weight, bias, offsets, perm)
    expert = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    assert torch.equal(out, x[perm] + expert[:, None].float())


def test_opcheck():
    args = problem([3, 0, 9], 12, 5, batch=7)
    torch.library.opcheck(torch.ops.mnn_fast.triton_segment_linear.default, args)


def test_backward_matches_autograd_of_the_reference():
    mnn_fast.engine.backends.get_backend("triton")  # registers the op's backward
    x, weight, bias, offsets, perm = problem([3, 0, 9, 4], 6, 5, batch=7)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    run(leaves[0], leaves[1], leaves[2], offsets, perm).square().sum().backward()
    ref = [t.clone().double().requires_grad_() for t in (x, weight, bias)]
    reference(ref[0], ref[1], ref[2], offsets, perm).square().sum().backward()
    for got, want in zip(leaves, ref):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-4)


def test_bad_inputs_are_refused():
    x, weight, bias, offsets, perm = problem([2, 3], 4, 3, batch=5)
    with pytest.raises(RuntimeError, match="dtype"):
        run(x.double(), weight.double(), None, offsets, perm)
    with pytest.raises(RuntimeError, match="offsets"):
        run(x, weight, bias, offsets[:-1], perm)
    with pytest.raises(RuntimeError, match="K"):
        run(x[:, :3], weight, bias, offsets, perm)


def mlp_specialists(experts, width=12, seed=0):
    classes = experts  # one specialist per class
    torch.manual_seed(seed)
    switch = nn.Sequential(nn.Linear(width, 16), nn.ReLU(), nn.Linear(16, classes))
    specialists = [nn.Sequential(nn.Linear(width, 16), nn.ReLU(), nn.Linear(16, classes)) for _ in range(experts)]
    return switch, specialists


@torch.no_grad()
def test_module_with_the_triton_backend_groups_and_fuses_the_gather():
    switch, specialists = mlp_specialists(5)
    mnn = mnn_fast.MetaNeuralNetwork(switch, specialists, backend="triton", executor="grouped", threshold=0.15).eval()
    assert mnn.executor == "grouped" and isinstance(mnn._grouped, GroupedLinearStack)
    x = torch.randn(64, 12)
    assert mnn._fused_gather(x)
    want = naive_forward(switch, specialists, x, threshold=0.15)
    torch.testing.assert_close(mnn(x), want, rtol=1e-5, atol=1e-5)


def test_module_gradients_flow_through_the_triton_grouped_path():
    # x requires grad: the gather is not fused (the rows' gradient goes through the gather op) and
    # the kernel's backward carries it; the specialists are frozen, so the grouped executor still runs.
    switch, specialists = mlp_specialists(4)
    for p in [*switch.parameters(), *(p for s in specialists for p in s.parameters())]:
        p.requires_grad_(False)
    mnn = mnn_fast.MetaNeuralNetwork(switch, specialists, backend="triton", executor="grouped", threshold=0.15).eval()
    x = torch.randn(32, 12, requires_grad=True)
    assert not mnn._fused_gather(x)
    mnn(x).logsumexp(1).sum().backward()
    x_ref = x.detach().clone().requires_grad_()  # naive_forward runs without autograd: the sequential module
    sequential = mnn_fast.MetaNeuralNetwork(switch, specialists, backend="torch", executor="sequential", threshold=0.15)
    sequential.eval()(x_ref).logsumexp(1).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_fused_grouped_path_compiles_without_graph_breaks():
    # The kernel needs no host read of the counts, so the whole forward is one graph.
    switch, specialists = mlp_specialists(4)
    mnn = mnn_fast.MetaNeuralNetwork(switch, specialists, backend="triton", executor="grouped", threshold=0.15).eval()
    x = torch.randn(40, 12)
    torch._dynamo.reset()
    compiled = mnn_fast.compile(mnn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), mnn(x), rtol=1e-5, atol=1e-5)
