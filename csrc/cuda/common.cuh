// Shared helpers of the CUDA kernels of the mnn_fast ops (semantics: docs/ops.md).
//
// Layout of every csrc/cuda/<op>.cu (keeps the build lean on small machines):
//   1. kernels (external linkage, unique names; helpers in an anonymous namespace), using only
//      this header's device part (CUDA builtins + c10/macros/Macros.h);
//   2. explicit instantiations of every kernel template the host code launches;
//   3. `#if MNN_FAST_HOST_PASS`: the torch headers, the host wrapper and TORCH_LIBRARY_IMPL.
// nvcc compiles a .cu once for the host (where __CUDA_ARCH__ is undefined) and once per GPU
// architecture; parsing the torch headers in every device pass would triple the front-end cost,
// so they are hidden from the device passes. This is the pattern nvcc documents for __CUDA_ARCH__:
// __global__ signatures do not depend on it, and every kernel template launched from host code is
// explicitly instantiated outside the guard, so both passes see the same kernels.
//
// Host part: only light headers. ATen/cuda/CUDAContext.h pulls in cuBLAS / cuSPARSE / cuSOLVER
// headers, which a bare CUDA toolkit may not ship, so the current stream comes from
// c10/cuda/CUDAStream.h (at::cuda::getCurrentCUDAStream is an alias of
// c10::cuda::getCurrentCUDAStream) and the SM count from the runtime API.
#pragma once

#include <c10/macros/Macros.h>  // CUDA_KERNEL_ASSERT
#include <cuda_runtime.h>

#include <cstdint>

#if !defined(__CUDA_ARCH__)
#define MNN_FAST_HOST_PASS 1
#else
#define MNN_FAST_HOST_PASS 0
#endif

namespace mnn_fast {
namespace cuda_impl {

constexpr unsigned int kFullMask = 0xffffffffu;

__device__ __forceinline__ unsigned int lanemask_lt() {
  unsigned int m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

}  // namespace cuda_impl
}  // namespace mnn_fast

#if MNN_FAST_HOST_PASS
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>
#include <sstream>
#include <string>

namespace mnn_fast {
namespace cuda_impl {

// "a 2-D Float tensor of shape [4, 3] on cuda:0": enough to see which property broke the contract.
inline std::string describe(const at::Tensor& t) {
  std::ostringstream os;
  os << "a " << t.dim() << "-D " << t.scalar_type() << " tensor of shape " << t.sizes() << " on " << t.device();
  return os.str();
}

// Exception types as on the CPU kernels (csrc/cpu/common.h): a wrong dtype raises TypeError in Python,
// a wrong shape, device or value ValueError. Index values are not checked here: that would need a
// device-to-host copy (a sync); an out-of-range index hits a device assert instead.

// Every tensor of a CUDA kernel lives on `device` (the first tensor argument's device).
inline void check_on(const char* op, const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " must be a CUDA tensor on ", device, " (the device of the ",
              "first argument), got ", describe(t));
}

inline void check_2d(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be a 2-D ", dtype, " tensor, got ", describe(t));
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be a 2-D ", dtype, " tensor, got ", describe(t));
}

// The index tensors of the routing (offsets, perm, rows) are all 1-D int64.
inline void check_index_1d(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be a 1-D int64 tensor, got ", describe(t));
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": ", name, " must be a 1-D int64 tensor, got ", describe(t));
}

inline int sm_count(c10::DeviceIndex device) {
  static int cached[64] = {0};  // a benign race: every writer stores the same value
  const int d = static_cast<int>(device);
  if (d >= 0 && d < 64 && cached[d] > 0) return cached[d];
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, d));
  n = std::max(n, 1);
  if (d >= 0 && d < 64) cached[d] = n;
  return n;
}

// Grid of a grid-stride loop over `items` work items of `per_block` each: enough blocks to fill
// the device (`blocks_per_sm` resident blocks per SM), never more than the work needs.
inline unsigned int grid_for(int64_t items, int64_t per_block, c10::DeviceIndex device, int blocks_per_sm) {
  const int64_t need = (items + per_block - 1) / per_block;
  const int64_t cap = static_cast<int64_t>(sm_count(device)) * blocks_per_sm;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(need, cap)));
}

}  // namespace cuda_impl
}  // namespace mnn_fast
#endif  // MNN_FAST_HOST_PASS
