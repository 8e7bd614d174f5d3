"""The serving path's direct entries (``mnn_fast._C.serve_<op>``, csrc/serving.cpp) are the ops.

Each entry converts its arguments itself and calls the op's typed dispatcher handle unboxed. The
reference is the same op through ``torch.ops``: every output bitwise equal, the op's own errors
(ValueError/TypeError with its message) unchanged, and a clear TypeError for an argument of the
wrong kind, never a crash.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

from mnn_fast.engine.inference_ops import inference_ops

OPS = torch.ops.mnn_fast
DIRECT = inference_ops("cpp")


def _routing(batch: int, experts: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, experts, generator=gen) * 3
    log_probs, probs = OPS.softmax_rows(z)
    return z, log_probs, probs, OPS.route(probs, 0.1, 0)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))


# B = 0 (nothing routed), B = 1 (the serving case), an odd width (E = 7), many experts (E = 300).
@pytest.mark.parametrize("batch,experts", [(0, 5), (1, 10), (37, 7), (64, 300)])
@pytest.mark.parametrize("threads", [1, 3], indirect=True)
def test_each_direct_entry_equals_its_op(batch, experts, threads):
    z, log_probs, probs, routing = _routing(batch, experts, seed=batch + experts)
    counts, offsets, perm, sample_offsets, sample_rows = routing
    x = torch.randn(batch, 13)
    gen = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(experts, experts, 13, generator=gen), torch.randn(experts, experts, generator=gen)
    used = counts.nonzero().flatten().tolist()
    groups = torch.arange(experts + 1), torch.arange(experts)
    tables = (groups[0], groups[1], torch.zeros(experts))
    logits = OPS.segment_linear(x, weight, bias, offsets, False, perm)
    cases = {
        "softmax_rows": (DIRECT.softmax_rows, OPS.softmax_rows, (z,)),
        "group_scores": (DIRECT.group_scores, OPS.group_scores, (probs, *groups)),
        "route": (DIRECT.route, OPS.route, (probs, 0.1, 0)),
        "route_top_k": (DIRECT.route, OPS.route, (probs, float("-inf"), min(2, experts))),
        "recombine": (DIRECT.recombine, OPS.recombine,
                      (log_probs, [logits], offsets, *tables, sample_offsets, sample_rows)),
        "segment_linear": (DIRECT.segment_linear, OPS.segment_linear, (x, weight, bias, offsets, False, perm)),
        "segment_linear_no_bias": (DIRECT.segment_linear, OPS.segment_linear, (x, weight, None, offsets, False, perm)),
        "segment_linear_experts": (DIRECT.segment_linear_experts, OPS.segment_linear_experts,
                                   (x, [weight[e] for e in used], [bias[e] for e in used], offsets, experts, perm)),
        "gather_split": (DIRECT.gather_split, OPS.gather_split, (x, perm, offsets)),
    }
    with torch.no_grad(), DIRECT.below_autograd():
        for name, (direct, op, args) in cases.items():
            assert _equal(direct(*args), op(*args)), name


def test_the_ops_errors_come_through_unchanged():
    probs = torch.rand(4, 3)
    with torch.no_grad(), DIRECT.below_autograd():
        with pytest.raises(ValueError, match="route") as direct:
            DIRECT.route(probs[0], 0.1, 0)  # 1-D scores
        with pytest.raises(ValueError) as op:
            OPS.route(probs[0], 0.1, 0)
        assert str(direct.value) == str(op.value)
        with pytest.raises(TypeError, match="segment_linear"):
            DIRECT.segment_linear(torch.randn(2, 4), torch.randn(1, 3, 4).double(), None, torch.tensor([0, 2]), False,
                                  None)


# Each kind of argument the entries convert, given as something else: a TypeError naming the entry
# and the argument (and the count of arguments when it is off), never a crash.
@pytest.mark.parametrize("call,message", [
    (lambda: DIRECT.softmax_rows([1.0, 2.0]), "softmax_rows: x must be a Tensor, got list"),
    (lambda: DIRECT.softmax_rows(), "softmax_rows takes 1 arguments, got 0"),
    (lambda: DIRECT.route(torch.rand(2, 3), "0.1", 0), "route: threshold must be a float, got str"),
    (lambda: DIRECT.route(torch.rand(2, 3), 0.1, 1.5), "route: top_k must be an int, got float"),
    (lambda: DIRECT.segment_linear(torch.rand(2, 3), torch.rand(1, 2, 3), None, torch.tensor([0, 2]), 1, None),
     "segment_linear: parallel_segments must be a bool, got int"),
    (lambda: DIRECT.segment_linear(torch.rand(2, 3), torch.rand(1, 2, 3), 5, torch.tensor([0, 2]), False, None),
     "segment_linear: bias must be a Tensor, got int"),
    (lambda: DIRECT.segment_linear_experts(torch.rand(2, 3), torch.rand(2, 3), [], torch.tensor([0, 2]), 2, None),
     "segment_linear_experts: weights must be a list of Tensors, got Tensor"),
    (lambda: DIRECT.recombine(torch.rand(2, 3), [torch.rand(2, 3), None], *[torch.zeros(1)] * 6),
     "recombine: logits must be a list of Tensors, got NoneType"),
])
def test_a_wrong_argument_is_a_type_error_naming_it(call, message):
    with torch.no_grad(), DIRECT.below_autograd():
        with pytest.raises(TypeError, match=message):
            call()


def test_an_int_beyond_int64_is_an_overflow_error():
    with torch.no_grad(), DIRECT.below_autograd():
        with pytest.raises(OverflowError):
            DIRECT.route(torch.rand(2, 3), 0.1, 2**70)
        with pytest.raises(OverflowError):
            DIRECT.route(torch.rand(2, 3), 10**400, 0)


def test_kernels_run_without_the_gil():
    # A serving process may call the module from several Python threads: each kernel runs with the
    # GIL released, so their calls can overlap. A Python thread stamps the time in a loop while the
    # main thread is inside one long route call; holding the GIL would leave no stamp in the call's
    # middle half.
    scores = torch.rand(2_000_000, 8)
    stamps = []
    stop = threading.Event()

    def stamp():
        while not stop.is_set():
            stamps.append(time.perf_counter())

    worker = threading.Thread(target=stamp)
    worker.start()
    try:
        while not stamps:
            time.sleep(0.001)
        with torch.no_grad(), DIRECT.below_autograd():
            start = time.perf_counter()
            DIRECT.route(scores, 0.2, 0)
            end = time.perf_counter()
    finally:
        stop.set()
        worker.join()
    quarter = (end - start) / 4
    assert any(start + quarter < t < end - quarter for t in stamps)
