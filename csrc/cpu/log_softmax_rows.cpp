// log_softmax_rows on CPU (semantics: docs/ops.md): the final step of recombine on its own, with
// rowmath's exp, log1p and lane sums, for the naive loop and the paths that combine separately.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "rows.h"
#include "tile.h"

namespace mnn_fast {
namespace cpu {
namespace {

at::Tensor log_softmax_rows_cpu(const at::Tensor& x_in) {
  check_2d("log_softmax_rows", "x", x_in, at::kFloat);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0);
  const int64_t C = x.size(1);
  at::Tensor out = at::empty({B, C}, x.options());
  if (B == 0 || C == 0) return out;
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const tile::Kernels* tiles = tile::kernels_for(B);  // one ISA for the whole call
  at::parallel_for(0, B, grain_for(C * 30), [&](int64_t begin, int64_t end) {
    if (tiles != nullptr) {  // eight or sixteen rows at a time, in place in the output (tile.h): the same bits
      std::copy(src + begin * C, src + end * C, dst + begin * C);
      std::vector<float> tile(tiles->rows * C);
      tiles->log_softmax_matrix_rows(dst, begin, end, C, tile.data());
      return;
    }
    for (int64_t i = begin; i < end; ++i) rows::log_softmax_row(src + i * C, C, dst + i * C);
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace mnn_fast

TORCH_LIBRARY_IMPL(mnn_fast, CPU, m) {
  m.impl("log_softmax_rows", &mnn_fast::cpu::log_softmax_rows_cpu);
}
