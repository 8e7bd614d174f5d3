// route on CPU: the batch is cut into contiguous chunks. Pass 1 selects each sample's active
// experts (threshold, then exact top-k by (key desc, index asc); a threshold alone on narrow
// contiguous rows from one flat compare pass over the chunk) into a per-chunk list (O(N) int32)
// and a per-chunk expert histogram; exclusive scans give every (expert, chunk) its first row; pass 2
// replays the lists to scatter perm / sample_rows. Chunks only split work: output is independent of them.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

#include "common.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace mnn_fast {
namespace cpu {
namespace {

// Growable int32 buffer without zero-fill: pass 1 writes each sample's experts through a raw
// pointer after reserving E slots, so the hot loop has no capacity check per expert.
class IdList {
 public:
  void reserve_more(int64_t extra) {
    if (size_ + extra <= cap_) return;
    const int64_t cap = std::max(size_ + extra, 2 * cap_);
    std::unique_ptr<int32_t[]> fresh(new int32_t[cap]);
    if (size_ > 0) std::memcpy(fresh.get(), data_.get(), size_ * sizeof(int32_t));
    data_ = std::move(fresh);
    cap_ = cap;
  }
  int32_t* tail() { return data_.get() + size_; }
  void grow(int64_t n) { size_ += n; }
  const int32_t* data() const { return data_.get(); }

 private:
  std::unique_ptr<int32_t[]> data_;
  int64_t size_ = 0;
  int64_t cap_ = 0;
};

// Up to this k the top-k is kept by insertion into a sorted array (one pass, usually no insert);
// beyond it, nth_element over the candidates is cheaper.
constexpr int64_t kSmallTopK = 8;

// Scores are scanned in blocks of this many: one vectorised compare gives the block's bit mask,
// so a block with nothing to do costs a few instructions and a busy one visits only its set bits.
constexpr int64_t kBlock = 16;  // above_mask's SSE path hard-codes 4 x 4 lanes

// Bit u set iff s[u] > lim (NaN compares false). Explicit SSE: once inlined, GCC fully unrolls a
// plain loop into scalar compares instead of vectorising it.
inline uint32_t above_mask(const float* s, float lim) {
#if defined(__SSE2__)
  const __m128 l = _mm_set1_ps(lim);
  const __m128 c0 = _mm_cmpgt_ps(_mm_loadu_ps(s), l);
  const __m128 c1 = _mm_cmpgt_ps(_mm_loadu_ps(s + 4), l);
  const __m128 c2 = _mm_cmpgt_ps(_mm_loadu_ps(s + 8), l);
  const __m128 c3 = _mm_cmpgt_ps(_mm_loadu_ps(s + 12), l);
  // Most blocks have no hit: one combined test before assembling the 16 bits.
  if (_mm_movemask_ps(_mm_or_ps(_mm_or_ps(c0, c1), _mm_or_ps(c2, c3))) == 0) return 0;
  return static_cast<uint32_t>(_mm_movemask_ps(c0)) | static_cast<uint32_t>(_mm_movemask_ps(c1)) << 4 |
         static_cast<uint32_t>(_mm_movemask_ps(c2)) << 8 | static_cast<uint32_t>(_mm_movemask_ps(c3)) << 12;
#else
  uint32_t mask = 0;
  for (int64_t u = 0; u < kBlock; ++u) mask |= static_cast<uint32_t>(s[u] > lim) << u;
  return mask;
#endif
}

// Bit j of words set iff s[j] > lim, for the n scores of contiguous rows read as one flat array:
// a vector compare per 16 scores whatever E is, so narrow rows (E = 10) pay no scalar tail each.
void above_bits(const float* s, int64_t n, float lim, uint64_t* words) {
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    words[j >> 6] = static_cast<uint64_t>(above_mask(s + j, lim)) |
                    static_cast<uint64_t>(above_mask(s + j + 16, lim)) << 16 |
                    static_cast<uint64_t>(above_mask(s + j + 32, lim)) << 32 |
                    static_cast<uint64_t>(above_mask(s + j + 48, lim)) << 48;
  }
  if (j < n) {
    uint64_t w = 0;
    for (int64_t u = 0; j + u < n; ++u) w |= static_cast<uint64_t>(s[j + u] > lim) << u;
    words[j >> 6] = w;
  }
}

// The set bits [p, p + E) of words as expert ids 0..E-1, in increasing order, to dst; how many.
inline int64_t active_from_bits(const uint64_t* words, int64_t p, int64_t E, int32_t* dst) {
  int64_t n = 0;
  for (int64_t e0 = 0; e0 < E;) {
    const int64_t q = p + e0;
    const int shift = static_cast<int>(q & 63);
    const int64_t take = std::min<int64_t>(64 - shift, E - e0);
    uint64_t w = words[q >> 6] >> shift;
    if (take < 64) w &= (static_cast<uint64_t>(1) << take) - 1;
    for (; w != 0; w &= w - 1) dst[n++] = static_cast<int32_t>(e0 + __builtin_ctzll(w));
    e0 += take;
  }
  return n;
}

// Ranking key of docs/ops.md: NaN ranks as -inf.
inline float rank_key(float s) { return std::isnan(s) ? -std::numeric_limits<float>::infinity() : s; }

// Writes the active experts of one sample (row s of length E) to dst in increasing order and
// returns how many. dst holds E slots; scratch holds E floats and E int32s.
//
// With a threshold, only experts with s > thr can be active, and every expert outranking such an
// expert also has s > thr, so the top-k can be taken among the candidates alone. Without one,
// NaNs (key -inf) still take top-k slots from -inf scores at higher indices, so all experts compete
// and NaNs are dropped only afterwards.
template <bool kHasThreshold>
int64_t select_active(const float* s, int64_t E, float thr, int64_t k, int32_t* dst, float* key_buf,
                      int32_t* idx_buf) {
  if (k == 0) {
    int64_t n = 0;
    int64_t e = 0;
    if (kHasThreshold) {
      // Few experts pass a threshold: a block costs one vector compare plus a step per active one.
      for (; e + kBlock <= E; e += kBlock) {
        for (uint32_t mask = above_mask(s + e, thr); mask != 0; mask &= mask - 1) {
          dst[n++] = static_cast<int32_t>(e + __builtin_ctz(mask));
        }
      }
    }
    for (; e < E; ++e) {
      dst[n] = static_cast<int32_t>(e);  // branch-free: always write, advance only past active ones
      n += kHasThreshold ? (s[e] > thr) : !std::isnan(s[e]);
    }
    return n;
  }

  int64_t m = 0;  // number of candidates selected into idx_buf
  if (k <= kSmallTopK) {
    float bk[kSmallTopK];  // best keys so far, descending; bi holds their experts
    int32_t bi[kSmallTopK];
    auto consider = [&](int64_t e) {
      const float v = s[e];
      if (kHasThreshold && !(v > thr)) return;
      const float kv = kHasThreshold ? v : rank_key(v);
      // Experts arrive in increasing index, so an equal key never displaces an earlier one.
      if (m == k && !(kv > bk[k - 1])) return;
      int64_t p = (m < k) ? m++ : k - 1;
      while (p > 0 && kv > bk[p - 1]) {
        bk[p] = bk[p - 1];
        bi[p] = bi[p - 1];
        --p;
      }
      bk[p] = kv;
      bi[p] = static_cast<int32_t>(e);
    };
    int64_t e = 0;
    for (; e + kBlock <= E; e += kBlock) {
      // Once k are held, only a score above the worst kept one can enter (NaN compares false, as
      // its key -inf would); it is above thr too, since every kept score is. Before that, with a
      // threshold, the candidates are exactly the scores above it.
      if (!kHasThreshold && m < k) {  // every expert enters until k are held, NaNs included
        for (int64_t u = e; u < e + kBlock; ++u) consider(u);
        continue;
      }
      // The mask is taken once per block, against a bar that only rises inside it: a superset of
      // the experts that can still enter, each rechecked exactly by consider().
      for (uint32_t mask = above_mask(s + e, m == k ? bk[k - 1] : thr); mask != 0; mask &= mask - 1) {
        consider(e + __builtin_ctz(mask));
      }
    }
    for (; e < E; ++e) consider(e);
    // Back to increasing expert order (at most kSmallTopK entries: insertion sort).
    for (int64_t j = 0; j < m; ++j) {
      const int32_t v = bi[j];
      int64_t p = j;
      for (; p > 0 && idx_buf[p - 1] > v; --p) idx_buf[p] = idx_buf[p - 1];
      idx_buf[p] = v;
    }
  } else {
    for (int64_t e = 0; e < E; ++e) {
      const float v = s[e];
      if (kHasThreshold && !(v > thr)) continue;
      key_buf[e] = kHasThreshold ? v : rank_key(v);
      idx_buf[m++] = static_cast<int32_t>(e);
    }
    if (m > k) {
      // (key desc, index asc) is a strict total order, so the k selected are exactly rank < k.
      std::nth_element(idx_buf, idx_buf + k, idx_buf + m, [key_buf](int32_t a, int32_t b) {
        return key_buf[a] > key_buf[b] || (key_buf[a] == key_buf[b] && a < b);
      });
      m = k;
      std::sort(idx_buf, idx_buf + m);
    }
  }

  int64_t n = 0;
  for (int64_t j = 0; j < m; ++j) {
    const int32_t e = idx_buf[j];
    dst[n] = e;
    n += kHasThreshold ? 1 : !std::isnan(s[e]);
  }
  return n;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_cpu(const at::Tensor& scores_in,
                                                                                 double threshold, int64_t top_k) {
  constexpr const char* op = "route";
  check_2d(op, "scores", scores_in, at::kFloat);
  const int64_t B = scores_in.size(0);
  const int64_t E = scores_in.size(1);
  TORCH_CHECK_VALUE(E >= 1, op, ": scores must have E >= 1 expert columns, got ", describe(scores_in));
  TORCH_CHECK_VALUE(E <= std::numeric_limits<int32_t>::max(), op, ": scores must have fewer than 2^31 expert columns, got ",
              describe(scores_in));
  TORCH_CHECK_VALUE(top_k >= 0 && top_k <= E, op, ": top_k must be 0 (no top-k) or in [1, E] with E = ", E, ", got ", top_k);

  // Rows may be strided (e.g. a column slice); only a non-unit column stride forces a copy.
  const at::Tensor scores = (scores_in.stride(1) == 1 || E == 1) ? scores_in : scores_in.contiguous();
  const int64_t row_stride = scores.stride(0);
  const auto long_opts = scores.options().dtype(at::kLong);
  // -inf means "no threshold" (the reference's threshold=None): -inf scores stay eligible.
  const bool has_threshold = !(std::isinf(threshold) && threshold < 0);
  // The reference compares the float32 tensor with the scalar cast to float32; so do we.
  const float thr = static_cast<float>(threshold);
  // Every rank is < E, so top_k == E selects everything: same as no top-k.
  const int64_t k = (top_k == E) ? 0 : top_k;

  at::Tensor counts = at::empty({E}, long_opts);
  at::Tensor offsets = at::empty({E + 1}, long_opts);
  at::Tensor sample_offsets = at::empty({B + 1}, long_opts);
  int64_t* so = sample_offsets.data_ptr<int64_t>();
  so[0] = 0;

  // Chunking only balances work; any T gives the same result.
  const int64_t max_threads = std::max<int64_t>(1, at::get_num_threads());
  // A sample costs its E compares and ~20 ns of fixed work (its list entry, counts, offsets), so
  // a chunk needs about an eighth of the samples E compares alone would ask for: counted as E
  // alone, a batch of 4096 samples at E = 10 ran on one thread (two now take ~60% of its time).
  const int64_t T = std::max<int64_t>(1, std::min(max_threads, B / std::max<int64_t>(1, grain_for(E) / 8)));
  const int64_t chunk = (B + T - 1) / T;

  // Pass 1: per-chunk counts; after the scan: next row. Chunk t's counters start at t * stride,
  // a cache line (8 int64) past the end of chunk t-1's, as each list below sits on lines of its
  // own: chunks sharing a line, every sample's writes bounced it between the cores, and two
  // threads ran ~3x slower than one (E = 10, B = 4096).
  const int64_t stride = E + 8;
  std::vector<int64_t> hist(T * stride, 0);
  std::vector<int64_t> chunk_total(T + 1, 0);
  struct alignas(64) PaddedList : IdList {};
  std::vector<PaddedList> lists(T);
  const float* s = scores.data_ptr<float>();
  const bool need_scratch = k > kSmallTopK;
  // Expected actives per sample, to size the lists: exact without a threshold (barring NaNs); with
  // one, a small guess (the MNN regime is ~2 of E) past which the lists grow geometrically.
  const int64_t per_sample_guess = has_threshold ? std::min<int64_t>(k > 0 ? k : E, 4) : (k > 0 ? k : E);

  // A threshold alone on contiguous rows narrower than a block: one flat compare pass per chunk,
  // then each sample's bits (wider rows take select_active's blocks, faster there: measured).
  const bool flat = has_threshold && k == 0 && row_stride == E && E < kBlock;
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> key_buf(need_scratch ? E : 0);
    std::vector<int32_t> idx_buf(k > 0 ? E : 0);
    std::vector<uint64_t> bits(flat ? (chunk * E + 63) / 64 : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b0 = std::min(B, t * chunk);
      const int64_t b1 = std::min(B, b0 + chunk);
      int64_t* h = hist.data() + t * stride;
      IdList& list = lists[t];
      list.reserve_more((b1 - b0) * per_sample_guess + E);
      int64_t total = 0;
      if (flat) above_bits(s + b0 * E, (b1 - b0) * E, thr, bits.data());
      for (int64_t i = b0; i < b1; ++i) {
        list.reserve_more(E);
        int32_t* dst = list.tail();
        const float* row = s + i * row_stride;
        const int64_t n = flat ? active_from_bits(bits.data(), (i - b0) * E, E, dst)
                          : has_threshold ? select_active<true>(row, E, thr, k, dst, key_buf.data(), idx_buf.data())
                                          : select_active<false>(row, E, thr, k, dst, key_buf.data(), idx_buf.data());
        for (int64_t j = 0; j < n; ++j) ++h[dst[j]];
        list.grow(n);
        so[i + 1] = n;
        total += n;
      }
      chunk_total[t + 1] = total;
    }
  });

  // Exclusive scans: chunk t's samples start at chunk_total[t] in the sample-major layout, and its
  // rows of expert e follow those of earlier chunks (stable: increasing sample index).
  for (int64_t t = 0; t < T; ++t) chunk_total[t + 1] += chunk_total[t];
  const int64_t N = chunk_total[T];
  int64_t* cnt = counts.data_ptr<int64_t>();
  int64_t* off = offsets.data_ptr<int64_t>();
  off[0] = 0;
  for (int64_t e = 0; e < E; ++e) {
    int64_t run = off[e];
    for (int64_t t = 0; t < T; ++t) {
      const int64_t c = hist[t * stride + e];
      hist[t * stride + e] = run;
      run += c;
    }
    cnt[e] = run - off[e];
    off[e + 1] = run;
  }

  at::Tensor perm = at::empty({N}, long_opts);
  at::Tensor sample_rows = at::empty({N}, long_opts);
  int64_t* pm = perm.data_ptr<int64_t>();
  int64_t* sr = sample_rows.data_ptr<int64_t>();

  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b0 = std::min(B, t * chunk);
      const int64_t b1 = std::min(B, b0 + chunk);
      int64_t* next_row = hist.data() + t * stride;
      const int32_t* ids = lists[t].data();
      int64_t pos = chunk_total[t];
      for (int64_t i = b0; i < b1; ++i) {
        const int64_t n = so[i + 1];
        for (int64_t j = 0; j < n; ++j) {
          const int64_t row = next_row[*ids++]++;
          pm[row] = i;
          sr[pos++] = row;
        }
        so[i + 1] = pos;
      }
    }
  });

  return std::make_tuple(counts, offsets, perm, sample_offsets, sample_rows);
}

}  // namespace
}  // namespace cpu
}  // namespace mnn_fast

TORCH_LIBRARY_IMPL(mnn_fast, CPU, m) {
  m.impl("route", &mnn_fast::cpu::route_cpu);
}
