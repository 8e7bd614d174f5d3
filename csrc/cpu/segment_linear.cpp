// segment_linear on CPU: out[r] = x[r] @ weight[e]^T + bias[e] for the rows r of segment e
// (offsets[e] <= r < offsets[e+1]). One at::addmm per segment, the call nn.Linear makes.
// Bitwise equal to the expert's own nn.Linear on a fresh tensor because BLAS sees the same call:
//  - operands start on the alignment of a fresh allocation (MKL picks a different kernel, with
//    different rounding, for a misaligned operand: measured on AMD EPYC at widths 5 and 24);
//    a misaligned segment is copied to a fresh tensor, a misaligned output slot written via one;
//  - segments run one after another, each GEMM at the caller's intra-op thread count, as the
//    naive loop runs them (MKL's result depends on its thread count).
// parallel_segments=true spreads segments over the cores, each GEMM single-threaded: faster for
// thousands of tiny GEMMs, but bitwise only where one-thread and n-thread GEMMs agree (opt-in).
// With perm, segment e's rows are x[perm[offsets[e]:offsets[e+1]]], copied just before its GEMM to
// the start of a buffer (aligned as the operand nn.Linear gets from x[mask]): one scratch buffer
// reused by every segment, or one per segment with parallel_segments. The [N, K] gathered buffer is
// never built.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include "common.h"
#include "segment_gemm.h"

namespace mnn_fast {
namespace cpu {
namespace {

// Segment e of the stacked form: its slice of the [E, M, K] stack, copied to a fresh tensor where
// the slice does not start on a fresh allocation's alignment (as the expert's own weight does).
void segment_gemm(at::Tensor& out, const at::Tensor& rows, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, int64_t e, int64_t begin, int64_t n) {
  at::Tensor w = weight.select(0, e).detach();
  if (!fresh_aligned(w)) w = w.contiguous().clone();
  const at::Tensor b = bias.has_value() ? bias->select(0, e).detach() : at::Tensor();
  gemm_into(out, rows, w, bias.has_value() ? &b : nullptr, begin, n);
}

at::Tensor segment_linear_cpu(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& offsets_in, bool parallel_segments,
                              const std::optional<at::Tensor>& perm_in) {
  constexpr const char* op = "segment_linear";
  TORCH_CHECK_VALUE(x_in.dim() == 2, op, ": x must be a 2-D tensor [N, K], got ", describe(x_in));
  TORCH_CHECK_VALUE(weight.dim() == 3, op, ": weight must be a 3-D tensor [E, M, K], got ", describe(weight));
  TORCH_CHECK_TYPE(x_in.scalar_type() == weight.scalar_type(), op, ": weight must have x's dtype ",
                   dtype_name(x_in.scalar_type()), ", got ", describe(weight));
  check_cpu(op, "x", x_in);
  check_cpu(op, "weight", weight);
  const int64_t E = weight.size(0), M = weight.size(1), K = weight.size(2), B = x_in.size(0);
  TORCH_CHECK_VALUE(x_in.size(1) == K, op, ": x has ", x_in.size(1), " features but weight expects K = ", K);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 2 && bias->size(0) == E && bias->size(1) == M, op,
                      ": bias must be a 2-D tensor [E, M] = [", E, ", ", M, "], got ", describe(*bias));
    TORCH_CHECK_TYPE(bias->scalar_type() == x_in.scalar_type(), op, ": bias must have x's dtype, got ", describe(*bias));
    check_cpu(op, "bias", *bias);
  }
  // The rows the segments cover: x's own, or those perm names.
  const SegmentRows segments = check_segment_rows(op, B, E, offsets_in, perm_in);
  const int64_t N = segments.N;
  const int64_t* off = segments.off;
  const int64_t* idx = segments.idx;
  // The ATen calls below are this kernel's own arithmetic: autograd is handled by the op (ops.py).
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::NoGradGuard no_grad;
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty({N, M}, x.options());
  if (N == 0) return out;
  auto run_segment = [&](int64_t e, const at::Tensor& scratch) {
    const int64_t n = off[e + 1] - off[e];
    if (n > 0) segment_gemm(out, segment_rows(x, idx, off[e], n, scratch), weight, bias, e, off[e], n);
  };
  if (!parallel_segments) {
    const at::Tensor scratch = perm_scratch(x, segments, E);
    for (int64_t e = 0; e < E; ++e) run_segment(e, scratch);
    return out;
  }
  // Grain 1: one segment is already thousands of multiply-adds. Segments run at once, so each
  // copies its rows into a buffer of its own.
  // The workers' ATen calls must see this thread's dispatch state (see segment_stack.cpp).
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, E, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t e = begin; e < end; ++e) run_segment(e, at::Tensor());
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace mnn_fast

TORCH_LIBRARY_IMPL(mnn_fast, CPU, m) {
  m.impl("segment_linear", &mnn_fast::cpu::segment_linear_cpu);
}
