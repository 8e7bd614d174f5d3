"""``serve_sequential_forward``: the sequential executor's whole forward after the switch, in one call.

The reference is the same ops called one by one through ``torch.ops`` (softmax_rows, group_scores for
multi-class groups, route, gather_split, each active specialist on its rows, recombine): every output
bitwise equal. Where it cannot finish (outputs that are not float32 ``[n_e, C]``) it hands back the
routing and the outputs for the module to check and recombine; a specialist's error comes through
(explained where the module explains it); bad arguments are clear errors, never a crash. The module
tests at the end check that a sequential module's call is this one entry call and that everything a
user can see (hooks, replaced specialists, errors, inputs it does not take) behaves as before.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from mnn_fast import MetaNeuralNetwork
from mnn_fast.engine import stages
from mnn_fast.engine.contributions import class_tables
from mnn_fast.engine.inference_ops import inference_ops
from mnn_fast.reference import naive_forward

OPS = torch.ops.mnn_fast
DIRECT = inference_ops("cpp")


def ops_in_turn(z, x, threshold, top_k, groups, experts, tables):
    """The reference: ``(out, outputs, log_probs, *routing)`` by one op call at a time."""
    log_probs, probs = OPS.softmax_rows(z)
    scores = probs if groups is None else OPS.group_scores(probs, *groups)
    routing = OPS.route(scores, threshold, top_k)
    counts, offsets, perm, sample_offsets, sample_rows = routing
    parts = OPS.gather_split(x, perm, offsets)
    outputs = [expert(rows) if n else None for expert, rows, n in zip(experts, parts, counts.tolist())]
    logits = [y if y is not None else torch.empty(0, tables.num_classes) for y in outputs]
    readable = all(y.dtype == torch.float32 and y.shape == (n, tables.num_classes)
                   for y, n in zip(logits, counts.tolist()))
    out = OPS.recombine(log_probs, logits, offsets, tables.group_offsets, tables.group_classes, tables.log_spread,
                        sample_offsets, sample_rows) if readable else None
    return (out, outputs, log_probs, *routing)


def make(batch, experts, classes, seed=0, width=11):
    torch.manual_seed(seed)
    nets = nn.ModuleList([nn.Sequential(nn.Linear(width, 9), nn.Tanh(), nn.Linear(9, classes)) for _ in range(experts)])
    return torch.randn(batch, classes) * 3, torch.randn(batch, width), nets


def call(z, x, threshold, top_k, groups, nets, tables, routing=True, width=None):
    # No below_autograd() region: the entry steps below autograd itself.
    with torch.no_grad():
        return DIRECT.sequential_forward(z, x, routing, tables.num_classes, threshold, top_k, *(groups or (None, None)),
                                         x.shape[1] if width is None else width, nets._modules,
                                         stages.explain_expert_error, tables.group_offsets, tables.group_classes,
                                         tables.log_spread)


def same(got, want):
    return all((g is None and w is None) or torch.equal(g, w) for g, w in zip(got, want))


# B = 0 (nothing to route), B = 1 (the serving case), an odd batch; E = 1, an odd E, E = 200 (most
# experts idle); threshold alone, top-k alone, both, and t = 1 (no expert active).
@pytest.mark.parametrize("batch,experts", [(0, 4), (1, 1), (1, 200), (13, 7)])
@pytest.mark.parametrize("threshold,top_k", [(0.1, 0), (float("-inf"), 2), (0.05, 3), (1.0, 0)])
@pytest.mark.parametrize("threads", [1, 3], indirect=True)
def test_equals_the_ops_in_turn(batch, experts, threshold, top_k, threads):
    top_k = min(top_k, experts)
    z, x, nets = make(batch, experts, experts, seed=batch + experts)
    tables = class_tables([[e] for e in range(experts)], experts, torch.device("cpu"))
    with torch.no_grad():
        want = ops_in_turn(z, x, threshold, top_k, None, nets, tables)
    got = call(z, x, threshold, top_k, None, nets, tables)
    assert torch.equal(got[0], want[0]) and same(got[1], want[1])
    assert all(torch.equal(g, w) for g, w in zip(got[2:], want[2:]))


def test_multi_class_groups_equal_the_ops_in_turn():
    # Overlapping groups of several classes: the experts' scores come from group_scores.
    groups = [[0, 1], [1, 2, 3], [4], [0, 5, 6]]
    z, x, nets = make(17, len(groups), 7, seed=5)
    tables = class_tables(groups, 7, torch.device("cpu"))
    expert_groups = (tables.group_offsets, tables.group_classes)
    with torch.no_grad():
        want = ops_in_turn(z, x, 0.1, 0, expert_groups, nets, tables)
    got = call(z, x, 0.1, 0, expert_groups, nets, tables)
    assert torch.equal(got[0], want[0]) and all(torch.equal(g, w) for g, w in zip(got[2:], want[2:]))


def test_without_the_routing_asked_for_the_output_comes_alone():
    z, x, nets = make(6, 3, 3, seed=2)
    tables = class_tables([[0], [1], [2]], 3, torch.device("cpu"))
    out = call(z, x, 0.1, 0, None, nets, tables, routing=False)
    assert type(out) is torch.Tensor and torch.equal(out, call(z, x, 0.1, 0, None, nets, tables)[0])


# Logits of another width or rank, a non-tensor z, or x of another width than the one checked:
# nothing is done (no specialist runs) and the caller checks and explains.
@pytest.mark.parametrize("case", ["z width", "z rank", "z not a tensor", "x width"])
def test_inputs_other_than_those_checked_before_are_left_to_the_caller(case):
    z, x, nets = make(4, 3, 3)
    calls = []
    for net in nets:
        net.register_forward_pre_hook(lambda *args: calls.append(1))
    tables = class_tables([[0], [1], [2]], 3, torch.device("cpu"))
    z = {"z width": z[:, :2], "z rank": z[0], "z not a tensor": z.tolist(), "x width": z}[case]
    width = x.shape[1] + 1 if case == "x width" else None
    assert call(z, x, 0.1, 0, None, nets, tables, width=width) is None
    assert calls == []


# Outputs recombine cannot read as they are: float64, one logit (binary), a row count or a width
# that is wrong. The routing and the outputs come back; the module checks and recombines them.
@pytest.mark.parametrize("wrong", ["float64", "binary", "rows", "width"])
def test_outputs_it_cannot_read_come_back_for_the_caller(wrong):
    z, x, nets = make(9, 3, 3, seed=4)
    change = {"float64": lambda y: y.double(), "binary": lambda y: y[:, :1], "rows": lambda y: y[1:],
              "width": lambda y: y[:, :2]}[wrong]
    nets[1].register_forward_hook(lambda module, args, y: change(y))
    tables = class_tables([[0], [1], [2]], 3, torch.device("cpu"))
    with torch.no_grad():
        want = ops_in_turn(z, x, 0.0, 0, None, nets, tables)
    got = call(z, x, 0.0, 0, None, nets, tables)
    assert got[0] is None and want[0] is None
    assert same(got[1], want[1]) and all(torch.equal(g, w) for g, w in zip(got[2:], want[2:]))


def test_a_specialists_own_error_comes_through():
    z, x, nets = make(5, 2, 2)
    nets[0] = nn.Linear(3, 2)  # x has 11 features
    tables = class_tables([[0], [1]], 2, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        call(z, x, 0.0, 0, None, nets, tables)


def test_bad_arguments_are_clear_errors():
    z, x, nets = make(3, 2, 2)
    tables = class_tables([[0], [1]], 2, torch.device("cpu"))
    args = [z, x, True, 2, 0.1, 0, None, None, 11, nets._modules, stages.explain_expert_error,
            tables.group_offsets, tables.group_classes, tables.log_spread]
    with pytest.raises(TypeError, match="sequential_forward takes 14 arguments, got 13"):
        DIRECT.sequential_forward(*args[:-1])
    for index, value, message in [(9, list(nets), "experts must be a dict of modules, got list"),
                                  (10, 3, "explain must be callable, got int"),
                                  (6, tables.group_offsets, "group_offsets and group_classes must both be")]:
        bad = list(args)
        bad[index] = value
        with pytest.raises(TypeError, match=message):
            DIRECT.sequential_forward(*bad)


# ---------------------------------------------------------------- the module


def identity_mnn(experts=10, threshold=0.1):
    specialists = [nn.Identity() for _ in range(experts)]
    return MetaNeuralNetwork(nn.Identity(), specialists, threshold=threshold), specialists


def counted_ops(mnn):
    calls = []
    ops = mnn._inference
    mnn._inference = dataclasses.replace(ops, **{
        name: (lambda name, fn: lambda *args: calls.append(name) or fn(*args))(name, getattr(ops, name))
        for name in ("softmax_rows", "group_scores", "route", "recombine", "gather_split", "grouped_forward",
                     "sequential_forward")})
    return calls


@pytest.mark.parametrize("threads", [1, 3], indirect=True)
def test_a_sequential_call_is_one_entry_call_and_the_naive_loop(threads):
    # Rows of 10 floats (40 bytes: not a multiple of the fresh alignment) go through gather_split.
    mnn, specialists = identity_mnn()
    calls = counted_ops(mnn)
    x = torch.randn(37, 10) * 4
    with torch.no_grad():
        for _ in range(2):
            got, routing = mnn(x, return_routing=True)
            want, want_routing = naive_forward(nn.Identity(), specialists, x, threshold=0.1, return_routing=True)
            assert torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip(routing, want_routing))
    assert calls == ["sequential_forward"] * 2  # nothing else: no op called one by one


def test_rows_a_multiple_of_the_alignment_keep_the_workspace_path():
    # 16 floats = 64 bytes: segments of one gathered buffer are aligned; no per-expert allocation.
    mnn, specialists = identity_mnn(16)
    calls = counted_ops(mnn)
    x = torch.randn(20, 16) * 4
    with torch.no_grad():
        assert torch.equal(mnn(x), naive_forward(nn.Identity(), specialists, x, threshold=0.1))
    assert "sequential_forward" not in calls and "recombine" in calls


def test_hooks_run_and_a_replaced_specialist_is_the_one_called():
    mnn, specialists = identity_mnn(4, threshold=0.0)
    x = torch.randn(8, 4)
    seen = []
    mnn.specialists[2].register_forward_hook(lambda module, args, y: seen.append(y.shape[0]))
    with torch.no_grad():
        mnn(x)
        assert seen and seen[0] > 0
        doubled = nn.Sequential(nn.Identity())
        doubled.register_forward_hook(lambda module, args, y: y * 2)
        mnn.specialists[1] = doubled
        specialists[1] = doubled
        assert torch.equal(mnn(x), naive_forward(nn.Identity(), specialists, x, threshold=0.0))


def test_a_wrong_output_gets_the_modules_own_error():
    mnn, _ = identity_mnn(4, threshold=0.0)
    mnn.specialists[3].register_forward_hook(lambda module, args, y: y[1:])
    with torch.no_grad(), pytest.raises(ValueError, match=r"specialists\[3\] must return one row of logits per input"):
        mnn(torch.randn(8, 4))


def test_a_one_row_batchnorm_in_training_mode_is_explained():
    # The explanation the step-by-step path gives (stages.explain_expert_error) comes through the entry.
    specialists = [nn.Sequential(nn.Linear(6, 2), nn.BatchNorm1d(2)) for _ in range(2)]
    switch = nn.Linear(6, 2)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.0)
    with torch.no_grad(), pytest.raises(ValueError, match="A specialist received one row while in training mode"):
        mnn(torch.randn(1, 6))
