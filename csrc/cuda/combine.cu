// combine on CUDA (semantics: docs/ops.md). Each thread block owns a range of samples (as many as
// fill its threads for C columns, at least one) and every (sample, column[s]) of the range belongs to
// exactly one thread: it starts from logp[i, c] and adds logv[r, c] for r in
// sample_rows[sample_offsets[i] : sample_offsets[i+1]] in that order with __fadd_rn. Each output
// element is written once; no atomics. With C % 4 == 0 and 16-byte aligned rows a thread handles 4
// adjacent columns (float4 loads); the adds stay per element and in the same order.
#include "common.cuh"

namespace mnn_fast {
namespace cuda_impl {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float4 add_rn(float4 a, float4 b) {
  return make_float4(__fadd_rn(a.x, b.x), __fadd_rn(a.y, b.y), __fadd_rn(a.z, b.z), __fadd_rn(a.w, b.w));
}

}  // namespace

// Kernels have external linkage (unique names): the device passes do not see the host launches.
// V = float or float4; cols = C / (elements of V); samples_per_block * cols fits int32.
template <typename V>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const V* __restrict__ logp, const V* __restrict__ logv, const int64_t* __restrict__ sample_offsets,
                   const int64_t* __restrict__ sample_rows, V* __restrict__ acc, int64_t B, int cols,
                   int samples_per_block, int64_t N) {
  for (int64_t i0 = static_cast<int64_t>(blockIdx.x) * samples_per_block; i0 < B;
       i0 += static_cast<int64_t>(gridDim.x) * samples_per_block) {
    const int n_here = static_cast<int>(B - i0 < samples_per_block ? B - i0 : samples_per_block);
    const int work = n_here * cols;
    for (int t = threadIdx.x; t < work; t += blockDim.x) {
      const int li = t / cols;
      const int c = t - li * cols;
      const int64_t i = i0 + li;
      V a = __ldg(logp + i * cols + c);
      const int64_t begin = __ldg(sample_offsets + i);
      const int64_t end = __ldg(sample_offsets + i + 1);
      for (int64_t k = begin; k < end; ++k) {
        const int64_t r = __ldg(sample_rows + k);
        CUDA_KERNEL_ASSERT(0 <= r && r < N);
        a = add_rn(a, __ldg(logv + r * cols + c));
      }
      acc[i * cols + c] = a;
    }
  }
}

// Every instantiation the host code launches (see common.cuh).
#define MNN_FAST_INSTANTIATE(V)                                                                               \
  template __global__ void combine_kernel<V>(const V* __restrict__, const V* __restrict__,                    \
                                             const int64_t* __restrict__, const int64_t* __restrict__,        \
                                             V* __restrict__, int64_t, int, int, int64_t);
MNN_FAST_INSTANTIATE(float)
MNN_FAST_INSTANTIATE(float4)
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
void launch_combine(const at::Tensor& logp, const at::Tensor& logv, const at::Tensor& sample_offsets,
                    const at::Tensor& sample_rows, at::Tensor& acc, int64_t B, int64_t C, c10::DeviceIndex dev,
                    cudaStream_t stream) {
  constexpr int64_t kLanes = sizeof(V) / sizeof(float);
  const int cols = static_cast<int>(C / kLanes);
  const int samples_per_block = std::max(1, kThreads / cols);
  const unsigned int grid = grid_for(B, samples_per_block, dev, 2048 / kThreads);
  combine_kernel<V><<<grid, kThreads, 0, stream>>>(
      reinterpret_cast<const V*>(logp.const_data_ptr<float>()), reinterpret_cast<const V*>(logv.const_data_ptr<float>()),
      sample_offsets.const_data_ptr<int64_t>(), sample_rows.const_data_ptr<int64_t>(),
      reinterpret_cast<V*>(acc.data_ptr<float>()), B, cols, samples_per_block, logv.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor combine_cuda(const at::Tensor& logp_in, const at::Tensor& logv_in, const at::Tensor& perm,
                        const at::Tensor& sample_offsets_in, const at::Tensor& sample_rows_in) {
  constexpr const char* op = "combine";
  check_2d(op, "logp", logp_in, at::kFloat);
  TORCH_CHECK_VALUE(logp_in.is_cuda(), op, ": logp must be a CUDA tensor for the CUDA kernel, got ", describe(logp_in));
  const at::Device device = logp_in.device();
  check_2d(op, "logv", logv_in, at::kFloat);
  check_on(op, "logv", logv_in, device);
  check_index_1d(op, "perm", perm);
  check_on(op, "perm", perm, device);
  check_index_1d(op, "sample_offsets", sample_offsets_in);
  check_on(op, "sample_offsets", sample_offsets_in, device);
  check_index_1d(op, "sample_rows", sample_rows_in);
  check_on(op, "sample_rows", sample_rows_in, device);
  const int64_t B = logp_in.size(0);
  const int64_t C = logp_in.size(1);
  const int64_t N = logv_in.size(0);
  TORCH_CHECK_VALUE(logv_in.size(1) == C, op, ": logv must have C = ", C, " columns like logp, got ", describe(logv_in));
  TORCH_CHECK_VALUE(sample_offsets_in.size(0) == B + 1, op, ": sample_offsets must have B + 1 = ", B + 1,
                    " entries, got ", describe(sample_offsets_in));
  TORCH_CHECK_VALUE(sample_rows_in.size(0) == N, op, ": sample_rows must have N = ", N, " entries (the rows of logv), got ",
                    describe(sample_rows_in));
  TORCH_CHECK_VALUE(perm.size(0) == N, op, ": perm must have N = ", N, " entries (the rows of logv), got ", describe(perm));
  TORCH_CHECK_VALUE(C <= std::numeric_limits<int32_t>::max() - kThreads, op, ": logp must have fewer than 2^31 - ", kThreads,
                    " columns, got ", describe(logp_in));

  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor logp = logp_in.contiguous();
  const at::Tensor logv = logv_in.contiguous();
  const at::Tensor sample_offsets = sample_offsets_in.contiguous();
  const at::Tensor sample_rows = sample_rows_in.contiguous();
  at::Tensor acc = at::empty({B, C}, logp.options());
  if (B == 0 || C == 0) return acc;

  const c10::DeviceIndex dev = device.index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  const auto aligned16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (C % 4 == 0 && aligned16(logp.const_data_ptr()) && aligned16(logv.const_data_ptr()) &&
      aligned16(acc.const_data_ptr())) {
    launch_combine<float4>(logp, logv, sample_offsets, sample_rows, acc, B, C, dev, stream);
  } else {
    launch_combine<float>(logp, logv, sample_offsets, sample_rows, acc, B, C, dev, stream);
  }
  return acc;
}

}  // namespace
}  // namespace cuda_impl
}  // namespace mnn_fast

TORCH_LIBRARY_IMPL(mnn_fast, CUDA, m) { m.impl("combine", TORCH_FN(mnn_fast::cuda_impl::combine_cuda)); }
#endif  // MNN_FAST_HOST_PASS
