// softmax_rows on CPU (semantics: docs/ops.md): the switch's log-probabilities and probabilities
// from one exp pass per row (rowmath.softmax_rows): log_probs are bitwise log_softmax_rows, probs
// = exp(x - m) / s. Parallel over rows; AVX2 / AVX-512 take eight / sixteen rows at a time (tile.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "rows.h"
#include "tile.h"

namespace mnn_fast {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> softmax_rows_cpu(const at::Tensor& x_in) {
  check_2d("softmax_rows", "x", x_in, at::kFloat);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0);
  const int64_t C = x.size(1);
  at::Tensor log_probs = at::empty({B, C}, x.options());
  at::Tensor probs = at::empty({B, C}, x.options());
  if (B == 0 || C == 0) return {log_probs, probs};
  const float* src = x.data_ptr<float>();
  float* log_dst = log_probs.data_ptr<float>();
  float* prob_dst = probs.data_ptr<float>();
  const tile::Kernels* tiles = tile::kernels_for(B);  // one ISA for the whole call
  at::parallel_for(0, B, grain_for(C * 20), [&](int64_t begin, int64_t end) {
    if (tiles != nullptr && C >= tile::kWideColumns) {
      tiles->softmax_rows_wide(src, begin, end, C, log_dst, prob_dst);
      return;
    }
    if (tiles != nullptr) {
      const int per_tile = tiles->rows;
      std::vector<float> tile(per_tile * C);
      const float* in[tile::kMaxRows];
      float* log_out[tile::kMaxRows];
      float* prob_out[tile::kMaxRows];
      for (int64_t i = begin; i < end; i += per_tile) {
        const int n = static_cast<int>(std::min<int64_t>(per_tile, end - i));
        for (int r = 0; r < n; ++r) {
          in[r] = src + (i + r) * C;
          log_out[r] = log_dst + (i + r) * C;
          prob_out[r] = prob_dst + (i + r) * C;
        }
        tiles->softmax_rows(in, n, C, tile.data(), log_out, prob_out);
      }
      return;
    }
    for (int64_t i = begin; i < end; ++i) rows::softmax_row(src + i * C, C, log_dst + i * C, prob_dst + i * C);
  });
  return {log_probs, probs};
}

}  // namespace
}  // namespace cpu
}  // namespace mnn_fast

TORCH_LIBRARY_IMPL(mnn_fast, CPU, m) {
  m.impl("softmax_rows", &mnn_fast::cpu::softmax_rows_cpu);
}
