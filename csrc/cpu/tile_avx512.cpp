// The tile kernels (tile.h) on AVX-512: sixteen rows per tile, one per lane of a 512-bit register
// (the 8x8 transposes stay 256-bit). Only the functions below and tile_impl.h's are compiled for
// AVX-512 (the pragma comes after every #include), and the build's -ffp-contract=off keeps each +
// and * its own rounding (no FMA).
#include <immintrin.h>

#include <cstdint>

#include "tile.h"

#pragma GCC push_options
#pragma GCC target("avx2,avx512f,avx512dq")
// GCC 12 flags the "undefined" source register inside its own AVX-512 intrinsics.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace mnn_fast {
namespace cpu {
namespace tile_avx512 {

constexpr int kRows = 16;
using F = __m512;
using M = __mmask16;
using I = __m512i;

inline F load_f(const float* p) { return _mm512_loadu_ps(p); }
inline void store_f(float* p, F v) { _mm512_storeu_ps(p, v); }
// The first n <= 16 floats (the rest 0; nothing past p + n is read or written).
inline M first(int64_t n) { return static_cast<M>((1u << n) - 1); }
inline F load_n(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first(n), p); }
inline void store_n(float* p, F v, int64_t n) { _mm512_mask_storeu_ps(p, first(n), v); }
inline F set1(float x) { return _mm512_set1_ps(x); }
inline F zero() { return _mm512_setzero_ps(); }
inline F add(F a, F b) { return _mm512_add_ps(a, b); }
inline F sub(F a, F b) { return _mm512_sub_ps(a, b); }
inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
inline F div(F a, F b) { return _mm512_div_ps(a, b); }
inline F max_v(F a, F b) { return _mm512_max_ps(a, b); }  // a > b ? a : b, as the SSE/AVX max
inline F abs_v(F a) { return _mm512_andnot_ps(_mm512_set1_ps(-0.0f), a); }
inline F floor_v(F a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
inline M lt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
inline M gt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
inline M eq(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
inline M unord(F a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
inline M mor(M a, M b) { return static_cast<M>(a | b); }
inline M mnone() { return 0; }
inline F select(M m, F a, F b) { return _mm512_mask_blend_ps(m, b, a); }  // m ? a : b
inline F zero_where(M m, F a) { return _mm512_maskz_mov_ps(static_cast<M>(~m), a); }
inline F mul_zero_where(M m, F a, F b) { return _mm512_maskz_mul_ps(static_cast<M>(~m), a, b); }  // m ? 0 : a * b
inline I as_int(F a) { return _mm512_castps_si512(a); }
inline F as_float(I a) { return _mm512_castsi512_ps(a); }
inline I cvtt(F a) { return _mm512_cvttps_epi32(a); }
inline F cvt(I a) { return _mm512_cvtepi32_ps(a); }
inline I iset1(int x) { return _mm512_set1_epi32(x); }
inline I iadd(I a, I b) { return _mm512_add_epi32(a, b); }
inline I isub(I a, I b) { return _mm512_sub_epi32(a, b); }
inline I iand(I a, I b) { return _mm512_and_si512(a, b); }
inline I ior(I a, I b) { return _mm512_or_si512(a, b); }
inline I shl23(I a) { return _mm512_slli_epi32(a, 23); }
inline I sar23(I a) { return _mm512_srai_epi32(a, 23); }
inline I inc_where(M m, I a) { return _mm512_mask_add_epi32(a, m, a, _mm512_set1_epi32(1)); }
inline F put_lane(F v, int lane, float x) { return _mm512_mask_mov_ps(v, static_cast<M>(1u << lane), _mm512_set1_ps(x)); }

inline F select_first(int64_t n, F a, F b) { return _mm512_mask_blend_ps(first(n > 0 ? n : 0), b, a); }
inline bool any(M m) { return m != 0; }

#include "tile_impl.h"

}  // namespace tile_avx512

const tile::Kernels tile::kAvx512 = {tile_avx512::kRows, tile_avx512::softmax_rows, tile_avx512::softmax_rows_wide,
                                     tile_avx512::log_softmax_matrix_rows, tile_avx512::contributions, tile_avx512::contribute_wide,
                                     tile_avx512::accumulate_rows};

}  // namespace cpu
}  // namespace mnn_fast

#pragma GCC diagnostic pop
#pragma GCC pop_options
