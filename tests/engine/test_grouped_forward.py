"""``serve_grouped_forward``: a grouped Linear stack's whole forward after the switch, in one call.

The reference is the same ops called one by one through ``torch.ops`` (softmax_rows, group_scores
for multi-class groups, route, segment_linear_experts per Linear on the active experts' own
parameters, the row-wise layers, recombine): every output bitwise equal. Where it cannot finish (a
weight missing from its module's parameter dict, outputs that are not ``[N, C]`` float32) it says
so with ``None`` and hands back what it computed; bad arguments are clear errors, never a crash.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mnn_fast.engine.contributions import class_tables
from mnn_fast.engine.inference_ops import inference_ops

OPS = torch.ops.mnn_fast
DIRECT = inference_ops("cpp")
LINEAR, CALL = 0, 1


def ops_in_turn(z, x, threshold, top_k, groups, experts, tables):
    """The reference: ``(out, outputs, log_probs, *routing)`` by one op call at a time."""
    log_probs, probs = OPS.softmax_rows(z)
    scores = probs if groups is None else OPS.group_scores(probs, *groups)
    routing = OPS.route(scores, threshold, top_k)
    counts, offsets, perm, sample_offsets, sample_rows = routing
    active = counts.nonzero().flatten().tolist()
    h, rows = x, perm
    for layer in range(len(experts[0])):
        if isinstance(experts[0][layer], nn.Linear):
            linears = [experts[e][layer] for e in active]
            biases = [lin.bias for lin in linears] if experts[0][layer].bias is not None else []
            h = OPS.segment_linear_experts(h, [lin.weight for lin in linears], biases, offsets,
                                           experts[0][layer].out_features, rows)
            rows = None
        else:
            h = experts[0][layer](h)
    out = OPS.recombine(log_probs, [h], offsets, tables.group_offsets, tables.group_classes, tables.log_spread,
                        sample_offsets, sample_rows)
    return (out, h, log_probs, *routing)


def program(experts):
    """The step list the module builds (GroupedLinearStack.serve_program) for Sequential experts."""
    steps = []
    for layer in range(len(experts[0])):
        first = experts[0][layer]
        if isinstance(first, nn.Linear):
            steps.append((LINEAR, [e[layer]._parameters for e in experts], first.bias is not None, first.out_features))
        else:
            steps.append((CALL, first, None, None))
    return steps


def make(batch, experts, classes, seed=0, bias=True, width=None):
    torch.manual_seed(seed)
    nets = [nn.Sequential(nn.Linear(11, 9, bias=bias), nn.ReLU(), nn.Linear(9, width or classes, bias=bias))
            for _ in range(experts)]
    return torch.randn(batch, classes) * 3, torch.randn(batch, 11), nets


def call(z, x, threshold, top_k, groups, nets, tables, steps=None, classes=None):
    # No below_autograd() region: the entry steps below autograd itself.
    with torch.no_grad():
        return DIRECT.grouped_forward(z, x, True, tables.num_classes if classes is None else classes, threshold, top_k,
                                      *(groups or (None, None)), steps or program(nets), tables.group_offsets,
                                      tables.group_classes, tables.log_spread)


# B = 0 (nothing to route), B = 1 (the serving case), an odd batch; E = 1, an odd E, E = 200 (most
# experts idle); threshold alone, top-k alone, both, and t = 1 (no expert active); Linears without
# bias; overlapping multi-class groups (group scores).
@pytest.mark.parametrize("batch,experts", [(0, 4), (1, 1), (1, 200), (13, 7)])
@pytest.mark.parametrize("threshold,top_k", [(0.1, 0), (float("-inf"), 2), (0.05, 3), (1.0, 0)])
@pytest.mark.parametrize("threads", [1, 3], indirect=True)
def test_equals_the_ops_in_turn(batch, experts, threshold, top_k, threads):
    top_k = min(top_k, experts)
    z, x, nets = make(batch, experts, experts, seed=batch + experts)
    tables = class_tables([[e] for e in range(experts)], experts, torch.device("cpu"))
    got = call(z, x, threshold, top_k, None, nets, tables)
    with torch.no_grad():
        want = ops_in_turn(z, x, threshold, top_k, None, nets, tables)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("bias", [True, False])
def test_groups_and_no_bias_equal_the_ops_in_turn(bias):
    groups = [[0, 1], [1, 2, 3], [4], [5, 0]]
    z, x, nets = make(9, 4, 6, seed=2, bias=bias)
    tables = class_tables(groups, 6, torch.device("cpu"))
    offsets = torch.tensor([0, 2, 5, 6, 8])
    classes = torch.tensor([c for g in groups for c in g])
    got = call(z, x, 0.1, 0, (offsets, classes), nets, tables)
    with torch.no_grad():
        want = ops_in_turn(z, x, 0.1, 0, (offsets, classes), nets, tables)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_without_the_routing_asked_for_the_output_comes_alone():
    z, x, nets = make(7, 6, 6, seed=5)
    tables = class_tables([[e] for e in range(6)], 6, torch.device("cpu"))
    with torch.no_grad():
        alone = DIRECT.grouped_forward(z, x, False, 6, 0.1, 0, None, None, program(nets), tables.group_offsets,
                                       tables.group_classes, tables.log_spread)
    assert isinstance(alone, torch.Tensor)
    assert torch.equal(alone, call(z, x, 0.1, 0, None, nets, tables)[0])


# The caller checks the switch's output only when it is not the [B, C] it checked before: a wrong
# width, a batch of another size, 1-D logits, something other than a tensor.
@pytest.mark.parametrize("z", [torch.randn(5, 4), torch.randn(6, 5), torch.randn(5), [1.0] * 5])
def test_logits_other_than_those_checked_before_are_left_to_the_caller(z):
    _, x, nets = make(5, 5, 5)
    tables = class_tables([[e] for e in range(5)], 5, torch.device("cpu"))
    assert call(z, x, 0.1, 0, None, nets, tables) is None


def test_a_weight_missing_from_its_dict_leaves_the_rest_to_the_caller():
    # A parametrized or pruned weight is computed by its module on access, not stored in
    # _parameters: nothing is multiplied, and the routing comes back for the caller's fallback.
    z, x, nets = make(6, 5, 5, seed=3)
    tables = class_tables([[e] for e in range(5)], 5, torch.device("cpu"))
    steps = program(nets)
    steps[2] = (LINEAR, [dict(p) for p in steps[2][1]], True, 5)
    for params in steps[2][1]:
        del params["weight"]
    out, outputs, log_probs, *routing = call(z, x, 0.1, 0, None, nets, tables, steps)
    with torch.no_grad():
        want = ops_in_turn(z, x, 0.1, 0, None, nets, tables)
    assert out is None and outputs is None
    assert torch.equal(log_probs, want[2])
    assert all(torch.equal(a, b) for a, b in zip(routing, want[3:]))


def test_binary_outputs_come_back_for_the_caller_to_recombine():
    z, x, nets = make(6, 5, 5, seed=4, width=1)
    tables = class_tables([[e] for e in range(5)], 5, torch.device("cpu"))
    out, outputs, *_ = call(z, x, 0.1, 0, None, nets, tables)
    assert out is None
    assert outputs.shape == (int(_[-1].numel()), 1)


def test_a_layers_own_error_comes_through():
    z, x, nets = make(4, 3, 3)
    tables = class_tables([[e] for e in range(3)], 3, torch.device("cpu"))

    def broken(h):
        raise RuntimeError("layer failed on purpose")

    steps = program(nets)
    steps[1] = (CALL, broken, None, None)
    with pytest.raises(RuntimeError, match="layer failed on purpose"):
        call(z, x, 0.0, 0, None, nets, tables, steps)
    steps[1] = (CALL, lambda h: h.tolist(), None, None)
    with pytest.raises(TypeError, match="grouped_forward: a specialist layer must return a Tensor, got list"):
        call(z, x, 0.0, 0, None, nets, tables, steps)


# Each malformed program or argument: a TypeError (ValueError for an unknown step kind) naming it.
@pytest.mark.parametrize("steps,error,message", [
    ("relu", TypeError, "steps must be a list of step tuples, got str"),
    ([(LINEAR, [], True)], TypeError, "steps must be a list of 4-tuples, got tuple"),
    ([(2, None, None, None)], ValueError, "a step's kind must be 0 \\(Linear\\) or 1 \\(call\\), got 2"),
    ([(LINEAR, (), True, 3)], TypeError, "a Linear step's parameters must be a list of dicts, got tuple"),
    ([(LINEAR, [], 1, 3)], TypeError, "a Linear step's has_bias must be a bool, got int"),
    ([(CALL, 5, None, None)], TypeError, "a call step's layer must be callable, got int"),
])
def test_a_malformed_program_is_a_clear_error(steps, error, message):
    z, x, nets = make(4, 3, 3)
    tables = class_tables([[e] for e in range(3)], 3, torch.device("cpu"))
    with pytest.raises(error, match=message):
        call(z, x, 0.1, 0, None, nets, tables, steps)


def test_groups_come_as_both_tensors_or_neither():
    z, x, nets = make(4, 3, 3)
    tables = class_tables([[e] for e in range(3)], 3, torch.device("cpu"))
    with torch.no_grad(), DIRECT.below_autograd():
        with pytest.raises(TypeError, match="group_offsets and group_classes must both be Tensors or both None"):
            DIRECT.grouped_forward(z, x, True, 3, 0.1, 0, torch.arange(4), None, program(nets), tables.group_offsets,
                                   tables.group_classes, tables.log_spread)
        with pytest.raises(TypeError, match="grouped_forward takes 12 arguments, got 2"):
            DIRECT.grouped_forward(z, x)
