// gather on CPU: out[r] = x[perm[r]] for every buffer row r, one memcpy of D elements per row.
// Rows are independent, so the copy is parallel over r (copy_rows.h); being a byte copy it is
// dtype-agnostic. Out-of-range indices are recorded during the copy and raised afterwards.
#include <torch/library.h>

#include "common.h"
#include "copy_rows.h"

namespace mnn_fast {
namespace cpu {
namespace {

at::Tensor gather_cpu(const at::Tensor& x_in, const at::Tensor& perm_in) {
  constexpr const char* op = "gather";
  TORCH_CHECK_VALUE(x_in.dim() == 2, op, ": x must be a 2-D tensor [B, D], got ", describe(x_in));
  check_cpu(op, "x", x_in);
  check_index_1d(op, "perm", perm_in);

  // Rows only need to be contiguous themselves; a row stride (e.g. a column slice) costs nothing.
  const at::Tensor x = (x_in.stride(1) == 1 || x_in.size(1) <= 1) ? x_in : x_in.contiguous();
  const at::Tensor perm = perm_in.contiguous();
  const int64_t N = perm.numel();
  at::Tensor out = at::empty({N, x.size(1)}, x.options());
  if (N == 0) return out;

  const int64_t row_bytes = x.size(1) * static_cast<int64_t>(x.element_size());
  char* dst = static_cast<char*>(out.data_ptr());
  copy_rows_checked(op, x, perm, [&](int64_t row) { return dst + row * row_bytes; });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace mnn_fast

TORCH_LIBRARY_IMPL(mnn_fast, CPU, m) {
  m.impl("gather", &mnn_fast::cpu::gather_cpu);
}
