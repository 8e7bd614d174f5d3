// The tile kernels: the row passes of rows.h for several rows at once, one row per SIMD lane (eight
// on AVX2, sixteen on AVX-512), or for wide rows one at a time in their own layout, compiled once
// per ISA (tile_avx2.cpp, tile_avx512.cpp from tile_impl.h) and picked at run time by isa.h's
// choice. Same bits as rows.h (tested bitwise).
#pragma once

#include <cstdint>

#include "isa.h"
#include "rows.h"

namespace mnn_fast {
namespace cpu {
namespace tile {

constexpr int kMaxRows = 16;
// From this many columns a row goes alone, in its own layout (tile_impl.h: "wide rows"); below it
// kRows rows go transposed into a tile. Measured crossovers (AVX-512, B = 2048-4096, one thread):
// softmax_rows ~128 columns; recombine (and the log_softmax it ends with) ~500, since its tile
// passes reuse each transposed row several times.
constexpr int64_t kWideColumns = 160;
constexpr int64_t kWideRecombineColumns = 512;

// One ISA's kernels (tile_impl.h says what each computes); `rows` per call, the tile scratch holds
// rows * C floats.
struct Kernels {
  int rows;
  void (*softmax_rows)(const float* const* x, int count, int64_t C, float* tile, float* const* log_out,
                       float* const* prob_out);
  void (*softmax_rows_wide)(const float* x, int64_t begin, int64_t end, int64_t C, float* log_out,
                            float* prob_out);
  void (*log_softmax_matrix_rows)(float* matrix, int64_t begin, int64_t end, int64_t C, float* tile);
  void (*contributions)(const float* const* y, const rows::ExpertGroup* g, int count, int64_t C, float* tile,
                        float* in_group, const int64_t* starts, float* spread);
  bool (*contribute_wide)(const float* y, int64_t C, const rows::ExpertGroup& g, float* kept, float* in_group,
                          const float* from, float* dst, const float* next);
  void (*accumulate_rows)(const float* const* from, float* const* dst, int count, int64_t C,
                          const rows::ExpertGroup* g, float* in_group, const int64_t* starts, const float* spread);
};

extern const Kernels kAvx2;
extern const Kernels kAvx512;

// The tile kernels of the ISA in use, or nullptr (sse2: the row-at-a-time path of rows.h).
inline const Kernels* kernels() {
  switch (isa()) {
    case Isa::kAvx512:
      return &kAvx512;
    case Isa::kAvx2:
      return &kAvx2;
    default:
      return nullptr;
  }
}

// kernels(), or nullptr (the row path) for a call of only `rows` rows: fewer than a quarter tile
// leaves most lanes idle, and a one-sample call runs its tile scratch and larger code cold (after
// the GEMVs that precede it). The same bits either way.
inline const Kernels* kernels_for(int64_t rows) {
  const Kernels* tiles = kernels();
  return tiles != nullptr && rows * 4 >= tiles->rows ? tiles : nullptr;
}

}  // namespace tile
}  // namespace cpu
}  // namespace mnn_fast
