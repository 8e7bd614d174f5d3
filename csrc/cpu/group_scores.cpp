// group_scores on CPU: scores[i, e] = probs[i, g0] + probs[i, g1] + ... over the CSR group e.
// Parallel over samples; each score is one float32 chain started from the group's first member
// and added strictly left to right, matching reference.group_scores_torch bit for bit.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common.h"

namespace mnn_fast {
namespace cpu {
namespace {

at::Tensor group_scores_cpu(const at::Tensor& probs_in, const at::Tensor& group_offsets_in,
                            const at::Tensor& group_classes_in) {
  constexpr const char* op = "group_scores";
  check_2d(op, "probs", probs_in, at::kFloat);
  check_index_1d(op, "group_offsets", group_offsets_in);
  check_index_1d(op, "group_classes", group_classes_in);
  TORCH_CHECK_VALUE(group_offsets_in.numel() >= 1, op, ": group_offsets must have E+1 >= 1 entries, got ",
              describe(group_offsets_in));

  const at::Tensor probs = probs_in.contiguous();
  const at::Tensor goffs = group_offsets_in.contiguous();
  const at::Tensor gcls = group_classes_in.contiguous();
  const int64_t B = probs.size(0);
  const int64_t C = probs.size(1);
  const int64_t E = goffs.numel() - 1;
  const int64_t M = gcls.numel();

  // Validate the (small) group description once, so the hot loop can index without checks.
  const int64_t* offs = goffs.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(offs[0] == 0, op, ": group_offsets must start at 0, got group_offsets[0] = ", offs[0]);
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK_VALUE(offs[e + 1] > offs[e], op, ": every group must be non-empty (group_offsets strictly increasing), got ",
                "group_offsets[", e, "] = ", offs[e], ", group_offsets[", e + 1, "] = ", offs[e + 1]);
  }
  TORCH_CHECK_VALUE(offs[E] == M, op, ": group_offsets[-1] must equal group_classes.numel() = ", M, ", got ", offs[E]);
  const int64_t* cls = gcls.data_ptr<int64_t>();
  for (int64_t j = 0; j < M; ++j) {
    TORCH_CHECK_VALUE(cls[j] >= 0 && cls[j] < C, op, ": group_classes values must be in [0, C) with C = ", C,
                ", got group_classes[", j, "] = ", cls[j]);
  }

  at::Tensor scores = at::empty({B, E}, probs.options());
  if (B == 0 || E == 0) return scores;

  const float* p = probs.data_ptr<float>();
  float* out = scores.data_ptr<float>();
  at::parallel_for(0, B, grain_for(M + E), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* row = p + i * C;
      float* o = out + i * E;
      for (int64_t e = 0; e < E; ++e) {
        int64_t j = offs[e];
        const int64_t stop = offs[e + 1];
        float s = row[cls[j]];  // start from the first member, not 0.0f: -0.0 and NaN payloads stay exact
        for (++j; j < stop; ++j) s += row[cls[j]];
        o[e] = s;
      }
    }
  });
  return scores;
}

}  // namespace
}  // namespace cpu
}  // namespace mnn_fast

TORCH_LIBRARY_IMPL(mnn_fast, CPU, m) {
  m.impl("group_scores", &mnn_fast::cpu::group_scores_cpu);
}
