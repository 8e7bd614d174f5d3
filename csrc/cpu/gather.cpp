// gather on CPU: out[r] = x[perm[r]] for every buffer row r, one memcpy of D elements per row.
// Rows are independent, so the copy is parallel over r; being a byte copy it is dtype-agnostic.
// Out-of-range indices are recorded during the copy and raised afterwards (never dereferenced).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>

#include "common.h"

namespace mnn_fast {
namespace cpu {
namespace {

at::Tensor gather_cpu(const at::Tensor& x_in, const at::Tensor& perm_in) {
  constexpr const char* op = "gather";
  TORCH_CHECK_VALUE(x_in.dim() == 2, op, ": x must be a 2-D tensor [B, D], got ", describe(x_in));
  check_cpu(op, "x", x_in);
  check_index_1d(op, "perm", perm_in);

  // Rows only need to be contiguous themselves; a row stride (e.g. a column slice) costs nothing.
  const at::Tensor x = (x_in.stride(1) == 1 || x_in.size(1) <= 1) ? x_in : x_in.contiguous();
  const at::Tensor perm = perm_in.contiguous();
  const int64_t B = x.size(0);
  const int64_t N = perm.numel();
  at::Tensor out = at::empty({N, x.size(1)}, x.options());
  if (N == 0) return out;

  const int64_t row_bytes = x.size(1) * static_cast<int64_t>(x.element_size());
  const int64_t src_stride_bytes = x.stride(0) * static_cast<int64_t>(x.element_size());
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* idx = perm.data_ptr<int64_t>();
  // First offending position; checking inline avoids a separate pass over perm.
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};

  // At least kGrainBytes per task: a copy that small finishes before a second thread gets going.
  constexpr int64_t kGrainBytes = 256 * 1024;
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = idx[r];
      if (static_cast<uint64_t>(i) >= static_cast<uint64_t>(B)) {  // also catches i < 0
        int64_t cur = bad.load(std::memory_order_relaxed);
        while (r < cur && !bad.compare_exchange_weak(cur, r, std::memory_order_relaxed)) {
        }
        continue;
      }
      std::memcpy(dst + r * row_bytes, src + i * src_stride_bytes, row_bytes);
    }
  });

  const int64_t r = bad.load();
  TORCH_CHECK_VALUE(r == std::numeric_limits<int64_t>::max(), op, ": perm values must be in [0, B) with B = ", B,
              ", got perm[", r, "] = ", idx[r]);
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace mnn_fast

TORCH_LIBRARY_IMPL(mnn_fast, CPU, m) {
  m.impl("gather", &mnn_fast::cpu::gather_cpu);
}
