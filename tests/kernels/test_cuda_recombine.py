"""The CUDA kernel of ``mnn_fast::recombine`` (csrc/cuda/recombine.cu) against the CPU kernel.

Both run csrc/rowmath.h's float32 steps in the same order (the GPU with __f*_rn intrinsics, no FMA,
IEEE denormals), so the results must be bitwise equal: ``torch.equal`` and equal bit patterns on
every non-NaN element (NaN payloads may differ: the GPU returns canonical NaNs). Skipped, with the
reason, on machines without a CUDA device.
"""
from __future__ import annotations

import math

import pytest
import torch

from mnn_fast.engine import ops as mnn_ops
from mnn_fast.engine.rowmath import log_softmax_rows, log_spread_table

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.fixture(scope="module", autouse=True)
def _cuda_kernel():
    if mnn_ops.EXTENSION_ERROR is not None:
        pytest.fail(mnn_ops.EXTENSION_ERROR)
    if not torch._C._dispatch_has_kernel_for_dispatch_key("mnn_fast::recombine", "CUDA"):
        pytest.fail("mnn_fast._C has no CUDA kernel for mnn_fast::recombine: rebuild on this machine "
                    "(pip install -e ., or FORCE_CUDA=1)")


def _groups(classes: int, experts: int, max_size: int, gen: torch.Generator) -> list[list[int]]:
    out = []
    for _ in range(experts):
        size = int(torch.randint(1, min(max_size, classes) + 1, (1,), generator=gen))
        out.append(torch.randperm(classes, generator=gen)[:size].tolist())
    return out


def make_inputs(batch: int, classes: int, experts: int, *, binary: bool = False, max_group: int = 4,
                threshold: float = 0.05, top_k: int = 3, seed: int = 0, groups: list[list[int]] | None = None):
    """The 8 CPU arguments of recombine, routed by the CPU ``route`` op (rows in increasing expert order)."""
    gen = torch.Generator().manual_seed(seed)
    if groups is None:
        groups = [[int(torch.randint(classes, (1,), generator=gen))] for _ in range(experts)] if binary else \
            _groups(classes, experts, max_group, gen)
    group_offsets = torch.tensor([0] + [len(g) for g in groups], dtype=torch.long).cumsum(0)
    group_classes = torch.tensor([c for g in groups for c in g], dtype=torch.long)
    scores = torch.softmax(torch.randn(batch, experts, generator=gen) * 2, dim=1)
    _, offsets, _, sample_offsets, sample_rows = torch.ops.mnn_fast.route(scores, threshold, min(top_k, experts))
    rows = int(offsets[-1])
    logits = torch.randn(rows, 1 if binary else classes, generator=gen) * 4
    logp = torch.log_softmax(torch.randn(batch, classes, generator=gen) * 3, dim=1)
    return [logp, logits, offsets, group_offsets, group_classes, log_spread_table(group_offsets, classes),
            sample_offsets, sample_rows]


def _recombine(logp, logits, *rest):
    """The op with the logits as one buffer-order tensor (the schema takes a list: one or one per expert)."""
    return torch.ops.mnn_fast.recombine(logp, [logits], *rest)


def check_against_cpu(args: list[torch.Tensor]) -> torch.Tensor:
    want = _recombine(*args)
    got = _recombine(*[a.cuda() for a in args])
    assert got.is_cuda and got.dtype == torch.float32 and got.shape == want.shape
    got = got.cpu()
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    assert torch.equal(got[finite], want[finite]), (got - want).abs().max()
    # Bit patterns too (the sign of a zero included), NaNs aside.
    assert torch.equal(got.view(torch.int32)[finite], want.view(torch.int32)[finite])
    return got


@pytest.mark.parametrize(
    "batch, classes, experts, max_group",
    [(64, 10, 4, 4), (300, 100, 12, 30), (200, 1000, 20, 300), (257, 33, 40, 33)],
)
def test_recombine_cuda_equals_cpu(batch, classes, experts, max_group):
    args = make_inputs(batch, classes, experts, max_group=max_group, seed=classes)
    assert args[1].shape[0] > 0
    check_against_cpu(args)


@pytest.mark.parametrize("classes", [10, 1000])
def test_recombine_cuda_binary_specialists(classes):
    # W = 1: one logit per row, every group one class.
    args = make_inputs(150, classes, min(classes, 25), binary=True, top_k=5, threshold=0.01, seed=classes + 1)
    assert args[1].shape[1] == 1 and args[1].shape[0] > 0
    check_against_cpu(args)


def test_recombine_cuda_one_expert():
    # E = 1, once with a partial group and once with a group covering every class (log_spread 0,
    # nothing outside the group: the outside logsumexp is -inf).
    check_against_cpu(make_inputs(50, 16, 1, max_group=5, threshold=-math.inf, top_k=1, seed=3))
    check_against_cpu(make_inputs(50, 16, 1, groups=[list(range(16))], threshold=-math.inf, top_k=1, seed=4))


def test_recombine_cuda_wide_rows():
    # C above the kernel's 8192-column membership chunk: the group mask is rebuilt per chunk.
    check_against_cpu(make_inputs(6, 9000, 3, max_group=5000, threshold=-math.inf, top_k=2, seed=5))


def test_recombine_cuda_empty():
    # B = 0: an empty [0, C] result.
    args = make_inputs(0, 10, 3)
    got = _recombine(*[a.cuda() for a in args])
    assert got.shape == (0, 10) and got.is_cuda
    # N = 0 (nothing routed): out = log_softmax(logp), the final step still runs.
    args = make_inputs(40, 100, 5, threshold=2.0)
    assert args[1].shape[0] == 0
    got = check_against_cpu(args)
    assert torch.equal(got, log_softmax_rows(args[0]))


def test_recombine_cuda_special_values():
    # Signed zeros, ties at the maximum, huge logits, -inf log-probabilities, a NaN logit.
    args = make_inputs(80, 48, 9, max_group=48, threshold=0.02, top_k=4, seed=6)
    logp, logits = args[0], args[1]
    assert logits.shape[0] > 5
    logits[0] = 0.0
    logits[0, ::3] = -0.0
    logits[1] = -0.0
    logits[2] = logits[2].round()
    logits[3, ::2] = 60.0
    logp[0] = 0.0
    logp[0, ::2] = -0.0
    logp[1, :20] = -math.inf
    check_against_cpu(args)
    logits[5, 7] = float("nan")
    check_against_cpu(args)


def test_recombine_cuda_non_contiguous_inputs_and_current_stream():
    args = make_inputs(70, 30, 6, max_group=10, seed=7)
    want = _recombine(*args)
    cuda = [a.cuda() for a in args]
    cuda[0] = cuda[0].t().contiguous().t()  # same values, column-major
    cuda[1] = torch.cat([cuda[1], cuda[1]], dim=1)[:, : args[1].shape[1]]  # row stride 2 C
    assert not cuda[0].is_contiguous() and not cuda[1].is_contiguous()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = _recombine(*cuda)
    stream.synchronize()
    assert torch.equal(got.cpu(), want)


def test_recombine_cuda_argument_checks():
    args = [a.cuda() for a in make_inputs(20, 10, 3, seed=8)]
    bad = list(args)
    bad[1] = torch.zeros(args[1].shape[0], 3, device="cuda")
    with pytest.raises(ValueError, match="recombine: logits"):
        _recombine(*bad)
    bad = list(args)
    bad[2] = args[2].int()
    with pytest.raises(TypeError, match="recombine: offsets"):
        _recombine(*bad)
    bad = list(args)
    bad[7] = args[7].cpu()
    with pytest.raises(ValueError, match="recombine: sample_rows"):
        _recombine(*bad)
    bad = list(args)
    bad[5] = args[5][:-1]
    with pytest.raises(ValueError, match="recombine: log_spread"):
        _recombine(*bad)
