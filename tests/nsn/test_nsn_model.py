"""DetachableMLP: sub-model k is the base's last k hidden layers plus its output layer, reading raw input."""
import pytest
import torch
from torch import nn

from mnn_fast.nsn import DetachableMLP, linear_macs


def by_hand(model, x, depth):
    """The definition: drop the first n - depth layers, run the rest (ReLU after each hidden layer)."""
    h = x
    for layer in list(model.hidden)[model.depth - depth:]:
        h = torch.relu(h @ layer.weight.T + layer.bias)
    return h @ model.output.weight.T + model.output.bias


@pytest.mark.parametrize("n", [0, 1, 2, 4])
def test_every_depth_is_the_bases_last_layers(n):
    torch.manual_seed(n)
    model = DetachableMLP(7, 3, depth=n).eval()
    x = torch.randn(11, 7)
    for depth in range(n + 1):
        torch.testing.assert_close(model(x, depth=depth), by_hand(model, x, depth), rtol=0, atol=1e-6)
    assert torch.equal(model(x), model(x, depth=n))


@pytest.mark.parametrize("removed", [0, 1, 2])
def test_detaching_returns_a_standalone_working_module(removed):
    torch.manual_seed(0)
    model = DetachableMLP(6, 4, depth=2, dropout=0.5)
    detached = model.detach_layers(removed)
    x = torch.randn(9, 1, 6)  # [B, ...] is flattened like the base does
    model.eval()
    assert torch.equal(detached(x), model(x, depth=2 - removed))
    linears = [m for m in detached if isinstance(m, nn.Linear)]
    assert len(linears) == 3 - removed
    assert sum(m.weight.numel() for m in linears) == linear_macs(6, 4, 2 - removed)
    with torch.no_grad():  # a copy: training the detached module leaves the base alone
        linears[-1].weight.add_(1.0)
    assert not torch.equal(linears[-1].weight, model.output.weight)


def test_bad_depths_are_value_errors_naming_the_argument():
    model = DetachableMLP(4, 2, depth=2)
    with pytest.raises(ValueError, match=r"depth must be an int in \[0, 2\]"):
        model(torch.randn(3, 4), depth=3)
    with pytest.raises(ValueError, match=r"removed must be an int in \[0, 2\]"):
        model.detach_layers(-1)
    with pytest.raises(ValueError, match="in_features"):
        DetachableMLP(0, 2)
    with pytest.raises(ValueError, match="dropout"):
        DetachableMLP(4, 2, dropout=1.0)
