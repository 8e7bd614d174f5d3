"""Detachable MNNs (SPEC section 9): at full depth the ordinary MNN with the same weights, at each depth
the naive loop over the detached specialists, per sample the naive loop over the same virtual experts.

Reference: ``naive_forward`` on standalone copies (``detach_layers``), never on the shared sub-networks.
"""
import pytest
import torch
from torch import nn

from conftest import CPU_BACKENDS
from mnn_fast import MetaNeuralNetwork
from mnn_fast.nsn import DetachableMLP
from mnn_fast.nsn.mnn import ConfidenceDepth, detachable_mnn, sub_network
from mnn_fast.reference import naive_forward

D, C = 13, 6  # an odd width: the engine's alignment path is exercised too


def parts(seed=0, groups=None):
    torch.manual_seed(seed)
    switch = nn.Sequential(nn.Flatten(), nn.Linear(D, C))
    experts = [DetachableMLP(D, C, depth=2).eval() for _ in range(len(groups) if groups else C)]
    x = torch.randn(120, D) * 2
    return switch, experts, x


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("groups", [None, [[0, 1], [2], [3, 4, 5]]])
def test_full_depth_equals_the_ordinary_mnn_with_the_same_weights(backend, groups):
    switch, experts, x = parts(1, groups)
    detachable = detachable_mnn(switch, experts, 2, groups=groups, threshold=0.1, num_classes=C, backend=backend)
    ordinary = MetaNeuralNetwork(switch, [e.detach_layers(0) for e in experts], groups=groups, threshold=0.1,
                                 num_classes=C, backend=backend)
    with torch.no_grad():
        assert torch.equal(detachable(x), ordinary(x))


@pytest.mark.parametrize("executor", ["auto", "sequential"])
@pytest.mark.parametrize("depth", [0, 1, 2])
def test_each_depth_equals_the_naive_loop_over_detached_specialists(depth, executor):
    switch, experts, x = parts(2)
    mnn = detachable_mnn(switch, experts, depth, threshold=0.1, executor=executor)
    assert mnn.executor == ("grouped" if executor == "auto" else "sequential")  # a Linear stack at every depth
    detached = [e.detach_layers(2 - depth) for e in experts]
    with torch.no_grad():
        assert torch.equal(mnn(x), naive_forward(switch, detached, x, threshold=0.1))


def test_per_sample_depth_follows_the_rule_and_equals_the_naive_loop():
    switch, experts, x = parts(3)
    rule = ConfidenceDepth([0.6, 0.35])
    virtual = [e.detach_layers(2 - d) for d in range(3) for e in experts]
    for executor in ("auto", "sequential"):
        mnn = detachable_mnn(switch, experts, rule, threshold=0.1, executor=executor)
        # auto: one grouped Linear stack per depth (GroupedLinearRuns), the depths' experts being contiguous.
        assert mnn.executor == ("grouped" if executor == "auto" else "sequential")
        with torch.no_grad():
            got, routing = mnn(x, return_routing=True)
            want = naive_forward(switch, virtual, x, groups=[[c] for c in range(C)] * 3, switch_fn=mnn.switch_fn)
            assert torch.equal(got, want)
        probs = torch.softmax(switch(x), 1)
    # Which depth each sample's rows ran at: confident samples shallow, unsure ones deep.
    depth_of_row = (torch.searchsorted(routing.offsets, torch.arange(routing.perm.numel()), right=True) - 1) // C
    want_depth = (probs.amax(1)[:, None] < torch.tensor([0.6, 0.35])).sum(1)
    assert torch.equal(depth_of_row, want_depth[routing.perm])
    assert set(want_depth.tolist()) == {0, 1, 2}  # the case covers all three depths


def test_sub_networks_share_the_bases_layers():
    model = DetachableMLP(D, C, depth=2)
    net = sub_network(model, 1)
    assert net[1] is model.hidden[1] and net[-1] is model.output
    with pytest.raises(ValueError, match="depth"):
        sub_network(model, 3)


def test_bad_rules_are_refused():
    with pytest.raises(ValueError, match="strictly decreasing"):
        ConfidenceDepth([0.3, 0.6])
    switch, experts, _ = parts()
    with pytest.raises(ValueError, match="cutoffs for 2 depths"):
        detachable_mnn(switch, experts, ConfidenceDepth([0.5]))
    with pytest.raises(TypeError, match="DetachableMLP"):
        detachable_mnn(switch, [nn.Linear(D, C)], 0)
