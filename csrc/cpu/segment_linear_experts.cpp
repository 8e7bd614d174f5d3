// segment_linear_experts on CPU (semantics: docs/ops.md): out[r] = x[r] @ W_e^T + b_e for the rows r
// of segment e, W_e and b_e given as the expert's own tensors. The serving path's form of
// segment_linear (segment_linear.cpp): the same GEMM per segment (segment_gemm.h), so the same bits.
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include "common.h"
#include "segment_gemm.h"

namespace mnn_fast {
namespace cpu {
namespace {

// The very tensors nn.Linear reads, so nothing is copied or checked for staleness. weights[k] and
// biases[k] belong to the k-th segment that has rows (in increasing e): only those cross from
// Python, whose list conversion costs per entry. out_features gives the width when none has rows.
at::Tensor segment_linear_experts_cpu(const at::Tensor& x_in, at::TensorList weights, at::TensorList biases,
                                      const at::Tensor& offsets_in, int64_t out_features,
                                      const std::optional<at::Tensor>& perm_in) {
  constexpr const char* op = "segment_linear_experts";
  TORCH_CHECK_VALUE(x_in.dim() == 2, op, ": x must be a 2-D tensor [N, K], got ", describe(x_in));
  check_cpu(op, "x", x_in);
  TORCH_CHECK_VALUE(out_features >= 0, op, ": out_features must be >= 0, got ", out_features);
  TORCH_CHECK_VALUE(offsets_in.dim() == 1 && offsets_in.numel() >= 1, op,
                    ": offsets must be a 1-D int64 tensor of E + 1 >= 1 entries, got ", describe(offsets_in));
  const int64_t E = offsets_in.numel() - 1, K = x_in.size(1), M = out_features;
  const SegmentRows segments = check_segment_rows(op, x_in.size(0), E, offsets_in, perm_in);
  const int64_t* off = segments.off;
  int64_t used = 0;
  for (int64_t e = 0; e < E; ++e) used += off[e + 1] > off[e];
  const int64_t given = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(given == used, op, ": weights must hold one tensor per segment with rows (", used,
                    " of the E = ", E, " segments), got ", given);
  const bool has_bias = !biases.empty();
  TORCH_CHECK_VALUE(!has_bias || static_cast<int64_t>(biases.size()) == used, op,
                    ": biases must be empty (no bias) or hold one tensor per segment with rows (", used, "), got ",
                    biases.size());
  for (int64_t k = 0; k < used; ++k) {
    const at::Tensor& w = weights[k];
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == M && w.size(1) == K, op, ": weights[", k,
                      "] must be a 2-D tensor [out_features, K] = [", M, ", ", K, "], got ", describe(w));
    TORCH_CHECK_TYPE(w.scalar_type() == x_in.scalar_type(), op, ": weights[", k, "] must have x's dtype ",
                     dtype_name(x_in.scalar_type()), ", got ", describe(w));
    check_cpu(op, "weights", w);
    if (!has_bias) continue;
    const at::Tensor& b = biases[k];
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == M, op, ": biases[", k, "] must be a 1-D tensor [", M, "], got ",
                      describe(b));
    TORCH_CHECK_TYPE(b.scalar_type() == x_in.scalar_type(), op, ": biases[", k, "] must have x's dtype, got ",
                     describe(b));
    check_cpu(op, "biases", b);
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::NoGradGuard no_grad;
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty({segments.N, M}, x.options());
  if (segments.N == 0) return out;
  const at::Tensor scratch = perm_scratch(x, segments, E);
  for (int64_t e = 0, k = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) continue;
    const at::Tensor b = has_bias ? plain(biases[k]) : at::Tensor();
    gemm_into(out, segment_rows(x, segments.idx, off[e], n, scratch), weights[k], has_bias ? &b : nullptr, off[e], n);
    ++k;
  }
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace mnn_fast

TORCH_LIBRARY_IMPL(mnn_fast, CPU, m) {
  m.impl("segment_linear_experts", &mnn_fast::cpu::segment_linear_experts_cpu);
}
