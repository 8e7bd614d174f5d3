"""``F.grouped_mm`` as the GPU backends' grouped Linear for bfloat16 (issue 13, item 3).

Reference at the top: each segment's rows times its expert's weight, in float64. On a GPU of compute
capability 9.x/10.x the cuda/triton backends run bfloat16 inference through ``F.grouped_mm``; this
machine has no GPU, so the wiring is tested on CPU (where ``F.grouped_mm`` runs bfloat16 as a loop
of ``mm``) with the device gate opened, and the GPU case is a test that runs where one exists.
"""
import pytest
import torch
from torch import nn

import mnn_fast
from mnn_fast.engine import backends
from mnn_fast.engine.backends import grouped_mm_reason
from mnn_fast.engine.torch_ops import segment_linear_grouped_mm


def reference(x, weight, bias, offsets):
    out = []
    for e in range(weight.shape[0]):
        a, b = int(offsets[e]), int(offsets[e + 1])
        y = x[a:b].double() @ weight[e].double().T
        out.append(y if bias is None else y + bias[e].double())
    return torch.cat(out)


def problem(counts, k, m, dtype, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *counts]).cumsum(0)
    x = torch.randn(int(offsets[-1]), k, generator=gen).to(dtype)
    weight = torch.randn(len(counts), m, k, generator=gen).to(dtype)
    b = torch.randn(len(counts), m, generator=gen).to(dtype) if bias else None
    return x, weight, b, offsets


# Why each case: empty experts first, between and last (its offsets repeat); E=1; one expert with
# every row; no rows at all; many experts, most empty; widths past one 8-wide stride step.
CASES = [([0, 5, 0, 9, 0], 16, 8), ([12], 8, 8), ([0, 0, 30], 24, 16), ([0, 0, 0], 8, 8),
         ([2] * 5 + [0] * 40 + [7], 32, 24)]


@pytest.mark.parametrize("counts, k, m", CASES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
def test_grouped_mm_is_segment_linear(counts, k, m, with_bias, dtype, tol):
    x, weight, bias, offsets = problem(counts, k, m, dtype, bias=with_bias)
    out = segment_linear_grouped_mm(x, weight, bias, offsets)
    assert out.dtype == dtype and out.shape == (x.shape[0], m)
    want = reference(x, weight, bias, offsets)
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol * scale)


def test_grouped_mm_refuses_mismatched_shapes():
    x, weight, bias, offsets = problem([3, 4], 16, 8, torch.bfloat16)
    with pytest.raises(ValueError, match="offsets must have E \\+ 1"):
        segment_linear_grouped_mm(x, weight, bias, offsets[:-1])
    with pytest.raises(ValueError, match="features"):
        segment_linear_grouped_mm(x[:, :8], weight, bias, offsets)


@pytest.fixture
def gate_open(monkeypatch):
    """The device gate opened for CPU tensors: the selection and the module wiring run here as on
    a Hopper GPU (F.grouped_mm runs bfloat16 on CPU too, as a loop of mm)."""
    monkeypatch.setattr(backends, "_grouped_mm_device_ok", lambda device: True)


@pytest.fixture
def grouped_mm_calls(monkeypatch):
    calls = []

    def counted(*args):
        calls.append(args[0].shape)
        return segment_linear_grouped_mm(*args)

    monkeypatch.setattr(backends, "segment_linear_grouped_mm", counted)
    return calls


def test_reasons_name_what_keeps_the_triton_kernel(gate_open):
    x, weight, bias, _ = problem([4, 4], 16, 8, torch.bfloat16)
    assert grouped_mm_reason(x, weight, bias) is None
    assert "bfloat16" in grouped_mm_reason(x.float(), weight.float())
    strided = x.t().contiguous().t()  # same values, column-major: F.grouped_mm would refuse it
    assert "contiguous" in grouped_mm_reason(strided, weight)
    assert "contiguous" in grouped_mm_reason(torch.cat([x, x], 1)[:, 8:], weight[:, :, :8])
    assert grouped_mm_reason(strided, weight, rows_copied=True) is None  # gathered into a fresh buffer first
    assert "16-byte" in grouped_mm_reason(x[:, :12], weight[:, :, :12])
    assert "16-byte" in grouped_mm_reason(x, weight[:, :5])
    assert "autograd" in grouped_mm_reason(x.clone().requires_grad_(), weight)
    assert "autograd" in grouped_mm_reason(x, weight, bias.clone().requires_grad_())  # bias-only training
    with torch.no_grad():
        assert grouped_mm_reason(x.clone().requires_grad_(), weight) is None


def test_the_gate_is_closed_off_hopper_and_blackwell():
    # This machine's CPU tensors: torch's grouped GEMM there is a loop of mm, so the kernel serves.
    x, weight, _, _ = problem([4, 4], 16, 8, torch.bfloat16)
    assert "capability" in grouped_mm_reason(x, weight)


def mlp(experts, width=16, hidden=24, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    switch = nn.Sequential(nn.Linear(width, 32), nn.ReLU(), nn.Linear(32, experts))
    specialists = [nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, experts))
                   for _ in range(experts)]
    return switch.to(dtype), [s.to(dtype) for s in specialists]


@torch.no_grad()
def test_module_runs_bfloat16_linears_through_grouped_mm(gate_open, grouped_mm_calls):
    switch, specialists = mlp(8)  # C = 8 outputs: a multiple of 8, as F.grouped_mm's strides need
    grouped = mnn_fast.MetaNeuralNetwork(switch, specialists, backend="triton", executor="grouped", threshold=0.1)
    sequential = mnn_fast.MetaNeuralNetwork(switch, specialists, backend="triton", executor="sequential", threshold=0.1)
    x = torch.randn(50, 16).to(torch.bfloat16)
    got, routing = grouped.eval()(x, return_routing=True)
    # Both Linears of the stack, the first on the gathered rows (F.grouped_mm reads no perm).
    assert grouped_mm_calls == [(routing.perm.shape[0], 16), (routing.perm.shape[0], 24)]
    grouped_mm_calls.clear()
    switch6, specialists6 = mlp(6)  # C = 6: the last Linear keeps the Triton kernel
    mnn_fast.MetaNeuralNetwork(switch6, specialists6, backend="triton", executor="grouped", threshold=0.1).eval()(x)
    assert [shape[1] for shape in grouped_mm_calls] == [16]
    want, want_routing = sequential.eval()(x, return_routing=True)
    assert torch.equal(routing.perm, want_routing.perm)
    torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)


@torch.no_grad()
def test_float32_keeps_the_triton_kernel(gate_open, grouped_mm_calls):
    switch, specialists = mlp(4, dtype=torch.float32)
    mnn = mnn_fast.MetaNeuralNetwork(switch, specialists, backend="triton", executor="grouped", threshold=0.1).eval()
    mnn(torch.randn(30, 16))
    assert grouped_mm_calls == []


@torch.no_grad()
def test_grouped_mm_path_compiles_without_graph_breaks(gate_open, grouped_mm_calls):
    # No host read of the counts on this path either: the whole forward stays one graph.
    switch, specialists = mlp(8)
    mnn = mnn_fast.MetaNeuralNetwork(switch, specialists, backend="triton", executor="grouped", threshold=0.1).eval()
    x = torch.randn(40, 16).to(torch.bfloat16)
    eager = mnn(x)
    calls = len(grouped_mm_calls)
    torch._dynamo.reset()
    compiled = mnn_fast.compile(mnn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager, rtol=1e-2, atol=1e-2)
    assert len(grouped_mm_calls) > calls  # traced through the grouped_mm path, not the kernel


def _hopper_or_blackwell() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] in (9, 10)


@pytest.mark.skipif(not _hopper_or_blackwell(), reason="needs a CUDA GPU of compute capability 9.x or 10.x")
@torch.no_grad()
def test_auto_picks_grouped_mm_on_hopper_without_a_host_sync(grouped_mm_calls):
    switch, specialists = mlp(8)
    mnn = mnn_fast.MetaNeuralNetwork(switch, specialists, threshold=0.1).cuda().eval()
    assert mnn.executor == "grouped"
    x = torch.randn(256, 16, device="cuda").to(torch.bfloat16)
    routing = mnn(x, return_routing=True)[1]
    xg = x[routing.perm]
    weight = torch.stack([s[0].weight for s in mnn.specialists])
    bias = torch.stack([s[0].bias for s in mnn.specialists])
    none = torch.zeros_like(routing.offsets)
    torch.cuda.set_sync_debug_mode("error")  # a device-to-host read inside raises
    try:
        out = segment_linear_grouped_mm(xg, weight, bias, routing.offsets)
        empty = segment_linear_grouped_mm(xg[:0], weight, bias, none)  # no routed rows
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert empty.shape == (0, weight.shape[1])
    torch.testing.assert_close(out.double().cpu(), reference(xg.cpu(), weight.cpu(), bias.cpu(), routing.offsets.cpu()),
                               rtol=2e-2, atol=2e-2 * 4)
    sequential = mnn_fast.MetaNeuralNetwork(mnn.switch, list(mnn.specialists), executor="sequential", threshold=0.1)
    grouped_mm_calls.clear()
    got = mnn(x)
    assert len(grouped_mm_calls) == 2
    torch.testing.assert_close(got, sequential.eval()(x), rtol=5e-2, atol=5e-2)
