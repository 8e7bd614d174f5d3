// The tile kernels (tile.h) on AVX2: eight rows per tile, one per lane of a 256-bit register.
// Only the functions below and tile_impl.h's are compiled for AVX2 (the pragma comes after every
// #include), and the build's -ffp-contract=off keeps each + and * its own rounding (no FMA).
#include <immintrin.h>

#include <cstdint>

#include "tile.h"

#pragma GCC push_options
#pragma GCC target("avx2")

namespace mnn_fast {
namespace cpu {
namespace tile_avx2 {

constexpr int kRows = 8;
using F = __m256;
using M = __m256;  // all-ones lanes where true
using I = __m256i;

inline F load_f(const float* p) { return _mm256_loadu_ps(p); }
inline void store_f(float* p, F v) { _mm256_storeu_ps(p, v); }
// The first n <= 8 floats (the rest 0; nothing past p + n is read or written).
inline __m256i first(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline F load_n(const float* p, int64_t n) { return _mm256_maskload_ps(p, first(n)); }
inline void store_n(float* p, F v, int64_t n) { _mm256_maskstore_ps(p, first(n), v); }
inline F set1(float x) { return _mm256_set1_ps(x); }
inline F zero() { return _mm256_setzero_ps(); }
inline F add(F a, F b) { return _mm256_add_ps(a, b); }
inline F sub(F a, F b) { return _mm256_sub_ps(a, b); }
inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
inline F div(F a, F b) { return _mm256_div_ps(a, b); }
inline F max_v(F a, F b) { return _mm256_max_ps(a, b); }  // a > b ? a : b
inline F abs_v(F a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
inline F floor_v(F a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
inline M lt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
inline M gt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
inline M eq(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
inline M unord(F a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
inline M mor(M a, M b) { return _mm256_or_ps(a, b); }
inline M mnone() { return _mm256_setzero_ps(); }
inline F select(M m, F a, F b) { return _mm256_blendv_ps(b, a, m); }  // m ? a : b
inline F zero_where(M m, F a) { return _mm256_andnot_ps(m, a); }
inline F mul_zero_where(M m, F a, F b) { return _mm256_andnot_ps(m, _mm256_mul_ps(a, b)); }  // m ? 0 : a * b
inline I as_int(F a) { return _mm256_castps_si256(a); }
inline F as_float(I a) { return _mm256_castsi256_ps(a); }
inline I cvtt(F a) { return _mm256_cvttps_epi32(a); }
inline F cvt(I a) { return _mm256_cvtepi32_ps(a); }
inline I iset1(int x) { return _mm256_set1_epi32(x); }
inline I iadd(I a, I b) { return _mm256_add_epi32(a, b); }
inline I isub(I a, I b) { return _mm256_sub_epi32(a, b); }
inline I iand(I a, I b) { return _mm256_and_si256(a, b); }
inline I ior(I a, I b) { return _mm256_or_si256(a, b); }
inline I shl23(I a) { return _mm256_slli_epi32(a, 23); }
inline I sar23(I a) { return _mm256_srai_epi32(a, 23); }
inline I inc_where(M m, I a) { return _mm256_sub_epi32(a, _mm256_castps_si256(m)); }  // true lanes are -1
inline F put_lane(F v, int lane, float x) {
  const __m256i at = _mm256_cmpeq_epi32(_mm256_set1_epi32(lane), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_blendv_ps(v, _mm256_set1_ps(x), _mm256_castsi256_ps(at));
}

inline F select_first(int64_t n, F a, F b) { return _mm256_blendv_ps(b, a, _mm256_castsi256_ps(first(n > 0 ? n : 0))); }
inline bool any(M m) { return _mm256_movemask_ps(m) != 0; }

#include "tile_impl.h"

}  // namespace tile_avx2

const tile::Kernels tile::kAvx2 = {tile_avx2::kRows, tile_avx2::softmax_rows, tile_avx2::softmax_rows_wide,
                                   tile_avx2::log_softmax_matrix_rows, tile_avx2::contributions, tile_avx2::contribute_wide,
                                   tile_avx2::accumulate_rows};

}  // namespace cpu
}  // namespace mnn_fast

#pragma GCC pop_options
