// CPU row routines of the recombination ops (recombine, contributions, log_softmax_rows).
// The exp and max passes run the 16 lanes of csrc/rowmath.h as SIMD registers; per lane the
// operations are rowmath.h's, in its order, so SIMD changes no bit (tests/engine/test_rowmath.py).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__SSE2__)
#include <immintrin.h>
#endif
#include <cstdlib>

#include "../rowmath.h"
#include "common.h"
#include "isa.h"

namespace mnn_fast {
namespace cpu {
namespace rows {

using rowmath::kLanes;
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// The row maximum from the 16 lanes' maxima and NaN flags (non-zero = a NaN was seen in that lane).
inline float fold_max(const float* lanes, const float* nans) {
  float best = -kInf;
  bool any_nan = false;
  for (int j = 0; j < kLanes; ++j) {
    best = lanes[j] > best ? lanes[j] : best;
    any_nan = any_nan || nans[j] != 0.0f;
  }
  return any_nan ? kNaN : best;
}

#if defined(__SSE2__)
// The 16 lanes as four SSE2 registers (lane j = register j / 4, element j % 4): every x86-64 CPU
// has SSE2, and each lane runs rowmath.h's scalar operations in its order, so no bit changes.
struct Lanes {
  __m128 v[kLanes / 4];
};

inline __m128 select4(__m128 mask, __m128 a, __m128 b) { return _mm_or_ps(_mm_and_ps(mask, a), _mm_andnot_ps(mask, b)); }

// rowmath::floor_small per element.
inline __m128 floor4(__m128 x) {
  const __m128 not_nan = _mm_cmpeq_ps(x, x);
  const __m128 t = _mm_cvtepi32_ps(_mm_cvttps_epi32(_mm_and_ps(not_nan, x)));
  const __m128 f = select4(_mm_cmpgt_ps(t, x), _mm_sub_ps(t, _mm_set1_ps(1.0f)), t);
  return select4(not_nan, f, x);
}

// rowmath::exp_nonpositive per element: the same operations in the same order.
inline __m128 exp4(__m128 t) {
  const __m128 flush = _mm_cmplt_ps(t, _mm_set1_ps(rowmath::kExpFlush));
  const __m128 x = select4(flush, _mm_set1_ps(rowmath::kExpFlush), t);
  const __m128 n = floor4(_mm_add_ps(_mm_mul_ps(x, _mm_set1_ps(1.44269504088896341f)), _mm_set1_ps(0.5f)));
  const __m128 r = _mm_sub_ps(_mm_sub_ps(x, _mm_mul_ps(n, _mm_set1_ps(0.693359375f))),
                              _mm_mul_ps(n, _mm_set1_ps(-2.12194440e-4f)));
  const __m128 z = _mm_mul_ps(r, r);
  __m128 p = _mm_add_ps(_mm_mul_ps(_mm_set1_ps(1.9875691500e-4f), r), _mm_set1_ps(1.3981999507e-3f));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(8.3334519073e-3f));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(4.1665795894e-2f));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.6666665459e-1f));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(5.0000001201e-1f));
  const __m128 y = _mm_add_ps(_mm_add_ps(_mm_mul_ps(p, z), r), _mm_set1_ps(1.0f));
  const __m128i e = _mm_cvttps_epi32(_mm_and_ps(_mm_cmpeq_ps(n, n), n));
  const __m128 scale = _mm_castsi128_ps(_mm_slli_epi32(_mm_add_epi32(e, _mm_set1_epi32(127)), 23));
  return _mm_andnot_ps(flush, _mm_mul_ps(y, scale));
}

// The block of columns c..c+15 (past n: -inf, which no max picks and whose exp is +0).
inline Lanes load_block(const float* x, int64_t c, int64_t n) {
  float tail[kLanes];
  const float* src = x + c;
  if (c + kLanes > n) {
    for (int j = 0; j < kLanes; ++j) tail[j] = c + j < n ? x[c + j] : -kInf;
    src = tail;
  }
  Lanes b;
  for (int k = 0; k < kLanes / 4; ++k) b.v[k] = _mm_loadu_ps(src + 4 * k);
  return b;
}

// max of x[0:n] (-inf when n == 0); NaN if any element is NaN (torch.amax propagates NaN).
inline float row_max_sse(const float* x, int64_t n) {
  __m128 m[kLanes / 4], nan[kLanes / 4];
  for (int k = 0; k < kLanes / 4; ++k) {
    m[k] = _mm_set1_ps(-kInf);
    nan[k] = _mm_setzero_ps();
  }
  for (int64_t c = 0; c < n; c += kLanes) {
    const Lanes b = load_block(x, c, n);
    for (int k = 0; k < kLanes / 4; ++k) {
      m[k] = _mm_max_ps(b.v[k], m[k]);  // b > m ? b : m, as the scalar loop
      nan[k] = _mm_or_ps(nan[k], _mm_cmpunord_ps(b.v[k], b.v[k]));
    }
  }
  float lanes[kLanes], nans[kLanes];
  for (int k = 0; k < kLanes / 4; ++k) {
    _mm_storeu_ps(lanes + 4 * k, m[k]);
    _mm_storeu_ps(nans + 4 * k, nan[k]);
  }
  return fold_max(lanes, nans);
}

// sum over c of exp(x[c] - shift) in rowmath's lane order; the -inf padding adds +0 to its lane.
inline float lane_sum_exp_sse(const float* x, int64_t n, float shift) {
  __m128 acc[kLanes / 4];
  for (int k = 0; k < kLanes / 4; ++k) acc[k] = _mm_setzero_ps();
  const __m128 s = _mm_set1_ps(shift);
  for (int64_t c = 0; c < n; c += kLanes) {
    const Lanes b = load_block(x, c, n);
    for (int k = 0; k < kLanes / 4; ++k) acc[k] = _mm_add_ps(acc[k], exp4(_mm_sub_ps(b.v[k], s)));
  }
  float lanes[kLanes];
  for (int k = 0; k < kLanes / 4; ++k) _mm_storeu_ps(lanes + 4 * k, acc[k]);
  return rowmath::fold_lanes(lanes);
}

// The same two passes on AVX2 (16 lanes = two 8-float registers), chosen at run time where the CPU
// has AVX2. The per-lane operations are those above (no FMA: target "avx2" does not enable it, and
// the build passes -ffp-contract=off), so both paths give the same bits.
__attribute__((target("avx2"))) static inline __m256 select8(__m256 mask, __m256 a, __m256 b) {
  return _mm256_or_ps(_mm256_and_ps(mask, a), _mm256_andnot_ps(mask, b));
}

// Two shortcuts give rowmath's values on its domain (t <= 0 or NaN): max(-80, t) is "t < -80 ? -80
// : t" (NaN included: max returns its second operand when either is NaN), and for v in [-115, 0.5]
// or NaN the rounding instruction's floor is floor_small's (NaN stays NaN).
__attribute__((target("avx2"))) static inline __m256 exp8(__m256 t) {
  const __m256 flush = _mm256_cmp_ps(t, _mm256_set1_ps(rowmath::kExpFlush), _CMP_LT_OQ);
  const __m256 x = _mm256_max_ps(_mm256_set1_ps(rowmath::kExpFlush), t);
  const __m256 v = _mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _mm256_set1_ps(0.5f));
  const __m256 n = _mm256_round_ps(v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m256 r = _mm256_sub_ps(_mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f))),
                                 _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
  const __m256 z = _mm256_mul_ps(r, r);
  __m256 p = _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(1.9875691500e-4f), r), _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(p, z), r), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_cvttps_epi32(_mm256_and_ps(_mm256_cmp_ps(n, n, _CMP_EQ_OQ), n));
  const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
  return _mm256_andnot_ps(flush, _mm256_mul_ps(y, scale));
}

// Eight columns from p with `left` columns remaining; past the end -inf (a masked load reads nothing there).
__attribute__((target("avx2"))) static inline __m256 load8(const float* p, int64_t left) {
  if (left >= 8) return _mm256_loadu_ps(p);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i real = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(left > 0 ? left : 0)), lane);
  return select8(_mm256_castsi256_ps(real), _mm256_maskload_ps(p, real), _mm256_set1_ps(-kInf));
}

__attribute__((target("avx2"))) static float row_max_avx2(const float* x, int64_t n) {
  __m256 m[2] = {_mm256_set1_ps(-kInf), _mm256_set1_ps(-kInf)};
  __m256 nan[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t c = 0; c < n; c += kLanes) {
    for (int k = 0; k < 2; ++k) {
      const __m256 b = load8(x + c + 8 * k, n - c - 8 * k);
      m[k] = _mm256_max_ps(b, m[k]);
      nan[k] = _mm256_or_ps(nan[k], _mm256_cmp_ps(b, b, _CMP_UNORD_Q));
    }
  }
  float lanes[kLanes], nans[kLanes];
  for (int k = 0; k < 2; ++k) {
    _mm256_storeu_ps(lanes + 8 * k, m[k]);
    _mm256_storeu_ps(nans + 8 * k, nan[k]);
  }
  return fold_max(lanes, nans);
}

__attribute__((target("avx2"))) static float lane_sum_exp_avx2(const float* x, int64_t n, float shift) {
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  const __m256 s = _mm256_set1_ps(shift);
  for (int64_t c = 0; c < n; c += kLanes) {
    for (int k = 0; k < 2; ++k) {
      if (n - c - 8 * k <= 0) break;  // a block of padding only adds +0
      acc[k] = _mm256_add_ps(acc[k], exp8(_mm256_sub_ps(load8(x + c + 8 * k, n - c - 8 * k), s)));
    }
  }
  float lanes[kLanes];
  for (int k = 0; k < 2; ++k) _mm256_storeu_ps(lanes + 8 * k, acc[k]);
  return rowmath::fold_lanes(lanes);
}

// The row-at-a-time passes take AVX2 under the avx2 and avx512 choices of isa.h (every AVX-512
// CPU has AVX2), SSE2 under sse2.
inline bool use_avx2() { return isa() != Isa::kSse2; }

inline float row_max(const float* x, int64_t n) { return use_avx2() ? row_max_avx2(x, n) : row_max_sse(x, n); }

inline float lane_sum_exp(const float* x, int64_t n, float shift) {
  return use_avx2() ? lane_sum_exp_avx2(x, n, shift) : lane_sum_exp_sse(x, n, shift);
}
#else
// Other CPUs: the scalar functions of rowmath.h, lane by lane (the same bits, slower).
inline float row_max(const float* x, int64_t n) {
  float lanes[kLanes];
  bool nan = false;
  for (int j = 0; j < kLanes; ++j) lanes[j] = -kInf;
  for (int64_t c = 0; c < n; ++c) {
    lanes[c % kLanes] = x[c] > lanes[c % kLanes] ? x[c] : lanes[c % kLanes];
    nan = nan || x[c] != x[c];
  }
  float best = -kInf;
  for (int j = 0; j < kLanes; ++j) best = lanes[j] > best ? lanes[j] : best;
  return nan ? kNaN : best;
}

inline float lane_sum_exp(const float* x, int64_t n, float shift) {
  float lanes[kLanes] = {};
  for (int64_t c = 0; c < n; ++c) {
    lanes[c % kLanes] = rowmath::add(lanes[c % kLanes], rowmath::exp_nonpositive(rowmath::sub(x[c], shift)));
  }
  return rowmath::fold_lanes(lanes);
}
#endif

// out[c] = log_softmax(x)[c] = (x[c] - m) - log(sum exp(x - m)); out may alias x.
inline void log_softmax_row(const float* x, int64_t n, float* out) {
  const float m = row_max(x, n);
  const float log_s = rowmath::log1p_nonnegative(rowmath::sub(lane_sum_exp(x, n, m), 1.0f));
  for (int64_t c = 0; c < n; ++c) out[c] = rowmath::sub(rowmath::sub(x[c], m), log_s);
}

// log_softmax_row and, from the same lane sum s, the softmax: prob[c] = exp(x[c] - m) * (1 / s)
// (rowmath.softmax_rows). This row path recomputes each exp one at a time; the tile kernels
// (tile.h, AVX2 and AVX-512) keep the exps of their one pass.
inline void softmax_row(const float* x, int64_t n, float* log_out, float* prob_out) {
  const float m = row_max(x, n);
  const float s = lane_sum_exp(x, n, m);
  const float log_s = rowmath::log1p_nonnegative(rowmath::sub(s, 1.0f));
  const float inverse = rowmath::div(1.0f, s);
  for (int64_t c = 0; c < n; ++c) {
    const float shifted = rowmath::sub(x[c], m);
    log_out[c] = rowmath::sub(shifted, log_s);
    prob_out[c] = rowmath::mul(rowmath::exp_nonpositive(shifted), inverse);
  }
}

// The group tables of one expert: its classes, log(C - |G|), and a per-thread membership scratch.
struct ExpertGroup {
  const int64_t* classes;
  int64_t size;
  float log_spread;
};

// log v of one row (the recombination, docs/how-it-works.md), written to dst[0:C] or, with kAccumulate, added to it
// (dst[c] = dst[c] + v[c], one float32 add: recombine's accumulation). y has W = C or 1 (binary)
// entries. `ls`, `outside` and `inside` are scratch of C entries; inside is all 0 on entry and return.
template <bool kAccumulate>
inline void contribution_row(const float* y, int64_t width, int64_t C, const ExpertGroup& g, float* ls,
                             float* outside, uint8_t* inside, float* dst) {
  if (width == 1 && C != 1) {
    const float yv = y[0];
    const float log_term = rowmath::log1p_nonnegative(rowmath::exp_nonpositive(-(yv < 0 ? -yv : yv)));
    const float log_q = rowmath::sub(yv < 0.0f ? yv : 0.0f, log_term);
    const float log_not_q = rowmath::sub(-yv < 0.0f ? -yv : 0.0f, log_term);
    const float spread = rowmath::sub(log_not_q, g.log_spread);
    const int64_t cls = g.classes[0];
    for (int64_t c = 0; c < C; ++c) {
      const float v = c == cls ? log_q : spread;
      dst[c] = kAccumulate ? rowmath::add(dst[c], v) : v;
    }
    return;
  }
  const float m = row_max(y, C);
  const float log_s = rowmath::log1p_nonnegative(rowmath::sub(lane_sum_exp(y, C, m), 1.0f));
  for (int64_t k = 0; k < g.size; ++k) inside[g.classes[k]] = 1;
  // s_out = the lane sum of exp(y - m) over the outside classes: group columns at -inf add exp = +0
  // to their lane, as rowmath's where(inside, 0, e) does.
  for (int64_t c = 0; c < C; ++c) outside[c] = inside[c] ? -kInf : y[c];
  const float s_out = lane_sum_exp(outside, C, m);
  for (int64_t c = 0; c < C; ++c) ls[c] = rowmath::sub(rowmath::sub(y[c], m), log_s);
  float log_not_q;
  if (s_out >= rowmath::kOnePassMin) {
    log_not_q = rowmath::sub(rowmath::log_positive(s_out), log_s);
  } else {  // the second pass: logsumexp of ls over the outside classes, shifted by their maximum
    for (int64_t c = 0; c < C; ++c) outside[c] = inside[c] ? -kInf : ls[c];
    float shift = row_max(outside, C);
    shift = (shift == kInf || shift == -kInf) ? 0.0f : shift;
    log_not_q = rowmath::add(rowmath::log_of_sum(lane_sum_exp(outside, C, shift)), shift);
  }
  const float spread = rowmath::sub(log_not_q, g.log_spread);
  for (int64_t c = 0; c < C; ++c) {
    const float v = inside[c] ? ls[c] : spread;
    dst[c] = kAccumulate ? rowmath::add(dst[c], v) : v;
  }
  for (int64_t k = 0; k < g.size; ++k) inside[g.classes[k]] = 0;
}

// The expert owning buffer row r: offsets[e] <= r < offsets[e+1] (offsets non-decreasing, E+1 long).
inline int64_t expert_of_row(const int64_t* offsets, int64_t num_experts, int64_t r) {
  return static_cast<int64_t>(std::upper_bound(offsets, offsets + num_experts + 1, r) - offsets) - 1;
}

// Checks of the tables shared by recombine and contributions, for N logits rows of width W and C
// classes (the logits' dtype and device are the caller's to check).
void check_tables(const char* op, int64_t N, int64_t W, const at::Tensor& offsets, const at::Tensor& group_offsets,
                  const at::Tensor& group_classes, const at::Tensor& log_spread, int64_t C);

}  // namespace rows
}  // namespace cpu
}  // namespace mnn_fast
