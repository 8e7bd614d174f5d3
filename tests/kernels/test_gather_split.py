"""``mnn_fast::gather_split`` (C++, CPU): per expert a fresh tensor of its routed rows.

Reference at the top: the naive loop's ``x[perm[a:b]]`` per expert. A byte copy, so results are
compared with ``torch.equal``; each output must also start on a fresh allocation's 64 bytes (what
the sequential executor needs it for) and own its memory.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mnn_fast  # noqa: F401  (loads the ops)
from mnn_fast.engine.ops import EXTENSION_ERROR

pytestmark = pytest.mark.skipif(EXTENSION_ERROR is not None, reason=f"the C++ extension is needed: {EXTENSION_ERROR}")


def reference(x, perm, offsets):
    bounds = offsets.tolist()
    return [x[perm[a:b]] for a, b in zip(bounds[:-1], bounds[1:])]


def run(x, perm, offsets):
    return torch.ops.mnn_fast.gather_split(x, perm, offsets)


def problem(counts, batch, width, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([0, *counts]).cumsum(0)
    x = (torch.randn(batch, width, generator=gen) * 100).to(dtype)
    perm = torch.randint(0, max(batch, 1), (int(offsets[-1]),), generator=gen) if batch else torch.zeros(0, dtype=torch.long)
    return x, perm, offsets


def assert_split(out, x, perm, offsets):
    want = reference(x, perm, offsets)
    assert len(out) == len(want)
    for got, rows in zip(out, want):
        assert got.dtype == x.dtype and torch.equal(got, rows) and got.is_contiguous()
        if got.numel():
            assert got.data_ptr() % 64 == 0
    pointers = [t.data_ptr() for t in out if t.numel()]
    assert len(set(pointers)) == len(pointers) and x.data_ptr() not in pointers


# Why each case: empty experts first, between and last; E=1; one expert with every row; no rows;
# B=0; B=1 with a row repeated; many experts, most empty; widths 1, 5 and 13 (rows of 4, 20 and 52
# bytes: segments of one buffer would start off the 64-byte boundary), and 16 (64 bytes).
CASES = [([0, 3, 0, 4, 0], 9, 5), ([7], 7, 13), ([0, 0, 11], 4, 1), ([0, 0, 0], 6, 5), ([0, 0], 0, 5), ([3, 2], 1, 16),
         ([2] * 5 + [0] * 200 + [9], 20, 13), ([40, 1, 33], 50, 16)]


@pytest.mark.parametrize("counts, batch, width", CASES)
def test_matches_the_naive_rows(counts, batch, width):
    assert_split(run(*problem(counts, batch, width)), *problem(counts, batch, width))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.uint8])
def test_any_dtype_is_copied_bytewise(dtype):
    args = problem([3, 0, 5], 6, 7, dtype=dtype)
    assert_split(run(*args), *args)


def test_strided_rows_and_zero_width():
    x, perm, offsets = problem([4, 2], 8, 12)
    assert_split(run(x[:, ::2], perm, offsets), x[:, ::2], perm, offsets)  # column stride 2: copied first
    assert_split(run(x[:, 3:9], perm, offsets), x[:, 3:9], perm, offsets)  # a row stride only
    out = run(x[:, :0], perm, offsets)
    assert [tuple(t.shape) for t in out] == [(4, 0), (2, 0)]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_count_changes_nothing(threads):
    # Large enough (about 5 MB) for the copy to split over the threads.
    args = problem([3000, 0, 7001, 13], 6000, 123, seed=threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_split(run(*args), *args)
    finally:
        torch.set_num_threads(before)


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(0, 30), min_size=1, max_size=12), batch=st.integers(1, 40),
       width=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_random_shapes(counts, batch, width, seed):
    args = problem(counts, batch, width, seed=seed)
    assert_split(run(*args), *args)


def test_opcheck():
    torch.library.opcheck(torch.ops.mnn_fast.gather_split.default, problem([2, 0, 3], 4, 5))


def test_bad_inputs_are_refused():
    x, perm, offsets = problem([2, 3], 5, 4)
    with pytest.raises(ValueError, match=r"gather_split: perm values must be in \[0, B\) with B = 5, got perm\[1\] = 5"):
        run(x, torch.tensor([0, 5, 1, 2, 3]), offsets)
    with pytest.raises(ValueError, match="perm values"):
        run(x, torch.tensor([0, -1, 1, 2, 3]), offsets)
    with pytest.raises(ValueError, match="perm values"):  # no bytes to copy, still checked
        run(x[:, :0], torch.tensor([0, 1, 9, 2, 3]), offsets)
    with pytest.raises(ValueError, match="offsets must run from 0 to N = 5"):
        run(x, perm, torch.tensor([0, 2, 4]))
    with pytest.raises(ValueError, match="non-decreasing"):
        run(x, perm, torch.tensor([0, 4, 3, 5]))
    with pytest.raises(TypeError, match="perm must be a 1-D int64 tensor"):
        run(x, perm.int(), offsets)
    with pytest.raises(ValueError, match="x must be a 2-D tensor"):
        run(x.flatten(), perm, offsets)
    with pytest.raises(ValueError, match="offsets must have E \\+ 1 >= 1 entries"):
        run(x, perm, torch.zeros(0, dtype=torch.long))
