"""Small batches: a call costs per active expert, not per expert, and keeps the naive loop's bits.

At B = 1 most of the E experts have no rows. The default (grouped) executor must not read their
parameters (checking every expert's stacked weights for changes cost ~1 us per expert per call),
no executor may call them, and the eager inference path (the C++ ops at their direct entries) must
equal both ``naive_forward`` and the module's generic path, including after an inactive expert's
weights change.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from models import mlp, mlp_mnn
from mnn_fast import MetaNeuralNetwork
from mnn_fast.engine import stages
from mnn_fast.reference import naive_forward


class CountingParameters(dict):
    """A Linear's ``_parameters`` that counts reads (the module's attribute lookups go through it too)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.reads = 0

    def __getitem__(self, key):
        self.reads += 1
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.reads += 1
        return super().get(key, default)


def _counted(experts: list[nn.Module]) -> list[list[CountingParameters]]:
    counters = []
    for expert in experts:
        mine = []
        for layer in expert.modules():
            if isinstance(layer, nn.Linear):
                layer._parameters = CountingParameters(layer._parameters)
                mine.append(layer._parameters)
        counters.append(mine)
    return counters


def one_hot_switch(d_in: int, classes: int, hot: int) -> nn.Module:
    """A switch that gives every input probability ~1 for class ``hot`` (so only expert ``hot`` runs)."""
    switch = nn.Linear(d_in, classes)
    with torch.no_grad():
        switch.weight.zero_()
        switch.bias.zero_()
        switch.bias[hot] = 20.0
    return switch.eval()


def test_inactive_experts_parameters_are_not_read_after_the_first_call():
    # E = 60 and one sample waking expert 17: the grouped executor reads expert 17's parameters to
    # hand them to its op, and no other expert's (the first call stacks them all, once, for compiled
    # calls).
    classes, hot = 60, 17
    _, specialists = mlp_mnn(classes, seed=3)
    counters = _counted(specialists)
    mnn = MetaNeuralNetwork(one_hot_switch(24, classes, hot), specialists, threshold=0.5)
    assert mnn.executor == "grouped"  # the default for MLP specialists
    x = torch.randn(1, 24)
    with torch.no_grad():
        mnn(x)
        for mine in counters:
            for c in mine:
                c.reads = 0
        got = mnn(x)
    reads = [sum(c.reads for c in mine) for mine in counters]
    assert reads[hot] > 0
    assert [e for e, n in enumerate(reads) if n] == [hot]
    assert torch.equal(got, naive_forward(mnn.switch, specialists, x, threshold=0.5))


def test_the_serving_path_reads_the_experts_own_weights_not_the_stacked_copy():
    # Eager inference hands segment_linear_experts each active expert's own parameters: a stacked
    # copy (built here as compiled calls build it) is never read, so zeroing it changes nothing.
    switch, specialists = mlp_mnn(8, seed=7)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.05)
    assert mnn.executor == "grouped"
    x = torch.randn(9, 24)
    with torch.no_grad():
        mnn(x)
        assert not mnn._grouped._cache.value  # eager calls alone never stack
        with mnn.weights_stacked_for_compiled_calls():
            stacks = mnn._grouped._cache.value
        assert stacks
        for stack in stacks:
            stack.zero_()
        assert torch.equal(mnn(x), naive_forward(switch, specialists, x, threshold=0.05))


@pytest.mark.parametrize("executor", ["sequential", "grouped"])
def test_inactive_experts_are_not_called(executor):
    # The naive loop calls only the experts with rows; so must every executor (grouped calls none:
    # it runs their stacked weights).
    classes, hot = 30, 4
    _, specialists = mlp_mnn(classes, seed=4)
    called = []
    for e, expert in enumerate(specialists):
        expert.register_forward_pre_hook(lambda module, args, e=e: called.append(e))
    mnn = MetaNeuralNetwork(one_hot_switch(24, classes, hot), specialists, threshold=0.5, executor=executor)
    with torch.no_grad():
        mnn(torch.randn(3, 24))
    assert set(called) <= {hot}
    assert (called == [hot]) == (executor == "sequential")


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
def test_one_sample_one_active_expert_of_a_hundred_is_bitwise(threads):
    # The serving case at its smallest: B = 1, E = 100, one expert with one row; and the same batch
    # routed by the trained-like random switch (one to a few experts).
    classes = 100
    switch, specialists = mlp_mnn(classes, seed=5)
    x = torch.randn(1, 24)
    for sw, threshold in ((one_hot_switch(24, classes, 63), 0.5), (switch, 0.011)):
        mnn = MetaNeuralNetwork(sw, specialists, threshold=threshold)
        with torch.no_grad():
            got, routing = mnn(x, return_routing=True)
            want, want_routing = naive_forward(sw, specialists, x, threshold=threshold, return_routing=True)
        assert routing.perm.numel() >= 1
        assert torch.equal(got, want)
        for a, b in zip(routing, want_routing):
            assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("change", ["in_place", "new_parameter"])
def test_an_inactive_experts_change_shows_when_it_becomes_active(mode, change):
    # Only active experts' slices are checked: a change made while an expert has no rows must still
    # show on its next call with rows (in place: an optimizer step; new: a parameter assigned anew).
    # inference_mode: the stacks built there are inference tensors, which outside it cannot be
    # updated in place (the executor restacks instead).
    classes, first, second = 12, 2, 9
    _, specialists = mlp_mnn(classes, seed=6)
    x = torch.randn(2, 24)
    routed_to = {e: MetaNeuralNetwork(one_hot_switch(24, classes, e), specialists, threshold=0.5)
                 for e in (first, second)}
    build = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    with build():
        for mnn in routed_to.values():
            mnn(x)
    layer = specialists[second][0]
    with torch.no_grad():
        if change == "in_place":
            layer.weight.mul_(-1.5)
        else:
            layer.weight = nn.Parameter(layer.weight * -1.5)
    with torch.no_grad():
        routed_to[first](x)  # the changed expert is inactive here
        got = routed_to[second](x)
        want = naive_forward(routed_to[second].switch, specialists, x, threshold=0.5)
    assert torch.equal(got, want)


# Each case an edge of the serving path: an empty batch, nothing routed (t = 1), everything routed
# (t = 0), top-k with and without a threshold, overlapping groups (group scores), binary specialists,
# one expert, a switch_fn mask, an input that a Flatten turns into rows; for the sequential executor
# also binary and width-C specialists mixed (contributions expert by expert), and rows of 64 bytes
# (one gathered buffer, where other widths get each expert's rows from gather_split). Each at 1 and
# 3 intra-op threads: the kernels split their work by the count, and the bits must not change.
CASES = {
    "empty": dict(batch=0),
    "nothing": dict(threshold=1.0),
    "everything": dict(threshold=0.0),
    "top_k": dict(threshold=None, top_k=2),
    "top_k_threshold": dict(threshold=0.05, top_k=3),
    "groups": dict(groups=[[0, 1], [1, 2, 3], [4], [5, 0]], experts=4),
    "binary": dict(widths=[1] * 6),
    "one_expert": dict(groups=[[0, 1, 2, 3, 4, 5]], experts=1),
    "switch_fn": dict(switch_fn=lambda s: s > s.mean(1, keepdim=True)),
    "flatten": dict(flatten=True),
}
SEQUENTIAL_ONLY = {"mixed_widths": dict(widths=[1, 6, 6, 1, 6, 1]), "aligned_rows": dict(features=16)}
SERVED = [(case, executor) for case in CASES for executor in ("grouped", "sequential")]
SERVED += [(case, "sequential") for case in SEQUENTIAL_ONLY]


@pytest.mark.parametrize("case,executor", SERVED)
@pytest.mark.parametrize("threads", [1, 3], indirect=True)
def test_serving_path_equals_the_generic_path_and_the_naive_loop(case, executor, threads, monkeypatch):
    spec = dict(batch=5, threshold=0.1, top_k=None, groups=None, experts=6, widths=None, switch_fn=None, flatten=False,
                features=24)
    spec.update({**CASES, **SEQUENTIAL_ONLY}[case])
    classes, features = 6, spec["features"]
    torch.manual_seed(7)
    switch = mlp(features, classes).eval()
    specialists = [mlp(features, w).eval() for w in (spec["widths"] or [classes] * spec["experts"])]
    x = torch.randn(spec["batch"], features)
    if spec["flatten"]:
        switch = nn.Sequential(nn.Flatten(), switch)
        specialists = [nn.Sequential(nn.Flatten(), s) for s in specialists]
        x = x.view(-1, 4, 6)
    kwargs = dict(groups=spec["groups"], threshold=spec["threshold"], top_k=spec["top_k"])
    mnn = MetaNeuralNetwork(switch, specialists, num_classes=classes, switch_fn=spec["switch_fn"], executor=executor,
                            **kwargs)
    assert mnn.executor == executor
    generic_routes = []  # only the generic path routes through stages.route_batch
    route_batch = stages.route_batch
    monkeypatch.setattr(stages, "route_batch", lambda *args: generic_routes.append(1) or route_batch(*args))
    with torch.no_grad():
        served, routing = mnn(x, return_routing=True)
    assert generic_routes == []
    # With grad mode on and nothing requiring grad, the module takes its generic path (stages and
    # backend ops through their Python wrappers), with the same executor.
    for p in mnn.parameters():
        p.requires_grad_(False)
    with torch.enable_grad():
        generic, generic_routing = mnn(x, return_routing=True)
    assert generic_routes == [1]
    with torch.no_grad():
        want = naive_forward(switch, specialists, x, switch_fn=spec["switch_fn"], **kwargs)
    assert torch.equal(served, generic)
    assert torch.equal(served, want)
    for a, b in zip(routing, generic_routing):
        assert torch.equal(a, b)


def test_a_grouped_mlp_call_is_one_entry_call_after_the_switch(monkeypatch):
    # Each Python step after the switch runs cold in a one-sample call (the GEMVs evicted it): with
    # grouped MLP specialists the whole rest is one grouped_forward call, and no other op is called.
    switch, specialists = mlp_mnn(10, seed=8)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.05)
    calls = []

    def counted(name, fn):
        return lambda *args: calls.append(name) or fn(*args)

    ops = mnn._inference
    mnn._inference = dataclasses.replace(ops, **{
        name: counted(name, getattr(ops, name)) for name in ("softmax_rows", "group_scores", "route", "recombine",
                                                             "segment_linear", "segment_linear_experts",
                                                             "gather_split", "grouped_forward")})
    x = torch.randn(1, 24)
    with torch.no_grad():
        got, routing = mnn(x, return_routing=True)
    assert calls == ["grouped_forward"]
    want, want_routing = naive_forward(switch, specialists, x, threshold=0.05, return_routing=True)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(routing, want_routing))


@pytest.mark.parametrize("change", ["threshold", "top_k"])
def test_a_new_threshold_or_top_k_applies_to_the_next_call(change):
    # The serving path keeps its op arguments between calls; setting either must reach the next one.
    switch, specialists = mlp_mnn(10, seed=9)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.05)
    x = torch.randn(6, 24)
    with torch.no_grad():
        before = mnn(x, return_routing=True)[1].perm.numel()
        setattr(mnn, change, 0.3 if change == "threshold" else 1)
        got, routing = mnn(x, return_routing=True)
        want = naive_forward(switch, specialists, x, threshold=mnn.threshold, top_k=mnn.top_k)
    assert routing.perm.numel() < before
    assert torch.equal(got, want)


def test_with_a_switch_fn_the_serving_arguments_are_built_once(monkeypatch):
    # A switch_fn takes the op-by-op path; the width-dependent arguments it shares with the one-call
    # path are still kept between calls (they were rebuilt on every call), and stay exact.
    switch, specialists = mlp_mnn(10, seed=10)
    rule = lambda scores: scores > 0.05  # noqa: E731
    mnn = MetaNeuralNetwork(switch, specialists, switch_fn=rule)
    built = []
    build = mnn._serve_arguments
    monkeypatch.setattr(mnn, "_serve_arguments", lambda *args: built.append(1) or build(*args))
    with torch.no_grad():
        for batch in (1, 5, 1):
            x = torch.randn(batch, 24)
            assert torch.equal(mnn(x), naive_forward(switch, specialists, x, switch_fn=rule))
    assert built == [1]


def test_a_repeated_call_skips_the_serving_setup(monkeypatch):
    # After the first serving call, forward goes straight to the switch and the entry: the setup in
    # _serve (input checks, building the entry's arguments) is not run again.
    switch, specialists = mlp_mnn(10, seed=11)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.05)
    x = torch.randn(1, 24)
    with torch.no_grad():
        mnn(x)
        serve = mnn._serve
        served = []
        monkeypatch.setattr(mnn, "_serve", lambda *args: served.append(1) or serve(*args))
        got, routing = mnn(x, return_routing=True)
        assert torch.equal(mnn(x), got)
        want, want_routing = naive_forward(switch, specialists, x, threshold=0.05, return_routing=True)
    assert served == []
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(routing, want_routing))


@pytest.mark.parametrize("change", ["new_switch", "switch_fn", "module_dtype", "input_dtype", "input_rank",
                                    "logits_width"])
@pytest.mark.parametrize("executor", ["grouped", "sequential"])
def test_the_short_path_sees_what_changed_since_the_last_call(change, executor):
    # forward's short path reuses what the last serving call checked; each change here must still
    # take effect (or be refused) on the next call, as it does on a module never called before.
    torch.manual_seed(12)
    classes, features = 6, 24
    switch = mlp(features, classes).eval()
    specialists = [mlp(features, classes).eval() for _ in range(classes)]
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.1, executor=executor)
    x = torch.randn(3, features)
    with torch.no_grad():
        mnn(x)
        if change == "new_switch":
            mnn.switch = mlp(features, classes).eval()
            assert torch.equal(mnn(x), naive_forward(mnn.switch, specialists, x, threshold=0.1))
        elif change == "switch_fn":
            mnn.switch_fn = lambda scores: scores > 0.3
            assert torch.equal(mnn(x), naive_forward(switch, specialists, x, switch_fn=mnn.switch_fn))
        elif change == "module_dtype":
            mnn.double()
            with pytest.raises(TypeError, match="switch's parameters are torch.float64"):
                mnn(x)
        elif change == "input_dtype":
            with pytest.raises(TypeError, match="x is torch.float64 but the switch's parameters are torch.float32"):
                mnn(x.double())
        elif change == "input_rank":
            with pytest.raises(ValueError, match="at least 2 dimensions"):
                mnn(x[0])
        else:  # a switch that now returns fewer classes than the groups name
            mnn.switch = nn.Sequential(switch, nn.Linear(classes, classes - 1)).eval()
            with pytest.raises(ValueError, match="C=5"):
                mnn(x)
