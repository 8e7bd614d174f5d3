"""Executors (sequential, grouped, streams, auto) against the naive loop and each other.

Reference: ``naive_forward`` (the paper's loop). The sequential executor must equal it bitwise; the
grouped Linear-stack executor bitwise too (``segment_linear`` makes the ``addmm`` call ``nn.Linear``
makes, per expert); the vmap executor within float32 rounding (batched kernels round differently).
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.utils.prune  # noqa: F401  (a submodule torch does not import)
from hypothesis import given, settings, strategies as st
from torch import nn

from models import cnn_mnn, mlp, mlp_mnn
from mnn_fast import MetaNeuralNetwork
from mnn_fast.engine.executors import GroupedLinearRuns, VmapExperts, bucket_experts
from mnn_fast.engine.ops import segment_linear_param_grads
from mnn_fast.reference import naive_forward

TOL = dict(atol=1e-5, rtol=1e-5)


def bias_free_mnn(classes: int, experts: int, d_in: int = 24, seed: int = 0):
    torch.manual_seed(seed)
    def net(d_out):
        return nn.Sequential(nn.Linear(d_in, 32, bias=False), nn.ReLU(), nn.Linear(32, d_out, bias=False)).eval()
    return net(classes), [net(classes) for _ in range(experts)]


def groups_for(classes: int, experts: int):
    return [[e % classes] for e in range(experts)]


# Each case is an edge the buffer layout has to survive: empty batch, one sample, nothing routed
# (t = 1), everything routed (t = 0), one expert taking every row, a single expert, many experts.
EDGES = [
    (0, 6, 6, 0.1), (1, 6, 6, 0.1), (40, 6, 6, 1.0), (40, 6, 6, 0.0),
    (40, 1, 1, 0.0), (50, 6, 1, 0.0), (64, 4, 300, 0.001),
]


@pytest.mark.parametrize("batch,classes,experts,threshold", EDGES)
@pytest.mark.parametrize("executor", ["sequential", "grouped"])
def test_bias_free_experts_bitwise_equal_to_naive(batch, classes, experts, threshold, executor):
    switch, specialists = bias_free_mnn(classes, experts)
    groups = groups_for(classes, experts)
    if experts == 1 and classes == 6:  # one expert takes everything: a group of all classes
        groups = [list(range(classes))]
    mnn = MetaNeuralNetwork(switch, specialists, groups=groups, threshold=threshold, num_classes=classes,
                            executor=executor)
    assert mnn.executor == executor
    x = torch.randn(batch, 24)
    with torch.no_grad():
        got = mnn(x)
        want = naive_forward(switch, specialists, x, groups=groups, threshold=threshold)
    assert torch.equal(got, want)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(0, 300), experts=st.integers(1, 40), seed=st.integers(0, 2**16),
       threshold=st.sampled_from([0.0, 0.02, 0.1, 0.3]))
def test_grouped_with_biases_bitwise_equal_to_sequential(batch, experts, seed, threshold):
    switch, specialists = mlp_mnn(8, experts, seed=seed)
    groups = groups_for(8, experts)
    x = torch.randn(batch, 24, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        seq = MetaNeuralNetwork(switch, specialists, groups=groups, threshold=threshold, executor="sequential")
        grouped = MetaNeuralNetwork(switch, specialists, groups=groups, threshold=threshold, executor="grouped")
        want, r_want = seq(x, return_routing=True)
        got, r_got = grouped(x, return_routing=True)
    assert torch.equal(r_got.perm, r_want.perm)
    assert torch.equal(got, want)
    assert torch.equal(want, naive_forward(switch, specialists, x, groups=groups, threshold=threshold))


def test_vmap_executor_close_to_sequential_and_reports_padding():
    switch, specialists = cnn_mnn(5, seed=3)
    x = torch.randn(70, 3, 8, 8)
    with torch.no_grad():
        seq = MetaNeuralNetwork(switch, specialists, threshold=0.1, executor="sequential")
        grouped = MetaNeuralNetwork(switch, specialists, threshold=0.1, executor="grouped")
        assert isinstance(grouped._grouped, VmapExperts)  # convs are not a Linear stack
        want, got = seq(x), grouped(x)
    torch.testing.assert_close(got, want, **TOL)
    assert 0.0 <= grouped._grouped.last_padding_waste <= 0.5


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5000), min_size=1, max_size=60))
def test_buckets_bound_padding_to_half(counts):
    buckets = bucket_experts(counts)
    covered = sorted(e for b in buckets for e in b)
    assert covered == [e for e, n in enumerate(counts) if n > 0]  # every expert with rows, once
    for b in buckets:
        widest = max(counts[e] for e in b)
        assert all(2 * counts[e] > widest for e in b)
        assert sum(counts[e] for e in b) * 2 > widest * len(b)  # padding < half of the bucket


def test_auto_groups_linear_stacks_and_explains_the_rest():
    switch, specialists = mlp_mnn(4)
    assert MetaNeuralNetwork(switch, specialists).executor == "grouped"
    cnn_switch, cnns = cnn_mnn(3)
    auto = MetaNeuralNetwork(cnn_switch, cnns)
    assert auto.executor == "sequential"
    assert "Conv2d" in auto.executor_skipped["grouped"]
    streams = MetaNeuralNetwork(switch, specialists, executor="streams")
    assert streams.executor == "sequential" and "CUDA" in streams.executor_skipped["streams"]
    # Different Linear stacks group run by run (issue 15: NSN specialists at mixed depths) ...
    mixed = [mlp(24, 4), mlp(24, 4, hidden=16), mlp(24, 4), mlp(24, 4)]
    assert isinstance(MetaNeuralNetwork(switch, mixed)._grouped, GroupedLinearRuns)
    # ... while experts of different architectures that are not all Linear stacks cannot group.
    mixed_arch = [cnns[0], cnns[1], nn.Sequential(nn.Flatten(), nn.Linear(192, 3))]
    assert "Conv2d" in MetaNeuralNetwork(cnn_switch, mixed_arch).executor_skipped["grouped"]
    with pytest.raises(ValueError, match="one architecture"):
        MetaNeuralNetwork(cnn_switch, mixed_arch, executor="grouped")
    odd = [nn.Sequential(nn.Linear(24, 33), nn.ReLU(), nn.Linear(33, 4)) for _ in range(4)]
    assert MetaNeuralNetwork(switch, odd).executor == "grouped"  # any sizes: no alignment rule
    with pytest.raises(ValueError, match="executor"):
        MetaNeuralNetwork(switch, specialists, executor="parallel")


def test_grouped_trains_like_sequential():
    # With autograd recording the grouped module runs the experts one by one: same loss, same grads.
    switch, specialists = mlp_mnn(5, seed=2)
    x = torch.randn(30, 24)
    grads = []
    for executor in ("sequential", "grouped"):
        for p in [*switch.parameters(), *(q for s in specialists for q in s.parameters())]:
            p.grad = None
        MetaNeuralNetwork(switch, specialists, threshold=0.1, executor=executor)(x).sum().backward()
        grads.append([s[0].weight.grad.clone() if s[0].weight.grad is not None else None for s in specialists])
    assert any(g is not None for g in grads[0])
    for a, b in zip(*grads):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


def test_stacked_weights_follow_in_place_updates():
    # The grouped executor caches stacked weights; an optimizer step (an in-place update) must show.
    switch, specialists = bias_free_mnn(4, 4, seed=1)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.0, executor="grouped")
    x = torch.randn(20, 24)
    with torch.no_grad():
        before = mnn(x)
        specialists[2][0].weight.mul_(3.0)
        after = mnn(x)
        want = naive_forward(switch, specialists, x, threshold=0.0)
    assert not torch.equal(before, after)
    assert torch.equal(after, want)


def test_stacked_weights_follow_a_parameter_assigned_anew():
    # The executor reads each Linear's parameters on every call (not a list kept from construction):
    # a parameter replaced by assignment must show, as it does in the naive loop.
    switch, specialists = mlp_mnn(4, seed=2)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.0, executor="grouped")
    x = torch.randn(20, 24)
    with torch.no_grad():
        before = mnn(x)
        layer = specialists[1][-1]
        layer.weight = torch.nn.Parameter(layer.weight * -2.0)  # fresh, so aligned
        layer.bias = torch.nn.Parameter(layer.bias + 1.0)
        after = mnn(x)
        want = naive_forward(switch, specialists, x, threshold=0.0)
    assert not torch.equal(before, after)
    assert torch.equal(after, want)


segment_linear = torch.ops.mnn_fast.segment_linear


# Empty segments between full ones, every segment empty (N = 0), one segment holding every row.
@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 0, 0], [10, 0, 0, 0]])
@pytest.mark.parametrize("with_bias", [True, False])
def test_segment_linear_is_each_segments_linear_and_passes_opcheck(counts, with_bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sum(counts), 16, generator=gen)
    w = torch.randn(len(counts), 8, 16, generator=gen)
    b = torch.randn(len(counts), 8, generator=gen) if with_bias else None
    offsets = torch.tensor([0] + counts).cumsum(0)
    parts = [nn.functional.linear(a, w[e], None if b is None else b[e]) for e, a in enumerate(torch.split(x, counts))]
    assert torch.equal(segment_linear(x, w, b, offsets), torch.cat(parts))
    torch.library.opcheck(segment_linear, (x, w, b, offsets))
    grads = [t.requires_grad_() for t in (x, w) + ((b,) if with_bias else ())]
    torch.library.opcheck(segment_linear, (x, w, b, offsets))
    torch.library.opcheck(segment_linear_param_grads, (x.detach(), torch.randn(sum(counts), 8), offsets))
    # The registered backward against autograd through the per-segment Linear calls.
    g = torch.randn(sum(counts), 8, generator=gen)
    got = torch.autograd.grad(segment_linear(x, w, b, offsets), grads, g)
    parts = [nn.functional.linear(a, w[e], None if b is None else b[e]) for e, a in enumerate(torch.split(x, counts))]
    want = torch.autograd.grad(torch.cat(parts), grads, g)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, **TOL)


# The rows read through perm (the module's fused gather): perm repeats rows (a sample routed to two
# experts), skips some (routed nowhere) and covers empty segments; x is wider than any segment.
@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 0, 0], [7, 0, 0, 0]])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("parallel", [False, True])
def test_segment_linear_through_perm_is_it_on_the_gathered_rows(counts, with_bias, parallel):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 13, generator=gen)  # 13 features: rows start off 64-byte boundaries in x
    w = torch.randn(len(counts), 5, 13, generator=gen)
    b = torch.randn(len(counts), 5, generator=gen) if with_bias else None
    perm = torch.randint(0, 9, (sum(counts),), generator=gen)
    offsets = torch.tensor([0] + counts).cumsum(0)
    got = segment_linear(x, w, b, offsets, parallel, perm)
    assert got.shape == (sum(counts), 5)
    # Fresh operands, as the naive loop's x[mask] and each expert's own weight are (MKL rounds a
    # misaligned operand differently).
    parts = [nn.functional.linear(a.clone(), w[e].clone(), None if b is None else b[e].clone())
             for e, a in enumerate(torch.split(x[perm], counts))]
    if parallel:
        torch.testing.assert_close(got, torch.cat(parts), **TOL)
    else:
        assert torch.equal(got, torch.cat(parts))
    torch.library.opcheck(segment_linear, (x, w, b, offsets, parallel, perm))
    grads = [t.requires_grad_() for t in (x, w) + ((b,) if with_bias else ())]
    torch.library.opcheck(segment_linear, (x, w, b, offsets, parallel, perm))
    g = torch.randn(sum(counts), 5, generator=gen)
    got = torch.autograd.grad(segment_linear(x, w, b, offsets, parallel, perm), grads, g, allow_unused=True)
    parts = [nn.functional.linear(a, w[e], None if b is None else b[e])
             for e, a in enumerate(torch.split(x[perm], counts))]
    want = torch.autograd.grad(torch.cat(parts), grads, g, allow_unused=True)
    for a, c in zip(got, want):
        if c is None:  # no rows at all: nothing reaches the parameters
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, c, **TOL)


def test_segment_linear_refuses_a_bad_perm():
    x, w, offsets = torch.randn(5, 4), torch.randn(2, 3, 4), torch.tensor([0, 2, 3])
    with pytest.raises(ValueError, match="perm values must be row indices of x in \\[0, 5\\), got perm\\[1\\] = 5"):
        segment_linear(x, w, None, offsets, False, torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="perm values must be row indices"):
        segment_linear(x, w, None, offsets, False, torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match="offsets must run from 0 to N = 4 \\(perm's length\\)"):
        segment_linear(x, w, None, offsets, False, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(TypeError, match="perm must be a 1-D int64"):
        segment_linear(x, w, None, offsets, False, torch.tensor([0, 1, 2], dtype=torch.int32))


def test_segment_linear_refuses_bad_offsets():
    x, w = torch.randn(5, 4), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="offsets must run from 0 to N"):
        segment_linear(x, w, None, torch.tensor([0, 2, 4]))
    with pytest.raises(ValueError, match="non-decreasing"):
        segment_linear(x, w, None, torch.tensor([0, 6, 5]))
    with pytest.raises(ValueError, match="E \\+ 1"):
        segment_linear(x, w, None, torch.tensor([0, 5]))
    with pytest.raises(TypeError, match="dtype"):
        segment_linear(x.double(), w, None, torch.tensor([0, 2, 5]))


segment_linear_experts = torch.ops.mnn_fast.segment_linear_experts


# The serving form: each expert's own weight, only for the segments with rows. Cases: empty segments
# between full ones, every segment empty (N = 0: out_features alone gives the width), one segment
# holding every row, one expert; odd widths (rows not a multiple of 64 bytes, so output slots start
# misaligned); through perm (rows repeated, as a sample routed to two experts) or x's own rows; 1
# and 3 intra-op threads (the GEMMs run at the caller's count, as nn.Linear's do).
@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 0, 0], [10, 0, 0, 0], [0, 0, 7], [4]])
@pytest.mark.parametrize("width", [16, 13])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("through_perm", [False, True])
@pytest.mark.parametrize("threads", [1, 3], indirect=True)
def test_segment_linear_experts_is_the_stacked_op_bitwise_and_passes_opcheck(counts, width, with_bias, through_perm,
                                                                              threads):
    gen = torch.Generator().manual_seed(1)
    experts, out_features = len(counts), 7
    weights = [torch.randn(out_features, width, generator=gen) for _ in range(experts)]
    biases = [torch.randn(out_features, generator=gen) for _ in range(experts)]
    offsets = torch.tensor([0] + counts).cumsum(0)
    if through_perm:
        x = torch.randn(6, width, generator=gen)
        perm = torch.randint(0, 6, (sum(counts),), generator=gen)
        rows = x[perm]
    else:
        x = rows = torch.randn(sum(counts), width, generator=gen)
        perm = None
    used = [e for e, n in enumerate(counts) if n]
    given_w = [weights[e] for e in used]
    given_b = [biases[e] for e in used] if with_bias else []
    got = segment_linear_experts(x, given_w, given_b, offsets, out_features, perm)
    stacked = segment_linear(x, torch.stack(weights), torch.stack(biases) if with_bias else None, offsets, False, perm)
    parts = [nn.functional.linear(r.clone(), weights[e], biases[e] if with_bias else None)
             for e, r in enumerate(torch.split(rows, counts))]
    assert got.shape == (sum(counts), out_features)
    assert torch.equal(got, stacked)
    assert torch.equal(got, torch.cat(parts))
    torch.library.opcheck(segment_linear_experts, (x, given_w, given_b, offsets, out_features, perm))


def test_segment_linear_experts_refuses_what_does_not_match_the_segments():
    x, offsets = torch.randn(5, 4), torch.tensor([0, 2, 2, 5])
    w, b = [torch.randn(3, 4), torch.randn(3, 4)], [torch.randn(3), torch.randn(3)]
    with pytest.raises(ValueError, match="one tensor per segment with rows"):
        segment_linear_experts(x, w + w, b, offsets, 3)  # four weights for two segments with rows
    with pytest.raises(ValueError, match="biases must be empty"):
        segment_linear_experts(x, w, b[:1], offsets, 3)
    with pytest.raises(ValueError, match=r"weights\[1\] must be a 2-D tensor \[out_features, K\] = \[3, 4\]"):
        segment_linear_experts(x, [w[0], torch.randn(3, 5)], b, offsets, 3)
    with pytest.raises(ValueError, match=r"out_features, K\] = \[2, 4\]"):
        segment_linear_experts(x, w, [], offsets, 2)
    with pytest.raises(TypeError, match=r"weights\[0\] must have x's dtype"):
        segment_linear_experts(x, [w[0].double(), w[1]], b, offsets, 3)
    with pytest.raises(ValueError, match=r"biases\[1\] must be a 1-D tensor \[3\]"):
        segment_linear_experts(x, w, [b[0], torch.randn(4)], offsets, 3)
    with pytest.raises(ValueError, match="perm values"):
        segment_linear_experts(x, w, b, offsets, 3, torch.tensor([0, 1, 2, 3, 9]))
    with pytest.raises(NotImplementedError, match="inference-only"):
        segment_linear_experts(x.requires_grad_(), w, b, offsets, 3)


# Runs of identical stacks (NSN specialists at three depths, depth-major): one grouped stack per run.
@pytest.mark.parametrize("parallel", [False, True])
def test_grouped_runs_of_different_stacks_match_sequential(parallel):
    torch.manual_seed(5)
    hidden = [[], [9], [9, 9]]  # three layouts, two experts each, in consecutive runs
    specialists = []
    for widths in hidden:
        for _ in range(2):
            layers, d = [], 24
            for w in widths:
                layers += [nn.Linear(d, w), nn.ReLU()]
                d = w
            specialists.append(nn.Sequential(*layers, nn.Linear(d, 6)))
    switch = mlp(24, 6)
    groups = [[e] for e in range(6)]
    x = torch.randn(150, 24)
    executor = "grouped_parallel" if parallel else "auto"
    grouped = MetaNeuralNetwork(switch, specialists, groups=groups, threshold=0.05, executor=executor)
    assert grouped.executor == executor.replace("auto", "grouped")
    assert isinstance(grouped._grouped, GroupedLinearRuns) and len(grouped._grouped.runs) == 3
    with torch.no_grad():
        got = grouped(x)
        want = naive_forward(switch, specialists, x, groups=groups, threshold=0.05)
    if parallel:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, want)


def test_runs_must_end_in_one_output_width():
    specialists = [nn.Linear(4, 3), nn.Linear(4, 1)]
    mnn = MetaNeuralNetwork(nn.Linear(4, 3), specialists, groups=[[0, 1], [2]], num_classes=3)
    assert mnn.executor == "sequential" and "output widths" in mnn.executor_skipped["grouped"]


def test_grouped_linear_needs_cpu_specialists_even_on_the_torch_backend():
    from mnn_fast.engine.backends import get_backend
    from mnn_fast.engine.executors import linear_stack_reason

    class OnMeta(nn.Linear):  # parameters on the meta device stand in for a GPU here
        def __init__(self):
            super().__init__(4, 3, device="meta")

    assert "runs on ['cpu']" in linear_stack_reason([OnMeta(), OnMeta()], get_backend("torch"))
    assert linear_stack_reason([nn.Linear(4, 3), nn.Linear(4, 3)], get_backend("torch")) is None


# Linears whose weight is not a plain parameter: weight_norm computes it on access, pruning keeps
# weight_orig and a mask. The grouped executor must read what the module computes, as the naive
# loop's call does.
@pytest.mark.parametrize("kind", ["weight_norm", "pruned"])
def test_grouped_reads_parametrized_and_pruned_weights(kind):
    switch, specialists = mlp_mnn(4, seed=8)
    for s in specialists:
        if kind == "weight_norm":
            nn.utils.parametrizations.weight_norm(s[0])
        else:
            torch.nn.utils.prune.l1_unstructured(s[-1], "weight", amount=0.5)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.05)
    assert mnn.executor == "grouped"
    x = torch.randn(30, 24)
    with torch.no_grad():
        assert torch.equal(mnn(x), naive_forward(switch, specialists, x, threshold=0.05))


# Reading the rows through perm runs the layers before the first Linear on the caller's x: an
# in-place one there must send the module back to gathering first, never write to x.
def test_grouped_never_writes_to_the_callers_input():
    torch.manual_seed(9)
    specialists = [nn.Sequential(nn.ReLU(inplace=True), nn.Linear(24, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
                   for _ in range(4)]
    switch = mlp(24, 4)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.05)
    assert mnn.executor == "grouped"
    x = torch.randn(30, 24)
    kept = x.clone()
    with torch.no_grad():
        got = mnn(x)
        assert torch.equal(x, kept)
        assert torch.equal(got, naive_forward(switch, specialists, x, threshold=0.05))


# Row-wise layers that are not one exact operation per element (Tanh, GELU, ...): ATen computes a
# tensor's elements past its last whole vector with a scalar formula whose last bit can differ, so
# on the whole buffer an element's bits depended on where its expert's rows ended. Odd hidden widths
# put those tails mid-row; before the per-expert calls, Sigmoid, SiLU and ELU mismatched here.
# The large case (66,000 elements an expert) has ATen split each call over the threads, at 1 and 3.
@pytest.mark.parametrize("act", [nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.LeakyReLU])
@pytest.mark.parametrize("threads", [1, 3])
def test_grouped_activations_are_bitwise_the_naive_loop(act, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cases = [(hidden, 6, 301, seed) for hidden in (5, 9, 13) for seed in range(3)] + [(33, 2, 4000, 0)]
        for hidden, experts, batch, seed in cases:
            torch.manual_seed(seed)
            specialists = [nn.Sequential(nn.Linear(24, hidden), act(), nn.Linear(hidden, experts)).eval()
                           for _ in range(experts)]
            switch = mlp(24, experts)
            mnn = MetaNeuralNetwork(switch, specialists, threshold=0.05)
            assert mnn.executor == "grouped"
            x = torch.randn(batch, 24)
            with torch.no_grad():
                got, want = mnn(x), naive_forward(switch, specialists, x, threshold=0.05)
            assert torch.equal(got, want), (hidden, experts, batch, seed)
    finally:
        torch.set_num_threads(before)


def test_grouped_activation_before_the_first_linear_gathers_first():
    # The rows through perm would meet Tanh on the caller's whole x, not per expert: not bitwise.
    torch.manual_seed(12)
    specialists = [nn.Sequential(nn.Tanh(), nn.Linear(13, 5), nn.ReLU(), nn.Linear(5, 4)).eval() for _ in range(4)]
    switch = mlp(13, 4)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.05)
    x = torch.randn(203, 13)
    assert mnn.executor == "grouped" and not mnn._grouped.fuses_gather(x)
    with torch.no_grad():
        assert torch.equal(mnn(x), naive_forward(switch, specialists, x, threshold=0.05))


# The executor holds a lock and thread-local state, the backend the extension's op handles: none
# pickle, so the module rebuilds them on load. A deepcopy or pickle of a grouped module must work
# and give the original's bits.
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_grouped_module_copies_and_pickles(how):
    switch, specialists = mlp_mnn(4, seed=13)
    mnn = MetaNeuralNetwork(switch, specialists, threshold=0.05)
    x = torch.randn(50, 24)
    with torch.no_grad():
        want = mnn(x)
        other = copy.deepcopy(mnn) if how == "deepcopy" else pickle.loads(pickle.dumps(mnn))
        assert other.executor == "grouped" and other.backend == mnn.backend
        assert other._grouped is not mnn._grouped
        assert torch.equal(other(x), want)
