// group_scores on CUDA (semantics: docs/ops.md). One thread per output element (i, e), grid-stride
// over the flattened [B, E] output (coalesced writes): it starts from probs[i, g0] and adds the
// group's other members left to right with __fadd_rn (plain IEEE float32 adds, no contraction).
#include "common.cuh"

namespace mnn_fast {
namespace cuda_impl {
namespace {

constexpr int kThreads = 256;

}  // namespace

// Kernels have external linkage (unique names): the device passes do not see the host launches.
template <typename IndexT>
__global__ void __launch_bounds__(kThreads)
    group_scores_kernel(const float* __restrict__ probs, const int64_t* __restrict__ group_offsets,
                        const int64_t* __restrict__ group_classes, float* __restrict__ scores, IndexT total,
                        IndexT E, int64_t C, int64_t M) {
  for (IndexT idx = static_cast<IndexT>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<IndexT>(gridDim.x) * blockDim.x) {
    const IndexT i = idx / E;
    const IndexT e = idx - i * E;
    const float* row = probs + static_cast<int64_t>(i) * C;
    const int64_t begin = __ldg(group_offsets + e);
    const int64_t end = __ldg(group_offsets + e + 1);
    CUDA_KERNEL_ASSERT(0 <= begin && begin < end && end <= M);  // CSR with non-empty groups
    int64_t c = __ldg(group_classes + begin);
    CUDA_KERNEL_ASSERT(0 <= c && c < C);
    float s = __ldg(row + c);
    for (int64_t m = begin + 1; m < end; ++m) {
      c = __ldg(group_classes + m);
      CUDA_KERNEL_ASSERT(0 <= c && c < C);
      s = __fadd_rn(s, __ldg(row + c));
    }
    scores[idx] = s;
  }
}

// Every instantiation the host code launches (see common.cuh).
#define MNN_FAST_INSTANTIATE(IndexT)                                                                           \
  template __global__ void group_scores_kernel<IndexT>(const float* __restrict__, const int64_t* __restrict__, \
                                                       const int64_t* __restrict__, float* __restrict__, IndexT, \
                                                       IndexT, int64_t, int64_t);
MNN_FAST_INSTANTIATE(int32_t)
MNN_FAST_INSTANTIATE(int64_t)
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

// The index tensors may come on the CPU (they are small): they are copied to probs' device.
at::Tensor index_on(const char* name, const at::Tensor& t, const at::Device& device) {
  constexpr const char* op = "group_scores";
  check_index_1d(op, name, t);
  TORCH_CHECK_VALUE(t.device() == device || t.device().is_cpu(), op, ": ", name, " must be on ", device,
                    " (the device of probs) or on the CPU, got ", describe(t));
  return t.to(device).contiguous();
}

at::Tensor group_scores_cuda(const at::Tensor& probs_in, const at::Tensor& group_offsets_in,
                             const at::Tensor& group_classes_in) {
  constexpr const char* op = "group_scores";
  check_2d(op, "probs", probs_in, at::kFloat);
  TORCH_CHECK_VALUE(probs_in.is_cuda(), op, ": probs must be a CUDA tensor for the CUDA kernel, got ", describe(probs_in));
  const c10::cuda::CUDAGuard guard(probs_in.device());
  const at::Device device = probs_in.device();
  TORCH_CHECK_VALUE(group_offsets_in.dim() == 1 && group_offsets_in.size(0) >= 1, op,
                    ": group_offsets must be a 1-D int64 tensor of E + 1 >= 1 entries, got ", describe(group_offsets_in));
  const at::Tensor group_offsets = index_on("group_offsets", group_offsets_in, device);
  const at::Tensor group_classes = index_on("group_classes", group_classes_in, device);
  const at::Tensor probs = probs_in.contiguous();

  const int64_t B = probs.size(0);
  const int64_t C = probs.size(1);
  const int64_t E = group_offsets.size(0) - 1;
  const int64_t M = group_classes.size(0);
  at::Tensor scores = at::empty({B, E}, probs.options());
  const int64_t total = B * E;
  if (total == 0) return scores;
  TORCH_CHECK_VALUE(M >= 1, op, ": group_classes must be non-empty when there are groups (E = ", E, "), got ",
                    describe(group_classes));

  const c10::DeviceIndex dev = device.index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  const unsigned int grid = grid_for(total, kThreads, dev, 2048 / kThreads);
  const int64_t max_step = static_cast<int64_t>(grid) * kThreads;
  if (total + max_step <= std::numeric_limits<int32_t>::max()) {
    group_scores_kernel<int32_t><<<grid, kThreads, 0, stream>>>(
        probs.data_ptr<float>(), group_offsets.data_ptr<int64_t>(), group_classes.data_ptr<int64_t>(),
        scores.data_ptr<float>(), static_cast<int32_t>(total), static_cast<int32_t>(E), C, M);
  } else {
    group_scores_kernel<int64_t><<<grid, kThreads, 0, stream>>>(
        probs.data_ptr<float>(), group_offsets.data_ptr<int64_t>(), group_classes.data_ptr<int64_t>(),
        scores.data_ptr<float>(), total, E, C, M);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return scores;
}

}  // namespace
}  // namespace cuda_impl
}  // namespace mnn_fast

TORCH_LIBRARY_IMPL(mnn_fast, CUDA, m) {
  m.impl("group_scores", TORCH_FN(mnn_fast::cuda_impl::group_scores_cuda));
}
#endif  // MNN_FAST_HOST_PASS
