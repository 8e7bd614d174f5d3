"""route: the active (sample, expert) pairs as an expert-major stable ``perm`` plus its sample-major view.

Algorithm: pass 1 finds each sample's k-th best key by a 32-step radix select and counts active pairs
per sample and per (program, expert); exclusive scans of those counts give every program's cursor per
expert; pass 2 revisits the same tiles and places each pair with in-tile prefix sums (stable by construction).
"""
from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

from mnn_fast.engine.ops import data_dependent_size  # absolute: the tests also import this file as kernels.route
from . import _block_start, _is_interpreted, _max, _sum


@triton.jit
def _load_keys(ptrs, mask):
    """int32 order keys of a tile of f32 scores: int order == float order of ``key(s)``.

    ``key(s)`` maps NaN (and the padding) to -inf and -0.0 to +0.0, so equal floats get equal keys.
    """
    s = tl.load(ptrs, mask=mask, other=-float("inf"))
    s = tl.where(s != s, -float("inf"), s)
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    # Negative floats order in reverse of their magnitude bits: flip those to make int order match.
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _passes_threshold(key, threshold_key, ptrs, mask, HAS_THRESHOLD: tl.constexpr):
    """The threshold half of ``active``: ``s > threshold`` as keys, or, with no threshold, "not NaN".

    Keys cannot tell NaN from -inf (both order as -inf), so with the threshold off (where a -inf
    score may still be among the top-k) NaN is found from the raw scores; padding loads as NaN.
    """
    if HAS_THRESHOLD:
        return key > threshold_key
    s = tl.load(ptrs, mask=mask, other=float("nan"))
    return s == s


@triton.jit
def _route_count_kernel(
    scores_ptr, kth_key_ptr, cut_ptr, sample_counts_ptr, program_counts_ptr,
    B, E, threshold_key, top_k, blocks_per_program,
    BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr, USE_TOP_K: tl.constexpr, HAS_THRESHOLD: tl.constexpr,
    ONE_TILE: tl.constexpr,
):
    """Pass 1. ``scores: [B, E] f32``; writes ``sample_counts: [B] i64``, adds into ``program_counts: [P, E] i32``.

    With ``USE_TOP_K`` also writes ``kth_key: [B] i32`` (the k-th best order key) and ``cut: [B] i32``
    (the largest expert index taken among the keys equal to it). Grid ``(P,)``; program ``p`` walks
    sample blocks ``[p * blocks_per_program, (p + 1) * blocks_per_program)``.
    """
    pid = tl.program_id(0)
    # int64 index math (_block_start): B * E and P * E can pass 2**31. rows is int64, so the row
    # offsets rows * E are int64 products; so are block_lo (hence blk) and this program's counts row.
    block_lo = _block_start(pid, blocks_per_program)
    block_hi = tl.minimum(block_lo + blocks_per_program, tl.cdiv(B, BLOCK_B))
    counts_row = program_counts_ptr + _block_start(pid, E)
    arange_e = tl.arange(0, BLOCK_E)
    for blk in range(block_lo, block_hi):
        rows = _block_start(blk, BLOCK_B) + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        row_ptr = scores_ptr + rows[:, None] * E
        if USE_TOP_K:
            if ONE_TILE:
                one_key = _load_keys(row_ptr + arange_e[None, :], row_mask[:, None] & (arange_e < E)[None, :])
            # Radix select: the k-th best key is the largest t with #{key >= t} >= k. Bits of t are
            # decided from the top in the unsigned view (key ^ INT_MIN), one pass over E per bit;
            # flipping a bit that is still 0 in that view is an XOR here, starting with the sign bit.
            kth = tl.full([BLOCK_B], -2147483648, tl.int32)
            bit = tl.full([], -2147483648, tl.int32)
            for _ in range(32):
                cand = kth ^ bit
                n_ge = tl.zeros([BLOCK_B], tl.int32)
                for e0 in range(0, E, BLOCK_E):
                    cols = e0 + arange_e
                    col_mask = cols < E
                    if ONE_TILE:
                        key = one_key
                    else:
                        key = _load_keys(row_ptr + cols[None, :], row_mask[:, None] & col_mask[None, :])
                    n_ge += tl.reduce(((key >= cand[:, None]) & col_mask[None, :]).to(tl.int32), 1, _sum)
                kth = tl.where(n_ge >= top_k, cand, kth)
                bit = tl.where(bit < 0, 0x40000000, bit >> 1)
            n_gt = tl.zeros([BLOCK_B], tl.int32)
            for e0 in range(0, E, BLOCK_E):
                cols = e0 + arange_e
                col_mask = cols < E
                if ONE_TILE:
                    key = one_key
                else:
                    key = _load_keys(row_ptr + cols[None, :], row_mask[:, None] & col_mask[None, :])
                n_gt += tl.reduce(((key > kth[:, None]) & col_mask[None, :]).to(tl.int32), 1, _sum)
            # Ties at the k-th key go to the lowest indices: take the first (k - n_gt) of them.
            need = top_k - n_gt
            cut = tl.full([BLOCK_B], -1, tl.int32)
            n_eq = tl.zeros([BLOCK_B], tl.int32)
            for e0 in range(0, E, BLOCK_E):
                cols = e0 + arange_e
                col_mask = cols < E
                if ONE_TILE:
                    key = one_key
                else:
                    key = _load_keys(row_ptr + cols[None, :], row_mask[:, None] & col_mask[None, :])
                eq = ((key == kth[:, None]) & col_mask[None, :]).to(tl.int32)
                hit = (eq != 0) & (tl.associative_scan(eq, 1, _sum) + n_eq[:, None] == need[:, None])
                cut = tl.maximum(cut, tl.reduce(tl.where(hit, cols[None, :], -1), 1, _max))
                n_eq += tl.reduce(eq, 1, _sum)
            tl.store(kth_key_ptr + rows, kth, mask=row_mask)
            tl.store(cut_ptr + rows, cut, mask=row_mask)
        n_active = tl.zeros([BLOCK_B], tl.int32)
        for e0 in range(0, E, BLOCK_E):
            cols = e0 + arange_e
            col_mask = cols < E
            key = _load_keys(row_ptr + cols[None, :], row_mask[:, None] & col_mask[None, :])
            act = _passes_threshold(key, threshold_key, row_ptr + cols[None, :], row_mask[:, None] & col_mask[None, :], HAS_THRESHOLD)
            if USE_TOP_K:
                act = act & ((key > kth[:, None]) | ((key == kth[:, None]) & (cols[None, :] <= cut[:, None])))
            act = act.to(tl.int32)
            n_active += tl.reduce(act, 1, _sum)
            tl.atomic_add(counts_row + cols, tl.reduce(act, 0, _sum), mask=col_mask, sem="relaxed")
        tl.store(sample_counts_ptr + rows, n_active.to(tl.int64), mask=row_mask)


@triton.jit
def _route_fill_kernel(
    scores_ptr, kth_key_ptr, cut_ptr, sample_offsets_ptr, cursor_ptr, perm_ptr, sample_rows_ptr,
    B, E, threshold_key, blocks_per_program,
    BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr, USE_TOP_K: tl.constexpr, HAS_THRESHOLD: tl.constexpr,
):
    """Pass 2. ``cursor: [P, E] i64`` = next ``perm`` row of each expert for program ``p`` (advanced here).

    Writes ``perm: [N] i64`` and ``sample_rows: [N] i64``; grid and sample blocks as in pass 1.
    """
    pid = tl.program_id(0)
    # int64 index math as in pass 1 (B * E and P * E can pass 2**31); r and slot are int64 loads.
    block_lo = _block_start(pid, blocks_per_program)
    block_hi = tl.minimum(block_lo + blocks_per_program, tl.cdiv(B, BLOCK_B))
    cursor_row = cursor_ptr + _block_start(pid, E)
    arange_e = tl.arange(0, BLOCK_E)
    for blk in range(block_lo, block_hi):
        rows = _block_start(blk, BLOCK_B) + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        row_ptr = scores_ptr + rows[:, None] * E
        slot0 = tl.load(sample_offsets_ptr + rows, mask=row_mask, other=0)
        if USE_TOP_K:
            kth = tl.load(kth_key_ptr + rows, mask=row_mask, other=0)
            cut = tl.load(cut_ptr + rows, mask=row_mask, other=-1)
        for e0 in range(0, E, BLOCK_E):
            cols = e0 + arange_e
            col_mask = cols < E
            key = _load_keys(row_ptr + cols[None, :], row_mask[:, None] & col_mask[None, :])
            act = _passes_threshold(key, threshold_key, row_ptr + cols[None, :], row_mask[:, None] & col_mask[None, :], HAS_THRESHOLD)
            if USE_TOP_K:
                act = act & ((key > kth[:, None]) | ((key == kth[:, None]) & (cols[None, :] <= cut[:, None])))
            a = act.to(tl.int32)
            # Exclusive prefix sums: down a column = rank among this block's samples of the expert
            # (increasing i: stable), along a row = rank among the sample's experts (increasing e).
            rank_in_expert = tl.associative_scan(a, 0, _sum) - a
            rank_in_sample = tl.associative_scan(a, 1, _sum) - a
            base = tl.load(cursor_row + cols, mask=col_mask, other=0)
            r = base[None, :] + rank_in_expert
            slot = slot0[:, None] + rank_in_sample
            tl.store(perm_ptr + r, tl.broadcast_to(rows[:, None], [BLOCK_B, BLOCK_E]), mask=act)
            tl.store(sample_rows_ptr + slot, r, mask=act)
            tl.store(cursor_row + cols, base + tl.reduce(a, 0, _sum), mask=col_mask)
            slot0 += tl.reduce(a, 1, _sum)
        # The next block re-reads this program's cursor row, possibly from other threads.
        tl.debug_barrier()


_INTERPRETED = _is_interpreted(_route_count_kernel)
# Under the interpreter every tl op is a numpy call plus Python overhead: fewer, bigger tiles.
# On a GPU, 8 elements a thread keep both passes near 100 registers, with no spills.
_MAX_BLOCK_E = 1024 if _INTERPRETED else 128
_TILE = 65536 if _INTERPRETED else 1024
_MAX_BLOCK_B = 8192 if _INTERPRETED else 256
_MAX_PROGRAMS = 1024  # persistent grid: the per-(program, expert) scratch stays <= 1024 * E ints


def _route_config(B: int, E: int, use_top_k: bool, has_threshold: bool = True) -> dict:
    block_e = min(triton.next_power_of_2(max(E, 1)), _MAX_BLOCK_E)
    block_b = max(1, min(_MAX_BLOCK_B, _TILE // block_e))
    num_blocks = triton.cdiv(B, block_b)
    blocks_per_program = max(1, triton.cdiv(num_blocks, _MAX_PROGRAMS))
    return {
        "BLOCK_B": block_b,
        "BLOCK_E": block_e,
        "USE_TOP_K": use_top_k,
        "HAS_THRESHOLD": has_threshold,
        "ONE_TILE": E <= block_e,
        "blocks_per_program": blocks_per_program,
        "num_programs": triton.cdiv(num_blocks, blocks_per_program),
    }


def _threshold_key(threshold: float) -> int:
    """The int32 order key ``K`` of the threshold, so that ``s > threshold`` iff ``key(s) > K``.

    torch compares a float32 tensor with a Python float in float32, so the threshold is rounded to
    float32 first. Keys send NaN scores to -inf, the smallest key: never above any ``K``, as the IEEE
    compare says. A NaN threshold activates nothing: it becomes +inf, the largest key.
    """
    t = float(torch.tensor(threshold, dtype=torch.float32))  # round to nearest; overflow -> inf
    if math.isnan(t):
        t = math.inf
    bits = struct.unpack("<i", struct.pack("<f", t + 0.0))[0]  # + 0.0: -0.0 -> +0.0
    return bits ^ 0x7FFFFFFF if bits < 0 else bits


def _check(scores: Tensor, top_k: int) -> None:
    torch._check(scores.dim() == 2 and scores.dtype == torch.float32, lambda: "triton_route: scores must be [B, E] float32")
    torch._check(scores.shape[1] >= 1, lambda: "triton_route: E must be >= 1")
    torch._check(top_k >= 0, lambda: f"triton_route: top_k must be >= 0, got {top_k}")


def _route_fake(scores: Tensor, threshold: float, top_k: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check(scores, top_k)
    b, e = scores.shape
    n = data_dependent_size(torch.library.get_ctx())  # also where dynamo's capture flags are off
    i64 = dict(dtype=torch.int64)
    return (
        scores.new_empty(e, **i64),
        scores.new_empty(e + 1, **i64),
        scores.new_empty(n, **i64),
        scores.new_empty(b + 1, **i64),
        scores.new_empty(n, **i64),
    )


def _route(scores: Tensor, threshold: float, top_k: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``scores: [B, E] f32`` -> ``(counts [E], offsets [E+1], perm [N], sample_offsets [B+1], sample_rows [N])``, all int64.

    ``threshold=-inf``: no threshold; ``top_k=0``: no top-k.
    """
    _check(scores, top_k)
    scores = scores.contiguous()
    b, e = scores.shape
    device = scores.device
    threshold_key = _threshold_key(threshold)
    top_k = min(top_k, e)  # k >= E keeps every expert, as a sort truncated at k does
    cfg = _route_config(b, e, top_k > 0, threshold != -math.inf)
    num_programs = cfg.pop("num_programs")
    blocks_per_program = cfg.pop("blocks_per_program")
    one_tile = cfg.pop("ONE_TILE")

    sample_counts = torch.empty(b, dtype=torch.int64, device=device)
    program_counts = torch.zeros(num_programs, e, dtype=torch.int32, device=device)
    select_len = b if top_k > 0 else 1
    kth_key = torch.empty(select_len, dtype=torch.int32, device=device)
    cut = torch.empty(select_len, dtype=torch.int32, device=device)
    if num_programs > 0:
        _route_count_kernel[(num_programs,)](
            scores, kth_key, cut, sample_counts, program_counts,
            b, e, threshold_key, top_k, blocks_per_program, ONE_TILE=one_tile, **cfg,
        )
    counts = program_counts.sum(0, dtype=torch.int64)
    offsets = torch.zeros(e + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, 0, out=offsets[1:])
    sample_offsets = torch.zeros(b + 1, dtype=torch.int64, device=device)
    torch.cumsum(sample_counts, 0, out=sample_offsets[1:])
    # The one host sync: N sizes perm and sample_rows.
    n = int(offsets[-1].item())
    perm = torch.empty(n, dtype=torch.int64, device=device)
    sample_rows = torch.empty(n, dtype=torch.int64, device=device)
    if n > 0:
        # Program p's first row for expert e: offsets[e] + the expert's count in programs before p.
        program_counts = program_counts.to(torch.int64)
        cursor = (offsets[:-1] + program_counts.cumsum(0) - program_counts).contiguous()
        _route_fill_kernel[(num_programs,)](
            scores, kth_key, cut, sample_offsets, cursor, perm, sample_rows,
            b, e, threshold_key, blocks_per_program, **cfg,
        )
    return counts, offsets, perm, sample_offsets, sample_rows


# A custom_op, not a triton_op: N is only known after pass 1, and a triton_op's fake kernel is its
# body, whose .item() on a fake tensor fails (opcheck's FakeTensorMode has no ShapeEnv; torch.compile
# needs capture_scalar_outputs). A custom_op's fake declares N with new_dynamic_size() instead, and
# torch.compile treats route as one opaque node. Its kernels are therefore launched directly.
triton_route = torch.library.custom_op("mnn_fast::triton_route", _route, mutates_args=())
triton_route.register_fake(_route_fake)
