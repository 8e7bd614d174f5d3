// The tile kernels (tile.h) written once over one ISA's vector operations: tile_avx2.cpp and
// tile_avx512.cpp each define, in their own namespace, kRows (rows per tile = floats per register),
// the register types F (floats), M (a lane mask), I (int32s) and the operations used below, then
// include this file there, after their ISA's target pragma. No #include here: every function is
// compiled for that ISA only and stays in that namespace.
//
// rows.h spreads one row's columns over 16 lanes, so each row is a long serial chain (max, exp
// sum, log1p, then the out-of-group sum) that the CPU cannot overlap with the next row's. A tile
// holds column c of kRows rows in one register, and the 16 column lanes become 16 registers: per
// row (register lane) the operations are rowmath.h's in its order, so the bits are rows.h's.

using rowmath::kLanes;

// ---------------------------------------------------------------- rowmath.h, one row per lane

// rowmath::exp_nonpositive. Three shortcuts give its values on its domain (t <= 0 or NaN):
// max(-80, t) is "t < -80 ? -80 : t" (NaN included: max returns its second operand when either is
// NaN); for v in [-115, 0.5] or NaN the rounding instruction's floor is floor_small's; and n is NaN
// only with t, where y is NaN and so is y * scale, whatever the conversion made of n (rowmath zeroes
// it first because C++ leaves converting NaN undefined; the instruction gives INT_MIN, scale 1.0).
inline F exp_v(F t) {
  const M flush = lt(t, set1(rowmath::kExpFlush));
  const F x = max_v(set1(rowmath::kExpFlush), t);
  const F n = floor_v(add(mul(x, set1(1.44269504088896341f)), set1(0.5f)));
  const F r = sub(sub(x, mul(n, set1(0.693359375f))), mul(n, set1(-2.12194440e-4f)));
  const F z = mul(r, r);
  F p = set1(1.9875691500e-4f);
  p = add(mul(p, r), set1(1.3981999507e-3f));
  p = add(mul(p, r), set1(8.3334519073e-3f));
  p = add(mul(p, r), set1(4.1665795894e-2f));
  p = add(mul(p, r), set1(1.6666665459e-1f));
  p = add(mul(p, r), set1(5.0000001201e-1f));
  const F y = add(add(mul(p, z), r), set1(1.0f));
  const F scale = as_float(shl23(iadd(cvtt(n), iset1(127))));
  return mul_zero_where(flush, y, scale);
}

// rowmath::log_corrected.
inline F log_corrected_v(F v, F correction) {
  const I bits = as_int(v);
  I e = isub(sar23(bits), iset1(127));
  F m = as_float(ior(iand(bits, iset1(0x007FFFFF)), iset1(0x3F800000)));
  const M big = gt(m, set1(1.41421356237309505f));
  m = select(big, mul(m, set1(0.5f)), m);
  e = inc_where(big, e);
  const F ef = cvt(e);
  const F f = sub(m, set1(1.0f));
  const F z = mul(f, f);
  F q = set1(7.0376836292e-2f);
  q = add(mul(q, f), set1(-1.1514610310e-1f));
  q = add(mul(q, f), set1(1.1676998740e-1f));
  q = add(mul(q, f), set1(-1.2420140846e-1f));
  q = add(mul(q, f), set1(1.4249322787e-1f));
  q = add(mul(q, f), set1(-1.6668057665e-1f));
  q = add(mul(q, f), set1(2.0000714765e-1f));
  q = add(mul(q, f), set1(-2.4999993993e-1f));
  q = add(mul(q, f), set1(3.3333331174e-1f));
  F y = mul(mul(q, f), z);
  y = add(y, mul(ef, set1(-2.12194440e-4f)));
  y = sub(y, mul(set1(0.5f), z));
  y = add(y, correction);
  return add(add(f, y), mul(ef, set1(0.693359375f)));
}

inline F log1p_v(F u) {  // rowmath::log1p_nonnegative
  const F v = add(set1(1.0f), u);
  return log_corrected_v(v, div(sub(u, sub(v, set1(1.0f))), v));
}

inline F log_positive_v(F x) { return log_corrected_v(x, zero()); }

inline F log_of_sum_v(F s) {  // rowmath::log_of_sum
  return select(eq(s, zero()), set1(-rows::kInf), log1p_v(sub(s, set1(1.0f))));
}

// ---------------------------------------------------------------- tiles

// An 8x8 block transposed in registers: out[k] element i = in[i] element k.
inline void transpose8(const __m256* in, __m256* out) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(in[i], in[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(in[i], in[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    out[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    out[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// tile[kRows c + r] = rows[r][c] for c < C: kRows rows of C floats as C columns of kRows, eight
// rows by eight columns at a time.
inline void load(const float* const* rows, int64_t C, float* tile) {
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    for (int h = 0; h < kRows; h += 8) {
      __m256 r[8], columns[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(rows[h + i] + c);
      transpose8(r, columns);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(tile + kRows * (c + i) + h, columns[i]);
    }
  }
  for (; c < C; ++c) {
    for (int r = 0; r < kRows; ++r) tile[kRows * c + r] = rows[r][c];
  }
}

// Per row (lane) the maximum of its C columns, as rows::row_max: lane j of the 16 takes columns
// j, j+16, ... in order (max(b, m) = b > m ? b : m, so even -0/+0 pick as the scalar loop), then
// the lanes in order; NaN if any column is NaN. Lanes past C would hold -inf, which no fold picks,
// so only the `used` ones are kept. The 16 column lanes go by whole blocks so that each has a fixed
// register (or stack slot), not one addressed by c % 16.
inline F max(const float* tile, int64_t C) {
  const int used = static_cast<int>(C < kLanes ? C : kLanes);
  const F minus_inf = set1(-rows::kInf);
  F lanes[kLanes];
  M any_nan = mnone();  // the order of an OR does not matter: one flag for all lanes
  for (int j = 0; j < used; ++j) {
    const F v = load_f(tile + kRows * j);
    lanes[j] = max_v(v, minus_inf);
    any_nan = mor(any_nan, unord(v));
  }
  int64_t c = kLanes;
  for (; c + kLanes <= C; c += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const F v = load_f(tile + kRows * (c + j));
      lanes[j] = max_v(v, lanes[j]);
      any_nan = mor(any_nan, unord(v));
    }
  }
  for (int j = 0; c + j < C; ++j) {
    const F v = load_f(tile + kRows * (c + j));
    lanes[j] = max_v(v, lanes[j]);
    any_nan = mor(any_nan, unord(v));
  }
  F best = minus_inf;
  for (int j = 0; j < used; ++j) best = max_v(lanes[j], best);
  return select(any_nan, set1(rows::kNaN), best);
}

// What a lane sum adds per cell: exp(x - shift), the same with the exp stored over x (kExpKept),
// or the cell itself (kAsIs: a tile of exps already).
enum class Terms { kExp, kExpKept, kAsIs };

template <Terms kTerms>
inline F term(float* cell, F shift) {
  const F x = load_f(cell);
  if (kTerms == Terms::kAsIs) return x;
  const F v = exp_v(sub(x, shift));
  if (kTerms == Terms::kExpKept) store_f(cell, v);
  return v;
}

// Per row the sum of the terms in rowmath's lane order (rows::lane_sum_exp). Lanes past C would
// hold +0 (what rows.h's -inf padding adds); x + +0 == x for every lane sum (>= +0 or NaN), so the
// pairwise fold skips them.
template <Terms kTerms = Terms::kExp>
inline F sum_exp(float* tile, int64_t C, F shift) {
  int used = static_cast<int>(C < kLanes ? C : kLanes);
  F lanes[kLanes];
  for (int j = 0; j < used; ++j) lanes[j] = add(zero(), term<kTerms>(tile + kRows * j, shift));
  int64_t c = kLanes;
  for (; c + kLanes <= C; c += kLanes) {
    for (int j = 0; j < kLanes; ++j) lanes[j] = add(lanes[j], term<kTerms>(tile + kRows * (c + j), shift));
  }
  for (int j = 0; c + j < C; ++j) lanes[j] = add(lanes[j], term<kTerms>(tile + kRows * (c + j), shift));
  if (used == 0) return zero();
  for (int h = kLanes / 2; h > 0; h /= 2) {
    for (int j = 0; j < h && j + h < used; ++j) lanes[j] = add(lanes[j], lanes[j + h]);
    used = used < h ? used : h;
  }
  return lanes[0];
}

// tile[c] = (tile[c] - m) - log_s per lane: log_softmax's last step, in place.
inline void shift_scale(float* tile, int64_t C, F m, F log_s) {
  for (int64_t c = 0; c < C; ++c) store_f(tile + kRows * c, sub(sub(load_f(tile + kRows * c), m), log_s));
}

// dst[c] = src[c] + value for c < n (one float32 add each, as the scalar loop; src may be dst); the
// last columns by a masked load and store, which touch nothing past n.
inline void add_scalar(const float* src, float* dst, int64_t n, float value) {
  const F v = set1(value);
  int64_t c = 0;
  for (; c + kRows <= n; c += kRows) store_f(dst + c, add(load_f(src + c), v));
  if (c < n) store_n(dst + c, add(load_n(src + c, n - c), v), n - c);
}

// dst[c] = (src[c] - m) - log_s for c < n.
inline void sub2(const float* src, int64_t n, float m, float log_s, float* dst) {
  const F vm = set1(m), vl = set1(log_s);
  int64_t c = 0;
  for (; c + kRows <= n; c += kRows) store_f(dst + c, sub(sub(load_f(src + c), vm), vl));
  if (c < n) store_n(dst + c, sub(sub(load_n(src + c, n - c), vm), vl), n - c);
}

// The one exp pass over up to kRows rows of C floats (`count` real ones; `padded` is filled with
// them, padded with the last): leaves exp(x - m) in the tile (kExpKept; kExp leaves x) and gives
// per lane the row maximum m, the lane sum s and log_s = log(s) as rows::log_softmax_row computes them.
struct ExpPass {
  F m, s, log_s;
};

template <Terms kTerms = Terms::kExpKept>
inline ExpPass exp_pass(const float* const* rows, int count, int64_t C, float* tile, const float** padded) {
  for (int r = 0; r < kRows; ++r) padded[r] = rows[r < count ? r : count - 1];
  load(padded, C, tile);
  ExpPass pass;
  pass.m = max(tile, C);
  pass.s = sum_exp<kTerms>(tile, C, pass.m);
  pass.log_s = log1p_v(sub(pass.s, set1(1.0f)));
  return pass;
}

// out[r] = (x[r] - m) - log_s for the `count` real rows: their log_softmax from an exp_pass.
inline void write_log_softmax(const float* const* x, float* const* out, int count, int64_t C, const ExpPass& pass) {
  float ms[kRows], ls[kRows];
  store_f(ms, pass.m);
  store_f(ls, pass.log_s);
  for (int r = 0; r < count; ++r) sub2(x[r], C, ms[r], ls[r], out[r]);
}

// log_softmax of up to kRows rows of C floats, each in place (rows::log_softmax_row); `count` real
// rows, the tile (scratch of kRows C floats) padded with the last one.
inline void log_softmax_rows(float* const* rows, int count, int64_t C, float* tile) {
  const float* padded[kRows];
  write_log_softmax(rows, rows, count, C, exp_pass<Terms::kExp>(rows, count, C, tile, padded));
}

// softmax_row (rows.h) of up to kRows rows of C floats: log_out[r] = log_softmax(x[r]), prob_out[r]
// = exp(x[r] - m) * (1 / s) from the exps of the one pass that sums s.
void softmax_rows(const float* const* x, int count, int64_t C, float* tile, float* const* log_out,
                  float* const* prob_out) {
  const float* padded[kRows];
  const ExpPass pass = exp_pass(x, count, C, tile, padded);  // the tile holds exp(x - m) now
  write_log_softmax(x, log_out, count, C, pass);
  const F inverse = div(set1(1.0f), pass.s);
  float inverses[kRows];
  store_f(inverses, inverse);
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {  // scaled column-wise, transposed back to rows eight by eight
    for (int i = 0; i < 8; ++i) store_f(tile + kRows * (c + i), mul(load_f(tile + kRows * (c + i)), inverse));
    for (int h = 0; h < count; h += 8) {
      __m256 columns[8], rows_out[8];
      for (int i = 0; i < 8; ++i) columns[i] = _mm256_loadu_ps(tile + kRows * (c + i) + h);
      transpose8(columns, rows_out);
      for (int r = 0; r < 8 && h + r < count; ++r) _mm256_storeu_ps(prob_out[h + r] + c, rows_out[r]);
    }
  }
  for (; c < C; ++c) {
    for (int r = 0; r < count; ++r) prob_out[r][c] = rowmath::mul(tile[kRows * c + r], inverses[r]);
  }
}

// ---------------------------------------------------------------- wide rows, one at a time
// A row of tile::kWideColumns or more (kWideRecombineColumns in recombine and log_softmax_rows) is
// read in its own layout: rowmath's 16 lanes are the 16 columns of each block (kBlockRegs registers
// of kRows floats), so nothing is transposed, where a tile of kRows such rows would not fit the L1
// cache (softmax_rows at C = 1000: ~1.5x faster so). Rows are independent: the CPU overlaps one
// row's serial folds with the next row's passes.
constexpr int kBlockRegs = kLanes / kRows;

// Asks for a row's cache lines ahead of its use: one row at a time streams too little at once to
// hide the latency of rows from L3 or memory (tiles read kRows rows together).
inline void prefetch_row(const float* x, int64_t n) {
  for (int64_t c = 0; c < n; c += 16) __builtin_prefetch(x + c);
}

// Register k of the block at column c of a row of n columns; past n: -inf.
inline F load_lanes(const float* x, int64_t c, int64_t n, int k) {
  const int64_t at = c + kRows * k;
  if (at + kRows <= n) return load_f(x + at);
  return select_first(n - at, load_n(x + at, n - at > 0 ? n - at : 0), set1(-rows::kInf));
}

// rows::row_max of a row of n >= 1 columns.
inline float row_max_wide(const float* x, int64_t n) {
  F m[kBlockRegs];
  M nan = mnone();
  for (int k = 0; k < kBlockRegs; ++k) m[k] = set1(-rows::kInf);
  for (int64_t c = 0; c < n; c += kLanes) {
    for (int k = 0; k < kBlockRegs; ++k) {
      const F v = load_lanes(x, c, n, k);
      m[k] = max_v(v, m[k]);
      nan = mor(nan, unord(v));
    }
  }
  if (any(nan)) return rows::kNaN;
  float lanes[kLanes];
  for (int k = 0; k < kBlockRegs; ++k) store_f(lanes + kRows * k, m[k]);
  float best = -rows::kInf;  // rows::fold_max's order: a tree could pick the other sign of a zero
  for (int j = 0; j < kLanes; ++j) best = lanes[j] > best ? lanes[j] : best;
  return best;
}

// rows::lane_sum_exp(x, n, m); the exps are also written to kept[0:n] (which may not alias x).
inline float sum_exp_wide(const float* x, int64_t n, float m, float* kept) {
  const F vm = set1(m);
  F acc[kBlockRegs];
  for (int k = 0; k < kBlockRegs; ++k) acc[k] = zero();
  for (int64_t c = 0; c < n; c += kLanes) {
    for (int k = 0; k < kBlockRegs; ++k) {
      const int64_t at = c + kRows * k;
      if (at >= n) break;  // a register of padding only adds +0
      const F e = exp_v(sub(load_lanes(x, c, n, k), vm));
      if (at + kRows <= n) {
        store_f(kept + at, e);
      } else {
        store_n(kept + at, e, n - at);
      }
      acc[k] = add(acc[k], e);
    }
  }
  float lanes[kLanes];
  for (int k = 0; k < kBlockRegs; ++k) store_f(lanes + kRows * k, acc[k]);
  return rowmath::fold_lanes(lanes);
}

// The lane sum of v[0:n] (each term as is) in rowmath's order.
inline float lane_sum_wide(const float* v, int64_t n) {
  F acc[kBlockRegs];
  for (int k = 0; k < kBlockRegs; ++k) acc[k] = zero();
  for (int64_t c = 0; c < n; c += kLanes) {
    for (int k = 0; k < kBlockRegs; ++k) {
      const int64_t at = c + kRows * k;
      if (at >= n) break;
      acc[k] = add(acc[k], at + kRows <= n ? load_f(v + at) : load_n(v + at, n - at));  // padding: +0
    }
  }
  float lanes[kLanes];
  for (int k = 0; k < kBlockRegs; ++k) store_f(lanes + kRows * k, acc[k]);
  return rowmath::fold_lanes(lanes);
}

// dst[c] = src[c] * scale for c < n (in place allowed).
inline void scale_row(const float* src, int64_t n, float scale, float* dst) {
  const F v = set1(scale);
  int64_t c = 0;
  for (; c + kRows <= n; c += kRows) store_f(dst + c, mul(load_f(src + c), v));
  if (c < n) store_n(dst + c, mul(load_n(src + c, n - c), v), n - c);
}

// softmax_row (rows.h) of rows [begin, end) of x (C >= 1 columns each): the summing pass keeps its
// exps in prob_out, scaled there by 1 / s.
void softmax_rows_wide(const float* x, int64_t begin, int64_t end, int64_t C, float* log_out, float* prob_out) {
  for (int64_t i = begin; i < end; ++i) {
    const float* row = x + i * C;
    float* prob = prob_out + i * C;
    if (i + 1 < end) prefetch_row(row + C, C);
    const float m = row_max_wide(row, C);
    const float s = sum_exp_wide(row, C, m, prob);
    sub2(row, C, m, rowmath::log1p_nonnegative(rowmath::sub(s, 1.0f)), log_out + i * C);
    scale_row(prob, C, rowmath::div(1.0f, s), prob);
  }
}

// rows::log_softmax_row of a row of C >= 1 columns, in place; `kept` is scratch of C floats.
inline void log_softmax_row_wide(float* x, int64_t C, float* kept) {
  const float m = row_max_wide(x, C);
  const float s = sum_exp_wide(x, C, m, kept);
  sub2(x, C, m, rowmath::log1p_nonnegative(rowmath::sub(s, 1.0f)), x);
}

// log_softmax_rows over rows [begin, end) of a row-major matrix of C columns, in place.
void log_softmax_matrix_rows(float* matrix, int64_t begin, int64_t end, int64_t C, float* tile) {
  if (C >= tile::kWideRecombineColumns) {  // the tile scratch (kRows C floats) holds one row's exps
    for (int64_t i = begin; i < end; ++i) {
      if (i + 1 < end) prefetch_row(matrix + (i + 1) * C, C);
      log_softmax_row_wide(matrix + i * C, C, tile);
    }
    return;
  }
  float* rows[kRows];
  for (int64_t i = begin; i < end; i += kRows) {
    const int n = static_cast<int>(end - i < kRows ? end - i : kRows);
    for (int r = 0; r < n; ++r) rows[r] = matrix + (i + r) * C;
    log_softmax_rows(rows, n, C, tile);
  }
}

// The contributions log v (the recombination, docs/how-it-works.md) of up to kRows rows of C
// logits each (rows::contribution_row, width C), `count` real rows in y (padded with the last), row
// r of expert group g[r]. On return: in_group[starts[r] + k] = log_softmax(y_r) at g[r].classes[k],
// spread[r] = the value of every other class; the tile (kRows C floats) is scratch.
void contributions(const float* const* y, const rows::ExpertGroup* g, int count, int64_t C, float* tile,
                   float* in_group, const int64_t* starts, float* spread) {
  const float* padded[kRows];
  const ExpPass pass = exp_pass(y, count, C, tile, padded);  // the tile holds exp(y - m) now
  const F m = pass.m, log_s = pass.log_s;
  // The group's cells at +0 leave each lane summing the outside classes' exps (rowmath: s_out).
  for (int r = 0; r < count; ++r) {
    for (int64_t k = 0; k < g[r].size; ++k) tile[kRows * g[r].classes[k] + r] = 0.0f;
  }
  const F s_out = sum_exp<Terms::kAsIs>(tile, C, m);
  float ms[kRows], log_ss[kRows], s_outs[kRows], one_pass[kRows];
  store_f(ms, m);
  store_f(log_ss, log_s);
  store_f(s_outs, s_out);
  store_f(one_pass, sub(log_positive_v(s_out), log_s));  // log(1 - q) where s_out >= kOnePassMin
  bool second_pass = false;
  for (int r = 0; r < count; ++r) {
    for (int64_t k = 0; k < g[r].size; ++k) {  // ls at the group's classes: (y - m) - log_s
      in_group[starts[r] + k] = rowmath::sub(rowmath::sub(y[r][g[r].classes[k]], ms[r]), log_ss[r]);
    }
    if (s_outs[r] >= rowmath::kOnePassMin) {
      spread[r] = rowmath::sub(one_pass[r], g[r].log_spread);
    } else {
      second_pass = true;
    }
  }
  if (!second_pass) return;
  // Rows with nothing outside the group, or an outside sum too small to trust: logsumexp of ls over
  // the outside classes, shifted by their maximum (rows::contribution_row's second pass).
  load(padded, C, tile);
  shift_scale(tile, C, m, log_s);  // the tile is log_softmax(y) now
  for (int r = 0; r < count; ++r) {
    for (int64_t k = 0; k < g[r].size; ++k) tile[kRows * g[r].classes[k] + r] = -rows::kInf;
  }
  F shift = max(tile, C);
  shift = zero_where(eq(abs_v(shift), set1(rows::kInf)), shift);  // +-inf -> 0, as the scalar code
  const F log_not_q = add(log_of_sum_v(sum_exp(tile, C, shift)), shift);
  float q[kRows];
  store_f(q, log_not_q);
  for (int r = 0; r < count; ++r) {
    if (!(s_outs[r] >= rowmath::kOnePassMin)) spread[r] = rowmath::sub(q[r], g[r].log_spread);
  }
}

// dst[c] = from[c] + v[c], v = in_group[k] at the group's classes[k] and `spread` elsewhere (one
// float32 add per class, as rows::contribution_row<true>; from may be dst); in_group is overwritten.
inline void accumulate(const float* from, float* dst, int64_t C, const rows::ExpertGroup& g, float* in_group,
                       float spread) {
  for (int64_t k = 0; k < g.size; ++k) in_group[k] = rowmath::add(from[g.classes[k]], in_group[k]);
  add_scalar(from, dst, C, spread);
  for (int64_t k = 0; k < g.size; ++k) dst[g.classes[k]] = in_group[k];
}

// accumulate() for the `count` rows of one contributions() call, in order (rows of one sample add
// in increasing expert order): row r into dst[r], which starts from from[r] (logp's row for a
// sample's first row, dst[r] itself after), with in_group[starts[r]:] and spread[r]. A row of at
// most kRows classes is one register: v built in it (spread, the group's values put in their
// lanes) and added, dst first: the same add per class as accumulate().
void accumulate_rows(const float* const* from, float* const* dst, int count, int64_t C, const rows::ExpertGroup* g,
                     float* in_group, const int64_t* starts, const float* spread) {
  if (C > kRows) {
    for (int r = 0; r < count; ++r) accumulate(from[r], dst[r], C, g[r], in_group + starts[r], spread[r]);
    return;
  }
  // A sample's rows are adjacent: its row stays in a register from its first row to its last (a
  // masked store read back at once by a masked load would wait for the store to complete).
  float* held = nullptr;
  F acc = zero();
  for (int r = 0; r < count; ++r) {
    F v = set1(spread[r]);
    const float* values = in_group + starts[r];
    for (int64_t k = 0; k < g[r].size; ++k) v = put_lane(v, static_cast<int>(g[r].classes[k]), values[k]);
    if (dst[r] != held) {
      if (held != nullptr) store_n(held, acc, C);
      held = dst[r];
      acc = load_n(from[r], C);
    }
    acc = add(acc, v);
  }
  if (held != nullptr) store_n(held, acc, C);
}

// rows::contribution_row<true> of one width-C row y of group g: dst[0:C] = from[0:C] + it, when the
// outside classes' sum allows the one-pass log(1 - q); false (nothing written) otherwise, and the
// caller takes rows.h's second pass. kept and in_group are scratch of C floats; `next` (or null) is
// the row the caller takes next, prefetched.
bool contribute_wide(const float* y, int64_t C, const rows::ExpertGroup& g, float* kept, float* in_group,
                     const float* from, float* dst, const float* next) {
  if (next != nullptr) prefetch_row(next, C);
  const float m = row_max_wide(y, C);
  const float log_s = rowmath::log1p_nonnegative(rowmath::sub(sum_exp_wide(y, C, m, kept), 1.0f));
  for (int64_t k = 0; k < g.size; ++k) kept[g.classes[k]] = 0.0f;  // the group's terms add +0 (s_out)
  const float s_out = lane_sum_wide(kept, C);
  if (!(s_out >= rowmath::kOnePassMin)) return false;
  for (int64_t k = 0; k < g.size; ++k) in_group[k] = rowmath::sub(rowmath::sub(y[g.classes[k]], m), log_s);
  const float spread = rowmath::sub(rowmath::sub(rowmath::log_positive(s_out), log_s), g.log_spread);
  accumulate(from, dst, C, g, in_group, spread);
  return true;
}
