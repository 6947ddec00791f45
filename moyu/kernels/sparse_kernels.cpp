// moyu sparse kernels: batch-1 sparse MLP and input-sparse linear for CPU decode.
//
// Decode is memory-bandwidth bound, so every kernel here is organised around one rule:
// a skipped neuron (or input channel) costs no weight bytes. Weights are pre-packed by
// moyu/kernels/packing.py so that everything one neuron needs is contiguous:
//   w_in  [d_ff, r, d]  r = 2 (gate row, up row) for gated MLPs, r = 1 for plain MLPs
//   w_dt  [d_ff, d]     W_down^T: neuron i's down column as a contiguous row
//   wt    [in, out]     W^T for input-sparse linears: input channel j's column as a row
// Weights are fp32 or bf16; inputs, biases, accumulators and outputs are fp32.
//
// Work is split over the kept neurons/channels with at::parallel_for (so it respects
// torch.set_num_threads); each chunk accumulates into its own partial output and the
// partials are summed at the end (cheaper than splitting the output dimension, which
// would cut every weight row into short strided segments).

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

namespace moyu {

using bf16 = c10::BFloat16;

constexpr int64_t kMaxRows = 8;        // rows of x processed per pass over the weights
constexpr int64_t kMinPerChunk = 16;   // fewer kept neurons than this per thread: fewer threads
constexpr int64_t kPrefetchAhead = 2;  // neurons ahead to prefetch when the kept set is gathered

enum Act : int64_t { kSilu = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3 };
enum Mode : int64_t { kGateMode = 1, kActMode = 2 };

// ---------------------------------------------------------------- element helpers

inline float to_float(float v) { return v; }
inline float to_float(bf16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
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

// sum_i w[i] * x[i]
template <typename T>
inline float dot(const T* w, const float* x, int64_t d) {
  int64_t i = 0;
  float s = 0.0f;
#if MOYU_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (; i + 32 <= d; i += 32) {
    a0 = _mm256_fmadd_ps(load8(w + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(load8(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    a2 = _mm256_fmadd_ps(load8(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
    a3 = _mm256_fmadd_ps(load8(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
  }
  for (; i + 8 <= d; i += 8) a0 = _mm256_fmadd_ps(load8(w + i), _mm256_loadu_ps(x + i), a0);
  s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
  for (; i < d; ++i) s += to_float(w[i]) * x[i];
  return s;
}

// y[i] += a * w[i]
template <typename T>
inline void axpy(float a, const T* w, float* y, int64_t d) {
  int64_t i = 0;
#if MOYU_AVX2
  const __m256 va = _mm256_set1_ps(a);
  for (; i + 32 <= d; i += 32) {
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, load8(w + i), _mm256_loadu_ps(y + i)));
    _mm256_storeu_ps(y + i + 8, _mm256_fmadd_ps(va, load8(w + i + 8), _mm256_loadu_ps(y + i + 8)));
    _mm256_storeu_ps(y + i + 16,
                     _mm256_fmadd_ps(va, load8(w + i + 16), _mm256_loadu_ps(y + i + 16)));
    _mm256_storeu_ps(y + i + 24,
                     _mm256_fmadd_ps(va, load8(w + i + 24), _mm256_loadu_ps(y + i + 24)));
  }
  for (; i + 8 <= d; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, load8(w + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < d; ++i) y[i] += a * to_float(w[i]);
}

template <typename T>
inline void prefetch(const T* p, int64_t count) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = count * static_cast<int64_t>(sizeof(T));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

// ---------------------------------------------------------------- index accessors

struct AllIndex {
  int64_t operator[](int64_t p) const { return p; }
};
template <typename I>
struct ListIndex {
  const I* p;
  int64_t operator[](int64_t q) const { return static_cast<int64_t>(p[q]); }
};

// ---------------------------------------------------------------- partial accumulators

// Per-call scratch owned by the calling thread (callers from several Python threads
// each get their own), reused across calls to avoid allocations on the decode path.
inline float* scratch(int64_t count) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < count) buf.resize(count);
  return buf.data();
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

// Runs body(chunk, lo, hi, acc) over [0, k) split into chunks, each with a zeroed
// accumulator of `width` floats; returns the summed per-chunk counts.
template <typename Body>
int64_t run_chunked(int64_t k, int64_t width, const float* bias, int64_t rows, float* out,
                    const Body& body) {
  const int64_t nchunks = num_chunks(k);
  const int64_t total = rows * width;
  float* partials = scratch(nchunks * total);
  std::vector<int64_t> counts(nchunks, 0);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      float* acc = partials + c * total;
      std::memset(acc, 0, total * sizeof(float));
      counts[c] = body(k * c / nchunks, k * (c + 1) / nchunks, acc);
    }
  });
  reduce_partials(partials, nchunks, rows, width, bias, out);
  int64_t kept = 0;
  for (int64_t c : counts) kept += c;
  return kept;
}

// ---------------------------------------------------------------- MLP

template <typename T>
struct MlpArgs {
  const float* x;      // [rows, d]
  int64_t rows, d;
  const T* w_in;       // [d_ff, r, d]
  const T* w_dt;       // [d_ff, d]
  int64_t r;           // 2 gated, 1 plain
  const float* b_in;   // [d_ff, r] or null
  int64_t act;
  int64_t mode;        // 0: keep all listed neurons; kGateMode / kActMode: threshold
  float tau;
};

// Adds neuron i's contribution for every row into acc [rows, d]; returns 1 if any row
// kept it (its up row / down column were read), 0 otherwise.
template <typename T>
inline int64_t mlp_neuron(const MlpArgs<T>& a, int64_t i, float* acc) {
  const int64_t d = a.d;
  const T* rows_in = a.w_in + i * a.r * d;
  const T* up = rows_in + (a.r - 1) * d;
  const float* bias = a.b_in ? a.b_in + i * a.r : nullptr;
  const bool gated = a.r == 2;
  float coef[kMaxRows];
  bool keep[kMaxRows];
  bool any = false;
  for (int64_t q = 0; q < a.rows; ++q) {
    const float* x = a.x + q * d;
    float gate_act = 1.0f;
    keep[q] = true;
    if (gated) {
      gate_act = activate(dot(rows_in, x, d) + (bias ? bias[0] : 0.0f), a.act);
      if (a.mode == kGateMode) keep[q] = std::fabs(gate_act) > a.tau;
    }
    if (!keep[q]) continue;
    const float u = dot(up, x, d) + (bias ? bias[a.r - 1] : 0.0f);
    coef[q] = gated ? gate_act * u : activate(u, a.act);
    if (a.mode == kActMode || (!gated && a.mode == kGateMode))
      keep[q] = std::fabs(coef[q]) > a.tau;
    any = any || keep[q];
  }
  if (!any) return 0;
  const T* down = a.w_dt + i * d;
  for (int64_t q = 0; q < a.rows; ++q)
    if (keep[q]) axpy(coef[q], down, acc + q * d, d);
  return 1;
}

template <typename T, typename Index>
int64_t mlp_run(const MlpArgs<T>& a, Index index, int64_t k, bool gathered, const float* b_down,
                float* out) {
  const int64_t per_neuron_in = a.r * a.d;
  return run_chunked(k, a.d, b_down, a.rows, out, [&](int64_t lo, int64_t hi, float* acc) {
    int64_t kept = 0;
    for (int64_t p = lo; p < hi; ++p) {
      if (gathered && p + kPrefetchAhead < hi) {
        const int64_t nxt = index[p + kPrefetchAhead];
        prefetch(a.w_in + nxt * per_neuron_in, per_neuron_in);
        prefetch(a.w_dt + nxt * a.d, a.d);
      }
      kept += mlp_neuron(a, index[p], acc);
    }
    return kept;
  });
}

// ---------------------------------------------------------------- input-sparse linear

template <typename T>
struct LinearArgs {
  const float* x;  // [rows, in]
  int64_t rows, in, out;
  const T* wt;     // [in, out]
  bool masked;     // tau mode: rows whose |x_j| <= tau skip channel j
  float tau;
};

template <typename T, typename Index>
void linear_run(const LinearArgs<T>& a, Index index, int64_t k, bool gathered, const float* bias,
                float* out) {
  run_chunked(k, a.out, bias, a.rows, out, [&](int64_t lo, int64_t hi, float* acc) {
    for (int64_t p = lo; p < hi; ++p) {
      if (gathered && p + kPrefetchAhead < hi) prefetch(a.wt + index[p + kPrefetchAhead] * a.out, a.out);
      const int64_t j = index[p];
      const T* col = a.wt + j * a.out;
      for (int64_t q = 0; q < a.rows; ++q) {
        const float c = a.x[q * a.in + j];
        if (a.masked && !(std::fabs(c) > a.tau)) continue;
        axpy(c, col, acc + q * a.out, a.out);
      }
    }
    return int64_t{0};
  });
}

// ---------------------------------------------------------------- tensor plumbing

at::Tensor as_rows(const at::Tensor& x, int64_t width, const char* what) {
  TORCH_CHECK(x.dim() == 1 || x.dim() == 2, what, ": x must be [", width, "] or [n, ", width,
              "], got ", x.sizes());
  TORCH_CHECK(x.size(-1) == width, what, ": x has ", x.size(-1), " features, expected ", width);
  TORCH_CHECK(!x.is_cuda(), what, ": CPU tensors only");
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
  TORCH_CHECK(w.is_contiguous(), what, " must be contiguous (use moyu.kernels.pack_*)");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, what,
              " must be float32 or bfloat16");
}

const float* bias_ptr(const c10::optional<at::Tensor>& b, int64_t numel, const char* what) {
  if (!b.has_value()) return nullptr;
  TORCH_CHECK(b->scalar_type() == at::kFloat && b->is_contiguous() && b->numel() == numel, what,
              " must be a contiguous float32 tensor with ", numel, " elements");
  return b->data_ptr<float>();
}

template <typename I>
void check_index(const I* p, int64_t k, int64_t limit) {
  for (int64_t q = 0; q < k; ++q)
    TORCH_CHECK(p[q] >= 0 && static_cast<int64_t>(p[q]) < limit, "index ", static_cast<int64_t>(p[q]),
                " out of range [0, ", limit, ")");
}

// Calls fn(index, k, gathered) with the right accessor for idx (None / int64 / int32).
template <typename Fn>
void with_index(const c10::optional<at::Tensor>& idx, int64_t limit, const Fn& fn) {
  if (!idx.has_value()) {
    fn(AllIndex{}, limit, false);
    return;
  }
  const at::Tensor& t = *idx;
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), "idx must be a contiguous 1-D tensor");
  const int64_t k = t.numel();
  if (t.scalar_type() == at::kLong) {
    check_index(t.data_ptr<int64_t>(), k, limit);
    fn(ListIndex<int64_t>{t.data_ptr<int64_t>()}, k, true);
  } else if (t.scalar_type() == at::kInt) {
    check_index(t.data_ptr<int32_t>(), k, limit);
    fn(ListIndex<int32_t>{t.data_ptr<int32_t>()}, k, true);
  } else {
    TORCH_CHECK(false, "idx must be int64 or int32, got ", t.scalar_type());
  }
}

template <typename T>
int64_t mlp_dispatch(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& w_dt,
                     const c10::optional<at::Tensor>& b_in, const c10::optional<at::Tensor>& b_down,
                     const c10::optional<at::Tensor>& idx, int64_t act, int64_t mode, double tau,
                     at::Tensor& out) {
  const int64_t d_ff = w_in.size(0), r = w_in.size(1), d = w_in.size(2);
  const int64_t rows = x.dim() == 1 ? 1 : x.size(0);
  MlpArgs<T> a{nullptr, 0, d, w_in.data_ptr<T>(), w_dt.data_ptr<T>(), r,
               bias_ptr(b_in, d_ff * r, "b_in"), act, mode, static_cast<float>(tau)};
  const float* bd = bias_ptr(b_down, d, "b_down");
  int64_t kept = 0;
  with_index(idx, d_ff, [&](auto index, int64_t k, bool gathered) {
    for (int64_t q0 = 0; q0 < rows; q0 += kMaxRows) {
      a.x = x.data_ptr<float>() + q0 * d;
      a.rows = std::min(kMaxRows, rows - q0);
      kept = std::max(kept, mlp_run(a, index, k, gathered, bd, out.data_ptr<float>() + q0 * d));
    }
  });
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
  const int64_t d = w_in.size(2);
  at::Tensor x = as_rows(x_in, d, "sparse_mlp");
  at::Tensor out = output_for(x, d, out_opt);
  int64_t kept;
  if (w_in.scalar_type() == at::kFloat)
    kept = mlp_dispatch<float>(x, w_in, w_dt, b_in, b_down, idx, act, mode, tau, out);
  else
    kept = mlp_dispatch<bf16>(x, w_in, w_dt, b_in, b_down, idx, act, mode, tau, out);
  return {out, kept};
}

at::Tensor sparse_mlp(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& w_dt,
                      const c10::optional<at::Tensor>& b_in, const c10::optional<at::Tensor>& b_down,
                      const c10::optional<at::Tensor>& idx, int64_t act,
                      const c10::optional<at::Tensor>& out) {
  return std::get<0>(mlp_impl(x, w_in, w_dt, b_in, b_down, idx, act, 0, 0.0, out));
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
                     const c10::optional<at::Tensor>& idx, c10::optional<double> tau, at::Tensor& out) {
  const int64_t in = wt.size(0), width = wt.size(1);
  const int64_t rows = x.dim() == 1 ? 1 : x.size(0);
  for (int64_t q0 = 0; q0 < rows; q0 += kMaxRows) {
    LinearArgs<T> a{x.data_ptr<float>() + q0 * in, std::min(kMaxRows, rows - q0), in, width,
                    wt.data_ptr<T>(), false, 0.0f};
    float* o = out.data_ptr<float>() + q0 * width;
    if (!idx.has_value() && tau.has_value()) {
      // Kept channels: those where any row passes the threshold (each row masks its own).
      a.masked = true;
      a.tau = static_cast<float>(*tau);
      std::vector<int64_t> kept;
      kept.reserve(in);
      for (int64_t j = 0; j < in; ++j)
        for (int64_t q = 0; q < a.rows; ++q)
          if (std::fabs(a.x[q * in + j]) > a.tau) {
            kept.push_back(j);
            break;
          }
      linear_run(a, ListIndex<int64_t>{kept.data()}, static_cast<int64_t>(kept.size()), true, bias, o);
    } else {
      with_index(idx, in, [&](auto index, int64_t k, bool gathered) {
        linear_run(a, index, k, gathered, bias, o);
      });
    }
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

bool has_avx2() { return MOYU_AVX2 != 0; }

}  // namespace moyu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moyu sparse CPU kernels";
  m.def("sparse_mlp", &moyu::sparse_mlp, "sparse MLP over a kept neuron list");
  m.def("sparse_mlp_threshold", &moyu::sparse_mlp_threshold, "CATS-style thresholded sparse MLP");
  m.def("input_sparse_linear", &moyu::input_sparse_linear, "input-sparse linear (TEAL/WINA)");
  m.def("has_avx2", &moyu::has_avx2, "whether the AVX2/FMA code path was compiled");
}
