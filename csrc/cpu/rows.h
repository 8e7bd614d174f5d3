// CPU row routines of the recombination ops (recombine, contributions, log_softmax_rows).
// The exp and max passes run the 16 lanes of csrc/rowmath.h as SIMD registers; per lane the
// operations are rowmath.h's, in its order, so SIMD changes no bit (tests/engine/test_rowmath.py).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "../rowmath.h"
#include "common.h"

namespace mnn_fast {
namespace cpu {
namespace rows {

using rowmath::kLanes;
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

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
inline float row_max(const float* x, int64_t n) {
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
  float best = -kInf;
  bool any_nan = false;
  for (int j = 0; j < kLanes; ++j) {
    best = lanes[j] > best ? lanes[j] : best;
    any_nan = any_nan || nans[j] != 0.0f;
  }
  return any_nan ? kNaN : best;
}

// sum over c of exp(x[c] - shift) in rowmath's lane order; the -inf padding adds +0 to its lane.
inline float lane_sum_exp(const float* x, int64_t n, float shift) {
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

// The group tables of one expert: its classes, log(C - |G|), and a per-thread membership scratch.
struct ExpertGroup {
  const int64_t* classes;
  int64_t size;
  float log_spread;
};

// log v of one row (SPEC section 4) into out[0:C]; y has W = C or 1 (binary) entries. `ls`,
// `outside` and `inside` are scratch of C entries; inside is all 0 on entry and on return.
inline void contribution_row(const float* y, int64_t width, int64_t C, const ExpertGroup& g, float* ls,
                             float* outside, uint8_t* inside, float* out) {
  if (width == 1 && C != 1) {
    const float yv = y[0];
    const float log_term = rowmath::log1p_nonnegative(rowmath::exp_nonpositive(-(yv < 0 ? -yv : yv)));
    const float log_q = rowmath::sub(yv < 0.0f ? yv : 0.0f, log_term);
    const float log_not_q = rowmath::sub(-yv < 0.0f ? -yv : 0.0f, log_term);
    const float spread = rowmath::sub(log_not_q, g.log_spread);
    for (int64_t c = 0; c < C; ++c) out[c] = spread;
    out[g.classes[0]] = log_q;
    return;
  }
  log_softmax_row(y, C, ls);
  for (int64_t k = 0; k < g.size; ++k) inside[g.classes[k]] = 1;
  // The out-of-group log-probabilities, group columns at -inf (rowmath: where(keep, ls, -inf)).
  for (int64_t c = 0; c < C; ++c) outside[c] = inside[c] ? -kInf : ls[c];
  float shift = row_max(outside, C);
  shift = (shift == kInf || shift == -kInf) ? 0.0f : shift;
  const float log_not_q = rowmath::add(rowmath::log_of_sum(lane_sum_exp(outside, C, shift)), shift);
  const float spread = rowmath::sub(log_not_q, g.log_spread);
  for (int64_t c = 0; c < C; ++c) out[c] = inside[c] ? ls[c] : spread;
  for (int64_t k = 0; k < g.size; ++k) inside[g.classes[k]] = 0;
}

// The expert owning buffer row r: offsets[e] <= r < offsets[e+1] (offsets non-decreasing, E+1 long).
inline int64_t expert_of_row(const int64_t* offsets, int64_t num_experts, int64_t r) {
  return static_cast<int64_t>(std::upper_bound(offsets, offsets + num_experts + 1, r) - offsets) - 1;
}

// Checks of the tables shared by recombine and contributions; N = logits rows, C = classes.
void check_tables(const char* op, const at::Tensor& logits, const at::Tensor& offsets, const at::Tensor& group_offsets,
                  const at::Tensor& group_classes, const at::Tensor& log_spread, int64_t C);

}  // namespace rows
}  // namespace cpu
}  // namespace mnn_fast
