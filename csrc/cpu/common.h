// Input checks shared by the CPU kernels of the mnn_fast ops (semantics: docs/ops.md).
// Every message names the op, the argument and what was expected, then what was received.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>
#include <string_view>

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
