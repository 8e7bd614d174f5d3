// The row passes of rows.h for eight rows at once (AVX2): one row per lane of a 256-bit register.
// rows.h spreads one row's columns over 16 lanes, so each row is a long serial chain (max, exp sum,
// log1p, then the out-of-group max and sum) that the CPU cannot overlap with the next row's. Here a
// tile holds column c of eight rows in one register and the 16 column lanes become 16 registers:
// per row the operations are rowmath.h's in its order, so the bits are rows.h's (tested bitwise).
#pragma once

#if defined(__SSE2__)

#include <immintrin.h>

#include <cstdint>

#include "rows.h"

namespace mnn_fast {
namespace cpu {
namespace tile8 {

constexpr int kRows = 8;
using rowmath::kLanes;

#define MNN_AVX2 __attribute__((target("avx2")))

// An 8x8 block transposed in registers: out[k] element i = in[i] element k.
MNN_AVX2 inline void transpose8(const __m256* in, __m256* out) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(in[i], in[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(in[i], in[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    out[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    out[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// tile[8 c + r] = rows[r][c] for c < C: eight rows of C floats as C columns of eight.
MNN_AVX2 inline void load(const float* const* rows, int64_t C, float* tile) {
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    __m256 r[8], columns[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(rows[i] + c);
    transpose8(r, columns);
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(tile + 8 * (c + i), columns[i]);
  }
  for (; c < C; ++c) {
    for (int r = 0; r < kRows; ++r) tile[8 * c + r] = rows[r][c];
  }
}

// Per row (lane) the maximum of its C columns, as rows::row_max: lane j of the 16 takes columns
// j, j+16, ... in order (max(b, m) = b > m ? b : m, so even -0/+0 pick as the scalar loop), then
// the lanes in order; NaN if any column is NaN. Lanes past C would hold -inf, which no fold picks,
// so only the `used` ones are kept (their first column starts them: no 512-byte memset per call).
MNN_AVX2 inline __m256 max(const float* tile, int64_t C) {
  const int used = static_cast<int>(C < kLanes ? C : kLanes);
  const __m256 minus_inf = _mm256_set1_ps(-rows::kInf);
  __m256 lanes[kLanes], nans[kLanes];
  for (int j = 0; j < used; ++j) {
    const __m256 v = _mm256_loadu_ps(tile + 8 * j);
    lanes[j] = _mm256_max_ps(v, minus_inf);
    nans[j] = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  }
  for (int64_t c = kLanes; c < C; ++c) {
    const __m256 v = _mm256_loadu_ps(tile + 8 * c);
    const int j = static_cast<int>(c % kLanes);
    lanes[j] = _mm256_max_ps(v, lanes[j]);
    nans[j] = _mm256_or_ps(nans[j], _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  __m256 best = minus_inf, any_nan = _mm256_setzero_ps();
  for (int j = 0; j < used; ++j) {
    best = _mm256_max_ps(lanes[j], best);
    any_nan = _mm256_or_ps(any_nan, nans[j]);
  }
  return _mm256_blendv_ps(best, _mm256_set1_ps(rows::kNaN), any_nan);
}

// What a lane sum adds per cell: exp(x - shift), the same with the exp stored over x (kExpKept),
// or the cell itself (kAsIs: a tile of exps already).
enum class Terms { kExp, kExpKept, kAsIs };

template <Terms kTerms>
MNN_AVX2 inline __m256 term(float* cell, __m256 shift) {
  const __m256 x = _mm256_loadu_ps(cell);
  if (kTerms == Terms::kAsIs) return x;
  const __m256 v = rows::exp8(_mm256_sub_ps(x, shift));
  if (kTerms == Terms::kExpKept) _mm256_storeu_ps(cell, v);
  return v;
}

// Per row the sum of the terms in rowmath's lane order (rows::lane_sum_exp). Lanes past C would
// hold +0 (what rows.h's -inf padding adds); x + +0 == x for every lane sum (>= +0 or NaN), so the
// pairwise fold skips them.
template <Terms kTerms = Terms::kExp>
MNN_AVX2 inline __m256 sum_exp(float* tile, int64_t C, __m256 shift) {
  int used = static_cast<int>(C < kLanes ? C : kLanes);
  __m256 lanes[kLanes];
  for (int j = 0; j < used; ++j) lanes[j] = _mm256_add_ps(_mm256_setzero_ps(), term<kTerms>(tile + 8 * j, shift));
  for (int64_t c = kLanes; c < C; ++c) {
    const int j = static_cast<int>(c % kLanes);
    lanes[j] = _mm256_add_ps(lanes[j], term<kTerms>(tile + 8 * c, shift));
  }
  if (used == 0) return _mm256_setzero_ps();
  for (int h = kLanes / 2; h > 0; h /= 2) {
    for (int j = 0; j < h && j + h < used; ++j) lanes[j] = _mm256_add_ps(lanes[j], lanes[j + h]);
    used = used < h ? used : h;
  }
  return lanes[0];
}

// f per lane with rowmath's scalar function: eight independent chains the CPU overlaps.
template <typename F>
MNN_AVX2 inline __m256 per_lane(__m256 x, F f) {
  alignas(32) float v[kRows];
  _mm256_store_ps(v, x);
  for (int r = 0; r < kRows; ++r) v[r] = f(v[r]);
  return _mm256_load_ps(v);
}

// tile[c] = (tile[c] - m) - log_s per lane: log_softmax's last step, in place.
MNN_AVX2 inline void shift_scale(float* tile, int64_t C, __m256 m, __m256 log_s) {
  for (int64_t c = 0; c < C; ++c) {
    _mm256_storeu_ps(tile + 8 * c, _mm256_sub_ps(_mm256_sub_ps(_mm256_loadu_ps(tile + 8 * c), m), log_s));
  }
}

// dst[c] = dst[c] + value for c < n (one float32 add each, as the scalar loop).
MNN_AVX2 inline void add_scalar(float* dst, int64_t n, float value) {
  const __m256 v = _mm256_set1_ps(value);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) _mm256_storeu_ps(dst + c, _mm256_add_ps(_mm256_loadu_ps(dst + c), v));
  for (; c < n; ++c) dst[c] = rowmath::add(dst[c], value);
}

// dst[c] = (src[c] - m) - log_s for c < n.
MNN_AVX2 inline void sub2(const float* src, int64_t n, float m, float log_s, float* dst) {
  const __m256 vm = _mm256_set1_ps(m), vl = _mm256_set1_ps(log_s);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) _mm256_storeu_ps(dst + c, _mm256_sub_ps(_mm256_sub_ps(_mm256_loadu_ps(src + c), vm), vl));
  for (; c < n; ++c) dst[c] = rowmath::sub(rowmath::sub(src[c], m), log_s);
}

// The one exp pass over up to eight rows of C floats (`count` real ones; `padded` is filled with
// them, padded with the last): leaves exp(x - m) in the tile and gives per lane the row maximum m,
// the lane sum s and log_s = log(s) as rows::log_softmax_row computes them.
struct ExpPass {
  __m256 m, s, log_s;
};

MNN_AVX2 inline ExpPass exp_pass(const float* const* rows, int count, int64_t C, float* tile, const float** padded) {
  for (int r = 0; r < kRows; ++r) padded[r] = rows[r < count ? r : count - 1];
  load(padded, C, tile);
  ExpPass pass;
  pass.m = max(tile, C);
  pass.s = sum_exp<Terms::kExpKept>(tile, C, pass.m);
  pass.log_s = per_lane(_mm256_sub_ps(pass.s, _mm256_set1_ps(1.0f)), rowmath::log1p_nonnegative);
  return pass;
}

// out[r] = (x[r] - m) - log_s for the `count` real rows: their log_softmax from an exp_pass.
MNN_AVX2 inline void write_log_softmax(const float* const* x, float* const* out, int count, int64_t C,
                                       const ExpPass& pass) {
  alignas(32) float ms[kRows], ls[kRows];
  _mm256_store_ps(ms, pass.m);
  _mm256_store_ps(ls, pass.log_s);
  for (int r = 0; r < count; ++r) sub2(x[r], C, ms[r], ls[r], out[r]);
}

// log_softmax of up to eight rows of C floats, each in place (rows::log_softmax_row); `count`
// real rows, the tile (scratch of 8 C floats) padded with the last one.
MNN_AVX2 inline void log_softmax_rows(float* const* rows, int count, int64_t C, float* tile) {
  const float* padded[kRows];
  write_log_softmax(rows, rows, count, C, exp_pass(rows, count, C, tile, padded));
}

// softmax_row (rows.h) of up to eight rows of C floats: log_out[r] = log_softmax(x[r]), prob_out[r]
// = exp(x[r] - m) * (1 / s) from the exps of the one pass that sums s; `count` real rows, the tile
// (scratch of 8 C floats) padded with the last one.
MNN_AVX2 inline void softmax_rows(const float* const* x, int count, int64_t C, float* tile, float* const* log_out,
                                  float* const* prob_out) {
  const float* padded[kRows];
  const ExpPass pass = exp_pass(x, count, C, tile, padded);  // the tile holds exp(x - m) now
  write_log_softmax(x, log_out, count, C, pass);
  const __m256 inverse = _mm256_div_ps(_mm256_set1_ps(1.0f), pass.s);
  alignas(32) float inverses[kRows];
  _mm256_store_ps(inverses, inverse);
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {  // scaled column-wise, transposed back to rows
    __m256 columns[8], rows_out[8];
    for (int i = 0; i < 8; ++i) columns[i] = _mm256_mul_ps(_mm256_loadu_ps(tile + 8 * (c + i)), inverse);
    transpose8(columns, rows_out);
    for (int r = 0; r < count; ++r) _mm256_storeu_ps(prob_out[r] + c, rows_out[r]);
  }
  for (; c < C; ++c) {
    for (int r = 0; r < count; ++r) prob_out[r][c] = rowmath::mul(tile[8 * c + r], inverses[r]);
  }
}

// log_softmax_rows over rows [begin, end) of a row-major matrix of C columns, in place.
MNN_AVX2 inline void log_softmax_matrix_rows(float* matrix, int64_t begin, int64_t end, int64_t C, float* tile) {
  float* rows[kRows];
  for (int64_t i = begin; i < end; i += kRows) {
    const int n = static_cast<int>(end - i < kRows ? end - i : kRows);
    for (int r = 0; r < n; ++r) rows[r] = matrix + (i + r) * C;
    log_softmax_rows(rows, n, C, tile);
  }
}

// The contributions log v (the recombination, docs/how-it-works.md) of up to eight rows of C logits each (rows::
// contribution_row, width C), `count` real rows in y (padded with the last), row r of expert group
// g[r]. On return: in_group[starts[r] + k] = log_softmax(y_r) at g[r].classes[k], spread[r] = the
// value of every other class; the tile (8 C floats) is scratch.
MNN_AVX2 inline void contributions(const float* const* y, const rows::ExpertGroup* g, int count, int64_t C,
                                   float* tile, float* in_group, const int64_t* starts, float* spread) {
  const float* padded[kRows];
  const ExpPass pass = exp_pass(y, count, C, tile, padded);  // the tile holds exp(y - m) now
  const __m256 m = pass.m, log_s = pass.log_s;
  // The group's cells at +0 leave each lane summing the outside classes' exps (rowmath: s_out).
  for (int r = 0; r < count; ++r) {
    for (int64_t k = 0; k < g[r].size; ++k) tile[8 * g[r].classes[k] + r] = 0.0f;
  }
  alignas(32) float ms[kRows], log_ss[kRows], s_outs[kRows];
  _mm256_store_ps(ms, m);
  _mm256_store_ps(log_ss, log_s);
  _mm256_store_ps(s_outs, sum_exp<Terms::kAsIs>(tile, C, m));
  bool second_pass = false;
  for (int r = 0; r < count; ++r) {
    for (int64_t k = 0; k < g[r].size; ++k) {  // ls at the group's classes: (y - m) - log_s
      in_group[starts[r] + k] = rowmath::sub(rowmath::sub(y[r][g[r].classes[k]], ms[r]), log_ss[r]);
    }
    if (s_outs[r] >= rowmath::kOnePassMin) {
      spread[r] = rowmath::sub(rowmath::sub(rowmath::log_positive(s_outs[r]), log_ss[r]), g[r].log_spread);
    } else {
      second_pass = true;
    }
  }
  if (!second_pass) return;
  // Rows with nothing outside the group, or an outside sum too small to trust: logsumexp of ls over
  // the outside classes, shifted by their maximum (rows::contribution_row's second pass).
  load(padded, C, tile);
  shift_scale(tile, C, m, log_s);  // the tile is log_softmax(y) now
  for (int r = 0; r < count; ++r) {
    for (int64_t k = 0; k < g[r].size; ++k) tile[8 * g[r].classes[k] + r] = -rows::kInf;
  }
  __m256 shift = max(tile, C);
  const __m256 infinite = _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), shift), _mm256_set1_ps(rows::kInf),
                                        _CMP_EQ_OQ);
  shift = _mm256_andnot_ps(infinite, shift);  // +-inf -> 0, as the scalar code
  const __m256 log_not_q = _mm256_add_ps(per_lane(sum_exp(tile, C, shift), rowmath::log_of_sum), shift);
  alignas(32) float q[kRows];
  _mm256_store_ps(q, log_not_q);
  for (int r = 0; r < count; ++r) {
    if (!(s_outs[r] >= rowmath::kOnePassMin)) spread[r] = rowmath::sub(q[r], g[r].log_spread);
  }
}

// dst[c] = dst[c] + v[c], v = in_group[k] at the group's classes[k] and `spread` elsewhere (one
// float32 add per class, as rows::contribution_row<true>); in_group is overwritten.
MNN_AVX2 inline void accumulate(float* dst, int64_t C, const rows::ExpertGroup& g, float* in_group, float spread) {
  for (int64_t k = 0; k < g.size; ++k) in_group[k] = rowmath::add(dst[g.classes[k]], in_group[k]);
  add_scalar(dst, C, spread);
  for (int64_t k = 0; k < g.size; ++k) dst[g.classes[k]] = in_group[k];
}

#undef MNN_AVX2

}  // namespace tile8
}  // namespace cpu
}  // namespace mnn_fast

#endif  // __SSE2__
