// The recombination's scalar float32 arithmetic, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda)
// kernels. The reference of every step is mnn_fast/engine/rowmath.py; Triton spells the same steps
// in kernels/recombine.py. Each +, -, *, / rounds once: on the host the build passes
// -ffp-contract=off, on the device the __f*_rn intrinsics are never fused into an FMA.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MNN_HD __host__ __device__ __forceinline__
#else
#define MNN_HD inline __attribute__((always_inline))
#endif

namespace mnn_fast {
namespace rowmath {

// Row sums: lane j adds columns j, j+16, ... left to right from 0, then lanes j and j+h pairwise.
constexpr int kLanes = 16;
constexpr float kExpFlush = -80.0f;  // exp below this is flushed to 0 (rowmath.EXP_FLUSH)
// log(1-q) comes from the first exp pass when the outside classes' sum is at least this
// (rowmath.ONE_PASS_MIN): flushed terms (< 2**-115 each) are then below its last bit.
constexpr float kOnePassMin = 8.67361737988403547e-19f;  // 2**-60

#if defined(__CUDA_ARCH__)
MNN_HD float add(float a, float b) { return __fadd_rn(a, b); }
MNN_HD float sub(float a, float b) { return __fsub_rn(a, b); }
MNN_HD float mul(float a, float b) { return __fmul_rn(a, b); }
MNN_HD float div(float a, float b) { return __fdiv_rn(a, b); }
MNN_HD int32_t float_bits(float x) { return __float_as_int(x); }
MNN_HD float bits_float(int32_t b) { return __int_as_float(b); }
MNN_HD float floor_small(float x) { return floorf(x); }
#else
MNN_HD float add(float a, float b) { return a + b; }
MNN_HD float sub(float a, float b) { return a - b; }
MNN_HD float mul(float a, float b) { return a * b; }
MNN_HD float div(float a, float b) { return a / b; }
MNN_HD int32_t float_bits(float x) {
  int32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}
MNN_HD float bits_float(int32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}
// floor for |x| < 2**23 (or NaN, returned as is) from a truncation: the baseline x86-64 target has
// no vector floor, and this form keeps the loops that call exp_nonpositive vectorised. Exact.
MNN_HD float floor_small(float x) {
  const float t = static_cast<float>(static_cast<int32_t>(x == x ? x : 0.0f));
  const float f = t > x ? t - 1.0f : t;
  return x == x ? f : x;
}
#endif

// exp(t) for t <= 0 (or NaN): Cody-Waite reduction t = n ln2 + r, Cephes polynomial for exp(r),
// 2**n built in the exponent field. Flushed to 0 below kExpFlush, where 2**n would be subnormal.
MNN_HD float exp_nonpositive(float t) {
  const bool flush = t < kExpFlush;
  const float x = flush ? kExpFlush : t;
  const float n = floor_small(add(mul(x, 1.44269504088896341f), 0.5f));
  const float r = sub(sub(x, mul(n, 0.693359375f)), mul(n, -2.12194440e-4f));
  const float z = mul(r, r);
  float p = 1.9875691500e-4f;
  p = add(mul(p, r), 1.3981999507e-3f);
  p = add(mul(p, r), 8.3334519073e-3f);
  p = add(mul(p, r), 4.1665795894e-2f);
  p = add(mul(p, r), 1.6666665459e-1f);
  p = add(mul(p, r), 5.0000001201e-1f);
  const float y = add(add(mul(p, z), r), 1.0f);
  const int32_t e = static_cast<int32_t>(n == n ? n : 0.0f);
  const float scale = bits_float(static_cast<int32_t>(static_cast<uint32_t>(e + 127) << 23));
  return flush ? 0.0f : mul(y, scale);
}

// log(v) + correction for a normal v > 0 (or NaN): v = 2**e * m with m in [sqrt(1/2), sqrt(2)),
// Cephes polynomial for log(m); `correction` is added next to the polynomial's smallest terms.
MNN_HD float log_corrected(float v, float correction) {
  const int32_t bits = float_bits(v);
  int32_t e = (bits >> 23) - 127;
  float m = bits_float((bits & 0x007FFFFF) | 0x3F800000);
  const bool big = m > 1.41421356237309505f;
  m = big ? mul(m, 0.5f) : m;
  e += big ? 1 : 0;
  const float ef = static_cast<float>(e);
  const float f = sub(m, 1.0f);
  const float z = mul(f, f);
  float q = 7.0376836292e-2f;
  q = add(mul(q, f), -1.1514610310e-1f);
  q = add(mul(q, f), 1.1676998740e-1f);
  q = add(mul(q, f), -1.2420140846e-1f);
  q = add(mul(q, f), 1.4249322787e-1f);
  q = add(mul(q, f), -1.6668057665e-1f);
  q = add(mul(q, f), 2.0000714765e-1f);
  q = add(mul(q, f), -2.4999993993e-1f);
  q = add(mul(q, f), 3.3333331174e-1f);
  float y = mul(mul(q, f), z);
  y = add(y, mul(ef, -2.12194440e-4f));
  y = sub(y, mul(0.5f, z));
  y = add(y, correction);
  return add(add(f, y), mul(ef, 0.693359375f));
}

// log(1 + u) for finite u >= 0 (or NaN), plus the rounding error of 1 + u so tiny u stay exact to
// first order.
MNN_HD float log1p_nonnegative(float u) {
  const float v = add(1.0f, u);
  return log_corrected(v, div(sub(u, sub(v, 1.0f)), v));
}

// log(x) for a normal x > 0 (or NaN).
MNN_HD float log_positive(float x) { return log_corrected(x, 0.0f); }

// log of a lane sum s: s >= 1 (the row maximum's own term) or s == 0 (nothing summed: -inf).
MNN_HD float log_of_sum(float s) {
  return s == 0.0f ? -__builtin_huge_valf() : log1p_nonnegative(sub(s, 1.0f));
}

// The lanes' pairwise tree: lanes j and j+h for h = 8, 4, 2, 1.
MNN_HD float fold_lanes(float* lanes) {
  for (int h = kLanes / 2; h > 0; h /= 2) {
    for (int j = 0; j < h; ++j) lanes[j] = add(lanes[j], lanes[j + h]);
  }
  return lanes[0];
}

}  // namespace rowmath
}  // namespace mnn_fast
