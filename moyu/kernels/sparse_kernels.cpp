// moyu sparse kernels: batch-1 sparse MLP and input-sparse linear for CPU decode.
//
// Decode is memory-bandwidth bound, so every kernel is organised around one rule: a
// skipped neuron (or input channel) costs no weight bytes. moyu/kernels/packing.py lays
// the weights out so that everything one neuron needs is contiguous:
//   w_in  [d_ff, r, d]  r = 2 (gate row, up row) for gated MLPs, r = 1 for plain MLPs
//   w_dt  [d_ff, d]     W_down^T: neuron i's down column as a contiguous row
//   wt    [in, out]     W^T for input-sparse linears: input channel j's column as a row
// Weights are fp32 or bf16; inputs, biases, accumulators and outputs are fp32.
//
// Memory-access shape (measured, see benchmarks/bench_kernels.py):
//  * The kept list is visited in ascending order (an unsorted list is sorted first,
//    through a bitmap): ascending gaps cost far less than random jumps.
//  * One sequential stream is the fastest way to read contiguous weights, but a list with
//    gaps restarts the hardware prefetcher at every kept row, leaving one stream latency
//    bound. Gathered lists are therefore read kGroup rows at a time, interleaved, which
//    keeps several independent misses in flight; contiguous lists go one row at a time.
//  * Each chunk first computes its neurons' coefficients (gate/up rows), then reads the
//    kept neurons' down rows, so each phase picks its own access shape (CATS gate mode
//    keeps gaps in phase 1 even when all neurons are listed). Fusing the two phases per
//    neuron measured no faster; software prefetching measured slower.
// Work is split over the kept list with at::parallel_for (so torch.set_num_threads
// applies); every chunk accumulates into its own partial output and the partials are
// summed at the end. Splitting the output dimension instead (a second parallel region
// whose threads each read a slice of every kept down row) measured 1.2-1.4x slower.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MOYU_AVX2 1
#else
#define MOYU_AVX2 0
#endif

#include "attn_args.h"

namespace moyu {

using moyu_core::AttnArgs;
#include "decode_core.h"

using bf16 = c10::BFloat16;

constexpr int64_t kMaxRows = 8;       // rows of x handled per pass over the weights
constexpr int kGroup = 8;             // rows read interleaved when the kept list has gaps
constexpr int64_t kMinPerChunk = 32;  // fewer kept rows than this per thread: fewer threads

enum Act : int64_t { kSilu = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3 };
enum Mode : int64_t { kAll = 0, kGateMode = 1, kActMode = 2 };

// ------------------------------------------------------------------ element helpers

inline float to_float(float v) { return v; }
inline float to_float(bf16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float activate(float v, int64_t act) {
  switch (act) {
    case kSilu: return v / (1.0f + std::exp(-v));
    case kGelu: return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
    case kGeluTanh: {
      const float inner = 0.79788456080286536f * (v + 0.044715f * v * v * v);
      return 0.5f * v * (1.0f + std::tanh(inner));
    }
    default: return v > 0.0f ? v : 0.0f;
  }
}

#if MOYU_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
// bf16 -> fp32 is a 16-bit left shift of the bit pattern.
inline __m256 load8(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// s[g] = dot(w[g], x) for G rows read interleaved. U accumulators per row keep enough
// independent FMAs in flight when G is small.
template <int G, typename T>
inline void dot_group(const T* const* w, const float* x, int64_t d, float* s) {
  int64_t i = 0;
  for (int g = 0; g < G; ++g) s[g] = 0.0f;
#if MOYU_AVX2
  constexpr int U = G >= 4 ? 1 : 4 / G;
  __m256 acc[G][U];
  for (int g = 0; g < G; ++g)
    for (int u = 0; u < U; ++u) acc[g][u] = _mm256_setzero_ps();
  for (; i + 8 * U <= d; i += 8 * U) {
    for (int u = 0; u < U; ++u) {
      const __m256 xv = _mm256_loadu_ps(x + i + 8 * u);
      for (int g = 0; g < G; ++g) acc[g][u] = _mm256_fmadd_ps(load8(w[g] + i + 8 * u), xv, acc[g][u]);
    }
  }
  for (; i + 8 <= d; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    for (int g = 0; g < G; ++g) acc[g][0] = _mm256_fmadd_ps(load8(w[g] + i), xv, acc[g][0]);
  }
  for (int g = 0; g < G; ++g) {
    __m256 t = acc[g][0];
    for (int u = 1; u < U; ++u) t = _mm256_add_ps(t, acc[g][u]);
    s[g] = hsum(t);
  }
#endif
  for (; i < d; ++i)
    for (int g = 0; g < G; ++g) s[g] += to_float(w[g][i]) * x[i];
}

// y += sum_g a[g] * w[g] for G rows read interleaved.
template <int G, typename T>
inline void axpy_group(const float* a, const T* const* w, float* y, int64_t d) {
  int64_t i = 0;
#if MOYU_AVX2
  __m256 va[G];
  for (int g = 0; g < G; ++g) va[g] = _mm256_set1_ps(a[g]);
  for (; i + 16 <= d; i += 16) {
    __m256 y0 = _mm256_loadu_ps(y + i), y1 = _mm256_loadu_ps(y + i + 8);
    for (int g = 0; g < G; ++g) {
      y0 = _mm256_fmadd_ps(va[g], load8(w[g] + i), y0);
      y1 = _mm256_fmadd_ps(va[g], load8(w[g] + i + 8), y1);
    }
    _mm256_storeu_ps(y + i, y0);
    _mm256_storeu_ps(y + i + 8, y1);
  }
  for (; i + 8 <= d; i += 8) {
    __m256 y0 = _mm256_loadu_ps(y + i);
    for (int g = 0; g < G; ++g) y0 = _mm256_fmadd_ps(va[g], load8(w[g] + i), y0);
    _mm256_storeu_ps(y + i, y0);
  }
#endif
  for (; i < d; ++i) {
    float t = y[i];
    for (int g = 0; g < G; ++g) t += a[g] * to_float(w[g][i]);
    y[i] = t;
  }
}

// Runtime group size (1..kGroup) -> template instantiation.
template <typename T>
inline void dot_n(int n, const T* const* w, const float* x, int64_t d, float* s) {
  switch (n) {
    case 1: dot_group<1>(w, x, d, s); break;
    case 2: dot_group<2>(w, x, d, s); break;
    case 3: dot_group<3>(w, x, d, s); break;
    case 4: dot_group<4>(w, x, d, s); break;
    case 5: dot_group<5>(w, x, d, s); break;
    case 6: dot_group<6>(w, x, d, s); break;
    case 7: dot_group<7>(w, x, d, s); break;
    default: dot_group<8>(w, x, d, s); break;
  }
}

template <typename T>
inline void axpy_n(int n, const float* a, const T* const* w, float* y, int64_t d) {
  switch (n) {
    case 1: axpy_group<1>(a, w, y, d); break;
    case 2: axpy_group<2>(a, w, y, d); break;
    case 3: axpy_group<3>(a, w, y, d); break;
    case 4: axpy_group<4>(a, w, y, d); break;
    case 5: axpy_group<5>(a, w, y, d); break;
    case 6: axpy_group<6>(a, w, y, d); break;
    case 7: axpy_group<7>(a, w, y, d); break;
    default: axpy_group<8>(a, w, y, d); break;
  }
}

// ------------------------------------------------------------------ scratch and lists

// Scratch owned by the calling thread (each Python thread gets its own), reused across
// calls so the decode path does not allocate.
template <typename V, int Slot>
V* scratch(int64_t count) {
  thread_local std::vector<V> buf;
  if (static_cast<int64_t>(buf.size()) < count) buf.resize(count);
  return buf.data();
}

struct KeptList {
  const int64_t* ids;
  int64_t k;
  bool contiguous;  // ids are 0..k-1 (or one unbroken run): read one row at a time
};

// Copies idx into out as int64 after a bounds check; returns whether it is ascending.
template <typename I>
bool copy_checked(const I* src, int64_t k, int64_t limit, int64_t* out) {
  bool ascending = true, in_range = true;
  int64_t prev = -1;
  for (int64_t q = 0; q < k; ++q) {
    const int64_t v = static_cast<int64_t>(src[q]);
    in_range = in_range && v >= 0 && v < limit;
    ascending = ascending && v >= prev;
    prev = v;
    out[q] = v;
  }
  if (!in_range)
    for (int64_t q = 0; q < k; ++q)
      TORCH_CHECK(out[q] >= 0 && out[q] < limit, "index ", out[q], " out of range [0, ", limit, ")");
  return ascending;
}

// Sorts distinct ids in [0, limit) through a bitmap: O(k + limit / 64), a few hundred
// nanoseconds for a decode-sized layer. Returns false (ids untouched) on a duplicate.
bool bitmap_sort(int64_t* ids, int64_t k, int64_t limit) {
  const int64_t words = (limit + 63) / 64;
  uint64_t* bits = scratch<uint64_t, 1>(words);
  std::memset(bits, 0, words * sizeof(uint64_t));
  for (int64_t q = 0; q < k; ++q) {
    const uint64_t mask = uint64_t{1} << (ids[q] & 63);
    if (bits[ids[q] >> 6] & mask) return false;
    bits[ids[q] >> 6] |= mask;
  }
  int64_t p = 0;
  for (int64_t w = 0; w < words; ++w)
    for (uint64_t b = bits[w]; b != 0; b &= b - 1) ids[p++] = w * 64 + __builtin_ctzll(b);
  return true;
}

// Ascending copy of idx (duplicates kept) after checking bounds; idx None -> 0..limit-1.
KeptList sorted_ids(const c10::optional<at::Tensor>& idx_opt, int64_t limit) {
  if (!idx_opt.has_value()) {
    int64_t* out = scratch<int64_t, 0>(limit);
    for (int64_t i = 0; i < limit; ++i) out[i] = i;
    return {out, limit, true};
  }
  const at::Tensor idx = idx_opt->contiguous();
  TORCH_CHECK(idx.dim() == 1, "idx must be 1-D, got ", idx.sizes());
  const int64_t k = idx.numel();
  int64_t* out = scratch<int64_t, 0>(std::max<int64_t>(k, 1));
  bool ascending;
  if (idx.scalar_type() == at::kLong)
    ascending = copy_checked(idx.data_ptr<int64_t>(), k, limit, out);
  else if (idx.scalar_type() == at::kInt)
    ascending = copy_checked(idx.data_ptr<int32_t>(), k, limit, out);
  else
    TORCH_CHECK(false, "idx must be int64 or int32, got ", idx.scalar_type());
  if (!ascending && !bitmap_sort(out, k, limit)) std::sort(out, out + k);
  const bool run = k > 0 && out[k - 1] - out[0] == k - 1;
  return {out, k, run};
}

inline int64_t num_chunks(int64_t k) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return std::max<int64_t>(1, std::min<int64_t>(threads, k / kMinPerChunk));
}

// out[r, :] = bias + sum_c partial[c][r, :]
inline void reduce_partials(const float* partials, int64_t nchunks, int64_t rows, int64_t width,
                            const float* bias, float* out) {
  const int64_t total = rows * width;
  for (int64_t r = 0; r < rows; ++r) {
    float* o = out + r * width;
    if (bias) std::memcpy(o, bias, width * sizeof(float));
    else std::memset(o, 0, width * sizeof(float));
  }
  for (int64_t c = 0; c < nchunks; ++c) {
    const float* p = partials + c * total;
    for (int64_t j = 0; j < total; ++j) out[j] += p[j];
  }
}

// Runs body(lo, hi, acc) over [0, k) split into chunks, each with a zeroed accumulator
// of rows x width floats; writes bias + the sum of the accumulators to out and returns
// the sum of body's return values.
template <typename Body>
int64_t run_chunked(int64_t k, int64_t rows, int64_t width, const float* bias, float* out,
                    const Body& body) {
  const int64_t nchunks = num_chunks(k);
  const int64_t total = rows * width;
  float* partials = scratch<float, 2>(nchunks * total);
  int64_t* counts = scratch<int64_t, 3>(nchunks);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      float* acc = partials + c * total;
      std::memset(acc, 0, total * sizeof(float));
      counts[c] = body(k * c / nchunks, k * (c + 1) / nchunks, acc);
    }
  });
  reduce_partials(partials, nchunks, rows, width, bias, out);
  int64_t kept = 0;
  for (int64_t c = 0; c < nchunks; ++c) kept += counts[c];
  return kept;
}

// ------------------------------------------------------------------ MLP

template <typename T>
struct MlpArgs {
  const float* x;      // [rows, d]
  int64_t rows, d;
  const T* w_in;       // [d_ff, r, d]
  const T* w_dt;       // [d_ff, d]
  int64_t r;           // 2 gated, 1 plain
  const float* b_in;   // [d_ff, r] or null
  int64_t act;
  int64_t mode;        // kAll: every listed neuron; kGateMode / kActMode: threshold
  float tau;
};

// Coefficients of neurons ids[0..n) for every row. Neurons kept by some row are appended
// to kept_ids / kept_coef (coef layout [row][slot], stride `stride`, zero where a row
// drops the neuron); returns how many were appended.
template <typename T>
int mlp_coefficients(const MlpArgs<T>& a, const int64_t* ids, int n, int64_t* kept_ids,
                     float* kept_coef, int64_t stride) {
  const int64_t d = a.d;
  const bool gated = a.r == 2;
  const T* rows_in[kGroup];
  const T* up[kGroup];
  for (int g = 0; g < n; ++g) {
    rows_in[g] = a.w_in + ids[g] * a.r * d;
    up[g] = rows_in[g] + (a.r - 1) * d;
  }
  float coef[kMaxRows][kGroup];
  bool keep[kMaxRows][kGroup];
  bool need_up[kGroup];
  for (int g = 0; g < n; ++g) need_up[g] = !(gated && a.mode == kGateMode);
  if (gated) {
    float s[kGroup];
    for (int64_t q = 0; q < a.rows; ++q) {
      dot_n(n, rows_in, a.x + q * d, d, s);
      for (int g = 0; g < n; ++g) {
        const float b = a.b_in ? a.b_in[ids[g] * 2] : 0.0f;
        coef[q][g] = activate(s[g] + b, a.act);
        keep[q][g] = a.mode != kGateMode || std::fabs(coef[q][g]) > a.tau;
        need_up[g] = need_up[g] || keep[q][g];
      }
    }
  }
  // Up rows only for neurons some row still needs, read as one interleaved group.
  int slot[kGroup];
  const T* up_rows[kGroup];
  int m = 0;
  for (int g = 0; g < n; ++g)
    if (need_up[g]) {
      slot[m] = g;
      up_rows[m++] = up[g];
    }
  if (m == 0) return 0;
  float s[kGroup];
  for (int64_t q = 0; q < a.rows; ++q) {
    dot_n(m, up_rows, a.x + q * d, d, s);
    for (int j = 0; j < m; ++j) {
      const int g = slot[j];
      const float u = s[j] + (a.b_in ? a.b_in[ids[g] * a.r + a.r - 1] : 0.0f);
      if (gated) {
        coef[q][g] *= u;
      } else {
        coef[q][g] = activate(u, a.act);
        keep[q][g] = true;
      }
      if (a.mode == kActMode || (!gated && a.mode == kGateMode))
        keep[q][g] = std::fabs(coef[q][g]) > a.tau;
    }
  }
  int appended = 0;
  for (int j = 0; j < m; ++j) {
    const int g = slot[j];
    bool any = false;
    for (int64_t q = 0; q < a.rows; ++q) any = any || keep[q][g];
    if (!any) continue;
    kept_ids[appended] = ids[g];
    for (int64_t q = 0; q < a.rows; ++q) kept_coef[q * stride + appended] = keep[q][g] ? coef[q][g] : 0.0f;
    ++appended;
  }
  return appended;
}

// acc[q] += sum_p coef[q][p] * w_dt[ids[p]] over p in [0, n).
template <typename T>
void mlp_down(const MlpArgs<T>& a, const int64_t* ids, const float* coef, int64_t stride,
              int64_t n, int group, float* acc) {
  const T* rows[kGroup];
  for (int64_t p = 0; p < n; p += group) {
    const int m = static_cast<int>(std::min<int64_t>(group, n - p));
    for (int g = 0; g < m; ++g) rows[g] = a.w_dt + ids[p + g] * a.d;
    for (int64_t q = 0; q < a.rows; ++q) axpy_n(m, coef + q * stride + p, rows, acc + q * a.d, a.d);
  }
}

template <typename T>
int64_t mlp_run(const MlpArgs<T>& a, const KeptList& list, const float* b_down, float* out) {
  // Gate/up rows form one unbroken stream only when every listed neuron's full w_in
  // block is read; CATS gate mode on a gated MLP reads gate rows with the up rows as gaps.
  const bool in_stream = list.contiguous && !(a.r == 2 && a.mode == kGateMode);
  const int in_group = in_stream ? 1 : kGroup;
  const int64_t stride = std::max<int64_t>(list.k, 1);
  int64_t* kept_ids = scratch<int64_t, 4>(stride);
  float* coef = scratch<float, 5>(a.rows * stride);
  return run_chunked(list.k, a.rows, a.d, b_down, out, [&](int64_t lo, int64_t hi, float* acc) {
    int64_t kept = 0;
    for (int64_t p = lo; p < hi; p += in_group) {
      const int n = static_cast<int>(std::min<int64_t>(in_group, hi - p));
      kept += mlp_coefficients(a, list.ids + p, n, kept_ids + lo + kept, coef + lo + kept, stride);
    }
    const int down_group = (list.contiguous && kept == hi - lo) ? 1 : kGroup;
    mlp_down(a, kept_ids + lo, coef + lo, stride, kept, down_group, acc);
    return kept;
  });
}

// ------------------------------------------------------------------ input-sparse linear

template <typename T>
struct LinearArgs {
  const float* x;  // [rows, in]
  int64_t rows, in, out;
  const T* wt;     // [in, out]
  bool masked;     // tau mode: a row whose |x_j| <= tau skips channel j
  float tau;
};

template <typename T>
void linear_run(const LinearArgs<T>& a, const KeptList& list, const float* bias, float* out) {
  const int group = list.contiguous ? 1 : kGroup;
  run_chunked(list.k, a.rows, a.out, bias, out, [&](int64_t lo, int64_t hi, float* acc) {
    const T* cols[kGroup];
    float coef[kGroup];
    for (int64_t p = lo; p < hi; p += group) {
      const int m = static_cast<int>(std::min<int64_t>(group, hi - p));
      for (int g = 0; g < m; ++g) cols[g] = a.wt + list.ids[p + g] * a.out;
      for (int64_t q = 0; q < a.rows; ++q) {
        for (int g = 0; g < m; ++g) {
          const float c = a.x[q * a.in + list.ids[p + g]];
          coef[g] = (a.masked && !(std::fabs(c) > a.tau)) ? 0.0f : c;
        }
        axpy_n(m, coef, cols, acc + q * a.out, a.out);
      }
    }
    return int64_t{0};
  });
}

// Channels where some row has |x_j| > tau, ascending.
KeptList threshold_ids(const float* x, int64_t rows, int64_t in, float tau) {
  int64_t* out = scratch<int64_t, 0>(std::max<int64_t>(in, 1));
  int64_t k = 0;
  for (int64_t j = 0; j < in; ++j)
    for (int64_t q = 0; q < rows; ++q)
      if (std::fabs(x[q * in + j]) > tau) {
        out[k++] = j;
        break;
      }
  return {out, k, k > 0 && out[k - 1] - out[0] == k - 1};
}

// ------------------------------------------------------------------ tensor plumbing

at::Tensor as_rows(const at::Tensor& x, int64_t width, const char* what) {
  TORCH_CHECK(x.dim() == 1 || x.dim() == 2, what, ": x must be [", width, "] or [n, ", width,
              "], got ", x.sizes());
  TORCH_CHECK(x.size(-1) == width, what, ": x has ", x.size(-1), " features, expected ", width);
  TORCH_CHECK(x.device().is_cpu(), what, ": CPU tensors only");
  return x.to(at::kFloat).contiguous();
}

at::Tensor output_for(const at::Tensor& x, int64_t width, const c10::optional<at::Tensor>& out) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = width;
  if (out.has_value()) {
    const at::Tensor& o = *out;
    TORCH_CHECK(o.scalar_type() == at::kFloat && o.is_contiguous() && o.sizes() == shape,
                "out must be a contiguous float32 tensor of shape ", shape);
    return o;
  }
  return at::empty(shape, x.options().dtype(at::kFloat));
}

void check_weights(const at::Tensor& w, const char* what) {
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous(), what,
              " must be a contiguous CPU tensor (use moyu.kernels.pack_*)");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, what,
              " must be float32 or bfloat16");
}

const float* bias_ptr(const c10::optional<at::Tensor>& b, int64_t numel, const char* what) {
  if (!b.has_value()) return nullptr;
  TORCH_CHECK(b->scalar_type() == at::kFloat && b->is_contiguous() && b->numel() == numel, what,
              " must be a contiguous float32 tensor with ", numel, " elements");
  return b->data_ptr<float>();
}

template <typename T>
int64_t mlp_dispatch(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& w_dt,
                     const float* b_in, const float* b_down, const KeptList& list, int64_t act,
                     int64_t mode, double tau, at::Tensor& out) {
  const int64_t d = w_in.size(2);
  const int64_t rows = x.dim() == 1 ? 1 : x.size(0);
  MlpArgs<T> a{nullptr, 0, d, w_in.data_ptr<T>(), w_dt.data_ptr<T>(), w_in.size(1),
               b_in, act, mode, static_cast<float>(tau)};
  int64_t kept = 0;
  for (int64_t q0 = 0; q0 < rows; q0 += kMaxRows) {
    a.x = x.data_ptr<float>() + q0 * d;
    a.rows = std::min(kMaxRows, rows - q0);
    kept = std::max(kept, mlp_run(a, list, b_down, out.data_ptr<float>() + q0 * d));
  }
  return kept;
}

std::tuple<at::Tensor, int64_t> mlp_impl(const at::Tensor& x_in, const at::Tensor& w_in,
                                         const at::Tensor& w_dt, const c10::optional<at::Tensor>& b_in,
                                         const c10::optional<at::Tensor>& b_down,
                                         const c10::optional<at::Tensor>& idx, int64_t act,
                                         int64_t mode, double tau,
                                         const c10::optional<at::Tensor>& out_opt) {
  check_weights(w_in, "w_in");
  check_weights(w_dt, "w_down_t");
  TORCH_CHECK(w_in.dim() == 3 && (w_in.size(1) == 1 || w_in.size(1) == 2),
              "w_in must be [d_ff, 1 or 2, d]");
  TORCH_CHECK(w_dt.dim() == 2 && w_dt.size(0) == w_in.size(0) && w_dt.size(1) == w_in.size(2) &&
                  w_dt.scalar_type() == w_in.scalar_type(),
              "w_down_t must be [d_ff, d] with the dtype of w_in");
  TORCH_CHECK(act >= kSilu && act <= kRelu, "unknown activation id ", act);
  const int64_t d_ff = w_in.size(0), d = w_in.size(2);
  at::Tensor x = as_rows(x_in, d, "sparse_mlp");
  at::Tensor out = output_for(x, d, out_opt);
  const float* bi = bias_ptr(b_in, d_ff * w_in.size(1), "b_in");
  const float* bd = bias_ptr(b_down, d, "b_down");
  const KeptList list = sorted_ids(idx, d_ff);
  int64_t kept;
  if (w_in.scalar_type() == at::kFloat)
    kept = mlp_dispatch<float>(x, w_in, w_dt, bi, bd, list, act, mode, tau, out);
  else
    kept = mlp_dispatch<bf16>(x, w_in, w_dt, bi, bd, list, act, mode, tau, out);
  return {out, kept};
}

at::Tensor sparse_mlp(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& w_dt,
                      const c10::optional<at::Tensor>& b_in, const c10::optional<at::Tensor>& b_down,
                      const c10::optional<at::Tensor>& idx, int64_t act,
                      const c10::optional<at::Tensor>& out) {
  return std::get<0>(mlp_impl(x, w_in, w_dt, b_in, b_down, idx, act, kAll, 0.0, out));
}

std::tuple<at::Tensor, int64_t> sparse_mlp_threshold(const at::Tensor& x, const at::Tensor& w_in,
                                                     const at::Tensor& w_dt,
                                                     const c10::optional<at::Tensor>& b_in,
                                                     const c10::optional<at::Tensor>& b_down,
                                                     int64_t act, double tau, int64_t mode,
                                                     const c10::optional<at::Tensor>& out) {
  TORCH_CHECK(mode == kGateMode || mode == kActMode, "unknown threshold mode ", mode);
  return mlp_impl(x, w_in, w_dt, b_in, b_down, c10::nullopt, act, mode, tau, out);
}

template <typename T>
void linear_dispatch(const at::Tensor& x, const at::Tensor& wt, const float* bias,
                     const c10::optional<at::Tensor>& idx, c10::optional<double> tau,
                     at::Tensor& out) {
  const int64_t in = wt.size(0), width = wt.size(1);
  const int64_t rows = x.dim() == 1 ? 1 : x.size(0);
  const bool by_tau = !idx.has_value() && tau.has_value();
  KeptList list{nullptr, 0, true};
  if (!by_tau) list = sorted_ids(idx, in);
  for (int64_t q0 = 0; q0 < rows; q0 += kMaxRows) {
    LinearArgs<T> a{x.data_ptr<float>() + q0 * in, std::min(kMaxRows, rows - q0), in, width,
                    wt.data_ptr<T>(), by_tau, by_tau ? static_cast<float>(*tau) : 0.0f};
    if (by_tau) list = threshold_ids(a.x, a.rows, in, a.tau);
    linear_run(a, list, bias, out.data_ptr<float>() + q0 * width);
  }
}

at::Tensor input_sparse_linear(const at::Tensor& x_in, const at::Tensor& wt,
                               const c10::optional<at::Tensor>& b,
                               const c10::optional<at::Tensor>& idx, c10::optional<double> tau,
                               const c10::optional<at::Tensor>& out_opt) {
  check_weights(wt, "wt");
  TORCH_CHECK(wt.dim() == 2, "wt must be [in, out]");
  at::Tensor x = as_rows(x_in, wt.size(0), "input_sparse_linear");
  at::Tensor out = output_for(x, wt.size(1), out_opt);
  const float* bias = bias_ptr(b, wt.size(1), "b");
  if (wt.scalar_type() == at::kFloat) linear_dispatch<float>(x, wt, bias, idx, tau, out);
  else linear_dispatch<bf16>(x, wt, bias, idx, tau, out);
  return out;
}

// ------------------------------------------------------------------ row-major matvec
// y = W x (+ b) for a decode position over a row-major W [out, in] (the lm_head of a large
// vocabulary): every output is one dot product with x held in L1, kGroup rows read side by
// side. The input-sparse form (W^T rows scaled into y) keeps rewriting y, which no longer
// fits in L2 once out x 4 bytes passes a few hundred KB (a 152k-token head: 600 KB).
// Prefetching the rows two to eight groups ahead measured no faster (bf16 and fp32).
template <typename T>
void rows_matvec_impl(const T* w, const float* x, int64_t rows, int64_t d, const float* b, float* y) {
  at::parallel_for(0, (rows + kGroup - 1) / kGroup, 16, [&](int64_t g0, int64_t g1) {
    const T* ptrs[kGroup];
    float s[kGroup];
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t r0 = g * kGroup;
      const int m = static_cast<int>(std::min<int64_t>(kGroup, rows - r0));
      for (int t = 0; t < m; ++t) ptrs[t] = w + (r0 + t) * d;
      dot_n(m, ptrs, x, d, s);
      for (int t = 0; t < m; ++t) y[r0 + t] = b ? s[t] + b[r0 + t] : s[t];
    }
  });
}

at::Tensor rows_matvec(const at::Tensor& x_in, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       const c10::optional<at::Tensor>& out_opt) {
  check_weights(w, "w");
  TORCH_CHECK(w.dim() == 2, "rows_matvec: w must be [out, in], got ", w.sizes());
  const int64_t rows = w.size(0), d = w.size(1);
  const at::Tensor x = as_rows(x_in, d, "rows_matvec");
  TORCH_CHECK(x.dim() == 1, "rows_matvec: one position [in] at a time");
  at::Tensor out = output_for(x, rows, out_opt);
  const float* b = bias_ptr(bias, rows, "bias");
  if (w.scalar_type() == at::kFloat) rows_matvec_impl(w.data_ptr<float>(), x.data_ptr<float>(), rows, d, b, out.data_ptr<float>());
  else rows_matvec_impl(w.data_ptr<bf16>(), x.data_ptr<float>(), rows, d, b, out.data_ptr<float>());
  return out;
}

// ------------------------------------------------------------------ sketch (moyu's own method)
//
// Every neuron is scored from an int8 copy of its gate/up rows ("the sketch", a quarter of
// the fp32 bytes, read as one sequential stream): g~, u~ = codes . x * scale + b,
// a~ = act(g~) * u~ (plain MLPs: act(u~)), score = |a~| * ||W_down[:, i]||. Neurons with
// score > tau are kept; then either their exact activations are computed from the fp32/bf16
// rows (exact mode), or a~ itself is used and only their down rows are read (reuse mode).
// sketch_act (batched, for evaluation) and the decode kernel share sketch_block, one
// non-inlined function, so both produce bit-identical a~ and select the same neurons.

struct SketchArgs {
  const int8_t* codes;   // [d_ff, r, d]
  const float* scales;   // [d_ff, r]
  const float* bias;     // [d_ff, r] or null
  int64_t r, d, act;
};

// dot(codes row, x) with a fixed accumulation order (independent of the caller).
inline float dot_i8(const int8_t* w, const float* x, int64_t d) {
  int64_t i = 0;
  float s = 0.0f;
#if MOYU_AVX2
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (; i + 32 <= d; i += 32)
    for (int u = 0; u < 4; ++u) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + i + 8 * u));
      const __m256 wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
      acc[u] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x + i + 8 * u), acc[u]);
    }
  for (; i + 8 <= d; i += 8) {
    const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + i));
    acc[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), _mm256_loadu_ps(x + i), acc[0]);
  }
  s = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
#endif
  for (; i < d; ++i) s += static_cast<float>(w[i]) * x[i];
  return s;
}

// a~ of neurons [lo, hi) for one row x into a_out[0 .. hi-lo).
__attribute__((noinline)) void sketch_block(const SketchArgs& a, const float* x, int64_t lo,
                                            int64_t hi, float* a_out) {
  for (int64_t i = lo; i < hi; ++i) {
    const int8_t* w = a.codes + i * a.r * a.d;
    float pre[2];
    for (int64_t j = 0; j < a.r; ++j) {
      const float dot = dot_i8(w + j * a.d, x, a.d);
      const float scaled = dot * a.scales[i * a.r + j];
      pre[j] = a.bias ? scaled + a.bias[i * a.r + j] : scaled;
    }
    const float g = activate(pre[0], a.act);
    a_out[i - lo] = a.r == 2 ? g * pre[1] : g;
  }
}

SketchArgs sketch_args(const at::Tensor& codes, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias, int64_t act) {
  TORCH_CHECK(codes.scalar_type() == at::kChar && codes.dim() == 3 && codes.is_contiguous() &&
                  (codes.size(1) == 1 || codes.size(1) == 2),
              "sketch codes must be a contiguous int8 tensor [d_ff, 1 or 2, d]");
  const int64_t d_ff = codes.size(0), r = codes.size(1);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == d_ff * r,
              "sketch scales must be float32 [d_ff, r]");
  TORCH_CHECK(act >= kSilu && act <= kRelu, "unknown activation id ", act);
  return {codes.data_ptr<int8_t>(), scales.data_ptr<float>(), bias_ptr(bias, d_ff * r, "sketch bias"),
          r, codes.size(2), act};
}

// a~ for every row and neuron: [n, d_ff] (evaluation path).
at::Tensor sketch_act(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& scales,
                      const c10::optional<at::Tensor>& bias, int64_t act) {
  const SketchArgs a = sketch_args(codes, scales, bias, act);
  const at::Tensor x = as_rows(x_in, a.d, "sketch_act").reshape({-1, a.d});
  const int64_t n = x.size(0), d_ff = codes.size(0);
  at::Tensor out = at::empty({n, d_ff}, x.options().dtype(at::kFloat));
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  constexpr int64_t kBlock = 64;  // neurons per task: their codes stay in L1/L2 across rows
  at::parallel_for(0, (d_ff + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> tmp(kBlock);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t lo = b * kBlock, hi = std::min(d_ff, lo + kBlock);
      for (int64_t q = 0; q < n; ++q) {
        sketch_block(a, xp + q * a.d, lo, hi, tmp.data());
        std::memcpy(op + q * d_ff + lo, tmp.data(), (hi - lo) * sizeof(float));
      }
    }
  });
  return out;
}

// One row: score all neurons, keep score > tau; kept ids ascending in ids, a~ in coef.
int64_t sketch_select(const SketchArgs& a, const float* x, const float* down_norm, float tau,
                      int64_t d_ff, int64_t* ids, float* coef) {
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), d_ff / 256));
  float* vals = scratch<float, 6>(d_ff);
  int64_t* counts = scratch<int64_t, 7>(nchunks);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t lo = d_ff * c / nchunks, hi = d_ff * (c + 1) / nchunks;
      sketch_block(a, x, lo, hi, vals + lo);
      int64_t k = lo;  // compact in place: kept ids and a~ at [lo, lo + count)
      for (int64_t i = lo; i < hi; ++i) {
        const float v = vals[i];
        if (std::fabs(v) * down_norm[i] > tau) {
          ids[k] = i;
          coef[k++] = v;
        }
      }
      counts[c] = k - lo;
    }
  });
  int64_t k = 0;
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t lo = d_ff * c / nchunks;
    std::memmove(ids + k, ids + lo, counts[c] * sizeof(int64_t));
    std::memmove(coef + k, coef + lo, counts[c] * sizeof(float));
    k += counts[c];
  }
  return k;
}

template <typename T>
void sketch_down(const T* w_dt, int64_t d, const int64_t* ids, const float* coef, int64_t k,
                 const float* b_down, float* out) {
  run_chunked(k, 1, d, b_down, out, [&](int64_t lo, int64_t hi, float* acc) {
    const T* rows[kGroup];
    for (int64_t p = lo; p < hi; p += kGroup) {
      const int m = static_cast<int>(std::min<int64_t>(kGroup, hi - p));
      for (int g = 0; g < m; ++g) rows[g] = w_dt + ids[p + g] * d;
      axpy_n(m, coef + p, rows, acc, d);
    }
    return hi - lo;
  });
}

// Decode: y = sum over kept neurons of a_i * W_down[:, i] (+ b_down), per row of x.
// exact: a_i recomputed from w_in; reuse: a_i = a~_i. Returns (y, max kept over rows).
std::tuple<at::Tensor, int64_t> sketch_mlp(const at::Tensor& x_in, const at::Tensor& codes,
                                           const at::Tensor& scales,
                                           const c10::optional<at::Tensor>& sk_bias,
                                           const at::Tensor& down_norm, double tau,
                                           const at::Tensor& w_in, const at::Tensor& w_dt,
                                           const c10::optional<at::Tensor>& b_in,
                                           const c10::optional<at::Tensor>& b_down, int64_t act,
                                           bool reuse, const c10::optional<at::Tensor>& out_opt) {
  const SketchArgs a = sketch_args(codes, scales, sk_bias, act);
  check_weights(w_in, "w_in");
  check_weights(w_dt, "w_down_t");
  const int64_t d_ff = codes.size(0), d = a.d;
  TORCH_CHECK(w_in.dim() == 3 && w_in.size(0) == d_ff && w_in.size(1) == a.r && w_in.size(2) == d &&
                  w_dt.dim() == 2 && w_dt.size(0) == d_ff && w_dt.size(1) == d &&
                  w_dt.scalar_type() == w_in.scalar_type(),
              "sketch_mlp: weights do not match the sketch's shape");
  TORCH_CHECK(down_norm.scalar_type() == at::kFloat && down_norm.is_contiguous() && down_norm.numel() == d_ff,
              "down_norm must be float32 [d_ff]");
  const at::Tensor x = as_rows(x_in, d, "sketch_mlp");
  at::Tensor out = output_for(x, d, out_opt);
  const float* bi = bias_ptr(b_in, d_ff * a.r, "b_in");
  const float* bd = bias_ptr(b_down, d, "b_down");
  const int64_t rows = x.dim() == 1 ? 1 : x.size(0);
  int64_t* ids = scratch<int64_t, 8>(d_ff);
  float* coef = scratch<float, 9>(d_ff);
  int64_t kept_max = 0;
  for (int64_t q = 0; q < rows; ++q) {
    const float* xq = x.data_ptr<float>() + q * d;
    float* oq = out.data_ptr<float>() + q * d;
    const int64_t k = sketch_select(a, xq, down_norm.data_ptr<float>(), static_cast<float>(tau), d_ff, ids, coef);
    kept_max = std::max(kept_max, k);
    if (reuse) {
      if (w_dt.scalar_type() == at::kFloat) sketch_down<float>(w_dt.data_ptr<float>(), d, ids, coef, k, bd, oq);
      else sketch_down<bf16>(w_dt.data_ptr<bf16>(), d, ids, coef, k, bd, oq);
    } else {
      const KeptList list{ids, k, k > 0 && ids[k - 1] - ids[0] == k - 1};
      if (w_in.scalar_type() == at::kFloat) {
        MlpArgs<float> m{xq, 1, d, w_in.data_ptr<float>(), w_dt.data_ptr<float>(), a.r, bi, act, kAll, 0.0f};
        mlp_run(m, list, bd, oq);
      } else {
        MlpArgs<bf16> m{xq, 1, d, w_in.data_ptr<bf16>(), w_dt.data_ptr<bf16>(), a.r, bi, act, kAll, 0.0f};
        mlp_run(m, list, bd, oq);
      }
    }
  }
  return {out, kept_max};
}

// ------------------------------------------------------------------ RMSNorm
// y = x / sqrt(mean(x^2) + eps) * w per row of width d. At decode sizes (one row of a few
// hundred floats) ATen's rms_norm costs ~50 us of dispatch; this loop costs ~1 us, and the
// runtime calls it twice per layer per token.
at::Tensor rms_norm(const at::Tensor& x_in, const c10::optional<at::Tensor>& weight, double eps) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat, "rms_norm: float32 CPU x");
  const at::Tensor x = x_in.contiguous();
  const int64_t d = x.size(-1), rows = d ? x.numel() / d : 0;
  const float* w = bias_ptr(weight, d, "rms_norm weight");
  at::Tensor out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t q = 0; q < rows; ++q) rms_row(xp + q * d, w, d, eps, op + q * d);
  return out;
}

// ------------------------------------------------------------------ decode attention
// One new position of causal attention for every head, with the KV-cache write and the
// rotary embedding fused in. At batch 1 the arithmetic is microseconds; what it replaces
// is ~15 ATen calls per layer (views, RoPE, cache copies, bmm, softmax, bmm) whose
// dispatch and parallel-region entry cost ~50-80 us per layer. Heads run on the calling
// thread until heads x positions x head_dim reaches 2^15, then split over the threads.
//   q [H*hd], k/v [Hkv*hd] (contiguous, e.g. slices of the fused qkv output)
//   kc/vc [Hkv, S, hd] (the layer's cache; row `pos` is written here)
//   cos/sin [half] or None: rotate-half RoPE over the first 2*half dims of q and k
// Scores of positions lo..pos: s = (scale * q) . k, optionally softcap * tanh(s / softcap),
// softmax, then the weighted sum of v. Head h reads kv head h / (H / Hkv). The work is
// decode_core.h's attend, which the fused quantized decode loop shares: both give the same bits.
at::Tensor attn_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       at::Tensor& kc, at::Tensor& vc, int64_t pos, int64_t lo,
                       const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin,
                       double scale, double softcap) {
  const at::Tensor* tensors[] = {&q, &k, &v, &kc, &vc};
  for (const at::Tensor* t : tensors)
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "attn_decode: q, k, v and the caches must be contiguous float32 CPU tensors");
  TORCH_CHECK(kc.dim() == 3 && vc.sizes() == kc.sizes(), "attn_decode: caches must be [Hkv, S, hd]");
  const int64_t n_kv = kc.size(0), S = kc.size(1), hd = kc.size(2);
  TORCH_CHECK(k.numel() == n_kv * hd && v.numel() == n_kv * hd && q.numel() % (n_kv * hd) == 0,
              "attn_decode: q/k/v sizes do not match the cache's heads");
  TORCH_CHECK(0 <= lo && lo <= pos && pos < S, "attn_decode: need 0 <= lo <= pos < cache length");
  const int64_t H = q.numel() / hd;
  const float* cs = nullptr;
  const float* sn = nullptr;
  int64_t half = 0;
  if (cos.has_value()) {
    TORCH_CHECK(sin.has_value() && cos->is_contiguous() && sin->is_contiguous() &&
                cos->scalar_type() == at::kFloat && sin->scalar_type() == at::kFloat &&
                cos->numel() == sin->numel() && 2 * cos->numel() <= hd,
                "attn_decode: cos/sin must be contiguous float32 [half] with 2*half <= head_dim");
    cs = cos->data_ptr<float>();
    sn = sin->data_ptr<float>();
    half = cos->numel();
  }
  at::Tensor out = at::empty({H * hd}, q.options());
  const AttnArgs args{kc.data_ptr<float>(), vc.data_ptr<float>(), S, hd, n_kv, H, pos, lo, cs, sn, half,
                      static_cast<float>(scale), static_cast<float>(softcap)};
  const int64_t n = pos - lo + 1;
  std::vector<float> scratch(H * hd + H * n);
  attend_prepare(args, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), scratch.data());
  at::parallel_for(0, H, attend_grain(H, n, hd), [&](int64_t h0, int64_t h1) {
    attend_heads(args, scratch.data(), h0, h1, out.data_ptr<float>(), scratch.data() + H * hd);
  });
  return out;
}

bool has_avx2() { return MOYU_AVX2 != 0; }

}  // namespace moyu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moyu sparse CPU kernels";
  // The GIL is released while a kernel runs so other Python threads keep going.
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("sparse_mlp", &moyu::sparse_mlp, "sparse MLP over a kept neuron list", release());
  m.def("sparse_mlp_threshold", &moyu::sparse_mlp_threshold, "CATS-style thresholded sparse MLP",
        release());
  m.def("input_sparse_linear", &moyu::input_sparse_linear, "input-sparse linear (TEAL/WINA)",
        release());
  m.def("rows_matvec", &moyu::rows_matvec, "y = W x (+ b) over a row-major float32/bfloat16 W, one position",
        release());
  m.def("sketch_act", &moyu::sketch_act, "int8-sketch activations a~ of every neuron", release());
  m.def("sketch_mlp", &moyu::sketch_mlp, "sketch-selected sparse MLP (exact or reuse)", release());
  m.def("rms_norm", &moyu::rms_norm, "RMSNorm of float32 rows (decode-sized)");
  m.def("attn_decode", &moyu::attn_decode, "one decode position of attention, RoPE and cache write fused");
  m.def("has_avx2", &moyu::has_avx2, "whether the AVX2/FMA code path was compiled");
}
