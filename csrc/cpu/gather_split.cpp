// gather_split on CPU: for each expert e, a fresh tensor of its rows x[perm[offsets[e]:offsets[e+1]]].
// The sequential executor hands each specialist such a tensor; cut from one gathered buffer, a
// segment starts on an arbitrary byte and must be copied again to reach the alignment of a fresh
// allocation (where BLAS rounds as in the naive loop). Allocating per expert, as the naive loop
// does, and copying each row once into place skips that second copy (copy_rows.h, as gather:
// parallel over the N rows, out-of-range indices raised afterwards, never dereferenced).
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"
#include "copy_rows.h"

namespace mnn_fast {
namespace cpu {
namespace {

std::vector<at::Tensor> gather_split_cpu(const at::Tensor& x_in, const at::Tensor& perm_in,
                                         const at::Tensor& offsets_in) {
  constexpr const char* op = "gather_split";
  TORCH_CHECK_VALUE(x_in.dim() == 2, op, ": x must be a 2-D tensor [B, D], got ", describe(x_in));
  check_cpu(op, "x", x_in);
  check_index_1d(op, "perm", perm_in);
  check_index_1d(op, "offsets", offsets_in);
  TORCH_CHECK_VALUE(offsets_in.numel() >= 1, op, ": offsets must have E + 1 >= 1 entries, got ", describe(offsets_in));
  const at::Tensor x = (x_in.stride(1) == 1 || x_in.size(1) <= 1) ? x_in : x_in.contiguous();
  const at::Tensor perm = perm_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const int64_t D = x.size(1), N = perm.numel(), E = offsets.numel() - 1;
  const int64_t* off = offsets.data_ptr<int64_t>();
  check_offsets(op, off, E, N, " (perm's length)");
  std::vector<at::Tensor> out;
  out.reserve(E);
  std::vector<char*> base(E);
  for (int64_t e = 0; e < E; ++e) {
    out.push_back(at::empty({off[e + 1] - off[e], D}, x.options()));
    base[e] = static_cast<char*>(out.back().data_ptr());
  }
  if (N == 0) return out;  // with D == 0 the indices are still checked, as gather checks them

  const int64_t row_bytes = D * static_cast<int64_t>(x.element_size());
  const std::vector<int32_t> expert_of = expert_of_rows(off, E);  // each row's segment, for the parallel copy
  copy_rows_checked(op, x, perm, [&](int64_t row) {
    const int32_t e = expert_of[row];
    return base[e] + (row - off[e]) * row_bytes;
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace mnn_fast

TORCH_LIBRARY_IMPL(mnn_fast, CPU, m) {
  m.impl("gather_split", &mnn_fast::cpu::gather_split_cpu);
}
