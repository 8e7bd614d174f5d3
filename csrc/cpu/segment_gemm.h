// One segment's GEMM as nn.Linear makes it, shared by segment_linear (stacked weights) and
// segment_linear_experts (each expert's own weight): the rows on an operand aligned as a fresh
// allocation, then the addmm (mm without a bias) nn.Linear calls.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace mnn_fast {
namespace cpu {

// What at::empty returns on CPU (c10's allocator alignment), so "fresh" operands share it.
constexpr uintptr_t kFreshAlignment = 64;

inline bool fresh_aligned(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % kFreshAlignment == 0; }

// A plain tensor over t's storage with the given geometry: what narrow / t / detach give, without
// their dispatcher calls (three or four each). A one-sample call makes a dozen of them right after
// its GEMVs have pushed the dispatcher's code out of the cache, where each cost microseconds. It
// carries no autograd history (as detach(), which out= calls need for inputs that require grad).
inline at::Tensor window(const at::Tensor& t, at::IntArrayRef sizes, at::IntArrayRef strides, int64_t offset) {
  auto impl = c10::make_intrusive<c10::TensorImpl>(c10::Storage(t.storage()), t.key_set(), t.dtype());
  impl->set_sizes_and_strides(sizes, strides, offset);
  return at::Tensor(std::move(impl));
}

// Rows [begin, begin + n) of a 2-D tensor.
inline at::Tensor row_window(const at::Tensor& t, int64_t begin, int64_t n) {
  return window(t, {n, t.size(1)}, {t.stride(0), t.stride(1)}, t.storage_offset() + begin * t.stride(0));
}

// The same tensor without autograd history, for an out= call's inputs (window of its whole geometry).
inline at::Tensor plain(const at::Tensor& t) { return window(t, t.sizes(), t.strides(), t.storage_offset()); }

// The buffer segment_rows copies perm's rows into when segments run one after another: one for
// every segment, sized by the largest ([largest, x.size(1)]); undefined without perm (x's own rows).
inline at::Tensor perm_scratch(const at::Tensor& x, const SegmentRows& segments, int64_t E) {
  if (segments.idx == nullptr) return at::Tensor();
  int64_t largest = 0;
  for (int64_t e = 0; e < E; ++e) largest = std::max(largest, segments.off[e + 1] - segments.off[e]);
  return at::empty({largest, x.size(1)}, x.options());
}

// Segment e's n rows of x on an operand aligned as a fresh allocation: x's own rows when they
// start on such a boundary, else a copy; with perm, the rows it names copied into `scratch` (the
// start of a buffer, so aligned; reused from segment to segment, so its pages are touched once).
// The copy is split over the threads when it is large enough: row by row, so no bit changes.
inline at::Tensor segment_rows(const at::Tensor& x, const int64_t* perm, int64_t begin, int64_t n, at::Tensor scratch) {
  if (perm == nullptr) {
    at::Tensor rows = row_window(x, begin, n);
    return fresh_aligned(rows) ? rows : rows.clone();
  }
  at::Tensor rows = scratch.defined() ? row_window(scratch, 0, n) : at::empty({n, x.size(1)}, x.options());
  const int64_t row_bytes = x.size(1) * x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(rows.data_ptr());
  const auto copy = [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) std::memcpy(dst + i * row_bytes, src + perm[begin + i] * row_bytes, row_bytes);
  };
  const int64_t grain = grain_for(x.size(1));
  if (n <= grain) {
    copy(0, n);
  } else {
    at::parallel_for(0, n, grain, copy);
  }
  return rows;
}

// out[begin:begin+n] = rows @ w^T (+ bias): the addmm (mm without a bias) nn.Linear makes with
// weight w (w.t() as nn.Linear passes it), written through a fresh buffer where the output slot is
// not aligned as a fresh one. out is contiguous.
inline void gemm_into(at::Tensor& out, const at::Tensor& rows, const at::Tensor& w, const at::Tensor* bias, int64_t begin,
                      int64_t n) {
  at::Tensor dst = row_window(out, begin, n);
  const at::Tensor w_t = window(w, {w.size(1), w.size(0)}, {w.stride(1), w.stride(0)}, w.storage_offset());
  const bool direct = fresh_aligned(dst);
  at::Tensor target = direct ? dst : at::empty({n, out.size(1)}, out.options());
  if (bias != nullptr) {
    at::addmm_out(target, *bias, rows, w_t);
  } else {
    at::mm_out(target, rows, w_t);
  }
  if (!direct) dst.copy_(target);
}

}  // namespace cpu
}  // namespace mnn_fast
