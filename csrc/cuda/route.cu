// route on CUDA (semantics: docs/ops.md). Memory O(B + E + N): no [B, E] intermediate.
//
//  1. route_count_kernel, one warp per sample: if a top-k applies (0 < top_k < E), a radix select
//     over the ordered key finds the sample's cut (the key of its top_k-th expert and how many of
//     the experts tied on that key are taken, lowest index first); one more pass over the row,
//     32 experts at a time with ballots, counts the active experts. The cut is stored (O(B)).
//  2. inclusive scan of the per-sample counts -> sample_offsets; N = sample_offsets[B] is read
//     back to the host (the only host synchronisation, needed to allocate perm / sample_rows).
//  3. route_fill_kernel, one warp per sample: the same pass writes the sample-major slot list
//     (expert id, sample id, slot id) in increasing expert order at sample_offsets[i].
//  4. stable radix sort of the slots by expert id (cub, LSD radix sort is stable): the sorted
//     position of slot k is its expert-major row r, so perm[r] = sample(k), sample_rows[k] = r.
//  5. offsets[e] = lower_bound(sorted expert ids, e) (= exclusive scan of the expert histogram);
//     counts[e] = offsets[e+1] - offsets[e].
// Every step is deterministic (no float atomics; the only atomics are shared-memory integer
// histogram increments whose order does not matter).
#include <cmath>

#include "common.cuh"

namespace mnn_fast {
namespace cuda_impl {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kRouteThreads = 32 * kWarpsPerBlock;
constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;
constexpr int kBinsPerLane = kBins / 32;
// cut.need meaning "every expert whose key equals cut.kv is in the top-k".
constexpr int32_t kTakeAllTies = 0x7fffffff;
constexpr int kScatterThreads = 256;

// Monotone map of the ranking key of docs/ops.md to uint32: key(s) = -inf for NaN, and -0.0 == +0.0
// (equal keys are ties), so both zeros map to the same ordinal. a > b as keys <=> ord(a) > ord(b).
// The smallest ordinal is ord(-inf) = 0x007fffff > 0.
__device__ __forceinline__ uint32_t order_key(float s) {
  uint32_t u = __float_as_uint(isnan(s) ? -INFINITY : s);
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Expert e of a sample is in its top-k iff ord(e) > kv, or ord(e) == kv and fewer than `need`
// experts e' < e have ord(e') == kv. kv = 0 (below every ordinal) means "no top-k".
struct Cut {
  uint32_t kv;
  int32_t need;
};

// Radix select (8 bits per pass, most significant first) of the k-th largest ordinal of `row`,
// 1 <= k < E, by one warp with a private 256-bin shared histogram. Returns the same Cut on all lanes.
__device__ Cut warp_select_cut(const float* __restrict__ row, int E, int k, uint32_t* hist) {
  const int lane = threadIdx.x & 31;
  uint32_t prefix = 0u, mask = 0u;
  uint32_t krem = static_cast<uint32_t>(k);  // rank (1-based) of the target among the prefix matches
#pragma unroll 1
  for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
#pragma unroll
    for (int j = 0; j < kBinsPerLane; ++j) hist[lane + 32 * j] = 0u;
    __syncwarp();
    for (int e = lane; e < E; e += 32) {
      const uint32_t o = order_key(__ldg(row + e));
      if ((o & mask) == prefix) atomicAdd(&hist[(o >> shift) & (kBins - 1)], 1u);
    }
    __syncwarp();
    // Lane l owns the digits 255 - 8l down to 248 - 8l: lanes in descending digit order.
    const int hi = kBins - 1 - kBinsPerLane * lane;
    uint32_t sum = 0u;
#pragma unroll
    for (int j = 0; j < kBinsPerLane; ++j) sum += hist[hi - j];
    uint32_t incl = sum;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const uint32_t t = __shfl_up_sync(kFullMask, incl, d);
      if (lane >= d) incl += t;
    }
    // The prefix matches number >= krem, so some lane reaches krem.
    const unsigned int reach = __ballot_sync(kFullMask, incl >= krem);
    const int src = __ffs(reach) - 1;
    uint32_t digit = 0u, before = 0u, in_bin = 0u;
    if (lane == src) {
      uint32_t acc = incl - sum;
      bool found = false;
#pragma unroll
      for (int j = 0; j < kBinsPerLane; ++j) {
        const uint32_t h = hist[hi - j];
        if (!found && acc + h >= krem) {
          digit = static_cast<uint32_t>(hi - j);
          before = acc;
          in_bin = h;
          found = true;
        }
        acc += h;
      }
    }
    digit = __shfl_sync(kFullMask, digit, src);
    before = __shfl_sync(kFullMask, before, src);
    in_bin = __shfl_sync(kFullMask, in_bin, src);
    __syncwarp();  // every lane has read hist before the next pass clears it
    prefix |= digit << shift;
    mask |= static_cast<uint32_t>(kBins - 1) << shift;
    krem -= before;
    // Exactly the whole bin is still needed: the top-k is every ordinal >= prefix.
    if (in_bin == krem) return Cut{prefix, kTakeAllTies};
  }
  return Cut{prefix, static_cast<int32_t>(krem)};
}

// One pass of a warp over a row, 32 experts at a time in increasing order. For each expert
// `visit(active, e, pos)` runs on its lane, with pos = number of active experts before e.
// Returns the number of active experts (same value on all lanes).
template <typename Visit>
__device__ __forceinline__ int warp_active_pass(const float* __restrict__ row, int E, float thr, bool has_thr,
                                                Cut cut, Visit visit) {
  const int lane = threadIdx.x & 31;
  const unsigned int lt = lanemask_lt();
  int ties = 0;   // experts before this chunk with ord == cut.kv
  int count = 0;  // active experts before this chunk
#pragma unroll 1
  for (int base = 0; base < E; base += 32) {  // uniform trip count: the ballots see the full warp
    const int e = base + lane;
    const bool valid = e < E;
    const float s = valid ? __ldg(row + e) : 0.0f;
    const uint32_t o = order_key(s);
    const unsigned int tie = __ballot_sync(kFullMask, valid && o == cut.kv);
    const bool in_top = o > cut.kv || (o == cut.kv && ties + __popc(tie & lt) < cut.need);
    // With a threshold: s > thr (false for NaN). Without (-inf): every non-NaN score, -inf included.
    const bool act = valid && in_top && (has_thr ? (s > thr) : !isnan(s));
    const unsigned int am = __ballot_sync(kFullMask, act);
    visit(act, e, count + __popc(am & lt));
    ties += __popc(tie);
    count += __popc(am);
  }
  return count;
}

__device__ __forceinline__ int64_t lower_bound(const int32_t* __restrict__ keys, int64_t n, int32_t value) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + ((hi - lo) >> 1);
    if (keys[mid] < value) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

}  // namespace

// Kernels have external linkage (unique names): the device passes do not see the host launches.

// Step 1: per-sample active count (and the top-k cut when k_sel > 0). One warp per sample.
__global__ void __launch_bounds__(kRouteThreads)
    route_count_kernel(const float* __restrict__ scores, int64_t B, int E, float thr, bool has_thr, int k_sel,
                       int64_t* __restrict__ per_sample, uint32_t* __restrict__ cut_kv,
                       int32_t* __restrict__ cut_need) {
  __shared__ uint32_t hist[kWarpsPerBlock][kBins];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; i < B;
       i += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const float* row = scores + i * E;
    Cut cut{0u, kTakeAllTies};
    if (k_sel > 0) cut = warp_select_cut(row, E, k_sel, hist[warp]);
    const int n = warp_active_pass(row, E, thr, has_thr, cut, [](bool, int, int) {});
    if (lane == 0) {
      per_sample[i] = n;
      if (k_sel > 0) {
        cut_kv[i] = cut.kv;
        cut_need[i] = cut.need;
      }
    }
  }
}

// Step 3: the sample-major slot list. Slot k = sample_offsets[i] + j holds sample i's j-th active
// expert (increasing expert order).
__global__ void __launch_bounds__(kRouteThreads)
    route_fill_kernel(const float* __restrict__ scores, int64_t B, int E, float thr, bool has_thr, int k_sel,
                      const int64_t* __restrict__ sample_offsets, const uint32_t* __restrict__ cut_kv,
                      const int32_t* __restrict__ cut_need, int32_t* __restrict__ slot_expert,
                      int32_t* __restrict__ slot_sample, int32_t* __restrict__ slot_id) {
  const int warp = threadIdx.x >> 5;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; i < B;
       i += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const float* row = scores + i * E;
    Cut cut{0u, kTakeAllTies};
    if (k_sel > 0) cut = Cut{cut_kv[i], cut_need[i]};
    const int64_t start = sample_offsets[i];
    warp_active_pass(row, E, thr, has_thr, cut, [&](bool act, int e, int pos) {
      if (act) {
        const int64_t k = start + pos;
        slot_expert[k] = e;
        slot_sample[k] = static_cast<int32_t>(i);
        slot_id[k] = static_cast<int32_t>(k);  // N <= INT32_MAX is checked on the host
      }
    });
  }
}

// Step 4b: row r of the expert-major layout holds sorted slot k = sorted_id[r].
__global__ void __launch_bounds__(kScatterThreads)
    route_scatter_kernel(const int32_t* __restrict__ sorted_id, const int32_t* __restrict__ slot_sample, int64_t N,
                         int64_t* __restrict__ perm, int64_t* __restrict__ sample_rows) {
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < N;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t k = sorted_id[r];
    perm[r] = slot_sample[k];
    sample_rows[k] = r;
  }
}

// Step 5: offsets[e] = first row of expert e in the sorted expert ids (offsets[E] = N).
__global__ void __launch_bounds__(kScatterThreads)
    route_offsets_kernel(const int32_t* __restrict__ sorted_expert, int64_t N, int E, int64_t* __restrict__ counts,
                         int64_t* __restrict__ offsets) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e <= E;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t lo = lower_bound(sorted_expert, N, static_cast<int32_t>(e));
    offsets[e] = lo;
    if (e < E) counts[e] = lower_bound(sorted_expert, N, static_cast<int32_t>(e + 1)) - lo;
  }
}

}  // namespace cuda_impl
}  // namespace mnn_fast

// ---------------------------------------------------------------- host side (not in device passes)
#if MNN_FAST_HOST_PASS
#include <ATen/cuda/cub.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>

namespace mnn_fast {
namespace cuda_impl {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_cuda(const at::Tensor& scores_in,
                                                                                  double threshold, int64_t top_k) {
  constexpr const char* op = "route";
  check_2d(op, "scores", scores_in, at::kFloat);
  TORCH_CHECK_VALUE(scores_in.is_cuda(), op, ": scores must be a CUDA tensor for the CUDA kernel, got ",
                    describe(scores_in));
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const int64_t B = scores_in.size(0);
  const int64_t E = scores_in.size(1);
  TORCH_CHECK_VALUE(E >= 1, op, ": scores must have E >= 1 expert columns, got ", describe(scores_in));
  // Expert ids, sample ids and slot ids are int32 on the device; e + 31 must not overflow.
  TORCH_CHECK_VALUE(E <= std::numeric_limits<int32_t>::max() - 64, op,
                    ": scores must have fewer than 2^31 - 64 expert columns, got ", describe(scores_in));
  TORCH_CHECK_VALUE(B <= std::numeric_limits<int32_t>::max(), op, ": scores must have fewer than 2^31 rows, got ",
                    describe(scores_in));
  TORCH_CHECK_VALUE(top_k >= 0 && top_k <= E, op, ": top_k must be 0 (no top-k) or in [1, E] with E = ", E, ", got ",
                    top_k);

  const at::Tensor scores = scores_in.contiguous();
  const auto long_opts = scores.options().dtype(at::kLong);
  const auto int_opts = scores.options().dtype(at::kInt);
  // -inf means "no threshold" (the reference's threshold=None): -inf scores stay eligible.
  const bool has_thr = !(std::isinf(threshold) && threshold < 0);
  // The reference compares the float32 scores with the scalar cast to float32; so do we.
  const float thr = static_cast<float>(threshold);
  // Every rank is < E, so top_k == E selects everything: same as no top-k.
  const int k_sel = (top_k > 0 && top_k < E) ? static_cast<int>(top_k) : 0;

  if (B == 0) {
    return {at::zeros({E}, long_opts), at::zeros({E + 1}, long_opts), at::empty({0}, long_opts),
            at::zeros({1}, long_opts), at::empty({0}, long_opts)};
  }

  const c10::DeviceIndex dev = scores.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  const int Ei = static_cast<int>(E);

  // Step 1.
  at::Tensor per_sample = at::empty({B}, long_opts);
  at::Tensor cuts = at::empty({k_sel > 0 ? 2 * B : 0}, int_opts);  // [kv | need], O(B)
  uint32_t* cut_kv = k_sel > 0 ? reinterpret_cast<uint32_t*>(cuts.data_ptr<int32_t>()) : nullptr;
  int32_t* cut_need = k_sel > 0 ? cuts.data_ptr<int32_t>() + B : nullptr;
  const unsigned int sample_grid = grid_for(B, kWarpsPerBlock, dev, 2048 / kRouteThreads);
  route_count_kernel<<<sample_grid, kRouteThreads, 0, stream>>>(scores.data_ptr<float>(), B, Ei, thr, has_thr, k_sel,
                                                                per_sample.data_ptr<int64_t>(), cut_kv, cut_need);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Step 2.
  at::Tensor sample_offsets = at::empty({B + 1}, long_opts);
  int64_t* so = sample_offsets.data_ptr<int64_t>();
  C10_CUDA_CHECK(cudaMemsetAsync(so, 0, sizeof(int64_t), stream));
  at::cuda::cub::inclusive_sum_truncating(per_sample.data_ptr<int64_t>(), so + 1, B);  // current stream
  // THE host synchronisation of route: N (the total number of routed rows) is data-dependent and
  // sizes perm / sample_rows, so it is read back here (a D2H copy of one int64 that waits for the
  // stream). It cannot be skipped even when top_k > 0 and threshold == -inf: a NaN score is never
  // active, so N = B * top_k - #(NaN scores among the top-k) is still data-dependent.
  const int64_t N = sample_offsets.select(0, B).item<int64_t>();
  TORCH_CHECK_VALUE(N <= std::numeric_limits<int32_t>::max(), op, ": the routing has N = ", N,
                    " rows; the CUDA kernel supports at most 2^31 - 1 (cub radix sort limit)");

  if (N == 0) {
    return {at::zeros({E}, long_opts), at::zeros({E + 1}, long_opts), at::empty({0}, long_opts), sample_offsets,
            at::empty({0}, long_opts)};
  }

  // Step 3. Scratch: 5 int32 arrays of N (slot expert / sample / id, sorted expert / id).
  at::Tensor scratch = at::empty({5, N}, int_opts);
  int32_t* slot_expert = scratch.data_ptr<int32_t>();
  int32_t* slot_sample = slot_expert + N;
  int32_t* slot_id = slot_sample + N;
  int32_t* sorted_expert = slot_id + N;
  int32_t* sorted_id = sorted_expert + N;
  route_fill_kernel<<<sample_grid, kRouteThreads, 0, stream>>>(scores.data_ptr<float>(), B, Ei, thr, has_thr, k_sel,
                                                               so, cut_kv, cut_need, slot_expert, slot_sample, slot_id);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Step 4: stable LSD radix sort on the bits of E - 1 only (current stream, caching allocator).
  const int bits = at::cuda::cub::get_num_bits(static_cast<uint64_t>(E - 1));
  at::cuda::cub::radix_sort_pairs<int32_t, int32_t>(slot_expert, sorted_expert, slot_id, sorted_id, N,
                                                    /*descending=*/false, 0, bits);

  at::Tensor perm = at::empty({N}, long_opts);
  at::Tensor sample_rows = at::empty({N}, long_opts);
  route_scatter_kernel<<<grid_for(N, kScatterThreads, dev, 2048 / kScatterThreads), kScatterThreads, 0, stream>>>(
      sorted_id, slot_sample, N, perm.data_ptr<int64_t>(), sample_rows.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Step 5.
  at::Tensor counts = at::empty({E}, long_opts);
  at::Tensor offsets = at::empty({E + 1}, long_opts);
  route_offsets_kernel<<<grid_for(E + 1, kScatterThreads, dev, 2048 / kScatterThreads), kScatterThreads, 0,
                         stream>>>(sorted_expert, N, Ei, counts.data_ptr<int64_t>(), offsets.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  return {counts, offsets, perm, sample_offsets, sample_rows};
}

}  // namespace
}  // namespace cuda_impl
}  // namespace mnn_fast

TORCH_LIBRARY_IMPL(mnn_fast, CUDA, m) { m.impl("route", TORCH_FN(mnn_fast::cuda_impl::route_cuda)); }
#endif  // MNN_FAST_HOST_PASS
