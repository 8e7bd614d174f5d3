"""Bad input gets a ValueError/TypeError naming the argument, never a crash, hang or wrong answer."""
import math

import pytest
import torch
from torch import nn

from models import mlp_mnn
from mnn_fast import MetaNeuralNetwork, route
from mnn_fast.engine.backends import get_backend
from mnn_fast.reference import naive_forward


@pytest.fixture
def nets():
    return mlp_mnn(4, seed=11)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(groups=[[0], [1], [], [3]]), ValueError, r"groups\[2\] is empty"),
        (dict(groups=[[0], [1], [2, 2], [3]]), ValueError, r"groups\[2\].*repeats"),
        (dict(groups=[[0], [1], [-1], [3]]), ValueError, r"groups\[2\] has class -1"),
        (dict(groups=[[0], [1], [9], [3]], num_classes=4), ValueError, r"groups\[2\] has class 9.*\[0, 4\)"),
        (dict(groups=[[0], [1], [2]]), ValueError, "groups has 3 entries but there are 4 specialists"),
        (dict(groups=[[0], [1], ["a"], [3]]), TypeError, r"groups\[2\] must hold integer"),
        (dict(groups="0123"), TypeError, "groups must be a list"),
        (dict(threshold=1.5), ValueError, r"threshold must be in \[0, 1\], got 1.5"),
        (dict(threshold=-0.1), ValueError, "threshold must be in"),
        (dict(threshold=math.nan), ValueError, "threshold must be in"),
        (dict(threshold="0.2"), TypeError, "threshold must be a float"),
        (dict(threshold=None), ValueError, "threshold=None needs top_k"),
        (dict(top_k=0), ValueError, r"top_k must be in \[1, E=4\], got 0"),
        (dict(top_k=5), ValueError, r"top_k must be in \[1, E=4\], got 5"),
        (dict(top_k=2.0), TypeError, "top_k must be an int"),
        (dict(top_k=True), TypeError, "top_k must be an int"),
        (dict(backend="fast"), ValueError, "backend must be 'auto' or one of"),
        (dict(num_classes=5), ValueError, "one specialist per class"),
        (dict(switch_fn=3), TypeError, "switch_fn must be callable"),
    ],
)
def test_constructor_rejects(nets, kwargs, exc, match):
    switch, specialists = nets
    with pytest.raises(exc, match=match):
        MetaNeuralNetwork(switch, specialists, **kwargs)


def test_constructor_rejects_non_modules(nets):
    switch, specialists = nets
    with pytest.raises(TypeError, match="switch must be an nn.Module"):
        MetaNeuralNetwork(lambda x: x, specialists)
    with pytest.raises(TypeError, match=r"specialists\[1\] must be an nn.Module"):
        MetaNeuralNetwork(switch, [specialists[0], "expert"])
    with pytest.raises(ValueError, match="specialists is empty"):
        MetaNeuralNetwork(switch, [])


def test_threshold_setter_validates(nets):
    mnn = MetaNeuralNetwork(*nets)
    with pytest.raises(ValueError, match="threshold must be in"):
        mnn.threshold = 2
    mnn.threshold = 0.6
    assert mnn.threshold == 0.6


@pytest.mark.parametrize(
    "x,exc,match",
    [
        (torch.randint(0, 3, (5, 24)), TypeError, "x must be a floating-point tensor"),
        (torch.randn(24), ValueError, r"x must have shape \[B, ...\]"),
        ([[0.0] * 24], TypeError, "x must be a torch.Tensor"),
        (torch.randn(5, 24, device="meta"), ValueError, "x is on meta but the module is on cpu"),
    ],
)
def test_forward_rejects_bad_inputs(nets, x, exc, match):
    with pytest.raises(exc, match=match):
        MetaNeuralNetwork(*nets)(x)


def test_switch_with_wrong_output_shape(nets):
    _, specialists = nets
    with pytest.raises(ValueError, match=r"switch must return logits of shape \[B=5, C\]"):
        MetaNeuralNetwork(nn.Sequential(nn.Linear(24, 4), nn.Unflatten(1, (2, 2))), specialists)(torch.randn(5, 24))


def test_classes_disagree_with_groups(nets):
    switch, specialists = nets  # the switch returns C=4
    with pytest.raises(ValueError, match="groups name class 6 but the switch returns only C=4"):
        MetaNeuralNetwork(switch, specialists, groups=[[0], [1], [6], [3]])(torch.randn(5, 24))
    wide = nn.Linear(24, 7)
    with pytest.raises(ValueError, match="switch returned C=7 logits but the module expects C=4"):
        MetaNeuralNetwork(wide, specialists)(torch.randn(5, 24))


def test_specialist_with_wrong_output_shape(nets):
    switch, specialists = nets
    specialists[2] = nn.Linear(24, 3)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.0)
    with pytest.raises(ValueError, match=r"specialists\[2\] must return logits of shape \[n, C=4\] \(or \[n, 1\]\), got \(\d+, 3\)"):
        mnn(torch.randn(8, 24))


class _DropsARow(nn.Module):
    # A specialist that loses a row (a bad reshape, say) would misalign every later row's logits.
    def forward(self, x):
        return torch.zeros(x.shape[0] - 1, 4)


@pytest.mark.parametrize("executor", ["sequential", "streams"])
def test_specialist_returning_other_row_count(nets, executor):
    switch, specialists = nets
    specialists[1] = _DropsARow()
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.0, executor=executor).eval()
    with pytest.raises(ValueError, match=r"specialists\[1\] must return one row of logits per input row \(8\), got \(7, 4\)"):
        with torch.no_grad():
            mnn(torch.randn(8, 24))


def test_binary_specialist_needs_single_class_group(nets):
    switch, specialists = nets
    specialists[0] = nn.Linear(24, 1)
    mnn = MetaNeuralNetwork(switch, specialists, groups=[[0, 1], [1], [2], [3]], threshold=0.0)
    with pytest.raises(ValueError, match=r"specialists\[0\] returns one logit \(binary\) but its group has 2 classes"):
        mnn(torch.randn(8, 24))


def test_switch_fn_must_return_bool_mask(nets):
    mnn = MetaNeuralNetwork(*nets, switch_fn=lambda s: s > 0.2)
    mnn(torch.randn(3, 24))
    mnn.switch_fn = lambda s: (s > 0.2).float()
    with pytest.raises(ValueError, match=r"switch_fn must return a bool tensor of shape \(3, 4\), got torch.float32"):
        mnn(torch.randn(3, 24))


def test_nan_and_inf_logits_are_contained(nets):
    """Documented: a sample whose logits hold NaN or +inf activates no expert and comes out NaN;
    the other samples of the batch are unaffected (up to the specialists' own arithmetic, which sees
    fewer rows: exactly what the naive loop gives on the same batch)."""

    class Poisoned(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            z = self.inner(x).clone()
            z[1, 2] = math.nan
            z[3, 0] = math.inf
            return z

    switch, specialists = nets
    clean = MetaNeuralNetwork(switch, specialists, threshold=0.0)
    poisoned = MetaNeuralNetwork(Poisoned(switch), specialists, threshold=0.0)
    x = torch.randn(6, 24)
    with torch.no_grad():
        out, routing = poisoned(x, return_routing=True)
        ok = clean(x)
    assert torch.isnan(out[[1, 3]]).all()
    keep = [0, 2, 4, 5]
    assert torch.equal(out[keep], naive_forward(Poisoned(switch), specialists, x, threshold=0.0)[keep])
    torch.testing.assert_close(out[keep], ok[keep], rtol=0, atol=1e-5)
    assert not torch.isin(routing.perm, torch.tensor([1, 3])).any()


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((torch.rand(4, 3, 2),), {}, ValueError, r"probs must have shape \[B, C\]"),
        ((torch.ones(4, 3, dtype=torch.long),), {}, TypeError, "probs must be a floating-point tensor"),
        ((torch.rand(4, 3),), dict(groups=[[0], [5]]), ValueError, r"groups\[1\] has class 5"),
        ((torch.rand(4, 3),), dict(top_k=4), ValueError, r"top_k must be in \[1, E=3\]"),
        ((torch.rand(4, 3),), dict(threshold=float("nan")), ValueError, "threshold must be in"),
        ((torch.rand(4, 3),), dict(backend="cuda"), ValueError, "backend='cuda' cannot run on cpu"),
    ],
)
def test_route_rejects(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        route(*args, **kwargs)


def test_kernels_reject_bad_tensors_without_crashing():
    ops = get_backend("cpp")
    scores = torch.rand(5, 3)
    with pytest.raises(TypeError, match="route: scores must be a 2-D float32 tensor"):
        ops.route(scores.double(), 0.1, 0)
    with pytest.raises(ValueError, match="route: scores must be a 2-D float32 tensor"):
        ops.route(scores[:, None], 0.1, 0)
    with pytest.raises(ValueError, match=r"perm values must be in \[0, B\)"):
        ops.gather(torch.randn(5, 2), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="top_k must be 0"):
        ops.route(scores, 0.1, 4)
    with pytest.raises(ValueError, match="sample_rows values must be in"):
        ops.combine(torch.zeros(2, 3), torch.zeros(1, 3), torch.tensor([0]), torch.tensor([0, 1, 1]), torch.tensor([5]))


# Friction a new user met with torchvision-style models (issue 10): each error says what to do.

def test_fewer_specialists_than_classes_without_groups_says_groups_is_needed():
    switch = nn.Linear(6, 10)
    mnn = MetaNeuralNetwork(switch, [nn.Linear(6, 10) for _ in range(5)])
    with pytest.raises(ValueError, match=r"expects C=5: without groups= .* pass groups="):
        mnn(torch.randn(4, 6))


def test_unbatched_image_is_named_as_unbatched():
    conv = lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(0), nn.Linear(4, 3))
    mnn = MetaNeuralNetwork(conv(), [conv() for _ in range(3)]).eval()
    with pytest.raises(ValueError, match=r"looks unbatched: pass a batch, e.g. x.unsqueeze\(0\)"):
        mnn(torch.randn(3, 8, 8))


def test_input_dtype_differing_from_the_module_is_a_type_error_naming_both():
    mnn = MetaNeuralNetwork(nn.Linear(6, 3), [nn.Linear(6, 3) for _ in range(3)])
    with pytest.raises(TypeError, match="x is torch.float16 but the switch's parameters are torch.float32"):
        mnn(torch.randn(4, 6, dtype=torch.float16))


def test_batchnorm_specialist_in_training_mode_on_one_row_says_call_eval():
    def net():
        return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    switch = nn.Linear(6, 3)
    with torch.no_grad():  # sample 0 goes to expert 0 only, the rest to expert 2: expert 0 gets one row
        switch.weight.zero_()
        switch.weight[0, 0], switch.weight[2, 0] = 10.0, -10.0
        switch.bias.copy_(torch.tensor([0.0, -50.0, 0.0]))
    mnn = MetaNeuralNetwork(switch, [net() for _ in range(3)], top_k=1, threshold=None, executor="sequential")
    x = torch.randn(5, 6)
    x[:, 0] = torch.tensor([1.0, -1.0, -1.0, -1.0, -1.0])
    with pytest.raises(ValueError, match=r"call mnn.eval\(\) for inference"):
        mnn(x)
    mnn.eval()
    assert mnn(x).shape == (5, 3)
