// The row copy shared by gather and gather_split: row perm[r] of x to dst_row(r) for every r,
// parallel over rows (each is independent, a byte copy of any dtype). Out-of-range indices are
// recorded during the copy (never dereferenced) so no separate pass over perm is needed.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>

namespace mnn_fast {
namespace cpu {

// Returns the first r whose perm[r] is outside [0, B), or -1 when every row was copied.
template <typename DstRow>
int64_t copy_rows(const char* src, int64_t src_stride_bytes, int64_t B, const int64_t* perm, int64_t N,
                  int64_t row_bytes, DstRow dst_row) {
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
  // At least 256 KiB per task: a copy that small finishes before a second thread gets going.
  constexpr int64_t kGrainBytes = 256 * 1024;
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = perm[r];
      if (static_cast<uint64_t>(i) >= static_cast<uint64_t>(B)) {  // also catches i < 0
        int64_t cur = bad.load(std::memory_order_relaxed);
        while (r < cur && !bad.compare_exchange_weak(cur, r, std::memory_order_relaxed)) {
        }
        continue;
      }
      if (row_bytes > 0) std::memcpy(dst_row(r), src + i * src_stride_bytes, row_bytes);  // D = 0: no pointers to use
    }
  });
  const int64_t r = bad.load();
  return r == std::numeric_limits<int64_t>::max() ? -1 : r;
}

// Row perm[r] of x: Tensor[B, D] (rows contiguous) to dst_row(r) for r in [0, N) with perm:
// Tensor[N] int64 contiguous; a ValueError naming `op` and the first out-of-range index otherwise.
template <typename DstRow>
void copy_rows_checked(const char* op, const at::Tensor& x, const at::Tensor& perm, DstRow dst_row) {
  const int64_t B = x.size(0), N = perm.numel(), elem = static_cast<int64_t>(x.element_size());
  const int64_t* idx = perm.data_ptr<int64_t>();
  const int64_t r = copy_rows(static_cast<const char*>(x.data_ptr()), x.stride(0) * elem, B, idx, N,
                              x.size(1) * elem, dst_row);
  TORCH_CHECK_VALUE(r < 0, op, ": perm values must be in [0, B) with B = ", B, ", got perm[", r, "] = ",
                    r < 0 ? 0 : idx[r]);
}

}  // namespace cpu
}  // namespace mnn_fast
