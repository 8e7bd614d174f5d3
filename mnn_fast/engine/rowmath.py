"""The recombination's float32 row arithmetic, written so every backend computes the same bits.

exp, log1p and log are Cody-Waite reduction plus Cephes polynomials, one rounding per ``+``, ``-``, ``*``, ``/`` (no
fused multiply-add); every row sum runs over 16 lanes in column order, then a fixed pairwise tree.
C++ (``csrc/rowmath.h``), CUDA and Triton (``kernels/recombine.py``) spell out exactly these steps.

This module is the reference of those steps in vectorised PyTorch, the ``torch`` backend of
``contributions``, ``log_softmax_rows`` and ``recombine`` (``docs/ops.md``), and the arithmetic
the naive loop calls when the C++ extension is missing. Each function is row-wise: a row's result
never depends on other rows, the batch size, memory alignment or the thread count.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["LANES", "exp_nonpositive", "log1p_nonnegative", "log_positive", "lane_sum", "log_softmax_rows", "softmax_rows",
           "contributions_torch",
           "recombine_torch", "log_spread_table", "expert_of_row", "membership"]

LANES = 16
# Below this exp(t) < 2**-115: flushed to 0, so 2**n stays a normal number. Nothing is lost: every
# sum it enters already holds a 1 (the row's maximum), and 2**-115 is far below its last bit.
EXP_FLUSH = -80.0
# log(1 - q) comes from the first exp pass when the outside classes' sum is at least this: the
# flushed terms (each < 2**-115, at most 2**31 of them) are then below its last bit.
ONE_PASS_MIN = 2.0**-60

_LOG2E = 1.44269504088896341
# ln 2 split so that n * _LN2_HI is exact for |n| < 2**15 (_LN2_HI has 9 significant bits).
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440e-4
# Cephes expf: exp(r) = 1 + r + r^2 * P(r) on |r| <= ln(2)/2.
_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
# Cephes logf: log(1 + f) = f - f^2/2 + f^3 * Q(f) on sqrt(1/2) - 1 <= f < sqrt(2) - 1.
_LOG_Q = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1, -1.6668057665e-1,
          2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)
_SQRT2 = 1.41421356237309505


def _f32(x: float) -> float:
    """``x`` rounded to float32, as the C++ and Triton kernels hold their constants."""
    return float(torch.tensor(x, dtype=torch.float32))


def exp_nonpositive(t: Tensor) -> Tensor:
    """``exp(t)`` for ``t: Tensor float32 <= 0`` (or NaN), within ~1 ulp; ``0`` below ``EXP_FLUSH``."""
    # NaN stays NaN through the polynomial; it is only kept out of the integer conversion below.
    clamped = torch.where(t < EXP_FLUSH, torch.full_like(t, EXP_FLUSH), t)
    n = torch.floor(clamped * _f32(_LOG2E) + 0.5)
    r = (clamped - n * _f32(_LN2_HI)) - n * _f32(_LN2_LO)
    z = r * r
    p = torch.full_like(r, _f32(_EXP_P[0]))
    for coef in _EXP_P[1:]:
        p = p * r + _f32(coef)
    y = (p * z + r) + 1.0
    exponent = torch.nan_to_num(n, nan=0.0).to(torch.int32)
    scale = torch.bitwise_left_shift(exponent + 127, 23).view(torch.float32)
    return torch.where(t < EXP_FLUSH, torch.zeros_like(t), y * scale)


def log1p_nonnegative(u: Tensor) -> Tensor:
    """``log(1 + u)`` for finite ``u: Tensor float32 >= 0`` (or NaN), within ~1 ulp, exact to first order
    for tiny ``u`` (the rounding of ``1 + u`` is added back)."""
    v = 1.0 + u
    return _log_corrected(v, (u - (v - 1.0)) / v)


def log_positive(x: Tensor) -> Tensor:
    """``log(x)`` for normal ``x: Tensor float32 > 0`` (or NaN), within ~1 ulp."""
    return _log_corrected(x, torch.zeros_like(x))


def _log_corrected(v: Tensor, correction: Tensor) -> Tensor:
    """``log(v) + correction``: ``v = 2**e * m``, ``m`` in ``[sqrt(1/2), sqrt(2))``, Cephes ``logf`` on ``m``,
    the correction added next to the polynomial's smallest terms."""
    bits = v.view(torch.int32)
    e = torch.bitwise_right_shift(bits, 23) - 127
    m = torch.bitwise_or(torch.bitwise_and(bits, 0x007FFFFF), 0x3F800000).view(torch.float32)
    big = m > _f32(_SQRT2)
    m = torch.where(big, m * 0.5, m)
    ef = (e + big.to(torch.int32)).to(torch.float32)
    f = m - 1.0
    z = f * f
    q = torch.full_like(f, _f32(_LOG_Q[0]))
    for coef in _LOG_Q[1:]:
        q = q * f + _f32(coef)
    y = (q * f) * z
    y = y + ef * _f32(_LN2_LO)
    y = y - 0.5 * z
    y = y + correction
    return (f + y) + ef * _f32(_LN2_HI)


def lane_sum(v: Tensor) -> Tensor:
    """``Tensor[n]``: each row of ``v: Tensor[n, k] float32 >= 0`` summed over 16 lanes (lane ``j`` adds
    columns ``j, j+16, j+32, ...`` left to right from 0), then lanes ``j`` and ``j+h`` pairwise for
    ``h = 8, 4, 2, 1``."""
    n, width = v.shape
    blocks = -(-width // LANES)
    padded = v.new_zeros(n, blocks * LANES)
    padded[:, :width] = v
    padded = padded.view(n, blocks, LANES)
    acc = v.new_zeros(n, LANES)
    for b in range(blocks):
        acc = acc + padded[:, b]
    h = LANES // 2
    while h:
        acc = acc[:, :h] + acc[:, h : 2 * h]
        h //= 2
    return acc[:, 0]


def _log_sum_shifted(x: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(m, log sum_c exp(x_c - m))`` per row of ``x: Tensor[n, k]``, over the columns where ``keep``;
    ``m`` = the row's maximum there (0 where that is infinite, as ``torch.logsumexp`` shifts);
    ``-inf`` for a row with nothing to sum."""
    masked = x if keep is None else torch.where(keep, x, torch.full_like(x, -math.inf))
    m = torch.amax(masked, dim=1, keepdim=True) if x.shape[1] else x.new_full((x.shape[0], 1), -math.inf)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    terms = exp_nonpositive(masked - m)
    s = lane_sum(terms)
    # s >= 1 (the maximum's own term) unless nothing was summed.
    log_s = torch.where(s == 0, torch.full_like(s, -math.inf), log1p_nonnegative(s - 1.0))
    return m, log_s.unsqueeze(1)


def _exp_pass(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The one exp pass of a row op over ``x: Tensor[n, C] float32``: ``(shifted = x - m, e = exp(shifted),
    s, log_s)``, ``m`` the row maximum, ``s: Tensor[n, 1]`` the lane sum of ``e`` and ``log_s = log(s)``."""
    m = torch.amax(x, dim=1, keepdim=True) if x.shape[1] else x
    shifted = x - m
    e = exp_nonpositive(shifted)
    s = lane_sum(e).unsqueeze(1)
    return shifted, e, s, log1p_nonnegative(s - 1.0)


def log_softmax_rows(x: Tensor) -> Tensor:
    """``Tensor[n, C] float32``: ``(x - m) - log(sum exp(x - m))`` per row, ``m`` the row maximum."""
    shifted, _, _, log_s = _exp_pass(x.float())
    return shifted - log_s


def softmax_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(log_probs, probs)``, both ``Tensor[n, C] float32``, from one exp pass per row: ``e = exp(x - m)``,
    ``s`` = its lane sum, ``log_probs = (x - m) - log(s)`` (bitwise :func:`log_softmax_rows`) and
    ``probs = e * (1 / s)`` (one division a row: a multiply costs a fraction of a division)."""
    shifted, e, s, log_s = _exp_pass(x.float())
    return shifted - log_s, e * (1.0 / s)


def log_spread_table(group_offsets: Tensor, num_classes: int) -> Tensor:
    """``Tensor[E] float32``: ``log(C - |G_e|)`` (0 where the group covers every class), each
    ``math.log`` rounded once to float32, the constant every backend subtracts."""
    sizes = (group_offsets[1:] - group_offsets[:-1]).tolist()
    values = [math.log(num_classes - g) if num_classes > g else 0.0 for g in sizes]
    return torch.tensor(values, dtype=torch.float32, device=group_offsets.device)


def expert_of_row(offsets: Tensor, rows: int) -> Tensor:
    """``Tensor[rows] int64``: the expert owning each buffer row (``offsets: Tensor[E+1] int64``)."""
    return torch.searchsorted(offsets, torch.arange(rows, device=offsets.device), right=True) - 1


def membership(group_offsets: Tensor, group_classes: Tensor, num_classes: int) -> Tensor:
    """``Tensor[E, C] bool``: class ``c`` is in expert ``e``'s group."""
    experts = group_offsets.shape[0] - 1
    sizes = group_offsets[1:] - group_offsets[:-1]
    owner = torch.repeat_interleave(torch.arange(experts, device=group_offsets.device), sizes,
                                    output_size=group_classes.shape[0])
    member = torch.zeros(experts, num_classes, dtype=torch.bool, device=group_offsets.device)
    member[owner, group_classes] = True
    return member


def contributions_torch(logits: Tensor, offsets: Tensor, group_offsets: Tensor, group_classes: Tensor,
                        log_spread: Tensor, num_classes: int | None = None) -> Tensor:
    """``log v: Tensor[N, C] float32`` (the recombination, docs/how-it-works.md) for ``logits: Tensor[N, W] float32`` in buffer order.

    ``W = C``, or ``W = 1`` (binary specialists, every group one class; then ``num_classes`` gives
    ``C``). ``offsets: Tensor[E+1] int64`` (expert ``e`` owns rows ``offsets[e]:offsets[e+1]``),
    ``group_offsets / group_classes`` the CSR groups, ``log_spread`` from :func:`log_spread_table`.
    Per row: ``ls = log_softmax(y)``; group classes keep ``ls[c]``; the others get ``log(1 - q) -
    log_spread[e]``, with ``log(1 - q) = log(s_out) - log(s)`` from the one exp pass (``s`` and
    ``s_out`` the lane sums of ``exp(y - m)`` over every class and over the outside ones) where
    ``s_out >= ONE_PASS_MIN``, else ``logsumexp(ls[outside])`` shifted by its own maximum (a second
    pass: nothing outside, or every outside term too small to trust). Binary: ``log q = logsigmoid(y)`` and
    ``log(1 - q) = logsigmoid(-y)``, computed as ``min(+-y, 0) - log1p(exp(-|y|))``.
    """
    rows, width = logits.shape
    classes = width if width != 1 or num_classes is None else num_classes
    expert = expert_of_row(offsets, rows)
    inside = membership(group_offsets, group_classes, classes).index_select(0, expert)
    spread = log_spread.index_select(0, expert).unsqueeze(1)
    y = logits.float()
    if width == 1 and classes != 1:
        log_term = log1p_nonnegative(exp_nonpositive(-y.abs()))
        log_q = torch.minimum(y, torch.zeros_like(y)) - log_term
        log_not_q = torch.minimum(-y, torch.zeros_like(y)) - log_term
        return torch.where(inside, log_q, log_not_q - spread)
    shifted, terms, _, log_s = _exp_pass(y)
    ls = shifted - log_s  # log_softmax_rows(y)
    s_out = lane_sum(torch.where(inside, torch.zeros_like(terms), terms)).unsqueeze(1)
    shift, log_sum = _log_sum_shifted(ls, ~inside)  # the second pass, for the rows below ONE_PASS_MIN
    log_not_q = torch.where(s_out >= ONE_PASS_MIN, log_positive(s_out) - log_s, log_sum + shift)
    return torch.where(inside, ls, log_not_q - spread)


def recombine_torch(logp: Tensor, logits: list[Tensor], offsets: Tensor, group_offsets: Tensor,
                    group_classes: Tensor, log_spread: Tensor, sample_offsets: Tensor, sample_rows: Tensor) -> Tensor:
    """``log_softmax_rows(logp[i] + log v[r0] + log v[r1] + ...)``: the ``recombine`` op in PyTorch.

    Shapes as ``docs/ops.md`` (``logits``: one tensor in buffer order, or one per expert);
    ``r0, r1, ...`` are sample ``i``'s rows in ``sample_rows`` order (increasing expert order).
    """
    if not isinstance(logits, Tensor):
        logits = logits[0] if len(logits) == 1 else torch.cat(list(logits))
    logv = contributions_torch(logits, offsets, group_offsets, group_classes, log_spread, logp.shape[1])
    acc = logp.clone()
    counts = sample_offsets[1:] - sample_offsets[:-1]
    position = torch.arange(sample_rows.shape[0], device=logp.device) - torch.repeat_interleave(
        sample_offsets[:-1], counts, output_size=sample_rows.shape[0])
    owner = torch.repeat_interleave(torch.arange(logp.shape[0], device=logp.device), counts,
                                    output_size=sample_rows.shape[0])
    # One add per step j over the samples that have a j-th row: each element's chain stays in order.
    for j in range(int(counts.max()) if counts.numel() else 0):
        at = (position == j).nonzero().squeeze(1)
        samples = owner.index_select(0, at)
        acc[samples] = acc.index_select(0, samples) + logv.index_select(0, sample_rows.index_select(0, at))
    return log_softmax_rows(acc)
