// recombine on CUDA (semantics: docs/ops.md; arithmetic: csrc/rowmath.h, reference
// mnn_fast/engine/rowmath.py). One warp per sample (grid-stride over samples), the output row is its
// accumulator: out[i] = logp[i], then += log v(r) for each of the sample's rows r in order, then
// log_softmax in place. Nothing of size [N, C] is allocated and no output element has two writers.
//
// Column c always belongs to thread c % 32 of the warp, which makes every pass over a row a loop of
// ceil(C / 32) uniform steps; registers do not grow with C. The 16 lanes of rowmath are kept exactly:
// lane j = c % 16 is the sequential chain of threads j and j + 16 (thread j adds its own term, then
// thread j + 16's via a shuffle, so the chain runs j, j+16, j+32, ... in column order), then the lanes
// are folded pairwise for h = 8, 4, 2, 1 with shuffles, the order of rowmath::fold_lanes. The exp of
// every column is computed by all 32 threads; only the adds are sequential. Row maxima are warp
// butterfly reductions (a maximum's value does not depend on the order; see warp_row_max).
//
// Group membership (W == C): a per-warp bitmask in shared memory of kChunkCols columns, filled from
// the expert's class list; rows wider than kChunkCols refill it per chunk of columns. Binary
// specialists (W == 1, C != 1) need no mask: their one class is compared directly. The expert of a
// row is a binary search in offsets (std::upper_bound, as the CPU), so one launch serves any E.
// Every float operation is a rowmath.h call (__f*_rn intrinsics: never contracted into FMA), so the
// results equal the CPU kernel's bit for bit, NaN payloads aside (the GPU returns canonical NaNs).
#include "../rowmath.h"
#include "common.cuh"

namespace mnn_fast {
namespace cuda_impl {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr int kChunkCols = 8192;  // membership bits per warp (1 KiB of shared memory)
constexpr int kMaskWords = kChunkCols / kWarp;
static_assert(rowmath::kLanes * 2 == kWarp, "a lane is the chain of threads j and j + 16");

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }  // the CPU's kNaN

// The membership bits of one expert's group over columns [chunk * kChunkCols, (chunk + 1) * kChunkCols).
struct GroupMask {
  unsigned int* bits;  // this warp's kMaskWords words of shared memory
  const int64_t* classes;
  int64_t size;
  int C;
  int chunk;  // the chunk the bits describe; -1: none yet

  // Warp-uniform call. Duplicated classes set their bit twice, as the CPU's byte mask does.
  __device__ __forceinline__ void build(int q, int t) {
    __syncwarp();  // every thread is done reading the previous bits
    const int base = q * kChunkCols;
    const int cols = C - base < kChunkCols ? C - base : kChunkCols;
    const int words = (cols + kWarp - 1) / kWarp;
    for (int w = t; w < words; w += kWarp) bits[w] = 0u;
    __syncwarp();
    for (int64_t k = t; k < size; k += kWarp) {
      const int64_t c = __ldg(classes + k);
      CUDA_KERNEL_ASSERT(0 <= c && c < C);
      const int64_t rel = c - base;
      if (0 <= rel && rel < cols) atomicOr(bits + (rel >> 5), 1u << (rel & 31));
    }
    __syncwarp();
    chunk = q;
  }

  // Warp-uniform call at column base `base` (a multiple of kWarp): the bits of its chunk are ready.
  __device__ __forceinline__ void cover(int base, int t) {
    const int q = base / kChunkCols;
    if (q != chunk) build(q, t);
  }

  // Column c (c % 32 == the calling thread, c in the covered chunk).
  __device__ __forceinline__ bool inside(int c) const {
    const int rel = c - chunk * kChunkCols;
    return (bits[rel >> 5] >> (c & 31)) & 1u;
  }
};

// rows::row_max over a row whose column c reads value(c): the maximum of the counted columns (skip
// when kMask and c is in the group), -inf when none, NaN when a counted one is NaN. A maximum does
// not depend on the order it is taken in, up to the sign of a zero when +0 and -0 tie; that sign
// never reaches a result: a tie puts two terms exp(0) = 1 in the row's sum s, so log(s) >= log 2,
// and both (x - m) - log(s) and log(s) + m come out the same for m = +0 and m = -0.
template <bool kMask, typename Value>
__device__ __forceinline__ float warp_row_max(const Value& value, int C, GroupMask& mask, int t) {
  float best = neg_inf();
  bool nan = false;
  for (int base = 0; base < C; base += kWarp) {
    if (kMask) mask.cover(base, t);
    const int c = base + t;
    if (c < C) {
      const float v = (kMask && mask.inside(c)) ? neg_inf() : value(c);
      best = v > best ? v : best;
      nan = nan || v != v;
    }
  }
  for (int h = kWarp / 2; h > 0; h /= 2) {
    const float other = __shfl_xor_sync(kFullMask, best, h);
    best = other > best ? other : best;
  }
  return __any_sync(kFullMask, nan) ? quiet_nan() : best;
}

// rows::lane_sum_exp: sum over the counted columns of exp(value(c) - shift) in rowmath's lane order
// (skipped columns add exp(-inf) = 0, as on the CPU); the same value on every thread.
template <bool kMask, typename Value>
__device__ __forceinline__ float warp_lane_sum_exp(const Value& value, int C, float shift, GroupMask& mask, int t) {
  float lane = 0.0f;  // meaningful on threads 0..15: lane t
  for (int base = 0; base < C; base += kWarp) {
    if (kMask) mask.cover(base, t);
    const int c = base + t;
    float term = 0.0f;  // beyond C: adding +0 to a lane (>= +0 or NaN) changes no bit
    if (c < C) {
      const float x = (kMask && mask.inside(c)) ? neg_inf() : rowmath::sub(value(c), shift);
      term = rowmath::exp_nonpositive(x);
    }
    const float upper = __shfl_down_sync(kFullMask, term, rowmath::kLanes);  // column c + 16, same lane
    lane = rowmath::add(rowmath::add(lane, term), upper);
  }
  // rowmath::fold_lanes: lanes[j] += lanes[j + h] for h = 8, 4, 2, 1 (threads >= h compute unused sums).
  for (int h = rowmath::kLanes / 2; h > 0; h /= 2) lane = rowmath::add(lane, __shfl_down_sync(kFullMask, lane, h));
  return __shfl_sync(kFullMask, lane, 0);
}

// rows::log_softmax_row statistics of a row: its maximum m and log_s = log(sum exp(x - m)).
template <typename Value>
__device__ __forceinline__ void warp_log_softmax_stats(const Value& value, int C, GroupMask& mask, int t, float& m,
                                                       float& log_s) {
  m = warp_row_max<false>(value, C, mask, t);
  log_s = rowmath::log1p_nonnegative(rowmath::sub(warp_lane_sum_exp<false>(value, C, m, mask, t), 1.0f));
}

struct GlobalRow {  // read-only input row (logits)
  const float* __restrict__ p;
  __device__ __forceinline__ float operator()(int c) const { return __ldg(p + c); }
};

struct AccRow {  // the accumulator: logp's row or the output row this warp writes (coherent loads)
  const float* p;
  __device__ __forceinline__ float operator()(int c) const { return p[c]; }
};

struct LogSoftmaxRow {  // ls[c] = (y[c] - m) - log_s, recomputed from the logits row on every pass
  const float* __restrict__ y;
  float m;
  float log_s;
  __device__ __forceinline__ float operator()(int c) const {
    return rowmath::sub(rowmath::sub(__ldg(y + c), m), log_s);
  }
};

// std::upper_bound(offsets, offsets + E + 1, r) - offsets - 1: the expert owning buffer row r.
__device__ __forceinline__ int64_t expert_of_row(const int64_t* __restrict__ offsets, int64_t E, int64_t r) {
  int64_t first = 0;
  int64_t count = E + 1;
  while (count > 0) {
    const int64_t step = count / 2;
    if (!(r < __ldg(offsets + first + step))) {
      first += step + 1;
      count -= step + 1;
    } else {
      count = step;
    }
  }
  return first - 1;
}

}  // namespace

// Kernels have external linkage (unique names): the device passes do not see the host launches.
// C < 2^31 - 64; W == C or W == 1; E >= 1. logp and out carry no __restrict__: the accumulator is read
// back from out, and with both restrict nvcc proves those loads read-only and emits ld.global.nc,
// whose cache need not see this kernel's own stores.
__global__ void __launch_bounds__(kThreads)
    recombine_kernel(const float* logp, const float* __restrict__ logits,
                     const int64_t* __restrict__ offsets, const int64_t* __restrict__ group_offsets,
                     const int64_t* __restrict__ group_classes, const float* __restrict__ log_spread,
                     const int64_t* __restrict__ sample_offsets, const int64_t* __restrict__ sample_rows,
                     float* out, int64_t B, int C, int64_t W, int64_t N, int64_t E, int64_t M) {
  __shared__ unsigned int mask_bits[kWarpsPerBlock][kMaskWords];
  const int t = static_cast<int>(threadIdx.x) % kWarp;
  const int warp = static_cast<int>(threadIdx.x) / kWarp;
  const bool binary = W == 1 && C != 1;
  GroupMask mask{mask_bits[warp], nullptr, 0, C, -1};

  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; i < B;
       i += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const int64_t begin = __ldg(sample_offsets + i);
    const int64_t end = __ldg(sample_offsets + i + 1);
    CUDA_KERNEL_ASSERT(0 <= begin && begin <= end && end <= N);
    float* dst = out + i * C;
    AccRow acc{logp + i * C};  // the first row adds onto logp[i]; later ones onto out[i]
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r = __ldg(sample_rows + k);
      CUDA_KERNEL_ASSERT(0 <= r && r < N);
      const int64_t e = expert_of_row(offsets, E, r);
      CUDA_KERNEL_ASSERT(0 <= e && e < E);
      const int64_t g0 = __ldg(group_offsets + e);
      const int64_t g1 = __ldg(group_offsets + e + 1);
      CUDA_KERNEL_ASSERT(0 <= g0 && g0 < g1 && g1 <= M);
      const float log_spread_e = __ldg(log_spread + e);
      const float* y = logits + r * W;
      if (binary) {
        // log q = logsigmoid(y), log(1 - q) = logsigmoid(-y): min(+-y, 0) - log1p(exp(-|y|)).
        CUDA_KERNEL_ASSERT(g1 - g0 == 1);
        const int64_t cls = __ldg(group_classes + g0);
        CUDA_KERNEL_ASSERT(0 <= cls && cls < C);
        const float yv = __ldg(y);
        const float log_term = rowmath::log1p_nonnegative(rowmath::exp_nonpositive(-(yv < 0 ? -yv : yv)));
        const float log_q = rowmath::sub(yv < 0.0f ? yv : 0.0f, log_term);
        const float log_not_q = rowmath::sub(-yv < 0.0f ? -yv : 0.0f, log_term);
        const float spread = rowmath::sub(log_not_q, log_spread_e);
        for (int c = t; c < C; c += kWarp) dst[c] = rowmath::add(acc(c), c == cls ? log_q : spread);
      } else {
        mask.classes = group_classes + g0;
        mask.size = g1 - g0;
        mask.chunk = -1;
        float m, log_s;
        warp_log_softmax_stats(GlobalRow{y}, C, mask, t, m, log_s);
        const LogSoftmaxRow ls{y, m, log_s};
        // log(1 - q) = log(s_out) - log_s, s_out the lane sum of exp(y - m) over the outside classes
        // (group columns add exp(-inf) = 0); where s_out is too small to trust, logsumexp of ls over
        // the outside classes shifted by their maximum. s_out is the same on every thread: no divergence.
        const float s_out = warp_lane_sum_exp<true>(GlobalRow{y}, C, m, mask, t);
        float log_not_q;
        if (s_out >= rowmath::kOnePassMin) {
          log_not_q = rowmath::sub(rowmath::log_positive(s_out), log_s);
        } else {
          float shift = warp_row_max<true>(ls, C, mask, t);
          shift = (shift == pos_inf() || shift == neg_inf()) ? 0.0f : shift;
          log_not_q = rowmath::add(rowmath::log_of_sum(warp_lane_sum_exp<true>(ls, C, shift, mask, t)), shift);
        }
        const float spread = rowmath::sub(log_not_q, log_spread_e);
        for (int base = 0; base < C; base += kWarp) {
          mask.cover(base, t);
          const int c = base + t;
          if (c < C) dst[c] = rowmath::add(acc(c), mask.inside(c) ? ls(c) : spread);
        }
      }
      acc.p = dst;
    }
    // out[i] = log_softmax(acc): each thread reads and rewrites only its own columns.
    float m, log_s;
    warp_log_softmax_stats(acc, C, mask, t, m, log_s);
    for (int c = t; c < C; c += kWarp) dst[c] = rowmath::sub(rowmath::sub(acc(c), m), log_s);
  }
}

}  // namespace cuda_impl
}  // namespace mnn_fast

// ---------------------------------------------------------------- host side (not in device passes)
#if MNN_FAST_HOST_PASS
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace mnn_fast {
namespace cuda_impl {
namespace {

at::Tensor recombine_cuda(const at::Tensor& logp_in, at::TensorList logits_list, const at::Tensor& offsets_in,
                          const at::Tensor& group_offsets_in, const at::Tensor& group_classes_in,
                          const at::Tensor& log_spread_in, const at::Tensor& sample_offsets_in,
                          const at::Tensor& sample_rows_in) {
  constexpr const char* op = "recombine";
  check_2d(op, "logp", logp_in, at::kFloat);
  TORCH_CHECK_VALUE(logp_in.is_cuda(), op, ": logp must be a CUDA tensor for the CUDA kernel, got ", describe(logp_in));
  const at::Device device = logp_in.device();
  // logits: one tensor in buffer order, or one per expert (the kernel reads one buffer: joined here).
  TORCH_CHECK_VALUE(!logits_list.empty(), op, ": logits must hold one tensor (buffer order) or one per expert, got none");
  for (const at::Tensor& part : logits_list) {
    check_2d(op, "logits", part, at::kFloat);
    check_on(op, "logits", part, device);
    TORCH_CHECK_VALUE(part.size(1) == logits_list[0].size(1), op, ": every logits tensor must have the same width, got ",
                      describe(logits_list[0]), " and ", describe(part));
  }
  const at::Tensor logits_in = logits_list.size() == 1 ? logits_list[0] : at::cat(logits_list);
  check_on(op, "logits", logits_in, device);
  check_index_1d(op, "offsets", offsets_in);
  check_on(op, "offsets", offsets_in, device);
  check_index_1d(op, "group_offsets", group_offsets_in);
  check_on(op, "group_offsets", group_offsets_in, device);
  check_index_1d(op, "group_classes", group_classes_in);
  check_on(op, "group_classes", group_classes_in, device);
  TORCH_CHECK_VALUE(log_spread_in.dim() == 1, op, ": log_spread must be a 1-D Float tensor, got ",
                    describe(log_spread_in));
  TORCH_CHECK_TYPE(log_spread_in.scalar_type() == at::kFloat, op, ": log_spread must be a 1-D Float tensor, got ",
                   describe(log_spread_in));
  check_on(op, "log_spread", log_spread_in, device);
  check_index_1d(op, "sample_offsets", sample_offsets_in);
  check_on(op, "sample_offsets", sample_offsets_in, device);
  check_index_1d(op, "sample_rows", sample_rows_in);
  check_on(op, "sample_rows", sample_rows_in, device);

  const int64_t B = logp_in.size(0);
  const int64_t C = logp_in.size(1);
  const int64_t N = logits_in.size(0);
  const int64_t W = logits_in.size(1);
  const int64_t E = offsets_in.size(0) - 1;
  const int64_t M = group_classes_in.size(0);
  TORCH_CHECK_VALUE(E >= 1, op, ": offsets must have E+1 >= 2 entries, got ", describe(offsets_in));
  TORCH_CHECK_VALUE(group_offsets_in.size(0) == E + 1, op, ": group_offsets must have E+1 = ", E + 1,
                    " entries (one group per expert), got ", describe(group_offsets_in));
  TORCH_CHECK_VALUE(log_spread_in.size(0) == E, op, ": log_spread must have E = ", E, " entries, got ",
                    describe(log_spread_in));
  TORCH_CHECK_VALUE(W == C || W == 1, op, ": logits must have C = ", C, " columns (or 1, binary specialists), got ",
                    describe(logits_in));
  TORCH_CHECK_VALUE(sample_offsets_in.size(0) == B + 1, op, ": sample_offsets must have B+1 = ", B + 1,
                    " entries, got ", describe(sample_offsets_in));
  TORCH_CHECK_VALUE(sample_rows_in.size(0) == N, op, ": sample_rows must have one entry per logits row (N = ", N,
                    "), got ", describe(sample_rows_in));
  TORCH_CHECK_VALUE(C <= std::numeric_limits<int32_t>::max() - 2 * kWarp, op, ": logp must have fewer than 2^31 - ",
                    2 * kWarp, " columns, got ", describe(logp_in));

  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor logp = logp_in.contiguous();
  at::Tensor out = at::empty({B, C}, logp.options());
  if (B == 0 || C == 0) return out;
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const at::Tensor group_offsets = group_offsets_in.contiguous();
  const at::Tensor group_classes = group_classes_in.contiguous();
  const at::Tensor log_spread = log_spread_in.contiguous();
  const at::Tensor sample_offsets = sample_offsets_in.contiguous();
  const at::Tensor sample_rows = sample_rows_in.contiguous();

  const c10::DeviceIndex dev = device.index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  const unsigned int grid = grid_for(B, kWarpsPerBlock, dev, 2048 / kThreads);
  recombine_kernel<<<grid, kThreads, 0, stream>>>(
      logp.const_data_ptr<float>(), logits.const_data_ptr<float>(), offsets.const_data_ptr<int64_t>(),
      group_offsets.const_data_ptr<int64_t>(), group_classes.const_data_ptr<int64_t>(),
      log_spread.const_data_ptr<float>(), sample_offsets.const_data_ptr<int64_t>(),
      sample_rows.const_data_ptr<int64_t>(), out.data_ptr<float>(), B, static_cast<int>(C), W, N, E, M);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace cuda_impl
}  // namespace mnn_fast

TORCH_LIBRARY_IMPL(mnn_fast, CUDA, m) { m.impl("recombine", TORCH_FN(mnn_fast::cuda_impl::recombine_cuda)); }
#endif  // MNN_FAST_HOST_PASS
