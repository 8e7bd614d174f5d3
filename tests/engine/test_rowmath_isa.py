"""The C++ row kernels give the same bits under every SIMD instruction set the CPU runs.

Reference: ``mnn_fast.engine.rowmath`` (the row arithmetic in PyTorch) and, for the whole module,
``mnn_fast.reference.naive_forward``. For each ISA this CPU can run (``sse2`` everywhere; ``avx2``,
``avx512`` where present: an ISA the CPU lacks is skipped with the reason), every row op
(``softmax_rows``, ``log_softmax_rows``, ``recombine``, ``contributions``) must be ``torch.equal`` to
the reference and to the ``sse2`` path, over odd widths, 0 / 1 / many rows, -inf, very negative
logits, ties, all-equal rows and NaN, at 1 to 3 threads.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mnn_fast import MetaNeuralNetwork, route
from mnn_fast.engine import rowmath
from mnn_fast.engine.contributions import class_tables
from mnn_fast.engine.isa import CPU_ISAS, cpu_isa, cpu_isa_status, set_cpu_isa, using_cpu_isa
from mnn_fast.reference import naive_forward

CPP = torch.ops.mnn_fast
STATUS = cpu_isa_status()


@pytest.fixture(params=CPU_ISAS)
def isa(request):
    if STATUS[request.param] is not None:
        pytest.skip(f"{request.param}: {STATUS[request.param]}")
    with using_cpu_isa(request.param):
        yield request.param


def same(got, want):
    """Equal bits, NaN at the same places (a NaN's payload is not part of the contract)."""
    nan = torch.isnan(want)
    return torch.equal(torch.isnan(got), nan) and torch.equal(got[~nan], want[~nan])


def hard_logits(rows, classes, seed, scale=6.0):
    """Random logits plus the rows that break shortcuts: a tie at the maximum, -inf, one far below
    exp's flush point (-1e4), an all-equal row, a row all -inf but one, and (row 5) a NaN."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(max(rows, 6), classes, generator=gen) * scale
    y[0, -1] = y[0].max()
    if classes > 1:
        y[1, 1] = -math.inf
        y[2, 0] = -1e4
    y[3] = 0.25
    y[4, 1:] = -math.inf
    y[5, classes // 2] = math.nan
    return y[:rows]


def routed(batch, classes, experts, seed):
    """recombine's arguments (logp, logits, offsets, group tables, sample rows) for random groups of
    one to three classes at threshold 0.6, logits with the hard rows of ``hard_logits``."""
    gen = torch.Generator().manual_seed(seed)
    groups = [torch.randperm(classes, generator=gen)[: 1 + e % min(3, classes)].tolist() for e in range(experts)]
    r = route(torch.rand(batch, experts, generator=gen), threshold=0.6)
    logits = hard_logits(r.perm.numel(), classes, seed + 1, scale=8.0)
    logp = torch.log_softmax(torch.randn(batch, classes, generator=gen), 1)
    t = class_tables(groups, classes, torch.device("cpu"))
    return logp, [logits], r.offsets, t.group_offsets, t.group_classes, t.log_spread, r.sample_offsets, r.sample_rows


def check_row_ops(x, args):
    """Every row op on ``x`` and ``args`` under the ISA in use: the reference's bits and sse2's."""
    with using_cpu_isa("sse2"):
        base = (*CPP.softmax_rows(x), CPP.log_softmax_rows(x), CPP.recombine(*args))
    logp, (logits,), offsets, go, gc, spread = args[:6]
    got = (*CPP.softmax_rows(x), CPP.log_softmax_rows(x), CPP.recombine(*args))
    want = (*rowmath.softmax_rows(x), rowmath.log_softmax_rows(x), rowmath.recombine_torch(*args))
    for g, w, b in zip(got, want, base):
        assert same(g, w) and same(g, b)
    # contributions runs one row at a time (AVX2 registers under avx2 and avx512): still the reference's bits.
    assert same(CPP.contributions(logits, offsets, go, gc, spread, logp.shape[1]),
                rowmath.contributions_torch(logits, offsets, go, gc, spread, logp.shape[1]))


# Widths around the 8- and 16-column blocks and the 16-lane sums (1, 3, 15, 16, 17, 31, 33), a
# mid-size one, the last tiled width and the first one-row-at-a-time width of softmax_rows (159,
# 160: tile.h's kWideColumns) and of the others (511, 512: kWideRecombineColumns), and a large odd
# one; 0 and 1 rows, and 37 (not a multiple of 8 or 16: partial tiles).
@pytest.mark.parametrize("classes", [1, 3, 15, 16, 17, 31, 33, 100, 159, 160, 511, 512, 1001])
@pytest.mark.parametrize("rows", [0, 1, 37])
def test_row_ops_are_the_reference_bits_under_each_isa(isa, classes, rows):
    x = hard_logits(rows, classes, seed=classes + rows)
    check_row_ops(x, routed(rows, classes, 5, seed=classes * 7 + rows))


# A wide row (one at a time, in its own layout) whose outside classes sum below rowmath's one-pass
# bound takes the second pass: a group of every class (nothing outside), and a group of class 0,
# which outweighs the 514 others by 90 to 120 nats (their exps flush to 0 in the first pass).
@pytest.mark.parametrize("group", ["every class", "class 0"])
def test_wide_rows_take_the_second_pass_where_the_outside_sum_is_tiny(isa, group):
    width = 515
    groups = [list(range(width))] if group == "every class" else [[0]]
    rows = 8  # enough rows for the kernels (tile.h's kernels_for), not the row path of tiny calls
    logits = torch.full((rows, width), -100.0)
    logits[:, 0] = 0.0
    logits[1, 1:] = torch.linspace(-120, -90, width - 1)
    logp = torch.log_softmax(torch.randn(rows, width, generator=torch.Generator().manual_seed(3)), 1)
    t = class_tables(groups, width, torch.device("cpu"))
    args = (logp, [logits], torch.tensor([0, rows]), t.group_offsets, t.group_classes, t.log_spread,
            torch.arange(rows + 1), torch.arange(rows))
    assert same(CPP.recombine(*args), rowmath.recombine_torch(*args))


# Thread counts split the rows into different chunks (and tiles into different partial ones).
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_row_ops_do_not_depend_on_the_thread_count(isa, threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_row_ops(hard_logits(301, 23, seed=threads), routed(301, 23, 9, seed=threads))
        check_row_ops(hard_logits(61, 515, seed=threads), routed(61, 515, 9, seed=threads))  # wide rows
    finally:
        torch.set_num_threads(old)


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(0, 40), classes=st.one_of(st.integers(1, 70), st.integers(150, 600)),
       scale=st.sampled_from([0.01, 1.0, 30.0, 1e3]), seed=st.integers(0, 2**16))
def test_row_ops_agree_across_isas_on_random_shapes(rows, classes, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, classes, generator=gen) * scale
    args = routed(rows, classes, 4, seed)
    for name in CPU_ISAS:
        if STATUS[name] is None:
            with using_cpu_isa(name):
                check_row_ops(x, args)


# The whole module (switch, routing, recombine) against the naive loop: E = 1 and a large E are the
# edges, E = 33 an odd width; threshold 0 wakes every expert, 1 none.
@pytest.mark.parametrize("experts,threshold", [(1, 0.5), (7, 0.1), (33, 0.0), (33, 1.0), (257, 0.01)])
def test_module_is_the_naive_loop_under_each_isa(isa, experts, threshold):
    gen = torch.Generator().manual_seed(experts)
    x = torch.randn(50, experts, generator=gen) * 4
    x[3] = 1.0  # an all-equal row: every expert ties
    specialists = [nn.Identity() for _ in range(experts)]
    mnn = MetaNeuralNetwork(nn.Identity(), specialists, threshold=threshold)
    assert torch.equal(mnn(x), naive_forward(nn.Identity(), specialists, x, threshold=threshold))


def test_set_cpu_isa_returns_the_previous_one_and_auto_picks_the_best():
    best = [n for n in CPU_ISAS if STATUS[n] is None][-1]
    start = cpu_isa()
    try:
        assert set_cpu_isa("sse2") == start
        assert cpu_isa() == "sse2"
        assert set_cpu_isa("auto") == "sse2"
        assert cpu_isa() == best
    finally:
        set_cpu_isa(start)


def test_bad_isa_names_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="set_cpu_isa: name must be 'auto', 'sse2', 'avx2' or 'avx512', got 'avx3'"):
        set_cpu_isa("avx3")
    with pytest.raises(TypeError, match="name must be a str, got int"):
        set_cpu_isa(2)
    for name in CPU_ISAS:
        if STATUS[name] is not None:
            with pytest.raises(ValueError, match=f"{name} cannot run here"):
                set_cpu_isa(name)


def _env_isa(value):
    """(ISA, note) of a fresh process with MNN_FAST_CPU_ISA=value; it loads the extension alone (not
    the whole package): the variable is read when the extension loads."""
    import mnn_fast._C as ext

    code = ("import importlib.util, sys, torch\n"
            "spec = importlib.util.spec_from_file_location('mnn_fast._C', sys.argv[1])\n"
            "ext = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(ext)\n"
            "print(ext.cpu_isa() + '|' + ext.cpu_isa_env_note())\n")
    out = subprocess.run([sys.executable, "-c", code, ext.__file__], env={**os.environ, "MNN_FAST_CPU_ISA": value},
                         check=True, capture_output=True, text=True).stdout.strip()
    return tuple(out.split("|", 1))


def test_the_environment_variable_caps_the_choice_and_a_bad_value_is_reported():
    assert _env_isa("sse2") == ("sse2", "")
    best = [n for n in CPU_ISAS if STATUS[n] is None][-1]
    isa, note = _env_isa("avx9")
    assert isa == best and note == "MNN_FAST_CPU_ISA=avx9 ignored: expected auto, sse2, avx2 or avx512"


def test_version_names_the_isa_in_use(capsys):
    from mnn_fast import cli

    with using_cpu_isa("sse2"), pytest.raises(SystemExit):
        cli.main(["--version"])
    usable = ", ".join(n for n in CPU_ISAS if STATUS[n] is None)
    assert f"cpp row kernels: sse2 (of {usable})" in capsys.readouterr().out


def test_row_ops_pass_opcheck_under_each_isa(isa):
    # The ISA changes only the kernels' insides: schema, fake kernels and autograd must hold on each.
    x = hard_logits(19, 11, seed=3)[6:]  # finite rows: opcheck compares outputs with NaN unequal
    args = routed(30, 11, 4, seed=5)
    logits = args[1][0].nan_to_num(nan=0.0)
    for op, op_args in ((CPP.softmax_rows, (x,)), (CPP.log_softmax_rows, (x,)),
                        (CPP.recombine, (args[0], [logits], *args[2:]))):
        torch.library.opcheck(op.default, op_args)
