"""recombine: ``out[i] = log_softmax(logp[i] + log v[r0] + log v[r1] + ...)`` over sample ``i``'s rows, in order.

Algorithm: one program per block of samples; step ``j`` stamps each sample's ``j``-th group into a scratch
row, then streams that row's logits in chunks of 16 columns (max, sum, outside sum, add into ``out``).
Every sum runs over 16 lanes plus a fixed pairwise tree, every op one float32 rounding: ``rowmath.py``.
"""
from __future__ import annotations

import contextlib
import struct
import warnings

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import _block_start, _define_op, _is_interpreted, _max, _sum


def _f32(x: float) -> float:
    """``x`` rounded to float32 (as ``rowmath._f32``): every constant below converts exactly."""
    return struct.unpack("f", struct.pack("f", x))[0]


# The constants of mnn_fast/engine/rowmath.py, rounded to float32 as there.
_EXP_FLUSH = tl.constexpr(-80.0)
_LOG2E = tl.constexpr(_f32(1.44269504088896341))
_LN2_HI = tl.constexpr(_f32(0.693359375))
_LN2_LO = tl.constexpr(_f32(-2.12194440e-4))
_P0 = tl.constexpr(_f32(1.9875691500e-4))
_P1 = tl.constexpr(_f32(1.3981999507e-3))
_P2 = tl.constexpr(_f32(8.3334519073e-3))
_P3 = tl.constexpr(_f32(4.1665795894e-2))
_P4 = tl.constexpr(_f32(1.6666665459e-1))
_P5 = tl.constexpr(_f32(5.0000001201e-1))
_Q0 = tl.constexpr(_f32(7.0376836292e-2))
_Q1 = tl.constexpr(_f32(-1.1514610310e-1))
_Q2 = tl.constexpr(_f32(1.1676998740e-1))
_Q3 = tl.constexpr(_f32(-1.2420140846e-1))
_Q4 = tl.constexpr(_f32(1.4249322787e-1))
_Q5 = tl.constexpr(_f32(-1.6668057665e-1))
_Q6 = tl.constexpr(_f32(2.0000714765e-1))
_Q7 = tl.constexpr(_f32(-2.4999993993e-1))
_Q8 = tl.constexpr(_f32(3.3333331174e-1))
_SQRT2 = tl.constexpr(_f32(1.41421356237309505))
_ONE_PASS_MIN = tl.constexpr(2.0**-60)
_NAN_ALL = tl.constexpr(tl.PropagateNan.ALL)

# Compile options of every launch: no fused multiply-add (one rounding per * and per +). The AOT
# test compiles with the same options.
_LAUNCH_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _exp_nonpositive(t):
    """``rowmath.exp_nonpositive``: ``exp(t)`` for ``t <= 0`` (or NaN), 0 below -80, op for op."""
    flush = t < _EXP_FLUSH
    x = tl.where(flush, _EXP_FLUSH, t)
    n = tl.floor(x * _LOG2E + 0.5)
    r = (x - n * _LN2_HI) - n * _LN2_LO
    z = r * r
    p = r * _P0 + _P1
    p = p * r + _P2
    p = p * r + _P3
    p = p * r + _P4
    p = p * r + _P5
    y = (p * z + r) + 1.0
    # NaN stays in y; it is only kept out of the integer conversion.
    exponent = tl.where(n != n, 0.0, n).to(tl.int32)
    scale = ((exponent + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where(flush, 0.0, y * scale)


@triton.jit
def _log1p_nonnegative(u):
    """``rowmath.log1p_nonnegative``: ``log(1 + u)`` for ``u >= 0`` (or NaN), op for op; IEEE division."""
    v = 1.0 + u
    return _log_corrected(v, tl.math.div_rn(u - (v - 1.0), v))


@triton.jit
def _log_positive(x):
    """``rowmath.log_positive``: ``log(x)`` for a normal ``x > 0`` (or NaN), op for op."""
    return _log_corrected(x, 0.0)


@triton.jit
def _log_corrected(v, correction):
    """``rowmath._log_corrected``: ``log(v) + correction``, op for op."""
    bits = v.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 127
    m = ((bits & 0x007FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    big = m > _SQRT2
    m = tl.where(big, m * 0.5, m)
    ef = (e + big.to(tl.int32)).to(tl.float32)
    f = m - 1.0
    z = f * f
    q = f * _Q0 + _Q1
    q = q * f + _Q2
    q = q * f + _Q3
    q = q * f + _Q4
    q = q * f + _Q5
    q = q * f + _Q6
    q = q * f + _Q7
    q = q * f + _Q8
    y = (q * f) * z
    y = y + ef * _LN2_LO
    y = y - 0.5 * z
    y = y + correction
    return (f + y) + ef * _LN2_HI


@triton.jit
def _fold_sum(lanes, BLOCK_B: tl.constexpr):
    """``[BLOCK_B]``: the 16 lanes of ``lanes: [BLOCK_B, 16]`` folded as ``rowmath.lane_sum``, ``lane[j] +=
    lane[j + h]`` for h = 8, 4, 2, 1: ``[B, 2h]`` viewed as ``[B, 2, h]`` and summed over the size-2 axis
    (a sum of two terms has one rounding, whatever order a reduction takes)."""
    x = tl.reduce(tl.reshape(lanes, [BLOCK_B, 2, 8]), 1, _sum)
    x = tl.reduce(tl.reshape(x, [BLOCK_B, 2, 4]), 1, _sum)
    x = tl.reduce(tl.reshape(x, [BLOCK_B, 2, 2]), 1, _sum)
    return tl.reduce(x, 1, _sum)


@triton.jit
def _lanes_add(lanes, x, BLOCK_B: tl.constexpr, K: tl.constexpr):
    """``lanes: [BLOCK_B, 16]`` plus ``x[:, 0, :]``, then ``x[:, 1, :]``, ... (``x: [BLOCK_B, K, 16]``), in this order."""
    if K == 1:
        return lanes + tl.reshape(x, [BLOCK_B, 16])
    else:
        # Interpreter only (the GPU config has K == 1): its scan is np.cumsum, a left-to-right float32
        # loop. The lanes enter through the first slot; the last slot is picked by a sum with zeros.
        k = tl.arange(0, K)[None, :, None]
        running = tl.associative_scan(tl.where(k == 0, x + lanes[:, None, :], x), 1, _sum)
        return tl.reduce(tl.where(k == K - 1, running, 0.0), 1, _sum)


@triton.jit
def _lanes_max(lanes, x, BLOCK_B: tl.constexpr, K: tl.constexpr):
    """``lanes: [BLOCK_B, 16]`` maxed with ``x: [BLOCK_B, K, 16]`` over its middle axis."""
    if K == 1:
        return tl.maximum(lanes, tl.reshape(x, [BLOCK_B, 16]), propagate_nan=_NAN_ALL)
    else:
        # Interpreter only: np.nanmax skips NaN here, but a NaN still makes its row NaN through the sums.
        return tl.maximum(lanes, tl.reduce(x, 1, _max), propagate_nan=_NAN_ALL)


@triton.jit
def _recombine_kernel(
    logp_ptr, logits_ptr, offsets_ptr, group_offsets_ptr, group_classes_ptr, log_spread_ptr,
    sample_offsets_ptr, sample_rows_ptr, stamp_ptr, out_ptr, B, C, E,
    BLOCK_B: tl.constexpr, K: tl.constexpr, BINARY: tl.constexpr,
):
    """``logp, out: [B, C] f32``, ``logits: [N, C] f32`` (``[N, 1]`` when ``BINARY``), ``offsets,
    group_offsets: [E+1] i64``, ``group_classes: [M] i64``, ``log_spread: [E] f32``, ``sample_offsets:
    [B+1] i64``, ``sample_rows: [N] i64``, ``stamp: [B, C] i32`` zeros (scratch). Grid ``(cdiv(B, BLOCK_B),)``;
    ``out`` holds the accumulator. Columns go in chunks of ``K`` x 16 (``[BLOCK_B, K, 16]`` tiles;
    column ``c`` is lane ``c % 16``).
    """
    # int64 index math (_block_start): B * C and N * C can pass 2**31. rows, and the loaded row
    # indices r, are int64, so every row offset (rows * C, r * C) is an int64 product.
    rows = _block_start(tl.program_id(0), BLOCK_B) + tl.arange(0, BLOCK_B)
    lane = tl.arange(0, 16)
    chunk = tl.reshape(tl.arange(0, 16 * K), [K, 16])  # column offsets within a chunk
    row_mask = rows < B
    out_rows = out_ptr + rows[:, None, None] * C
    stamp_rows = stamp_ptr + rows[:, None, None] * C
    start = tl.load(sample_offsets_ptr + rows, mask=row_mask, other=0)
    count = tl.load(sample_offsets_ptr + rows + 1, mask=row_mask, other=0) - start
    # The largest power of two <= E: the first step of the binary searches over offsets below.
    top = tl.full([], 1, tl.int32)
    while top <= (E >> 1):
        top = top << 1
    # The barriers order global-memory passes whose tiles may map elements to different threads
    # (no-ops under the interpreter).
    for c0 in range(0, C, 16 * K):
        cols = (c0 + chunk)[None, :, :]
        mask = row_mask[:, None, None] & (cols < C)
        x = tl.load(logp_ptr + rows[:, None, None] * C + cols, mask=mask)
        tl.store(out_rows + cols, x, mask=mask)
    tl.debug_barrier()

    for j in range(0, tl.reduce(count, 0, _max)):
        has = j < count
        has3 = has[:, None, None]
        r = tl.load(sample_rows_ptr + start + j, mask=has, other=0)
        # Expert of row r: the largest e with offsets[e] <= r, by binary search over offsets[0:E+1].
        e = tl.zeros([BLOCK_B], tl.int64)
        step = top
        while step > 0:
            cand = e + step
            ok = has & (cand <= E)
            ok = ok & (tl.load(offsets_ptr + cand, mask=ok, other=0) <= r)
            e = tl.where(ok, cand, e)
            step = step >> 1
        group_start = tl.load(group_offsets_ptr + e, mask=has, other=0)
        group_size = tl.load(group_offsets_ptr + e + 1, mask=has, other=0) - group_start
        log_spread = tl.load(log_spread_ptr + e, mask=has, other=0.0)
        # Membership: column c is in this step's group iff stamp[i, c] == j + 1. Stamps only grow, so
        # nothing is cleared, and the scatter costs the group's size, not C.
        tl.debug_barrier()
        for k0 in range(0, tl.reduce(group_size, 0, _max), 16):
            pos = k0 + lane
            member = has[:, None] & (pos[None, :] < group_size[:, None])
            cls = tl.load(group_classes_ptr + group_start[:, None] + pos[None, :], mask=member, other=0)
            tl.store(stamp_ptr + rows[:, None] * C + cls, tl.full([BLOCK_B, 16], j + 1, tl.int32), mask=member)
        tl.debug_barrier()

        if BINARY:
            # log q = min(y, 0) - log1p(exp(-|y|)), log(1 - q) = min(-y, 0) - log1p(exp(-|y|)).
            y1 = tl.load(logits_ptr + r, mask=has, other=0.0)
            log_term = _log1p_nonnegative(_exp_nonpositive(-tl.abs(y1)))
            inside_value = (tl.minimum(y1, 0.0, propagate_nan=_NAN_ALL) - log_term)[:, None, None]
            spread = ((tl.minimum(-y1, 0.0, propagate_nan=_NAN_ALL) - log_term) - log_spread)[:, None, None]
        else:
            # ls = (y - m) - log_s. The maximum of ls over the outside classes comes from the logits:
            # a - b rounds monotonically in a, so it is exactly (max_out y - m) - log_s.
            y_rows = logits_ptr + r[:, None, None] * C
            lanes_max = tl.full([BLOCK_B, 16], float("-inf"), tl.float32)
            lanes_out = tl.full([BLOCK_B, 16], float("-inf"), tl.float32)
            for c0 in range(0, C, 16 * K):
                cols = (c0 + chunk)[None, :, :]
                mask = has3 & (cols < C)
                y = tl.load(y_rows + cols, mask=mask, other=float("-inf"))
                inside = tl.load(stamp_rows + cols, mask=mask, other=0) == j + 1
                lanes_max = _lanes_max(lanes_max, y, BLOCK_B, K)
                lanes_out = _lanes_max(lanes_out, tl.where(inside, float("-inf"), y), BLOCK_B, K)
            # _max may drop a NaN (maxnumf on a GPU); a NaN logit still makes the row NaN through the sum.
            m_row = tl.reduce(lanes_max, 1, _max)
            m = m_row[:, None, None]
            lanes = tl.zeros([BLOCK_B, 16], tl.float32)
            lanes_outside = tl.zeros([BLOCK_B, 16], tl.float32)  # s_out: the outside classes' exps
            for c0 in range(0, C, 16 * K):
                cols = (c0 + chunk)[None, :, :]
                mask = has3 & (cols < C)
                y = tl.load(y_rows + cols, mask=mask, other=float("-inf"))
                inside = tl.load(stamp_rows + cols, mask=mask, other=0) == j + 1
                terms = _exp_nonpositive(y - m)
                lanes = _lanes_add(lanes, tl.where(mask, terms, 0.0), BLOCK_B, K)
                lanes_outside = _lanes_add(lanes_outside, tl.where(mask & ~inside, terms, 0.0), BLOCK_B, K)
            log_s_row = _log1p_nonnegative(_fold_sum(lanes, BLOCK_B) - 1.0)
            s_out = _fold_sum(lanes_outside, BLOCK_B)
            log_s = log_s_row[:, None, None]
            shift_row = (tl.reduce(lanes_out, 1, _max) - m_row) - log_s_row
            shift_row = tl.where((shift_row == float("inf")) | (shift_row == float("-inf")), 0.0, shift_row)
            shift = shift_row[:, None, None]
            # The second pass, for rows whose s_out is too small: log(1 - q) = shift + log of the sum over the
            # outside classes of exp(ls - shift).
            lanes = tl.zeros([BLOCK_B, 16], tl.float32)
            for c0 in range(0, C, 16 * K):
                cols = (c0 + chunk)[None, :, :]
                mask = has3 & (cols < C)
                y = tl.load(y_rows + cols, mask=mask, other=float("-inf"))
                inside = tl.load(stamp_rows + cols, mask=mask, other=0) == j + 1
                terms = _exp_nonpositive(((y - m) - log_s) - shift)
                lanes = _lanes_add(lanes, tl.where(mask & ~inside, terms, 0.0), BLOCK_B, K)
            s = _fold_sum(lanes, BLOCK_B)
            log_not_q = tl.where(s == 0.0, float("-inf"), _log1p_nonnegative(s - 1.0)) + shift_row
            # From the first pass where s_out is large enough to trust (rowmath.contributions_torch).
            log_not_q = tl.where(s_out >= _ONE_PASS_MIN, _log_positive(s_out) - log_s_row, log_not_q)
            spread = (log_not_q - log_spread)[:, None, None]

        # out[i] += log v: ls (or log q) on the group's classes, log(1 - q) - log(C - |G|) elsewhere.
        for c0 in range(0, C, 16 * K):
            cols = (c0 + chunk)[None, :, :]
            mask = has3 & (cols < C)
            inside = tl.load(stamp_rows + cols, mask=mask, other=0) == j + 1
            if BINARY:
                v = tl.where(inside, inside_value, spread)
            else:
                y = tl.load(y_rows + cols, mask=mask, other=0.0)
                v = tl.where(inside, (y - m) - log_s, spread)
            acc = tl.load(out_rows + cols, mask=mask, other=0.0)
            tl.store(out_rows + cols, acc + v, mask=mask)
        tl.debug_barrier()

    # out[i] = log_softmax(acc) = (acc - m) - log(sum exp(acc - m)).
    lanes_max = tl.full([BLOCK_B, 16], float("-inf"), tl.float32)
    for c0 in range(0, C, 16 * K):
        cols = (c0 + chunk)[None, :, :]
        mask = row_mask[:, None, None] & (cols < C)
        lanes_max = _lanes_max(lanes_max, tl.load(out_rows + cols, mask=mask, other=float("-inf")), BLOCK_B, K)
    m = tl.reduce(lanes_max, 1, _max)[:, None, None]
    lanes = tl.zeros([BLOCK_B, 16], tl.float32)
    for c0 in range(0, C, 16 * K):
        cols = (c0 + chunk)[None, :, :]
        mask = row_mask[:, None, None] & (cols < C)
        acc = tl.load(out_rows + cols, mask=mask, other=float("-inf"))
        lanes = _lanes_add(lanes, tl.where(mask, _exp_nonpositive(acc - m), 0.0), BLOCK_B, K)
    log_s = _log1p_nonnegative(_fold_sum(lanes, BLOCK_B) - 1.0)[:, None, None]
    for c0 in range(0, C, 16 * K):
        cols = (c0 + chunk)[None, :, :]
        mask = row_mask[:, None, None] & (cols < C)
        acc = tl.load(out_rows + cols, mask=mask, other=0.0)
        tl.store(out_rows + cols, (acc - m) - log_s, mask=mask)


_INTERPRETED = _is_interpreted(_recombine_kernel)
# Under the interpreter every tl op is a numpy call plus ~0.1 ms of Python: one wide chunk covers
# the row (K x 16 >= C, up to 1024 columns) and a tile holds up to 65536 elements. On a GPU a chunk
# is 16 columns (K = 1) whatever C; per-row values are replicated over the 16 lanes' threads, so
# registers grow with BLOCK_B: 16 rows (2 tile elements a thread) use ~64, 32 rows ~115.
_GPU_TILE, _GPU_MAX_K = 256, 1
_TILE, _MAX_K = (65536, 64) if _INTERPRETED else (_GPU_TILE, _GPU_MAX_K)


def _recombine_config(C: int, B: int | None = None) -> dict:
    """``BLOCK_B`` samples a program, chunks of ``K`` x 16 columns; under the interpreter, no more
    samples a program than ``B`` needs (results never depend on the blocking)."""
    k = 1
    if _MAX_K > 1:  # (C may be symbolic when traced; the GPU config does not look at it)
        k = min(triton.next_power_of_2(triton.cdiv(max(C, 1), 16)), _MAX_K)
    block_b = _TILE // (16 * k)
    if _INTERPRETED and B is not None:
        block_b = min(block_b, triton.next_power_of_2(max(B, 1)))
    return {"BLOCK_B": block_b, "K": k}


def _check(logp: Tensor, logits: Tensor, offsets: Tensor, group_offsets: Tensor, group_classes: Tensor,
           log_spread: Tensor, sample_offsets: Tensor, sample_rows: Tensor) -> None:
    name = "triton_recombine"
    torch._check(logp.dim() == 2 and logp.dtype == torch.float32, lambda: f"{name}: logp must be [B, C] float32")
    torch._check(
        logits.dim() == 2 and logits.dtype == torch.float32 and (logits.shape[1] == logp.shape[1] or logits.shape[1] == 1),
        lambda: f"{name}: logits must be [N, C] or [N, 1] float32",
    )
    for t in (offsets, group_offsets, group_classes, sample_offsets, sample_rows):
        torch._check(t.dim() == 1 and t.dtype == torch.int64, lambda: f"{name}: routing and group tables must be 1-D int64")
    torch._check(offsets.shape[0] >= 1, lambda: f"{name}: offsets must be [E+1]")
    torch._check(group_offsets.shape[0] == offsets.shape[0], lambda: f"{name}: group_offsets must be [E+1] like offsets")
    torch._check(
        log_spread.dim() == 1 and log_spread.dtype == torch.float32 and log_spread.shape[0] == offsets.shape[0] - 1,
        lambda: f"{name}: log_spread must be [E] float32",
    )
    torch._check(sample_offsets.shape[0] == logp.shape[0] + 1, lambda: f"{name}: sample_offsets must be [B+1]")
    torch._check(sample_rows.shape[0] == logits.shape[0], lambda: f"{name}: sample_rows must be [N], one per logits row")


def _recombine_fake(logp: Tensor, logits: Tensor, offsets: Tensor, group_offsets: Tensor, group_classes: Tensor,
                    log_spread: Tensor, sample_offsets: Tensor, sample_rows: Tensor) -> Tensor:
    _check(logp, logits, offsets, group_offsets, group_classes, log_spread, sample_offsets, sample_rows)
    return torch.empty_like(logp, memory_format=torch.contiguous_format)


def _recombine(logp: Tensor, logits: Tensor, offsets: Tensor, group_offsets: Tensor, group_classes: Tensor,
               log_spread: Tensor, sample_offsets: Tensor, sample_rows: Tensor) -> Tensor:
    """``logp: [B, C] f32``, ``logits: [N, C or 1] f32`` in buffer order, CSR groups and ``log_spread: [E]``,
    routing from ``triton_route`` -> ``[B, C] f32``, equal to ``rowmath.recombine_torch``."""
    _check(logp, logits, offsets, group_offsets, group_classes, log_spread, sample_offsets, sample_rows)
    logp, logits, offsets, group_offsets, group_classes, log_spread, sample_offsets, sample_rows = (
        t.contiguous() for t in (logp, logits, offsets, group_offsets, group_classes, log_spread, sample_offsets,
                                 sample_rows)
    )
    b, c = logp.shape
    out = torch.empty_like(logp)
    if b == 0 or c == 0:
        return out
    stamp = torch.zeros((b, c), dtype=torch.int32, device=logp.device)
    cfg = _recombine_config(c, b)
    binary = logits.shape[1] == 1 and c != 1
    grid = (triton.cdiv(b, cfg["BLOCK_B"]),)
    args = (logp, logits, offsets, group_offsets, group_classes, log_spread, sample_offsets, sample_rows, stamp, out,
            b, c, offsets.shape[0] - 1)
    with _quiet_numpy():
        wrap_triton(_recombine_kernel)[grid](*args, BINARY=binary, **cfg, **_LAUNCH_OPTIONS)
    return out


@contextlib.contextmanager
def _quiet_numpy():
    """Under the interpreter, numpy's warnings about inf - inf, NaN and the like: the masked-off lanes
    and non-finite inputs compute them, as a GPU does, silently. Nothing to silence when compiled."""
    if not _INTERPRETED:
        yield
        return
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


triton_recombine = _define_op("mnn_fast::triton_recombine", _recombine, _recombine_fake, [_recombine_kernel])
