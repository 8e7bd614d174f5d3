// combine on CPU: acc[i, c] = ((logp[i, c] + logv[r0, c]) + logv[r1, c]) + ... over sample i's
// rows r0, r1, ... = sample_rows[sample_offsets[i] : sample_offsets[i+1]]. Parallel over samples,
// so each output row has exactly one writer; columns go in register tiles, each element's chain of
// float32 adds runs strictly left to right (vectorising across c never reorders a chain).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <limits>

#include "common.h"

namespace mnn_fast {
namespace cpu {
namespace {

// Columns per register tile: 32 floats fit in 8 SSE registers with room for the loads.
constexpr int64_t kTile = 32;

inline void combine_row(const float* lp, const float* lv, int64_t C, const int64_t* rows, int64_t n, float* out) {
  int64_t c = 0;
  for (; c + kTile <= C; c += kTile) {
    float acc[kTile];
    for (int64_t u = 0; u < kTile; ++u) acc[u] = lp[c + u];
    for (int64_t j = 0; j < n; ++j) {
      const float* v = lv + rows[j] * C + c;
      for (int64_t u = 0; u < kTile; ++u) acc[u] += v[u];
    }
    for (int64_t u = 0; u < kTile; ++u) out[c + u] = acc[u];
  }
  for (; c < C; ++c) {
    float acc = lp[c];
    for (int64_t j = 0; j < n; ++j) acc += lv[rows[j] * C + c];
    out[c] = acc;
  }
}

at::Tensor combine_cpu(const at::Tensor& logp_in, const at::Tensor& logv_in, const at::Tensor& perm,
                       const at::Tensor& sample_offsets_in, const at::Tensor& sample_rows_in) {
  constexpr const char* op = "combine";
  check_2d(op, "logp", logp_in, at::kFloat);
  check_2d(op, "logv", logv_in, at::kFloat);
  check_index_1d(op, "perm", perm);
  check_index_1d(op, "sample_offsets", sample_offsets_in);
  check_index_1d(op, "sample_rows", sample_rows_in);
  const int64_t B = logp_in.size(0);
  const int64_t C = logp_in.size(1);
  const int64_t NV = logv_in.size(0);
  TORCH_CHECK_VALUE(logv_in.size(1) == C, op, ": logv must have the same number of columns C = ", C, " as logp, got ",
              describe(logv_in));
  TORCH_CHECK_VALUE(perm.numel() == NV, op, ": perm must have one entry per logv row (N = ", NV, "), got ", describe(perm));
  TORCH_CHECK_VALUE(sample_offsets_in.numel() == B + 1, op, ": sample_offsets must have B+1 = ", B + 1,
              " entries, got ", describe(sample_offsets_in));

  const at::Tensor logp = logp_in.contiguous();
  const at::Tensor logv = logv_in.contiguous();
  const at::Tensor sample_offsets = sample_offsets_in.contiguous();
  const at::Tensor sample_rows = sample_rows_in.contiguous();
  const int64_t NR = sample_rows.numel();
  at::Tensor acc = at::empty({B, C}, logp.options());
  if (B == 0) return acc;

  const float* lp = logp.data_ptr<float>();
  const float* lv = logv.data_ptr<float>();
  const int64_t* so = sample_offsets.data_ptr<int64_t>();
  const int64_t* sr = sample_rows.data_ptr<int64_t>();
  float* out = acc.data_ptr<float>();
  // First offending sample; validating inline avoids separate passes over the index tensors.
  std::atomic<int64_t> bad{std::numeric_limits<int64_t>::max()};
  const int64_t avg_rows = NR / B + 1;

  at::parallel_for(0, B, grain_for(C * avg_rows + 8), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t a = so[i];
      const int64_t b = so[i + 1];
      bool ok = 0 <= a && a <= b && b <= NR;
      for (int64_t k = a; ok && k < b; ++k) ok = static_cast<uint64_t>(sr[k]) < static_cast<uint64_t>(NV);
      if (!ok) {
        int64_t cur = bad.load(std::memory_order_relaxed);
        while (i < cur && !bad.compare_exchange_weak(cur, i, std::memory_order_relaxed)) {
        }
        continue;
      }
      combine_row(lp + i * C, lv, C, sr + a, b - a, out + i * C);
    }
  });

  const int64_t i = bad.load();
  if (i != std::numeric_limits<int64_t>::max()) {
    const int64_t a = so[i];
    const int64_t b = so[i + 1];
    TORCH_CHECK_VALUE(0 <= a && a <= b && b <= NR, op, ": sample_offsets must be non-decreasing within [0, ",
                "sample_rows.numel() = ", NR, "], got sample_offsets[", i, "] = ", a, ", sample_offsets[", i + 1,
                "] = ", b);
    for (int64_t k = a; k < b; ++k) {
      TORCH_CHECK_VALUE(sr[k] >= 0 && sr[k] < NV, op, ": sample_rows values must be in [0, N) with N = ", NV,
                  " (rows of logv), got sample_rows[", k, "] = ", sr[k]);
    }
  }
  return acc;
}

}  // namespace
}  // namespace cpu
}  // namespace mnn_fast

TORCH_LIBRARY_IMPL(mnn_fast, CPU, m) {
  m.impl("combine", &mnn_fast::cpu::combine_cpu);
}
