// Input checks and routing tables shared by the CPU kernels of the mnn_fast ops (semantics:
// docs/ops.md). Every message names the op, the argument and what was expected, then what was received.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

namespace mnn_fast {
namespace cpu {

// Python's spelling ("float32", "int64"), the one users see in torch.
inline std::string_view dtype_name(at::ScalarType dtype) { return c10::getDtypeNames(dtype).first; }

// "a 2-D float32 tensor of shape [4, 3] on cpu": enough to see which property broke the contract.
inline std::string describe(const at::Tensor& t) {
  std::ostringstream os;
  os << "a " << t.dim() << "-D " << dtype_name(t.scalar_type()) << " tensor of shape " << t.sizes() << " on "
     << t.device();
  return os.str();
}

inline void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor for the CPU kernel, got ", describe(t));
}

// Wrong dtypes raise TypeError in Python, wrong shapes or values ValueError.
inline void check_2d(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be a 2-D ", dtype_name(dtype), " tensor, got ", describe(t));
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be a 2-D ", dtype_name(dtype), " tensor, got ", describe(t));
  check_cpu(op, name, t);
}

// The index tensors of the routing (offsets, perm, rows) are all 1-D int64.
inline void check_index_1d(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be a 1-D int64 tensor, got ", describe(t));
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": ", name, " must be a 1-D int64 tensor, got ", describe(t));
  check_cpu(op, name, t);
}

// The routing's expert boundaries off[0..E]: from 0 to N, non-decreasing. `rows` says what N counts
// (" (perm's length)"), or "".
inline void check_offsets(const char* op, const int64_t* off, int64_t E, int64_t N, const char* rows) {
  TORCH_CHECK_VALUE(off[0] == 0 && off[E] == N, op, ": offsets must run from 0 to N = ", N, rows, ", got ", off[0],
                    " .. ", off[E]);
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK_VALUE(off[e] <= off[e + 1], op, ": offsets must be non-decreasing, got offsets[", e, "] = ", off[e],
                      " > offsets[", e + 1, "] = ", off[e + 1]);
  }
}

// The rows the segment ops (segment_linear, segment_stack) cut into E segments: x's own B rows, or
// the N that `perm` names (1-D int64, values in [0, B)); `offsets` (E + 1 entries, from 0 to N,
// non-decreasing) bounds the segments. Holds the contiguous copies the raw pointers read.
struct SegmentRows {
  at::Tensor perm, offsets;    // perm undefined without one
  const int64_t* idx;          // perm's values, or nullptr
  const int64_t* off;          // E + 1 segment bounds
  int64_t N;
};

inline SegmentRows check_segment_rows(const char* op, int64_t B, int64_t E, const at::Tensor& offsets_in,
                                      const std::optional<at::Tensor>& perm_in) {
  SegmentRows rows;
  check_index_1d(op, "offsets", offsets_in);
  if (perm_in.has_value()) {
    check_index_1d(op, "perm", *perm_in);
    rows.perm = perm_in->contiguous();
  }
  rows.N = rows.perm.defined() ? rows.perm.numel() : B;
  TORCH_CHECK_VALUE(offsets_in.numel() == E + 1, op, ": offsets must have E + 1 = ", E + 1, " entries, got ",
                    offsets_in.numel());
  rows.offsets = offsets_in.contiguous();
  rows.off = rows.offsets.data_ptr<int64_t>();
  check_offsets(op, rows.off, E, rows.N, rows.perm.defined() ? " (perm's length)" : "");
  rows.idx = rows.perm.defined() ? rows.perm.data_ptr<int64_t>() : nullptr;
  for (int64_t r = 0; rows.idx != nullptr && r < rows.N; ++r) {
    TORCH_CHECK_VALUE(rows.idx[r] >= 0 && rows.idx[r] < B, op, ": perm values must be row indices of x in [0, ", B,
                      "), got perm[", r, "] = ", rows.idx[r]);
  }
  return rows;
}

// The expert of each of the off[E] buffer rows (checked offsets): a table, because a binary search in
// offsets per row mispredicts more than a small row's whole work costs.
inline std::vector<int32_t> expert_of_rows(const int64_t* off, int64_t E) {
  std::vector<int32_t> expert_of(off[E]);
  for (int64_t e = 0; e < E; ++e) {
    std::fill(expert_of.begin() + off[e], expert_of.begin() + off[e + 1], static_cast<int32_t>(e));
  }
  return expert_of;
}

// Work per parallel task, in scalar operations (~20 us): smaller tasks lose more to the fork/join
// (and, on a busy machine, to waiting for a descheduled worker) than they gain.
constexpr int64_t kGrainWork = 65536;

// Grain size (in items) for at::parallel_for over items that each cost `work_per_item`.
inline int64_t grain_for(int64_t work_per_item) {
  const int64_t w = work_per_item > 0 ? work_per_item : 1;
  const int64_t g = kGrainWork / w;
  return g > 1 ? g : 1;
}

}  // namespace cpu
}  // namespace mnn_fast
