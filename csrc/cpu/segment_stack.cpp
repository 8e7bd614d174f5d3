// segment_stack on CPU: each expert's whole Linear -> activation -> ... -> Linear stack on its rows,
// a tile of rows at a time. The tiles ((expert, row range) pairs) go to the cores one by one; each
// tile's rows are copied (through perm) into a thread's own buffer and every layer runs on them
// single-threaded, so the rows and hidden activations stay in that core's cache from the first
// Linear to the last, and no [N, hidden] buffer is ever written.
// Not bitwise the naive loop (one-thread GEMMs on tiles round differently from the expert's whole
// GEMM at the caller's thread count): it serves the opt-in grouped_parallel executor, within float32
// rounding of it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"

namespace mnn_fast {
namespace cpu {
namespace {

constexpr const char* kOp = "segment_stack";

enum class Activation { none, relu, leaky_relu, tanh, sigmoid, silu, gelu, gelu_tanh, elu };

Activation parse_activation(const std::string& name) {
  static const std::pair<const char*, Activation> names[] = {
      {"none", Activation::none},         {"relu", Activation::relu}, {"leaky_relu", Activation::leaky_relu},
      {"tanh", Activation::tanh},         {"sigmoid", Activation::sigmoid}, {"silu", Activation::silu},
      {"gelu", Activation::gelu},         {"gelu_tanh", Activation::gelu_tanh}, {"elu", Activation::elu}};
  for (const auto& [spelling, activation] : names) {
    if (name == spelling) return activation;
  }
  TORCH_CHECK_VALUE(false, kOp, ": activations must each be one of none, relu, leaky_relu, tanh, sigmoid, silu, "
                    "gelu, gelu_tanh, elu; got '", name, "'");
}

void activate(at::Tensor& h, Activation activation, double arg) {
  switch (activation) {
    case Activation::none: return;
    case Activation::relu: h.clamp_min_(0); return;  // what nn.ReLU computes (aten::relu is clamp_min)
    case Activation::leaky_relu: at::leaky_relu_(h, arg); return;
    case Activation::tanh: h.tanh_(); return;
    case Activation::sigmoid: h.sigmoid_(); return;
    case Activation::silu: at::silu_(h); return;
    case Activation::gelu: at::gelu_(h, "none"); return;
    case Activation::gelu_tanh: at::gelu_(h, "tanh"); return;
    case Activation::elu: at::elu_(h, arg); return;
  }
}

// Rows per tile when the caller leaves it to the kernel: as many as still leave about four tiles per
// thread to balance the cores (a descheduled core's tiles go to the others), and at least what
// fills ~256 KB of cache with the tile's rows and hidden buffers. Large tiles win because every GEMM
// call packs its expert's weight anew: measured on the MLP 512-64-10 grid cell (B = 4096, 819 rows
// an expert, 2 threads), one tile per expert was +5-8% over the compute floor, 256-row tiles
// +4-13%, 102-row tiles (the cache budget alone) +16-20%.
int64_t auto_tile_rows(int64_t row_floats, int64_t element_size, int64_t rows_total, int64_t threads) {
  constexpr int64_t kTileBytes = 256 * 1024;
  const int64_t cache_rows = std::max<int64_t>(kTileBytes / std::max<int64_t>(row_floats * element_size, 1), 16);
  const int64_t balance_rows = (rows_total + 4 * threads - 1) / (4 * threads);
  return std::max(cache_rows, balance_rows);
}

struct Tile {
  int64_t expert, begin, rows;
};

// Each expert's rows cut into pieces of at most `tile_rows`, of near-equal size (a 300-row expert at
// 256 is two tiles of 150, not 256 + 44), in expert-major order: a core taking consecutive tiles
// keeps an expert's weights in its cache.
std::vector<Tile> cut_tiles(const int64_t* off, int64_t E, int64_t tile_rows) {
  std::vector<Tile> tiles;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    if (n == 0) continue;
    const int64_t pieces = (n + tile_rows - 1) / tile_rows;
    for (int64_t p = 0; p < pieces; ++p) {
      const int64_t lo = n * p / pieces, hi = n * (p + 1) / pieces;
      tiles.push_back({e, off[e] + lo, hi - lo});
    }
  }
  return tiles;
}

at::Tensor segment_stack_cpu(const at::Tensor& x_in, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                             const std::vector<std::string>& activation_names, c10::ArrayRef<double> activation_args,
                             const at::Tensor& offsets_in, const std::optional<at::Tensor>& perm_in, int64_t tile_rows) {
  TORCH_CHECK_VALUE(x_in.dim() == 2, kOp, ": x must be a 2-D tensor [B, K], got ", describe(x_in));
  TORCH_CHECK_TYPE(at::isFloatingType(x_in.scalar_type()), kOp, ": x must be a floating tensor, got ", describe(x_in));
  check_cpu(kOp, "x", x_in);
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(L >= 1, kOp, ": weights must hold at least one [E, M, K] tensor, got an empty list");
  TORCH_CHECK_VALUE(static_cast<int64_t>(biases.size()) == L, kOp, ": biases must have one entry (a tensor or None) per "
                    "weight, ", L, ", got ", biases.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(activation_names.size()) == L && static_cast<int64_t>(activation_args.size()) == L,
                    kOp, ": activations and activation_args must have one entry per weight, ", L, ", got ",
                    activation_names.size(), " and ", activation_args.size());
  TORCH_CHECK_VALUE(tile_rows >= 0, kOp, ": tile_rows must be >= 0 (0: chosen by the kernel), got ", tile_rows);
  const int64_t E = weights[0].dim() == 3 ? weights[0].size(0) : -1;
  std::vector<at::Tensor> w(L), b(L);
  std::vector<Activation> act(L);
  int64_t width = x_in.size(1), widest = 0;
  for (int64_t i = 0; i < L; ++i) {
    const at::Tensor& wi = weights[i];
    TORCH_CHECK_VALUE(wi.dim() == 3 && wi.size(0) == E && wi.size(2) == width, kOp, ": weights[", i,
                      "] must be a 3-D tensor [E, M, K] with E = ", E, " and K = ", width,
                      i == 0 ? " (x's features)" : " (the previous layer's M)", ", got ", describe(wi));
    TORCH_CHECK_TYPE(wi.scalar_type() == x_in.scalar_type(), kOp, ": weights[", i, "] must have x's dtype ",
                     dtype_name(x_in.scalar_type()), ", got ", describe(wi));
    check_cpu(kOp, "weights", wi);
    // Each expert's [M, K] dense is all a GEMM needs: the stack's own padding between experts (the
    // grouped executor's 64-byte slabs) is kept rather than copied away on every call.
    const bool experts_dense = wi.stride(2) == 1 && wi.stride(1) == wi.size(2);
    w[i] = (experts_dense ? wi : wi.contiguous()).detach();  // out= calls refuse inputs that require grad
    const int64_t M = wi.size(1);
    const std::optional<at::Tensor> bi = biases.get(i);
    if (bi.has_value()) {
      TORCH_CHECK_VALUE(bi->dim() == 2 && bi->size(0) == E && bi->size(1) == M, kOp, ": biases[", i,
                        "] must be a 2-D tensor [E, M] = [", E, ", ", M, "], got ", describe(*bi));
      TORCH_CHECK_TYPE(bi->scalar_type() == x_in.scalar_type(), kOp, ": biases[", i, "] must have x's dtype, got ",
                       describe(*bi));
      check_cpu(kOp, "biases", *bi);
      b[i] = bi->contiguous().detach();
    }
    act[i] = parse_activation(activation_names[i]);
    width = M;
    if (i + 1 < L) widest = std::max(widest, M);
  }
  const int64_t B = x_in.size(0), K = x_in.size(1);
  const SegmentRows segments = check_segment_rows(kOp, B, E, offsets_in, perm_in);
  const int64_t N = segments.N;
  const int64_t* off = segments.off;
  const int64_t* idx = segments.idx;
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // inference only: the op has no backward
  at::NoGradGuard no_grad;
  const at::Tensor x = x_in.contiguous().detach();
  at::Tensor out = at::empty({N, width}, x.options());
  if (N == 0) return out;
  if (tile_rows == 0) tile_rows = auto_tile_rows(K + 2 * widest, x.element_size(), N, at::get_num_threads());
  // No tile outgrows the largest expert: the buffers are sized by it, and a huge request cannot overflow.
  int64_t largest = 0;
  for (int64_t e = 0; e < E; ++e) largest = std::max(largest, off[e + 1] - off[e]);
  tile_rows = std::min(tile_rows, largest);
  const std::vector<Tile> tiles = cut_tiles(off, E, tile_rows);
  const int64_t T = static_cast<int64_t>(tiles.size());
  const int64_t row_bytes = K * x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());

  // Tiles are taken from a shared counter rather than split evenly up front: on a busy machine a
  // descheduled core's share is picked up by the others instead of ending the call late.
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), T);
  // The ATen calls on the worker threads must see this thread's dispatch state (below autograd, no
  // grad, inference mode): OpenMP workers do not inherit it, and under torch.inference_mode() an
  // addmm into `out` from a worker was refused as an in-place update outside inference mode.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, workers, 1, [&](int64_t first, int64_t last) {
    at::ThreadLocalStateGuard state_guard(caller_state);
    at::Tensor rows_buf = idx != nullptr ? at::empty({tile_rows, K}, x.options()) : at::Tensor();
    at::Tensor hidden[2];
    if (L > 1) {
      hidden[0] = at::empty({tile_rows * widest}, x.options());
      hidden[1] = at::empty({tile_rows * widest}, x.options());
    }
    for (int64_t worker = first; worker < last; ++worker) {
      for (int64_t t = next.fetch_add(1); t < T; t = next.fetch_add(1)) {
        const Tile& tile = tiles[t];
        at::Tensor h;
        if (idx == nullptr) {
          h = x.narrow(0, tile.begin, tile.rows);
        } else {
          h = rows_buf.narrow(0, 0, tile.rows);
          char* dst = static_cast<char*>(h.data_ptr());
          for (int64_t j = 0; j < tile.rows; ++j) std::memcpy(dst + j * row_bytes, src + idx[tile.begin + j] * row_bytes, row_bytes);
        }
        for (int64_t i = 0; i < L; ++i) {
          const int64_t M = w[i].size(1);
          // A hidden layer's [rows, M] is the contiguous front of its buffer, so addmm writes it in place.
          at::Tensor dst = i + 1 == L ? out.narrow(0, tile.begin, tile.rows)
                                      : hidden[i % 2].narrow(0, 0, tile.rows * M).view({tile.rows, M});
          const at::Tensor w_t = w[i].select(0, tile.expert).t();
          if (b[i].defined()) {
            at::addmm_out(dst, b[i].select(0, tile.expert), h, w_t);
          } else {
            at::mm_out(dst, h, w_t);
          }
          activate(dst, act[i], activation_args[i]);
          h = dst;
        }
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace mnn_fast

TORCH_LIBRARY_IMPL(mnn_fast, CPU, m) {
  m.impl("segment_stack", &mnn_fast::cpu::segment_stack_cpu);
}
