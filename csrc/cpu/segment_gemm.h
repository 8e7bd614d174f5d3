// One segment's GEMM as nn.Linear makes it, shared by segment_linear (stacked weights) and
// segment_linear_experts (each expert's own weight): the rows on an operand aligned as a fresh
// allocation, then the addmm (mm without a bias) nn.Linear calls.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>

#include "common.h"

namespace mnn_fast {
namespace cpu {

// What at::empty returns on CPU (c10's allocator alignment), so "fresh" operands share it.
constexpr uintptr_t kFreshAlignment = 64;

inline bool fresh_aligned(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % kFreshAlignment == 0; }

// Segment e's n rows of x on an operand aligned as a fresh allocation: x's own rows when they
// start on such a boundary, else a copy; with perm, the rows it names copied into `scratch` (the
// start of a buffer, so aligned; reused from segment to segment, so its pages are touched once).
// The copy is split over the threads: it is row by row, so the split changes no bit.
inline at::Tensor segment_rows(const at::Tensor& x, const int64_t* perm, int64_t begin, int64_t n, at::Tensor scratch) {
  if (perm == nullptr) {
    // detach(): out= calls refuse inputs that require grad, even below autograd.
    at::Tensor rows = x.narrow(0, begin, n).detach();
    return fresh_aligned(rows) ? rows : rows.clone();
  }
  at::Tensor rows = scratch.defined() ? scratch.narrow(0, 0, n) : at::empty({n, x.size(1)}, x.options());
  const int64_t row_bytes = x.size(1) * x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(rows.data_ptr());
  at::parallel_for(0, n, grain_for(x.size(1)), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) std::memcpy(dst + i * row_bytes, src + perm[begin + i] * row_bytes, row_bytes);
  });
  return rows;
}

// out[begin:begin+n] = rows @ w^T (+ bias): the addmm (mm without a bias) nn.Linear makes with
// weight w, written through a fresh buffer where the output slot is not aligned as a fresh one.
inline void gemm_into(at::Tensor& out, const at::Tensor& rows, const at::Tensor& w, const at::Tensor* bias, int64_t begin,
               int64_t n) {
  at::Tensor dst = out.narrow(0, begin, n);
  const at::Tensor w_t = w.t();
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
