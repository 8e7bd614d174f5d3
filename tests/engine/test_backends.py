"""Backend choice in one place: the Backend record (segment_linear included) and one exception type
per bad input on every CPU backend (the C++ kernels check in C++, torch and Triton in engine/checks.py)."""
import dataclasses

import pytest
import torch
from torch import nn

from conftest import CPU_BACKENDS
from mnn_fast import MetaNeuralNetwork
from mnn_fast.engine.backends import get_backend

BAD_INPUTS = {
    "route: float64 scores": (TypeError, lambda o: o.route(torch.rand(5, 3, dtype=torch.float64), 0.1, 0)),
    "route: 3-D scores": (ValueError, lambda o: o.route(torch.rand(5, 3, 1), 0.1, 0)),
    "route: top_k > E": (ValueError, lambda o: o.route(torch.rand(5, 3), 0.1, 4)),
    "gather: perm out of range": (ValueError, lambda o: o.gather(torch.randn(5, 2), torch.tensor([0, 7]))),
    "gather: float perm": (TypeError, lambda o: o.gather(torch.randn(5, 2), torch.tensor([0.0, 1.0]))),
    "gather: 3-D x": (ValueError, lambda o: o.gather(torch.randn(5, 2, 2), torch.tensor([0, 1]))),
    "combine: sample_rows out of range": (ValueError, lambda o: o.combine(
        torch.zeros(2, 3), torch.zeros(1, 3), torch.tensor([0]), torch.tensor([0, 1, 1]), torch.tensor([5]))),
    "combine: logv width": (ValueError, lambda o: o.combine(
        torch.zeros(2, 3), torch.zeros(1, 4), torch.tensor([0]), torch.tensor([0, 1, 1]), torch.tensor([0]))),
    "group_scores: class out of range": (ValueError, lambda o: o.group_scores(
        torch.rand(4, 3), torch.tensor([0, 1]), torch.tensor([5]))),
    "group_scores: float64 probs": (TypeError, lambda o: o.group_scores(
        torch.rand(4, 3, dtype=torch.float64), torch.tensor([0, 1]), torch.tensor([1]))),
}
SEGMENT_LINEAR_BAD = {
    "offsets decreasing": (ValueError, lambda f: f(torch.randn(5, 3), torch.randn(2, 4, 3), None, torch.tensor([0, 6, 5]))),
    "offsets short": (ValueError, lambda f: f(torch.randn(5, 3), torch.randn(2, 4, 3), None, torch.tensor([0, 5]))),
    "x float64": (TypeError, lambda f: f(torch.randn(5, 3).double(), torch.randn(2, 4, 3), None, torch.tensor([0, 2, 5]))),
    "K mismatch": (ValueError, lambda f: f(torch.randn(5, 2), torch.randn(2, 4, 3), None, torch.tensor([0, 2, 5]))),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_one_bad_input_one_exception_type_on_every_backend(backend, case):
    exc, call = BAD_INPUTS[case]
    with pytest.raises(exc, match=case.split(":")[0]):  # the message names the op
        call(get_backend(backend))


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("case", sorted(SEGMENT_LINEAR_BAD))
def test_segment_linear_bad_input_same_type_on_both_cpu_implementations(backend, case):
    exc, call = SEGMENT_LINEAR_BAD[case]
    with pytest.raises(exc, match="segment_linear"):
        call(get_backend(backend).segment_linear)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_segment_linear_of_both_cpu_backends_is_bitwise_each_experts_linear(backend):
    torch.manual_seed(0)
    counts = [3, 0, 5, 1]
    linears = [nn.Linear(7, 6) for _ in counts]
    x = torch.randn(sum(counts), 7)
    offsets = torch.tensor([0] + counts).cumsum(0)
    w = torch.stack([lin.weight.detach() for lin in linears])
    b = torch.stack([lin.bias.detach() for lin in linears])
    with torch.no_grad():
        want = torch.cat([lin(x[a:z].clone()) for lin, a, z in zip(linears, offsets[:-1], offsets[1:])])
        assert torch.equal(get_backend(backend).segment_linear(x, w, b, offsets), want)


def test_the_executor_follows_the_backends_segment_linear():
    # A backend without a segment_linear kernel: auto cannot group there, and says why.
    experts = [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(3)]
    bare = dataclasses.replace(get_backend("torch"), name="bare", segment_linear=None)
    mnn = MetaNeuralNetwork(nn.Linear(4, 3), experts, backend=bare)
    assert mnn.executor == "sequential" and "segment_linear" in mnn.executor_skipped["grouped"]
    # Triton's kernel (issue 13) groups too, and reads the rows through perm itself.
    triton = get_backend("triton")
    assert triton.segment_linear_gather is not None and "cuda" in triton.segment_linear_devices
    assert MetaNeuralNetwork(nn.Linear(4, 3), experts, backend="triton", executor="grouped").executor == "grouped"
    # auto does not pick it on CPU (interpreter only, and not bitwise the naive loop), and says why.
    auto = MetaNeuralNetwork(nn.Linear(4, 3), experts, backend="triton")
    assert auto.executor == "sequential" and "bitwise" in auto.executor_skipped["grouped"]
    assert MetaNeuralNetwork(nn.Linear(4, 3), experts, backend="torch").executor == "grouped"
    assert MetaNeuralNetwork(nn.Linear(4, 3), experts, backend="cpp").executor == "grouped"


def test_backend_status_without_a_device_asks_about_the_likely_one(monkeypatch):
    import torch

    from mnn_fast import backend_status

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert backend_status() == backend_status(expected)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backend_status() == backend_status("cuda")
