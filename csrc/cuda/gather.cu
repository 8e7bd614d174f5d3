// gather on CUDA (semantics: docs/ops.md): out[r] = x[perm[r]], a row copy of any dtype. Rows are
// copied as raw bytes in the widest unit (16/8/4/2/1 bytes) dividing the row size and both base
// addresses; one thread per unit, grid-stride over the flattened [N, units per row] output.
#include "common.cuh"

namespace mnn_fast {
namespace cuda_impl {
namespace {

constexpr int kThreads = 256;

}  // namespace

// Kernels have external linkage (unique names): the device passes do not see the host launches.
template <typename V, typename IndexT>
__global__ void __launch_bounds__(kThreads)
    gather_rows_kernel(const V* __restrict__ x, const int64_t* __restrict__ perm, V* __restrict__ out, IndexT total,
                       IndexT units_per_row, int64_t B) {
  for (IndexT idx = static_cast<IndexT>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<IndexT>(gridDim.x) * blockDim.x) {
    const IndexT r = idx / units_per_row;
    const IndexT u = idx - r * units_per_row;
    const int64_t src = __ldg(perm + r);
    CUDA_KERNEL_ASSERT(0 <= src && src < B);
    out[idx] = __ldg(x + src * static_cast<int64_t>(units_per_row) + u);
  }
}

// Every instantiation the host code launches (see common.cuh).
#define MNN_FAST_INSTANTIATE(V, IndexT)                                                                    \
  template __global__ void gather_rows_kernel<V, IndexT>(const V* __restrict__, const int64_t* __restrict__, \
                                                         V* __restrict__, IndexT, IndexT, int64_t);
#define MNN_FAST_INSTANTIATE_BOTH(V) MNN_FAST_INSTANTIATE(V, int32_t) MNN_FAST_INSTANTIATE(V, int64_t)
MNN_FAST_INSTANTIATE_BOTH(uint4)
MNN_FAST_INSTANTIATE_BOTH(uint2)
MNN_FAST_INSTANTIATE_BOTH(uint32_t)
MNN_FAST_INSTANTIATE_BOTH(uint16_t)
MNN_FAST_INSTANTIATE_BOTH(uint8_t)
#undef MNN_FAST_INSTANTIATE_BOTH
#undef MNN_FAST_INSTANTIATE

}  // namespace cuda_impl
}  // namespace mnn_fast

// ---------------------------------------------------------------- host side (not in device passes)
#if MNN_FAST_HOST_PASS
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace mnn_fast {
namespace cuda_impl {
namespace {

template <typename V>
void launch_gather(const at::Tensor& x, const at::Tensor& perm, at::Tensor& out, int64_t N, int64_t row_bytes,
                   c10::DeviceIndex dev, cudaStream_t stream) {
  const int64_t units = row_bytes / static_cast<int64_t>(sizeof(V));
  const int64_t total = N * units;
  const unsigned int grid = grid_for(total, kThreads, dev, 2048 / kThreads);
  const int64_t max_step = static_cast<int64_t>(grid) * kThreads;
  const V* xs = reinterpret_cast<const V*>(x.const_data_ptr());
  V* os = reinterpret_cast<V*>(out.data_ptr());
  const int64_t* ps = perm.data_ptr<int64_t>();
  if (total + max_step <= std::numeric_limits<int32_t>::max()) {
    gather_rows_kernel<V, int32_t><<<grid, kThreads, 0, stream>>>(xs, ps, os, static_cast<int32_t>(total),
                                                                 static_cast<int32_t>(units), x.size(0));
  } else {
    gather_rows_kernel<V, int64_t><<<grid, kThreads, 0, stream>>>(xs, ps, os, total, units, x.size(0));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor gather_cuda(const at::Tensor& x_in, const at::Tensor& perm_in) {
  constexpr const char* op = "gather";
  TORCH_CHECK_VALUE(x_in.dim() == 2, op, ": x must be a 2-D floating-point tensor, got ", describe(x_in));
  TORCH_CHECK_TYPE(at::isFloatingType(x_in.scalar_type()), op, ": x must be a 2-D floating-point tensor, got ",
                   describe(x_in));
  TORCH_CHECK_VALUE(x_in.is_cuda(), op, ": x must be a CUDA tensor for the CUDA kernel, got ", describe(x_in));
  check_index_1d(op, "perm", perm_in);
  check_on(op, "perm", perm_in, x_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor perm = perm_in.contiguous();

  const int64_t N = perm.size(0);
  const int64_t D = x.size(1);
  at::Tensor out = at::empty({N, D}, x.options());
  const int64_t row_bytes = D * static_cast<int64_t>(x.element_size());
  if (N == 0 || row_bytes == 0) return out;
  TORCH_CHECK_VALUE(x.size(0) > 0, op, ": perm has ", N, " entries but x has no rows: ", describe(x));

  const c10::DeviceIndex dev = x.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  const auto xa = reinterpret_cast<uintptr_t>(x.const_data_ptr());
  const auto oa = reinterpret_cast<uintptr_t>(out.data_ptr());
  auto fits = [&](int64_t w) {
    return row_bytes % w == 0 && xa % static_cast<uintptr_t>(w) == 0 && oa % static_cast<uintptr_t>(w) == 0;
  };
  if (fits(16)) {
    launch_gather<uint4>(x, perm, out, N, row_bytes, dev, stream);
  } else if (fits(8)) {
    launch_gather<uint2>(x, perm, out, N, row_bytes, dev, stream);
  } else if (fits(4)) {
    launch_gather<uint32_t>(x, perm, out, N, row_bytes, dev, stream);
  } else if (fits(2)) {
    launch_gather<uint16_t>(x, perm, out, N, row_bytes, dev, stream);
  } else {
    launch_gather<uint8_t>(x, perm, out, N, row_bytes, dev, stream);
  }
  return out;
}

}  // namespace
}  // namespace cuda_impl
}  // namespace mnn_fast

TORCH_LIBRARY_IMPL(mnn_fast, CUDA, m) { m.impl("gather", TORCH_FN(mnn_fast::cuda_impl::gather_cuda)); }
#endif  // MNN_FAST_HOST_PASS
