"""Auxiliary heads on label groups (SPEC section 8): a frozen base, one hidden stack per group wired
only to that group's logits, the classifier retrained; multiply-add overhead measured."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mnn_fast.groups.heads import DEFAULT_HEAD_HIDDEN, AuxHeadNet, base_features, count_macs, head_overhead, train_heads
from mnn_fast.training.models import build_model


# ------------------------------------------------------------------------------ auxiliary heads

@pytest.mark.parametrize("name,shape", [("mlp", (1, 8, 8)), ("small_cnn", (1, 8, 8)), ("resnet20", (3, 32, 32)),
                                        ("mobilenet_v2", (3, 32, 32))])
def test_untrained_heads_reproduce_the_base(name, shape):
    # The split must cut exactly at the classifier input of every build_model architecture: with
    # the output layers of the heads at zero, the net's logits are the base's, bit for bit.
    torch.manual_seed(0)
    base = build_model(name, 10, shape).eval()
    net = AuxHeadNet(base, [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]])
    x = torch.randn(2, *shape)
    assert torch.equal(net(x), base(x))
    assert not any(p.requires_grad for p in net.body.parameters())
    trainable = {id(p) for p in net.trainable_parameters()}
    assert trainable == {id(p) for p in [*net.classifier.parameters(), *net.heads.parameters()]}


def test_train_heads_leaves_the_base_frozen():
    # small_cnn has BatchNorm: its running statistics must not move either (body stays in eval mode).
    torch.manual_seed(0)
    base = build_model("small_cnn", 6, (1, 8, 8)).eval()
    before_user = {k: v.clone() for k, v in base.state_dict().items()}
    net = AuxHeadNet(base, [[0, 3], [1], [2, 4, 5]], hidden=16)
    body_before = {k: v.clone() for k, v in net.body.state_dict().items()}
    clf_before = {k: v.clone() for k, v in net.classifier.state_dict().items()}
    heads_before = [p.clone() for p in net.heads.parameters()]
    x, y = torch.randn(96, 1, 8, 8), torch.randint(0, 6, (96,))
    train_heads(net, x, y, epochs=2, lr=1e-2, batch_size=32, seed=0)
    assert any("running_mean" in k for k in body_before)
    assert all(torch.equal(v, net.body.state_dict()[k]) for k, v in body_before.items())
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before_user.items())
    assert any(not torch.equal(v, net.classifier.state_dict()[k]) for k, v in clf_before.items())
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, net.heads.parameters()))
    net.train()
    assert net.training and not net.body.training


def test_a_head_only_touches_its_groups_logits():
    # Connectivity: head g feeds only the output units of G_g.
    torch.manual_seed(0)
    groups = [[0, 3], [1], [2, 4, 5]]
    net = AuxHeadNet(build_model("mlp", 6, (1, 4, 4)), groups, hidden=8, depth=2)
    x = torch.randn(16, 1, 4, 4)
    ref = net(x)
    for g, members in enumerate(groups):
        with torch.no_grad():
            for p in net.heads[g].parameters():
                p.add_(torch.randn_like(p))
        diff = (net(x) - ref).abs().amax(0)
        outside = [c for c in range(6) if c not in members]
        assert diff[members].gt(0).all() and diff[outside].eq(0).all()
        ref = net(x)


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    return build_model("resnet20", 10, (3, 32, 32)).eval()


@pytest.mark.parametrize("groups", [[[c] for c in range(10)], [list(range(10))], [[0, 1, 8, 9], [2, 3, 4, 5, 6, 7]],
                                    [[0], [1, 2], [3, 4, 5], [6, 7, 8, 9]]])
def test_resnet20_head_overhead_at_most_5_percent(resnet20, groups):
    # The default head width is meant as a cheap augmentation: <= 5% of ResNet-20's multiply-adds for
    # any partition of the 10 CIFAR classes (ten singletons, the first case, is the most expensive).
    net = AuxHeadNet(resnet20, groups)
    assert net.hidden == DEFAULT_HEAD_HIDDEN
    cost = head_overhead(net, (1, 3, 32, 32))
    assert 40_000_000 < cost["base_macs"] < 42_000_000  # ResNet-20's well-known ~41M
    assert cost["head_macs"] == net.head_macs() > 0  # measured = analytic count of the heads' Linears
    assert cost["overhead"] <= 0.05
    assert count_macs(net, (1, 3, 32, 32)) == cost["total_macs"]


def test_classifier_only_training_leaves_heads_at_zero():
    # The classifier_refit control must differ from the base only in its last layer.
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    net = AuxHeadNet(base, [[0, 1], [2, 3]], hidden=8)
    before = net.classifier.weight.clone()
    train_heads(net, torch.randn(64, 6), torch.randint(0, 4, (64,)), epochs=2, classifier_only=True)
    assert not torch.equal(net.classifier.weight, before)
    assert all(torch.count_nonzero(h[-1].weight) == 0 for h in net.heads)



def test_shared_features_train_the_same_heads():
    # The report computes the base's features once for all its rows; that must change nothing.
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    x, y = torch.randn(64, 6), torch.randint(0, 4, (64,))
    own, shared = (AuxHeadNet(base, [[0, 1], [2, 3]], hidden=8) for _ in range(2))
    shared.load_state_dict(own.state_dict())
    train_heads(own, x, y, epochs=2)
    train_heads(shared, x, y, epochs=2, features=base_features(shared, x))
    assert all(torch.equal(a, b) for a, b in zip(own.state_dict().values(), shared.state_dict().values()))
    with pytest.raises(ValueError, match="features"):
        train_heads(shared, x, y, features=torch.zeros(63, 5))
