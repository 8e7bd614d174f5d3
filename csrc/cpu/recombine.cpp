// recombine on CPU (semantics: docs/ops.md): per sample i, acc = logp[i], then for each of its
// buffer rows in increasing expert order acc += log v(row) (rows.h, one pass over the row's
// logits), then out[i] = log_softmax(acc). Parallel over samples: each output row has one writer
// and per-thread scratch of C floats; nothing of size [N, C] is allocated. The logits come as one
// tensor in buffer order or one per expert (the sequential executor's outputs, read in place).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "rows.h"
#include "tile.h"

namespace mnn_fast {
namespace cpu {
namespace {

at::Tensor recombine_cpu(const at::Tensor& logp_in, at::TensorList logits_list, const at::Tensor& offsets_in,
                         const at::Tensor& group_offsets_in, const at::Tensor& group_classes_in,
                         const at::Tensor& log_spread_in, const at::Tensor& sample_offsets_in,
                         const at::Tensor& sample_rows_in) {
  constexpr const char* op = "recombine";
  check_2d(op, "logp", logp_in, at::kFloat);
  const int64_t B = logp_in.size(0);
  const int64_t C = logp_in.size(1);
  check_index_1d(op, "offsets", offsets_in);
  const int64_t E = offsets_in.numel() - 1;
  const int64_t parts = static_cast<int64_t>(logits_list.size());
  TORCH_CHECK_VALUE(parts >= 1 && (parts == 1 || parts == E), op, ": logits must hold one tensor (all rows in buffer order) or one per ",
                    "expert (E = ", E, "), got ", parts);
  int64_t N = 0;
  for (const at::Tensor& part : logits_list) {
    check_2d(op, "logits", part, at::kFloat);
    TORCH_CHECK_VALUE(part.size(1) == logits_list[0].size(1), op, ": every logits tensor must have the same width, got ",
                      describe(logits_list[0]), " and ", describe(part));
    N += part.size(0);
  }
  const int64_t W = logits_list[0].size(1);
  rows::check_tables(op, N, W, offsets_in, group_offsets_in, group_classes_in, log_spread_in, C);
  check_index_1d(op, "sample_offsets", sample_offsets_in);
  check_index_1d(op, "sample_rows", sample_rows_in);
  TORCH_CHECK_VALUE(sample_offsets_in.numel() == B + 1, op, ": sample_offsets must have B+1 = ", B + 1,
                    " entries, got ", describe(sample_offsets_in));
  TORCH_CHECK_VALUE(sample_rows_in.numel() == N, op, ": sample_rows must have one entry per logits row (N = ", N,
                    "), got ", describe(sample_rows_in));

  const at::Tensor logp = logp_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const int64_t* off = offsets.data_ptr<int64_t>();
  // Row r of expert e: parts[e] row r - offsets[e] (per-expert tensors), or row r of the one buffer.
  std::vector<at::Tensor> held;
  std::vector<const float*> base;
  for (int64_t e = 0; e < parts; ++e) {
    held.push_back(logits_list[e].contiguous());
    TORCH_CHECK_VALUE(parts == 1 || held.back().size(0) == off[e + 1] - off[e], op, ": logits[", e,
                      "] must have the expert's offsets[", e + 1, "] - offsets[", e, "] = ", off[e + 1] - off[e],
                      " rows, got ", describe(held.back()));
    base.push_back(held.back().data_ptr<float>());
  }
  const at::Tensor group_offsets = group_offsets_in.contiguous();
  const at::Tensor group_classes = group_classes_in.contiguous();
  const at::Tensor log_spread = log_spread_in.contiguous();
  const at::Tensor sample_offsets = sample_offsets_in.contiguous();
  const at::Tensor sample_rows = sample_rows_in.contiguous();
  at::Tensor out = at::empty({B, C}, logp.options());
  if (B == 0 || C == 0) return out;

  const float* lp = logp.data_ptr<float>();
  const int64_t* go = group_offsets.data_ptr<int64_t>();
  const int64_t* gc = group_classes.data_ptr<int64_t>();
  const float* spread = log_spread.data_ptr<float>();
  const int64_t* so = sample_offsets.data_ptr<int64_t>();
  const int64_t* sr = sample_rows.data_ptr<int64_t>();
  float* dst = out.data_ptr<float>();
  std::atomic<int64_t> bad{-1};
  const int64_t avg_rows = N / B + 1;

  const std::vector<int32_t> expert_of = expert_of_rows(off, E);  // rows::check_tables checked offsets
  // Row r of the logits, and its expert.
  const auto logits_row = [&](int64_t r, int64_t e) { return parts == 1 ? base[0] + r * W : base[e] + (r - off[e]) * W; };
  const auto group_of = [&](int64_t e) { return rows::ExpertGroup{gc + go[e], go[e + 1] - go[e], spread[e]}; };
  // Whether samples [begin, end) index only rows that exist; the kernel reads nothing otherwise.
  // Non-decreasing offsets with both ends in [0, N] keep every sample's range inside; then one
  // branch-free pass over the chunk's rows. Only a failing chunk looks for its first bad sample.
  const auto valid = [&](int64_t begin, int64_t end) {
    bool ok = 0 <= so[begin] && so[end] <= N;
    for (int64_t i = begin; i < end; ++i) ok &= so[i] <= so[i + 1];
    if (ok) {
      for (int64_t k = so[begin]; k < so[end]; ++k) ok &= static_cast<uint64_t>(sr[k]) < static_cast<uint64_t>(N);
    }
    if (ok) return true;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t a = so[i], b = so[i + 1];
      bool ok = 0 <= a && a <= b && b <= N;
      for (int64_t k = a; ok && k < b; ++k) ok = 0 <= sr[k] && sr[k] < N;
      if (!ok) {
        bad.store(i);
        return false;
      }
    }
    return true;
  };
  // Eight (AVX2) or sixteen (AVX-512) rows at a time, one per SIMD lane (tile.h): the same bits as
  // one row at a time, without each row's long serial chain. Width-C logits; the rest (and the sse2
  // choice) take the row path below.
  const tile::Kernels* tiles = W == C ? tile::kernels_for(N) : nullptr;
  at::parallel_for(0, B, grain_for(C * (avg_rows * 40 + 30)), [&](int64_t begin, int64_t end) {
    if (!valid(begin, end)) return;
    if (tiles != nullptr && C >= tile::kWideRecombineColumns) {  // wide rows one at a time, as they lie
      std::vector<float> kept(tiles->rows * C), in_group(C), ls(C), outside(C);
      std::vector<uint8_t> inside(C, 0);
      for (int64_t i = begin; i < end; ++i) {
        float* acc = dst + i * C;
        if (so[i] == so[i + 1]) std::copy(lp + i * C, lp + (i + 1) * C, acc);
        for (int64_t k = so[i]; k < so[i + 1]; ++k) {
          const int64_t r = sr[k];
          const int64_t e = expert_of[r];
          const float* y = logits_row(r, e);
          const rows::ExpertGroup g = group_of(e);
          const float* from = k == so[i] ? lp + i * C : acc;  // the first row adds to logp: no copy
          const float* next = k + 1 < so[end] ? logits_row(sr[k + 1], expert_of[sr[k + 1]]) : nullptr;
          if (!tiles->contribute_wide(y, C, g, kept.data(), in_group.data(), from, acc, next)) {
            if (from != acc) std::copy(from, from + C, acc);  // rows.h's second pass, in place
            rows::contribution_row<true>(y, W, C, g, ls.data(), outside.data(), inside.data(), acc);
          }
        }
      }
      tiles->log_softmax_matrix_rows(dst, begin, end, C, kept.data());
      return;
    }
    if (tiles != nullptr) {
      const int per_tile = tiles->rows;
      std::vector<float> tile(per_tile * C), in_group;
      const float* y[tile::kMaxRows];
      rows::ExpertGroup g[tile::kMaxRows];
      const float* acc_from[tile::kMaxRows];  // a sample's first row starts from logp, the rest from dst
      float* acc_rows[tile::kMaxRows];
      int64_t starts[tile::kMaxRows + 1] = {0};
      float spreads[tile::kMaxRows];
      int count = 0;
      const auto flush = [&]() {
        in_group.resize(starts[count]);
        tiles->contributions(y, g, count, C, tile.data(), in_group.data(), starts, spreads);
        // in sample_rows order: each sample's rows by increasing expert
        tiles->accumulate_rows(acc_from, acc_rows, count, C, g, in_group.data(), starts, spreads);
        count = 0;
      };
      for (int64_t i = begin; i < end; ++i) {
        if (so[i] == so[i + 1]) std::copy(lp + i * C, lp + (i + 1) * C, dst + i * C);
        for (int64_t k = so[i]; k < so[i + 1]; ++k) {
          const int64_t r = sr[k];
          const int64_t e = expert_of[r];
          y[count] = logits_row(r, e);
          g[count] = group_of(e);
          acc_from[count] = k == so[i] ? lp + i * C : dst + i * C;
          acc_rows[count] = dst + i * C;
          starts[count + 1] = starts[count] + g[count].size;
          if (++count == per_tile) flush();
        }
      }
      if (count > 0) flush();
      tiles->log_softmax_matrix_rows(dst, begin, end, C, tile.data());
      return;
    }
    std::copy(lp + begin * C, lp + end * C, dst + begin * C);
    std::vector<float> ls(C), outside(C);
    std::vector<uint8_t> inside(C, 0);
    for (int64_t i = begin; i < end; ++i) {
      float* acc = dst + i * C;
      for (int64_t k = so[i]; k < so[i + 1]; ++k) {
        const int64_t r = sr[k];
        const int64_t e = expert_of[r];
        rows::contribution_row<true>(logits_row(r, e), W, C, group_of(e), ls.data(), outside.data(), inside.data(), acc);
      }
      rows::log_softmax_row(acc, C, acc);
    }
  });
  TORCH_CHECK_VALUE(bad.load() < 0, op, ": sample_offsets must be non-decreasing within [0, N = ", N,
                    "] and sample_rows values in [0, N); sample ", bad.load(), " breaks this");
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace mnn_fast

TORCH_LIBRARY_IMPL(mnn_fast, CPU, m) {
  m.impl("recombine", &mnn_fast::cpu::recombine_cpu);
}
