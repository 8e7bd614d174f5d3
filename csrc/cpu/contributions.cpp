// contributions on CPU (semantics: docs/ops.md): log v of every buffer row, the row arithmetic of
// recombine (rows.h) without the accumulation. The naive loop calls it on one expert's rows, so
// its contributions are bitwise those recombine adds. Parallel over rows, each written once.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "rows.h"

namespace mnn_fast {
namespace cpu {
namespace rows {

void check_tables(const char* op, int64_t N, int64_t W, const at::Tensor& offsets, const at::Tensor& group_offsets,
                  const at::Tensor& group_classes, const at::Tensor& log_spread, int64_t C) {
  check_index_1d(op, "offsets", offsets);
  check_index_1d(op, "group_offsets", group_offsets);
  check_index_1d(op, "group_classes", group_classes);
  TORCH_CHECK_VALUE(log_spread.dim() == 1, op, ": log_spread must be a 1-D float32 tensor, got ", describe(log_spread));
  TORCH_CHECK_TYPE(log_spread.scalar_type() == at::kFloat, op, ": log_spread must be a 1-D float32 tensor, got ",
                   describe(log_spread));
  check_cpu(op, "log_spread", log_spread);
  const int64_t E = offsets.numel() - 1;
  TORCH_CHECK_VALUE(E >= 1, op, ": offsets must have E+1 >= 2 entries, got ", describe(offsets));
  TORCH_CHECK_VALUE(group_offsets.numel() == E + 1, op, ": group_offsets must have E+1 = ", E + 1,
                    " entries (one group per expert), got ", describe(group_offsets));
  TORCH_CHECK_VALUE(log_spread.numel() == E, op, ": log_spread must have E = ", E, " entries, got ",
                    describe(log_spread));
  TORCH_CHECK_VALUE(W == C || W == 1, op, ": logits must have C = ", C, " columns (or 1, binary specialists), got ", W);
  const at::Tensor off = offsets.contiguous();
  const at::Tensor go = group_offsets.contiguous();
  const at::Tensor gc = group_classes.contiguous();
  const int64_t* o = off.data_ptr<int64_t>();
  const int64_t* g = go.data_ptr<int64_t>();
  const int64_t* cls = gc.data_ptr<int64_t>();
  check_offsets(op, o, E, N, " (logits rows)");
  TORCH_CHECK_VALUE(g[0] == 0 && g[E] == gc.numel(), op, ": group_offsets must run from 0 to group_classes.numel() = ",
                    gc.numel(), ", got ", g[0], " ... ", g[E]);
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK_VALUE(g[e] < g[e + 1], op, ": every group must be non-empty, got an empty group ", e);
    TORCH_CHECK_VALUE(W == C || g[e + 1] - g[e] == 1, op, ": binary logits (1 column) need one-class groups, group ", e,
                      " has ", g[e + 1] - g[e], " classes");
  }
  for (int64_t k = 0; k < gc.numel(); ++k) {
    TORCH_CHECK_VALUE(cls[k] >= 0 && cls[k] < C, op, ": group_classes values must be in [0, C) with C = ", C,
                      ", got group_classes[", k, "] = ", cls[k]);
  }
}

}  // namespace rows

namespace {

at::Tensor contributions_cpu(const at::Tensor& logits_in, const at::Tensor& offsets_in,
                             const at::Tensor& group_offsets_in, const at::Tensor& group_classes_in,
                             const at::Tensor& log_spread_in, int64_t num_classes) {
  constexpr const char* op = "contributions";
  TORCH_CHECK_VALUE(num_classes >= 1, op, ": num_classes must be >= 1, got ", num_classes);
  check_2d(op, "logits", logits_in, at::kFloat);
  rows::check_tables(op, logits_in.size(0), logits_in.size(1), offsets_in, group_offsets_in, group_classes_in,
                     log_spread_in, num_classes);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const at::Tensor group_offsets = group_offsets_in.contiguous();
  const at::Tensor group_classes = group_classes_in.contiguous();
  const at::Tensor log_spread = log_spread_in.contiguous();
  const int64_t N = logits.size(0);
  const int64_t W = logits.size(1);
  const int64_t C = num_classes;
  const int64_t E = offsets.numel() - 1;
  at::Tensor out = at::empty({N, C}, logits.options());
  const float* y = logits.data_ptr<float>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* go = group_offsets.data_ptr<int64_t>();
  const int64_t* gc = group_classes.data_ptr<int64_t>();
  const float* spread = log_spread.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, N, grain_for(C * 40), [&](int64_t begin, int64_t end) {
    std::vector<float> ls(C), outside(C);
    std::vector<uint8_t> inside(C, 0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t e = rows::expert_of_row(off, E, r);
      const rows::ExpertGroup g{gc + go[e], go[e + 1] - go[e], spread[e]};
      rows::contribution_row<false>(y + r * W, W, C, g, ls.data(), outside.data(), inside.data(), dst + r * C);
    }
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace mnn_fast

TORCH_LIBRARY_IMPL(mnn_fast, CPU, m) {
  m.impl("contributions", &mnn_fast::cpu::contributions_cpu);
}
