// moyu quantized kernels: batch-1 integer kernels over int8 / int4 block-quantized weights.
//
// Formats (see moyu/kernels/quant.py, which builds them):
//   int8  blocks of 32 along a row: 32 int8 codes + one fp16 scale d   w = d * q   (GGUF Q8_0)
//   int4  blocks of 32 along a row: 16 bytes of 4-bit codes + fp16 d and fp16 min m,
//         w = d * q + m; byte j of a block holds element j (low nibble) and j + 16 (high
//         nibble)                                                                 (GGUF Q4_1)
// A matrix is three arrays: qs [rows, nb * 32] int8 or [rows, nb * 16] uint8, d [rows, nb]
// fp16 and m [rows, nb] fp16 (int4 only); rows are padded with zero codes to nb * 32.
//
// The activation row is quantized once per call to int8 with one fp32 scale per 32-block
// (dx = amax / 127, q = round(x * 127 / amax)), so a row's dot product is
//   sum_b (isum_b * (d_b * dx_b)) [+ m_b * dx_b * sum(q_x, block b)]
// where isum_b is an exact integer dot product of the block's codes.
//
// Instruction sets: one library holds three code paths compiled with per-function target
// options (#pragma GCC target): AVX-512 VNNI (vpdpbusd, unsigned x signed bytes: int8
// weights are offset by +128 and the offset's contribution is pre-subtracted through a
// per-call correction vector; 4-bit codes are already unsigned), AVX2 (vpmaddubsw /
// vpmaddwd with the sign trick) and scalar. The library itself is compiled for the
// baseline x86-64 ISA and picks a path at RUN time from the CPU's flags, so a cached
// build can never execute an instruction the CPU lacks; set_isa() can force a lower path.
//
// Threading: at::parallel_for over the listed rows; axpy-style kernels (sum of rows)
// accumulate per-chunk partial outputs that are summed at the end, as in
// sparse_kernels.cpp.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MOYUQ_X86 1
#else
#define MOYUQ_X86 0
#endif

#include "attn_args.h"

namespace moyuq {

using moyu_core::AttnArgs;

constexpr int64_t kBlk = 32;
constexpr int kGroup = 8;             // rows summed per pass over the output in axpy
// Rows ahead of the current four that dot4 prefetches (set_dot_prefetch; a multiple of 4).
int g_ahead4 = 16;
// Passes ahead whose rows an axpy pass prefetches (set_axpy_prefetch).
int64_t g_axpy_passes = 3;
constexpr int64_t kMinPerChunk = 32;  // fewer listed rows than this per thread: fewer threads

enum Fmt : int64_t { kInt8 = 0, kInt4 = 1 };
enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
enum Act : int64_t { kSilu = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3 };
enum Mode : int64_t { kAll = 0, kGateMode = 1, kActMode = 2 };

// One quantized matrix (a view of the tensors held by a QuantMatrix).
struct QM {
  int64_t fmt, rows, cols, nb;
  const uint8_t* qs;
  const uint16_t* d;
  const uint16_t* m;  // int4 only
  int64_t row_bytes() const { return fmt == kInt8 ? nb * kBlk : nb * kBlk / 2; }
  const uint8_t* codes(int64_t r) const { return qs + r * row_bytes(); }
};

// The rows the next axpy pass will read: prefetched a line at a time during this pass.
struct Ahead {
  const int64_t* ids = nullptr;
  int n = 0;
};

// Prefetches what block b of the next pass's rows needs: their code line holding block b's
// first byte (once per 64 bytes of codes) and, at b % 16 == 0, the next 16 fp16 scales and
// mins. Spread over a pass like this, the reads of the next rows overlap the arithmetic on
// these: with G rows read 32 bytes at a time the hardware prefetcher alone does not keep
// enough lines in flight. Codes go to L2 (locality hint 2): into L1 they were ~1.5x slower,
// likely because the few L1 miss buffers fill up (int8 down rows from DRAM, 2 threads, a
// development probe: 73 us without prefetching, 52 us into L1, 35 us into L2;
// benchmarks/bench_quant_kernels.py times the kernels with and without it).
template <bool Q4>
__attribute__((always_inline)) inline void prefetch_block(const QM& w, const Ahead& next, int64_t b) {
  constexpr int64_t bpb = Q4 ? kBlk / 2 : kBlk;  // code bytes per block
  if ((b * bpb) % 64 < bpb)
    for (int g = 0; g < next.n; ++g) __builtin_prefetch(w.codes(next.ids[g]) + b * bpb, 0, 2);
  if (b % 16 == 0)
    for (int g = 0; g < next.n; ++g) {
      __builtin_prefetch(w.d + next.ids[g] * w.nb + b);
      if (Q4) __builtin_prefetch(w.m + next.ids[g] * w.nb + b);
    }
}

// One activation row quantized to int8 per 32-block.
struct XQ {
  const int8_t* q;      // [nb * 32], zero padded
  const float* dx;      // [nb]
  const float* sx;      // [nb]  dx * sum of the block's codes (int4 min term)
  const int32_t* corr;  // [nb * 8]  -128 * sum of each 4 consecutive codes (VNNI int8)
  const int8_t* qperm;  // [nb * 32]  codes regrouped per 4 blocks for the VNNI int4 loop
};

inline float h2f(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

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


// ------------------------------------------------------------------ scalar path

namespace scalar {
#include "decode_core.h"

float dot_i8(const QM& w, int64_t r, const XQ& x) {
  const int8_t* q = reinterpret_cast<const int8_t*>(w.codes(r));
  const uint16_t* d = w.d + r * w.nb;
  float s = 0.0f;
  for (int64_t b = 0; b < w.nb; ++b) {
    int32_t is = 0;
    for (int i = 0; i < kBlk; ++i) is += int32_t{q[b * kBlk + i]} * int32_t{x.q[b * kBlk + i]};
    s += static_cast<float>(is) * (h2f(d[b]) * x.dx[b]);
  }
  return s;
}

float dot_i4(const QM& w, int64_t r, const XQ& x) {
  const uint8_t* q = w.codes(r);
  const uint16_t* d = w.d + r * w.nb;
  const uint16_t* m = w.m + r * w.nb;
  float s = 0.0f, mt = 0.0f;
  for (int64_t b = 0; b < w.nb; ++b) {
    int32_t is = 0;
    const int8_t* xb = x.q + b * kBlk;
    for (int j = 0; j < kBlk / 2; ++j) {
      const uint8_t v = q[b * kBlk / 2 + j];
      is += int32_t{v & 0x0F} * xb[j] + int32_t{v >> 4} * xb[j + 16];
    }
    s += static_cast<float>(is) * (h2f(d[b]) * x.dx[b]);
    mt += h2f(m[b]) * x.sx[b];
  }
  return s + mt;
}

// y[0 .. nb*32) += sum_g a[g] * dequant(row rows[g]) for n <= kGroup rows.
// (No std::fma: the baseline build has no FMA instruction and would call libm per element.)
void axpy_i8(const QM& w, int n, const int64_t* rows, const float* a, float* y, Ahead) {
  for (int g = 0; g < n; ++g) {
    const int8_t* q = reinterpret_cast<const int8_t*>(w.codes(rows[g]));
    const uint16_t* d = w.d + rows[g] * w.nb;
    for (int64_t b = 0; b < w.nb; ++b) {
      const float sc = a[g] * h2f(d[b]);
      for (int i = 0; i < kBlk; ++i) y[b * kBlk + i] += static_cast<float>(q[b * kBlk + i]) * sc;
    }
  }
}

void axpy_i4(const QM& w, int n, const int64_t* rows, const float* a, float* y, Ahead) {
  for (int g = 0; g < n; ++g) {
    const uint8_t* q = w.codes(rows[g]);
    const uint16_t* d = w.d + rows[g] * w.nb;
    const uint16_t* m = w.m + rows[g] * w.nb;
    for (int64_t b = 0; b < w.nb; ++b) {
      const float sc = a[g] * h2f(d[b]), mm = a[g] * h2f(m[b]);
      float* yb = y + b * kBlk;
      for (int j = 0; j < kBlk / 2; ++j) {
        const uint8_t v = q[b * kBlk / 2 + j];
        yb[j] += static_cast<float>(v & 0x0F) * sc + mm;
        yb[j + 16] += static_cast<float>(v >> 4) * sc + mm;
      }
    }
  }
}

}  // namespace scalar

#if MOYUQ_X86
// ------------------------------------------------------------------ AVX2 path

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#include "decode_core.h"

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Integer dot product of one int8 block with the activation block, as 8 fp32 lanes.
inline __m256 blk_i8(const int8_t* w, const int8_t* xq) {
  const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
  // |w| (unsigned) times x with w's sign: maddubs needs one unsigned operand.
  const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

inline __m256 blk_i4(const uint8_t* w, const int8_t* xq) {
  const __m128i w16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  const __m128i nib = _mm_set1_epi8(0x0F);
  const __m256i qv = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(w16, 4), nib), _mm_and_si128(w16, nib));
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
  const __m256i p = _mm256_maddubs_epi16(qv, xv);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

float dot_i8(const QM& w, int64_t r, const XQ& x) {
  const int8_t* q = reinterpret_cast<const int8_t*>(w.codes(r));
  const uint16_t* d = w.d + r * w.nb;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= w.nb; b += 2) {
    acc0 = _mm256_fmadd_ps(blk_i8(q + b * kBlk, x.q + b * kBlk), _mm256_set1_ps(_cvtsh_ss(d[b]) * x.dx[b]), acc0);
    acc1 = _mm256_fmadd_ps(blk_i8(q + (b + 1) * kBlk, x.q + (b + 1) * kBlk),
                           _mm256_set1_ps(_cvtsh_ss(d[b + 1]) * x.dx[b + 1]), acc1);
  }
  if (b < w.nb)
    acc0 = _mm256_fmadd_ps(blk_i8(q + b * kBlk, x.q + b * kBlk), _mm256_set1_ps(_cvtsh_ss(d[b]) * x.dx[b]), acc0);
  return hsum(_mm256_add_ps(acc0, acc1));
}

float dot_i4(const QM& w, int64_t r, const XQ& x) {
  const uint8_t* q = w.codes(r);
  const uint16_t* d = w.d + r * w.nb;
  const uint16_t* m = w.m + r * w.nb;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  float mt = 0.0f;
  int64_t b = 0;
  for (; b + 2 <= w.nb; b += 2) {
    acc0 = _mm256_fmadd_ps(blk_i4(q + b * 16, x.q + b * kBlk), _mm256_set1_ps(_cvtsh_ss(d[b]) * x.dx[b]), acc0);
    acc1 = _mm256_fmadd_ps(blk_i4(q + (b + 1) * 16, x.q + (b + 1) * kBlk),
                           _mm256_set1_ps(_cvtsh_ss(d[b + 1]) * x.dx[b + 1]), acc1);
    mt += _cvtsh_ss(m[b]) * x.sx[b] + _cvtsh_ss(m[b + 1]) * x.sx[b + 1];
  }
  if (b < w.nb) {
    acc0 = _mm256_fmadd_ps(blk_i4(q + b * 16, x.q + b * kBlk), _mm256_set1_ps(_cvtsh_ss(d[b]) * x.dx[b]), acc0);
    mt += _cvtsh_ss(m[b]) * x.sx[b];
  }
  return hsum(_mm256_add_ps(acc0, acc1)) + mt;
}

// a * (8 fp16 values from p, zero beyond n) -> out[0..8)
inline void scaled8(const uint16_t* p, int64_t n, float a, float* out) {
  __m128i h;
  if (n >= 8) {
    h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  } else {
    alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(tmp, p, n * sizeof(uint16_t));
    h = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
  }
  _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_set1_ps(a), _mm256_cvtph_ps(h)));
}

// Block scales (a * d) and offsets (a * m) of G rows are computed 8 blocks at a time,
// then each block broadcasts them from L1: fewer instructions per weight than
// converting one fp16 per block and row.
template <int G, bool Q4>
void axpy_g(const QM& w, const int64_t* rows, const float* a, float* y, Ahead next) {
  const uint8_t* q[G];
  const uint16_t* d[G];
  const uint16_t* m[G];
  for (int g = 0; g < G; ++g) {
    q[g] = w.codes(rows[g]);
    d[g] = w.d + rows[g] * w.nb;
    m[g] = Q4 ? w.m + rows[g] * w.nb : nullptr;
  }
  const __m128i nib = _mm_set1_epi8(0x0F);
  alignas(32) float sc[G][8];
  alignas(32) float mm[8];
  for (int64_t b0 = 0; b0 < w.nb; b0 += 8) {
    const int64_t nbk = std::min<int64_t>(8, w.nb - b0);
    // int4: the mins add sum_g a[g] * m[g][b], one constant per block, once per group.
    if (Q4) std::memset(mm, 0, sizeof(mm));
    for (int g = 0; g < G; ++g) {
      scaled8(d[g] + b0, nbk, a[g], sc[g]);
      if (Q4) {
        alignas(32) float t[8];
        scaled8(m[g] + b0, nbk, a[g], t);
        _mm256_store_ps(mm, _mm256_add_ps(_mm256_load_ps(mm), _mm256_load_ps(t)));
      }
    }
    for (int64_t bb = 0; bb < nbk; ++bb) {
      const int64_t b = b0 + bb;
      float* yp = y + b * kBlk;
      prefetch_block<Q4>(w, next, b);
      __m256 y0 = _mm256_loadu_ps(yp), y1 = _mm256_loadu_ps(yp + 8);
      __m256 y2 = _mm256_loadu_ps(yp + 16), y3 = _mm256_loadu_ps(yp + 24);
      if (Q4) {
        const __m256 o = _mm256_broadcast_ss(&mm[bb]);
        y0 = _mm256_add_ps(y0, o);
        y1 = _mm256_add_ps(y1, o);
        y2 = _mm256_add_ps(y2, o);
        y3 = _mm256_add_ps(y3, o);
      }
      for (int g = 0; g < G; ++g) {
        const __m256 s = _mm256_broadcast_ss(&sc[g][bb]);
        if (Q4) {
          const __m128i w16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q[g] + b * 16));
          const __m128i lo = _mm_and_si128(w16, nib), hi = _mm_and_si128(_mm_srli_epi16(w16, 4), nib);
          y0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), s, y0);
          y1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), s, y1);
          y2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), s, y2);
          y3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), s, y3);
        } else {
          const int8_t* qb = reinterpret_cast<const int8_t*>(q[g]) + b * kBlk;
          auto cvt = [&](int off) {
            return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qb + off))));
          };
          y0 = _mm256_fmadd_ps(cvt(0), s, y0);
          y1 = _mm256_fmadd_ps(cvt(8), s, y1);
          y2 = _mm256_fmadd_ps(cvt(16), s, y2);
          y3 = _mm256_fmadd_ps(cvt(24), s, y3);
        }
      }
      _mm256_storeu_ps(yp, y0);
      _mm256_storeu_ps(yp + 8, y1);
      _mm256_storeu_ps(yp + 16, y2);
      _mm256_storeu_ps(yp + 24, y3);
    }
  }
}

#include "axpy_entry.h"

}  // namespace avx2
#pragma GCC pop_options

// ------------------------------------------------------------------ AVX-512 VNNI path

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
namespace avx512 {

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// (d[b..b+4) as fp32) * dx[b..b+4)
inline __m128 scales4(const uint16_t* d, const float* dx) {
  return _mm_mul_ps(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(d))), _mm_loadu_ps(dx));
}

float dot_i8(const QM& w, int64_t r, const XQ& x) {
  const int8_t* q = reinterpret_cast<const int8_t*>(w.codes(r));
  const uint16_t* d = w.d + r * w.nb;
  const __m512i off = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i lanes01 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i lanes23 = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 4 <= w.nb; b += 4) {
    const __m512 sc = _mm512_castps128_ps512(scales4(d + b, x.dx + b));
    // (w + 128) . x - 128 * sum(x) = w . x, exactly, in int32 lanes.
    const __m512i i0 = _mm512_dpbusd_epi32(
        _mm512_loadu_si512(x.corr + b * 8),
        _mm512_xor_si512(_mm512_loadu_si512(q + b * kBlk), off), _mm512_loadu_si512(x.q + b * kBlk));
    const __m512i i1 = _mm512_dpbusd_epi32(
        _mm512_loadu_si512(x.corr + (b + 2) * 8),
        _mm512_xor_si512(_mm512_loadu_si512(q + (b + 2) * kBlk), off), _mm512_loadu_si512(x.q + (b + 2) * kBlk));
    acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_permutexvar_ps(lanes01, sc), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), _mm512_permutexvar_ps(lanes23, sc), acc1);
  }
  __m256 tail = _mm256_setzero_ps();
  const __m256i off8 = _mm256_set1_epi8(static_cast<char>(0x80));
  for (; b < w.nb; ++b) {
    const __m256i i = _mm256_dpbusd_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.corr + b * 8)),
        _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * kBlk)), off8),
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + b * kBlk)));
    tail = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(_cvtsh_ss(d[b]) * x.dx[b]), tail);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + hsum256(tail);
}

// dot_i8 of rows r .. r+3 into out[0..4): per row the very operations of dot_i8 in the same
// order (bit-identical results), four rows at a time so the activation codes, their
// corrections and scales are loaded once for all four.
void dot4_i8(const QM& w, int64_t r, const XQ& x, float* out) {
  const int8_t* q[4];
  const uint16_t* d[4];
  for (int k = 0; k < 4; ++k) {
    q[k] = reinterpret_cast<const int8_t*>(w.codes(r + k));
    d[k] = w.d + (r + k) * w.nb;
  }
  const __m512i off = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i lanes01 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i lanes23 = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
  __m512 acc0[4], acc1[4];
  for (int k = 0; k < 4; ++k) acc0[k] = acc1[k] = _mm512_setzero_ps();
  int64_t b = 0;
  // Four rows read side by side are four short streams the hardware prefetcher does not
  // follow (2x slower from DRAM than one row at a time): the next four rows' lines are
  // prefetched during this pass, as the axpy passes do.
  const bool ahead = r + 4 + g_ahead4 <= w.rows;
  if (ahead)
    for (int k = g_ahead4; k < g_ahead4 + 4; ++k) __builtin_prefetch(w.d + (r + k) * w.nb, 0, 2);
  for (; b + 4 <= w.nb; b += 4) {
    if (ahead)
      for (int k = g_ahead4; k < g_ahead4 + 4; ++k) {
        __builtin_prefetch(w.codes(r + k) + b * kBlk, 0, 2);
        __builtin_prefetch(w.codes(r + k) + (b + 2) * kBlk, 0, 2);
      }
    const __m512i x0 = _mm512_loadu_si512(x.q + b * kBlk), x1 = _mm512_loadu_si512(x.q + (b + 2) * kBlk);
    const __m512i c0 = _mm512_loadu_si512(x.corr + b * 8), c1 = _mm512_loadu_si512(x.corr + (b + 2) * 8);
    const __m128 dx = _mm_loadu_ps(x.dx + b);
    for (int k = 0; k < 4; ++k) {
      const __m512 sc = _mm512_castps128_ps512(
          _mm_mul_ps(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(d[k] + b))), dx));
      const __m512i i0 = _mm512_dpbusd_epi32(c0, _mm512_xor_si512(_mm512_loadu_si512(q[k] + b * kBlk), off), x0);
      const __m512i i1 = _mm512_dpbusd_epi32(c1, _mm512_xor_si512(_mm512_loadu_si512(q[k] + (b + 2) * kBlk), off), x1);
      acc0[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_permutexvar_ps(lanes01, sc), acc0[k]);
      acc1[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), _mm512_permutexvar_ps(lanes23, sc), acc1[k]);
    }
  }
  if (ahead)
    for (int64_t t = b; t < w.nb; t += 2)
      for (int k = g_ahead4; k < g_ahead4 + 4; ++k) __builtin_prefetch(w.codes(r + k) + t * kBlk, 0, 2);
  const __m256i off8 = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int k = 0; k < 4; ++k) {
    __m256 tail = _mm256_setzero_ps();
    for (int64_t t = b; t < w.nb; ++t) {
      const __m256i i = _mm256_dpbusd_epi32(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.corr + t * 8)),
          _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[k] + t * kBlk)), off8),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + t * kBlk)));
      tail = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(_cvtsh_ss(d[k][t]) * x.dx[t]), tail);
    }
    out[k] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[k], acc1[k])) + hsum256(tail);
  }
}

// One int4 row's blocks b.. left after the four-block loop, then the row's total from the
// loop's accumulators: shared by dot_i4 and dot4_i4, so the two give the same bits.
inline float finish_i4(__m512 acc, __m128 macc, const uint8_t* q, const uint16_t* d, const uint16_t* m,
                       const XQ& x, int64_t b, int64_t nb) {
  __m256 tail = _mm256_setzero_ps();
  float mt = 0.0f;
  const __m128i nib16 = _mm_set1_epi8(0x0F);
  for (; b < nb; ++b) {
    const __m128i w16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 16));
    const __m256i qv = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(w16, 4), nib16), _mm_and_si128(w16, nib16));
    const __m256i i = _mm256_dpbusd_epi32(_mm256_setzero_si256(), qv,
                                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + b * kBlk)));
    tail = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(_cvtsh_ss(d[b]) * x.dx[b]), tail);
    mt += _cvtsh_ss(m[b]) * x.sx[b];
  }
  macc = _mm_add_ps(macc, _mm_movehl_ps(macc, macc));
  macc = _mm_add_ss(macc, _mm_movehdup_ps(macc));
  return _mm512_reduce_add_ps(acc) + hsum256(tail) + (_mm_cvtss_f32(macc) + mt);
}

float dot_i4(const QM& w, int64_t r, const XQ& x) {
  const uint8_t* q = w.codes(r);
  const uint16_t* d = w.d + r * w.nb;
  const uint16_t* m = w.m + r * w.nb;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const __m512i lanes = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  __m512 acc = _mm512_setzero_ps();
  __m128 macc = _mm_setzero_ps();
  int64_t b = 0;
  // Four blocks per step: 64 code bytes; the activation codes were regrouped (qperm) so
  // that 128-bit lane k of the low / high nibbles meets block k's first / last 16 codes.
  for (; b + 4 <= w.nb; b += 4) {
    const __m512i wv = _mm512_loadu_si512(q + b * 16);
    const __m512i lo = _mm512_and_si512(wv, nib);
    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), nib);
    __m512i i = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(x.qperm + b * kBlk));
    i = _mm512_dpbusd_epi32(i, hi, _mm512_loadu_si512(x.qperm + b * kBlk + 64));
    const __m512 sc = _mm512_castps128_ps512(scales4(d + b, x.dx + b));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_permutexvar_ps(lanes, sc), acc);
    macc = _mm_fmadd_ps(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m + b))),
                        _mm_loadu_ps(x.sx + b), macc);
  }
  return finish_i4(acc, macc, q, d, m, x, b, w.nb);
}

// dot_i4 of rows r .. r+3 into out[0..4): per row the very operations of dot_i4 in the same
// order (bit-identical results), with the activation codes, scales and block sums loaded
// once for all four rows and the next rows prefetched as in dot4_i8.
void dot4_i4(const QM& w, int64_t r, const XQ& x, float* out) {
  const uint8_t* q[4];
  const uint16_t* d[4];
  const uint16_t* m[4];
  for (int k = 0; k < 4; ++k) {
    q[k] = w.codes(r + k);
    d[k] = w.d + (r + k) * w.nb;
    m[k] = w.m + (r + k) * w.nb;
  }
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const __m512i lanes = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  __m512 acc[4];
  __m128 macc[4];
  for (int k = 0; k < 4; ++k) {
    acc[k] = _mm512_setzero_ps();
    macc[k] = _mm_setzero_ps();
  }
  const bool ahead = r + 4 + g_ahead4 <= w.rows;
  if (ahead)
    for (int k = g_ahead4; k < g_ahead4 + 4; ++k) {
      __builtin_prefetch(w.d + (r + k) * w.nb, 0, 2);
      __builtin_prefetch(w.m + (r + k) * w.nb, 0, 2);
    }
  int64_t b = 0;
  for (; b + 4 <= w.nb; b += 4) {
    if (ahead)
      for (int k = g_ahead4; k < g_ahead4 + 4; ++k) __builtin_prefetch(w.codes(r + k) + b * 16, 0, 2);
    const __m512i xlo = _mm512_loadu_si512(x.qperm + b * kBlk), xhi = _mm512_loadu_si512(x.qperm + b * kBlk + 64);
    const __m128 dx = _mm_loadu_ps(x.dx + b), sx = _mm_loadu_ps(x.sx + b);
    for (int k = 0; k < 4; ++k) {
      const __m512i wv = _mm512_loadu_si512(q[k] + b * 16);
      const __m512i lo = _mm512_and_si512(wv, nib);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), nib);
      __m512i i = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo);
      i = _mm512_dpbusd_epi32(i, hi, xhi);
      const __m512 sc = _mm512_castps128_ps512(
          _mm_mul_ps(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(d[k] + b))), dx));
      acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_permutexvar_ps(lanes, sc), acc[k]);
      macc[k] = _mm_fmadd_ps(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m[k] + b))), sx, macc[k]);
    }
  }
  if (ahead)
    for (int64_t t = b; t < w.nb; t += 4)
      for (int k = g_ahead4; k < g_ahead4 + 4; ++k) __builtin_prefetch(w.codes(r + k) + t * 16, 0, 2);
  for (int k = 0; k < 4; ++k) out[k] = finish_i4(acc[k], macc[k], q[k], d[k], m[k], x, b, w.nb);
}

// Block scales (a * d) of G rows, 16 blocks at a time (masked load of the fp16 values),
// broadcast per block from L1; int4 mins enter as one per-block constant per group.
template <int G, bool Q4>
void axpy_g(const QM& w, const int64_t* rows, const float* a, float* y, Ahead next) {
  const uint8_t* q[G];
  const uint16_t* d[G];
  const uint16_t* m[G];
  for (int g = 0; g < G; ++g) {
    q[g] = w.codes(rows[g]);
    d[g] = w.d + rows[g] * w.nb;
    m[g] = Q4 ? w.m + rows[g] * w.nb : nullptr;
  }
  const __m128i nib = _mm_set1_epi8(0x0F);
  alignas(64) float sc[G][16];
  alignas(64) float mm[16];
  for (int64_t b0 = 0; b0 < w.nb; b0 += 16) {
    const int64_t nbk = std::min<int64_t>(16, w.nb - b0);
    const __mmask16 mk = static_cast<__mmask16>((1u << nbk) - 1u);
    __m512 offs = _mm512_setzero_ps();  // int4: sum_g a[g] * m[g][b], one constant per block
    for (int g = 0; g < G; ++g) {
      const __m512 av = _mm512_set1_ps(a[g]);
      _mm512_store_ps(sc[g], _mm512_mul_ps(av, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, d[g] + b0))));
      if (Q4) offs = _mm512_fmadd_ps(av, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, m[g] + b0)), offs);
    }
    _mm512_store_ps(mm, offs);
    for (int64_t bb = 0; bb < nbk; ++bb) {
      const int64_t b = b0 + bb;
      float* yp = y + b * kBlk;
      prefetch_block<Q4>(w, next, b);
      __m512 y0 = _mm512_loadu_ps(yp), y1 = _mm512_loadu_ps(yp + 16);
      if (Q4) {
        const __m512 o = _mm512_set1_ps(mm[bb]);
        y0 = _mm512_add_ps(y0, o);
        y1 = _mm512_add_ps(y1, o);
      }
      for (int g = 0; g < G; ++g) {
        const __m512 s = _mm512_set1_ps(sc[g][bb]);
        if (Q4) {
          const __m128i w16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q[g] + b * 16));
          const __m128i lo = _mm_and_si128(w16, nib), hi = _mm_and_si128(_mm_srli_epi16(w16, 4), nib);
          y0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), s, y0);
          y1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), s, y1);
        } else {
          const int8_t* qb = reinterpret_cast<const int8_t*>(q[g]) + b * kBlk;
          y0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qb)))), s, y0);
          y1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + 16)))), s, y1);
        }
      }
      _mm512_storeu_ps(yp, y0);
      _mm512_storeu_ps(yp + 16, y1);
    }
  }
}

#include "axpy_entry.h"

}  // namespace avx512
#pragma GCC pop_options
#endif  // MOYUQ_X86

// ------------------------------------------------------------------ dispatch

using DotFn = float (*)(const QM&, int64_t, const XQ&);
using AxpyFn = void (*)(const QM&, int, const int64_t*, const float*, float*, Ahead);
using Dot4Fn = void (*)(const QM&, int64_t, const XQ&, float*);   // rows r..r+3

// Four rows by four one-row dots: the paths without a four-row kernel of their own.
template <DotFn Dot>
void dot4_each(const QM& w, int64_t r, const XQ& x, float* out) {
  for (int k = 0; k < 4; ++k) out[k] = Dot(w, r + k, x);
}
struct Kern {
  DotFn dot;
  AxpyFn axpy;
  Dot4Fn dot4;
};

int64_t best_isa() {
#if MOYUQ_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
      __builtin_cpu_supports("f16c"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return kAvx2;
#endif
  return kScalar;
}

int64_t g_isa = best_isa();

int64_t get_isa() { return g_isa; }

void set_isa(int64_t isa) {
  TORCH_CHECK(isa >= kScalar && isa <= best_isa(), "instruction set ", isa,
              " is not available on this CPU (best: ", best_isa(), ")");
  g_isa = isa;
}

Kern kernels(int64_t fmt) {
#if MOYUQ_X86
  if (g_isa == kAvx512) return fmt == kInt8 ? Kern{avx512::dot_i8, avx512::axpy_i8, avx512::dot4_i8} : Kern{avx512::dot_i4, avx512::axpy_i4, avx512::dot4_i4};
  if (g_isa == kAvx2) return fmt == kInt8 ? Kern{avx2::dot_i8, avx2::axpy_i8, dot4_each<avx2::dot_i8>} : Kern{avx2::dot_i4, avx2::axpy_i4, dot4_each<avx2::dot_i4>};
#endif
  return fmt == kInt8 ? Kern{scalar::dot_i8, scalar::axpy_i8, dot4_each<scalar::dot_i8>} : Kern{scalar::dot_i4, scalar::axpy_i4, dot4_each<scalar::dot_i4>};
}

// ------------------------------------------------------------------ scratch, lists, activations

// Software prefetching, set by set_prefetch(rows): rows < 0 none (the hardware prefetcher
// alone); 0, the default: each axpy pass prefetches the next pass's rows (prefetch_block);
// rows > 0 also prefetches that many listed rows ahead in the dot-product loops (no gain
// measured there: their rows are long enough for the hardware prefetcher). See
// benchmarks/bench_quant_kernels.py --prefetch.
int64_t g_ahead = 0;
bool g_prefetch = true;

void set_dot_prefetch(int64_t rows) {
  TORCH_CHECK(rows >= 4 && rows <= 64 && rows % 4 == 0, "set_dot_prefetch: rows must be a multiple of 4 in [4, 64]");
  g_ahead4 = static_cast<int>(rows);
}

void set_axpy_prefetch(int64_t passes) {
  TORCH_CHECK(passes >= 1 && passes <= 8, "set_axpy_prefetch: passes must be in [1, 8]");
  g_axpy_passes = passes;
}

void set_prefetch(int64_t rows) {
  g_ahead = std::max<int64_t>(0, rows);
  g_prefetch = rows >= 0;
}

// Prefetches one row's codes, scales and mins into the cache.
inline void prefetch_row(const QM& w, int64_t r) {
  const uint8_t* c = w.codes(r);
  const int64_t nbytes = w.row_bytes();
  for (int64_t o = 0; o < nbytes; o += 64) __builtin_prefetch(c + o);
  __builtin_prefetch(w.d + r * w.nb);
  if (w.m) __builtin_prefetch(w.m + r * w.nb);
}

// Thread-local scratch reused across calls, so the decode path does not allocate.
template <typename V, int Slot>
V* scratch(int64_t count) {
  thread_local std::vector<V> buf;
  if (static_cast<int64_t>(buf.size()) < count) buf.resize(count);
  return buf.data();
}

void quantize_row(const float* x, int64_t cols, int64_t nb, int8_t* q, float* dx, float* sx,
                  int32_t* corr, int8_t* qperm) {
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t lo = b * kBlk, hi = std::min(cols, lo + kBlk);
    float amax = 0.0f;
    for (int64_t i = lo; i < hi; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
    dx[b] = amax / 127.0f;
    int32_t sum = 0;
    for (int64_t i = lo; i < lo + kBlk; ++i) {
      // Round half to even (as nearbyint in the default mode, and torch.round) without a
      // libm call: adding and subtracting 1.5 * 2^23 rounds any |v| < 2^22 exactly.
      constexpr float magic = 12582912.0f;
      float v = i < hi ? (x[i] * id + magic) - magic : 0.0f;
      v = std::min(127.0f, std::max(-127.0f, v));
      q[i] = static_cast<int8_t>(v);
      sum += q[i];
    }
    sx[b] = dx[b] * static_cast<float>(sum);
    for (int k = 0; k < 8; ++k)
      corr[b * 8 + k] = -128 * (q[lo + 4 * k] + q[lo + 4 * k + 1] + q[lo + 4 * k + 2] + q[lo + 4 * k + 3]);
  }
  for (int64_t g = 0; g + 4 <= nb; g += 4)
    for (int k = 0; k < 4; ++k) {
      std::memcpy(qperm + g * kBlk + 16 * k, q + (g + k) * kBlk, 16);
      std::memcpy(qperm + g * kBlk + 64 + 16 * k, q + (g + k) * kBlk + 16, 16);
    }
}

// Quantized views of n rows of x (float32 [n, cols]) held in thread-local scratch.
std::vector<XQ>& quantize_rows(const float* x, int64_t n, int64_t cols, int64_t nb) {
  const int64_t w = nb * kBlk;
  int8_t* q = scratch<int8_t, 10>(n * w);
  int8_t* qp = scratch<int8_t, 11>(n * w);
  float* dx = scratch<float, 12>(n * nb);
  float* sx = scratch<float, 13>(n * nb);
  int32_t* corr = scratch<int32_t, 14>(n * nb * 8);
  thread_local std::vector<XQ> views;
  views.resize(n);
  for (int64_t r = 0; r < n; ++r) {
    quantize_row(x + r * cols, cols, nb, q + r * w, dx + r * nb, sx + r * nb, corr + r * nb * 8, qp + r * w);
    views[r] = {q + r * w, dx + r * nb, sx + r * nb, corr + r * nb * 8, qp + r * w};
  }
  return views;
}

struct List {
  const int64_t* ids;
  int64_t k;
};

template <typename I>
void copy_checked(const I* src, int64_t k, int64_t limit, int64_t* out) {
  for (int64_t q = 0; q < k; ++q) {
    const int64_t v = static_cast<int64_t>(src[q]);
    TORCH_CHECK(v >= 0 && v < limit, "index ", v, " out of range [0, ", limit, ")");
    out[q] = v;
  }
}

// Bounds-checked int64 copy of idx (None: 0..limit-1), ascending if sort is set.
List index_list(const c10::optional<at::Tensor>& idx_opt, int64_t limit, bool sort) {
  if (!idx_opt.has_value()) {
    int64_t* out = scratch<int64_t, 0>(limit);
    for (int64_t i = 0; i < limit; ++i) out[i] = i;
    return {out, limit};
  }
  const at::Tensor idx = idx_opt->contiguous();
  TORCH_CHECK(idx.dim() == 1, "idx must be 1-D, got ", idx.sizes());
  const int64_t k = idx.numel();
  int64_t* out = scratch<int64_t, 0>(std::max<int64_t>(k, 1));
  if (idx.scalar_type() == at::kLong) copy_checked(idx.data_ptr<int64_t>(), k, limit, out);
  else if (idx.scalar_type() == at::kInt) copy_checked(idx.data_ptr<int32_t>(), k, limit, out);
  else TORCH_CHECK(false, "idx must be int64 or int32, got ", idx.scalar_type());
  if (sort && !std::is_sorted(out, out + k)) std::sort(out, out + k);
  return {out, k};
}

inline int64_t num_chunks(int64_t k) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return std::max<int64_t>(1, std::min<int64_t>(threads, k / kMinPerChunk));
}

// Runs body(lo, hi, acc) over [0, k) in chunks, each with a zeroed accumulator of `width`
// floats; writes bias + the sum of the accumulators' first `cols` entries to out and
// returns the sum of body's return values.
template <typename Body>
int64_t run_chunked(int64_t k, int64_t width, int64_t cols, const float* bias, float* out, const Body& body) {
  const int64_t nchunks = num_chunks(k);
  float* partials = scratch<float, 2>(nchunks * width);
  int64_t* counts = scratch<int64_t, 3>(nchunks);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      float* acc = partials + c * width;
      std::memset(acc, 0, width * sizeof(float));
      counts[c] = body(k * c / nchunks, k * (c + 1) / nchunks, acc);
    }
  });
  if (bias) std::memcpy(out, bias, cols * sizeof(float));
  else std::memset(out, 0, cols * sizeof(float));
  int64_t kept = 0;
  for (int64_t c = 0; c < nchunks; ++c) {
    const float* p = partials + c * width;
    for (int64_t j = 0; j < cols; ++j) out[j] += p[j];
    kept += counts[c];
  }
  return kept;
}

// acc += sum_p coef[p] * dequant(w row ids[p]) for p in [0, n), kGroup rows at a time.
inline void axpy_list(const Kern& k, const QM& w, const int64_t* ids, const float* coef, int64_t n, float* acc) {
  for (int64_t p = 0; p < n; p += kGroup) {
    const int m = static_cast<int>(std::min<int64_t>(kGroup, n - p));
    const int64_t from = p + m + (g_axpy_passes - 1) * kGroup;
    const Ahead next{ids + from, g_prefetch && from < n ? static_cast<int>(std::min<int64_t>(kGroup, n - from)) : 0};
    k.axpy(w, m, ids + p, coef + p, acc, next);
  }
}

// ------------------------------------------------------------------ tensor plumbing

QM as_qm(int64_t fmt, int64_t cols, const at::Tensor& qs, const at::Tensor& d,
         const c10::optional<at::Tensor>& m, const char* what) {
  TORCH_CHECK(fmt == kInt8 || fmt == kInt4, what, ": unknown format id ", fmt);
  TORCH_CHECK(qs.device().is_cpu() && qs.is_contiguous() && qs.dim() == 2, what,
              ": codes must be a contiguous 2-D CPU tensor (use moyu.kernels.quantize)");
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.is_contiguous() && d.dim() == 2, what,
              ": scales must be a contiguous float16 [rows, blocks] tensor");
  const int64_t rows = qs.size(0), nb = d.size(1);
  TORCH_CHECK(d.size(0) == rows && nb * kBlk >= cols && (nb - 1) * kBlk < std::max<int64_t>(cols, 1), what,
              ": scales ", d.sizes(), " do not match ", rows, " rows of ", cols, " columns");
  const uint16_t* mp = nullptr;
  if (fmt == kInt8) {
    TORCH_CHECK(qs.scalar_type() == at::kChar && qs.size(1) == nb * kBlk, what, ": int8 codes must be int8 [rows, ",
                nb * kBlk, "]");
  } else {
    TORCH_CHECK(qs.scalar_type() == at::kByte && qs.size(1) == nb * kBlk / 2, what,
                ": int4 codes must be uint8 [rows, ", nb * kBlk / 2, "]");
    TORCH_CHECK(m.has_value() && m->scalar_type() == at::kHalf && m->is_contiguous() && m->sizes() == d.sizes(),
                what, ": int4 needs float16 mins shaped like the scales");
    mp = reinterpret_cast<const uint16_t*>(m->data_ptr<at::Half>());
  }
  return {fmt, rows, cols, nb, reinterpret_cast<const uint8_t*>(qs.data_ptr()),
          reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>()), mp};
}

at::Tensor as_rows(const at::Tensor& x, int64_t width, const char* what) {
  TORCH_CHECK(x.dim() == 1 || x.dim() == 2, what, ": input must be [", width, "] or [n, ", width, "], got ",
              x.sizes());
  TORCH_CHECK(x.size(-1) == width, what, ": input has ", x.size(-1), " features, expected ", width);
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

const float* f32_ptr(const c10::optional<at::Tensor>& b, int64_t numel, const char* what) {
  if (!b.has_value()) return nullptr;
  TORCH_CHECK(b->scalar_type() == at::kFloat && b->is_contiguous() && b->numel() == numel, what,
              " must be a contiguous float32 tensor with ", numel, " elements");
  return b->data_ptr<float>();
}

inline int64_t nrows(const at::Tensor& x) { return x.dim() == 1 ? 1 : x.size(0); }

// ------------------------------------------------------------------ entry points

// Activation quantization as the kernels do it: (codes int8 [n, nb*32], scales fp32 [n, nb]).
std::tuple<at::Tensor, at::Tensor> quantize_act(const at::Tensor& x_in, int64_t nb) {
  const at::Tensor x = x_in.to(at::kFloat).contiguous().reshape({-1, x_in.size(-1)});
  const int64_t n = x.size(0), cols = x.size(1);
  TORCH_CHECK(nb * kBlk >= cols, "quantize_act: ", nb, " blocks cannot hold ", cols, " columns");
  std::vector<XQ>& v = quantize_rows(x.data_ptr<float>(), n, cols, nb);
  at::Tensor q = at::empty({n, nb * kBlk}, x.options().dtype(at::kChar));
  at::Tensor dx = at::empty({n, nb}, x.options());
  for (int64_t r = 0; r < n; ++r) {
    std::memcpy(q.data_ptr<int8_t>() + r * nb * kBlk, v[r].q, nb * kBlk);
    std::memcpy(dx.data_ptr<float>() + r * nb, v[r].dx, nb * sizeof(float));
  }
  return {q, dx};
}

// y[q * list.k + j] = W[list.ids[j]] . x_q (+ bias[list.ids[j]]) for the n quantized rows x_q.
void matvec_rows(const QM& w, const Kern& k, const List& list, const std::vector<XQ>& xq, int64_t n,
                 const float* bp, float* y) {
  const int64_t grain = std::max<int64_t>(kMinPerChunk, (list.k + at::get_num_threads() - 1) / at::get_num_threads());
  at::parallel_for(0, list.k, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      if (g_ahead && j + g_ahead < hi) prefetch_row(w, list.ids[j + g_ahead]);
      const int64_t r = list.ids[j];
      if (j + 4 <= hi && list.ids[j + 3] == r + 3 && list.ids[j + 1] == r + 1 && list.ids[j + 2] == r + 2) {
        float v[4];
        for (int64_t q = 0; q < n; ++q) {
          k.dot4(w, r, xq[q], v);
          for (int t = 0; t < 4; ++t) y[q * list.k + j + t] = v[t] + (bp ? bp[r + t] : 0.0f);
        }
        j += 3;
        continue;
      }
      const float b = bp ? bp[r] : 0.0f;
      for (int64_t q = 0; q < n; ++q) y[q * list.k + j] = k.dot(w, r, xq[q]) + b;
    }
  });
}

// y[., j] = W[rows[j]] . x (+ bias[rows[j]]).
at::Tensor q_matvec(const at::Tensor& x_in, int64_t fmt, int64_t cols, const at::Tensor& qs, const at::Tensor& d,
                    const c10::optional<at::Tensor>& m, const c10::optional<at::Tensor>& rows,
                    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& out_opt) {
  const QM w = as_qm(fmt, cols, qs, d, m, "q_matvec");
  const at::Tensor x = as_rows(x_in, cols, "q_matvec");
  const List list = index_list(rows, w.rows, false);
  at::Tensor out = output_for(x, list.k, out_opt);
  const float* bp = f32_ptr(bias, w.rows, "bias");
  const int64_t n = nrows(x);
  std::vector<XQ>& xq = quantize_rows(x.data_ptr<float>(), n, cols, w.nb);
  matvec_rows(w, kernels(fmt), list, xq, n, bp, out.data_ptr<float>());
  return out;
}

// y = sum_{r in rows} a[r] * dequant(W[r]) (+ bias); rows None: every row, or those with
// |a[r]| > tau when tau is given.
at::Tensor q_axpy(const at::Tensor& a_in, int64_t fmt, int64_t cols, const at::Tensor& qs, const at::Tensor& d,
                  const c10::optional<at::Tensor>& m, const c10::optional<at::Tensor>& rows,
                  c10::optional<double> tau, const c10::optional<at::Tensor>& bias,
                  const c10::optional<at::Tensor>& out_opt) {
  const QM w = as_qm(fmt, cols, qs, d, m, "q_axpy");
  const at::Tensor a = as_rows(a_in, w.rows, "q_axpy");
  at::Tensor out = output_for(a, cols, out_opt);
  const float* bp = f32_ptr(bias, cols, "bias");
  const Kern k = kernels(fmt);
  const int64_t n = nrows(a), width = w.nb * kBlk;
  const bool by_tau = !rows.has_value() && tau.has_value();
  for (int64_t q = 0; q < n; ++q) {
    const float* aq = a.data_ptr<float>() + q * w.rows;
    List list;
    if (by_tau) {
      int64_t* ids = scratch<int64_t, 0>(std::max<int64_t>(w.rows, 1));
      int64_t kk = 0;
      const float t = static_cast<float>(*tau);
      for (int64_t r = 0; r < w.rows; ++r)
        if (std::fabs(aq[r]) > t) ids[kk++] = r;
      list = {ids, kk};
    } else {
      list = index_list(rows, w.rows, true);
    }
    float* coef = scratch<float, 4>(std::max<int64_t>(list.k, 1));
    for (int64_t p = 0; p < list.k; ++p) coef[p] = aq[list.ids[p]];
    run_chunked(list.k, width, cols, bp, out.data_ptr<float>() + q * cols, [&](int64_t lo, int64_t hi, float* acc) {
      axpy_list(k, w, list.ids + lo, coef + lo, hi - lo, acc);
      return int64_t{0};
    });
  }
  return out;
}

struct MlpArgs {
  QM win, wdt;
  Kern kin, kdt;
  int64_t r;             // 2 gated (rows 2i gate, 2i+1 up), 1 plain
  const float* b_in;     // [d_ff * r] or null
  int64_t act, mode;
  float tau;
  const float* down_norm;  // [d_ff] or null (act mode: |a_i| * down_norm_i > tau)
};

// act(gate + bias) of gated neuron i from its gate dot product.
inline float gate_act(const MlpArgs& a, int64_t i, float gate) {
  return activate(gate + (a.b_in ? a.b_in[2 * i] : 0.0f), a.act);
}

// a_i = g * (up + bias) of gated neuron i from g = gate_act and its up dot product, and
// whether the act mode keeps it (the gate mode has decided before up is read).
inline bool gated_coef(const MlpArgs& a, int64_t i, float g, float up, float* coef) {
  *coef = g * (up + (a.b_in ? a.b_in[2 * i + 1] : 0.0f));
  if (a.mode == kActMode) return std::fabs(*coef) * (a.down_norm ? a.down_norm[i] : 1.0f) > a.tau;
  return true;
}

// Coefficient a_i of neuron i and whether the mode keeps it. One function for decode and
// for q_mlp_act, so both see bit-identical activations.
__attribute__((noinline)) bool neuron(const MlpArgs& a, const XQ& x, int64_t i, float* coef, bool gate_only) {
  const int64_t r0 = i * a.r;
  if (a.r == 2) {
    const float g = gate_act(a, i, a.kin.dot(a.win, r0, x));
    if (gate_only) {
      *coef = g;
      return true;
    }
    if (a.mode == kGateMode && !(std::fabs(g) > a.tau)) return false;   // up only if the gate keeps it
    return gated_coef(a, i, g, a.kin.dot(a.win, r0 + 1, x), coef);
  }
  *coef = activate(a.kin.dot(a.win, r0, x) + (a.b_in ? a.b_in[r0] : 0.0f), a.act);
  if (gate_only) return true;
  if (a.mode == kGateMode) return std::fabs(*coef) > a.tau;
  if (a.mode == kActMode) return std::fabs(*coef) * (a.down_norm ? a.down_norm[i] : 1.0f) > a.tau;
  return true;
}

// Gated neurons i and i + 1 when every row is read (modes all and act): their four
// adjacent gate/up rows in one dot4 pass, then the rule exactly as neuron() applies it.
inline void neuron_pair(const MlpArgs& a, const XQ& x, int64_t i, float* coef, bool* keep) {
  float v[4];
  a.kin.dot4(a.win, i * 2, x, v);
  keep[0] = gated_coef(a, i, gate_act(a, i, v[0]), v[1], coef);
  keep[1] = gated_coef(a, i + 1, gate_act(a, i + 1, v[2]), v[3], coef + 1);
}

MlpArgs mlp_args(int64_t fmt_in, const at::Tensor& qs_in, const at::Tensor& d_in, const c10::optional<at::Tensor>& m_in,
                 int64_t fmt_dt, const at::Tensor& qs_dt, const at::Tensor& d_dt, const c10::optional<at::Tensor>& m_dt,
                 int64_t dim, const c10::optional<at::Tensor>& b_in, int64_t act) {
  const QM win = as_qm(fmt_in, dim, qs_in, d_in, m_in, "w_in");
  TORCH_CHECK(act >= kSilu && act <= kRelu, "unknown activation id ", act);
  MlpArgs a{win, win, kernels(fmt_in), kernels(fmt_in), 1, nullptr, act, kAll, 0.0f, nullptr};
  if (fmt_dt >= 0) {
    a.wdt = as_qm(fmt_dt, dim, qs_dt, d_dt, m_dt, "w_down_t");
    a.kdt = kernels(fmt_dt);
    TORCH_CHECK(win.rows == a.wdt.rows || win.rows == 2 * a.wdt.rows,
                "w_in must hold 1 or 2 rows per neuron of w_down_t (", win.rows, " vs ", a.wdt.rows, ")");
    a.r = win.rows / a.wdt.rows;
  }
  a.b_in = f32_ptr(b_in, win.rows, "b_in");
  return a;
}

// One row's fused MLP over the neurons in list: y[0..d) = sum of kept a_i * W_down^T[i]
// (+ b_down); returns the number kept.
int64_t mlp_row(const MlpArgs& a, const List& list, const XQ& xr, const float* bd, float* y) {
  const int64_t width = a.wdt.nb * kBlk, d = a.wdt.cols;
  int64_t* kept_ids = scratch<int64_t, 5>(std::max<int64_t>(list.k, 1));
  float* coef = scratch<float, 6>(std::max<int64_t>(list.k, 1));
  return run_chunked(list.k, width, d, bd, y, [&](int64_t lo, int64_t hi, float* acc) {
    int64_t kept = 0;
    const bool pairs = a.r == 2 && a.mode != kGateMode;
    for (int64_t p = lo; p < hi; ++p) {
      if (g_ahead && p + g_ahead / 2 < hi)
        for (int64_t j = 0; j < a.r; ++j) prefetch_row(a.win, list.ids[p + g_ahead / 2] * a.r + j);
      const int64_t i = list.ids[p];
      if (pairs && p + 1 < hi && list.ids[p + 1] == i + 1) {
        float c[2];
        bool keep[2];
        neuron_pair(a, xr, i, c, keep);
        for (int t = 0; t < 2; ++t)
          if (keep[t]) {
            coef[lo + kept] = c[t];
            kept_ids[lo + kept++] = i + t;
          }
        ++p;
        continue;
      }
      if (neuron(a, xr, i, coef + lo + kept, false)) kept_ids[lo + kept++] = i;
    }
    axpy_list(a.kdt, a.wdt, kept_ids + lo, coef + lo, kept, acc);
    return kept;
  });
}

// Fused MLP: y = sum over kept neurons of a_i * W_down^T[i] (+ b_down); returns (y, kept
// summed over the rows of x).
std::tuple<at::Tensor, int64_t> q_mlp(const at::Tensor& x_in, int64_t fmt_in, const at::Tensor& qs_in,
                                      const at::Tensor& d_in, const c10::optional<at::Tensor>& m_in,
                                      int64_t fmt_dt, const at::Tensor& qs_dt, const at::Tensor& d_dt,
                                      const c10::optional<at::Tensor>& m_dt, const c10::optional<at::Tensor>& b_in,
                                      const c10::optional<at::Tensor>& b_down, const c10::optional<at::Tensor>& idx,
                                      int64_t act, int64_t mode, double tau,
                                      const c10::optional<at::Tensor>& down_norm,
                                      const c10::optional<at::Tensor>& out_opt) {
  TORCH_CHECK(mode >= kAll && mode <= kActMode, "unknown mode ", mode);
  const int64_t d = x_in.size(-1);
  MlpArgs a = mlp_args(fmt_in, qs_in, d_in, m_in, fmt_dt, qs_dt, d_dt, m_dt, d, b_in, act);
  a.mode = mode;
  a.tau = static_cast<float>(tau);
  const int64_t d_ff = a.wdt.rows;
  a.down_norm = f32_ptr(down_norm, d_ff, "down_norm");
  TORCH_CHECK(!(idx.has_value() && mode != kAll), "q_mlp: idx and a threshold mode are exclusive");
  const at::Tensor x = as_rows(x_in, d, "q_mlp");
  at::Tensor out = output_for(x, d, out_opt);
  const float* bd = f32_ptr(b_down, d, "b_down");
  const int64_t n = nrows(x);
  std::vector<XQ>& xq = quantize_rows(x.data_ptr<float>(), n, d, a.win.nb);
  const List list = index_list(idx, d_ff, true);
  int64_t total = 0;
  for (int64_t q = 0; q < n; ++q) total += mlp_row(a, list, xq[q], bd, out.data_ptr<float>() + q * d);
  return {out, total};
}

// Row r of a quantized matrix as float32 [nb * 32]: d * q (+ m), exactly as
// QuantMatrix.dequantize computes it.
void dequant_row(const QM& w, int64_t r, float* o) {
  const uint8_t* c = w.codes(r);
  for (int64_t b = 0; b < w.nb; ++b) {
    const float s = h2f(w.d[r * w.nb + b]);
    float* ob = o + b * kBlk;
    if (w.fmt == kInt8) {
      const int8_t* q = reinterpret_cast<const int8_t*>(c) + b * kBlk;
      for (int i = 0; i < kBlk; ++i) ob[i] = s * static_cast<float>(q[i]);
    } else {
      const float mn = h2f(w.m[r * w.nb + b]);
      const uint8_t* q = c + b * kBlk / 2;
      for (int i = 0; i < kBlk / 2; ++i) {
        ob[i] = s * static_cast<float>(q[i] & 0x0F) + mn;
        ob[i + kBlk / 2] = s * static_cast<float>(q[i] >> 4) + mn;
      }
    }
  }
}

// Rows r0 .. r1 of a quantized matrix as float32 [r1 - r0, nb * 32] (d * q (+ m), exactly as
// QuantMatrix.dequantize computes it): the prompt's widened weights, one pass, no temporaries.
at::Tensor dequant_rows(int64_t fmt, int64_t cols, const at::Tensor& qs, const at::Tensor& d,
                        const c10::optional<at::Tensor>& m, int64_t r0, int64_t r1) {
  const QM w = as_qm(fmt, cols, qs, d, m, "dequant_rows");
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= w.rows, "dequant_rows: rows ", r0, "..", r1, " outside [0, ", w.rows, "]");
  const int64_t width = w.nb * kBlk;
  at::Tensor out = at::empty({r1 - r0, width}, qs.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  at::parallel_for(r0, r1, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) dequant_row(w, r, op + (r - r0) * width);
  });
  return out;
}

// Activations of every neuron: [n, d_ff] (gate_only: act(gate) for gated MLPs).
at::Tensor q_mlp_act(const at::Tensor& x_in, int64_t fmt_in, const at::Tensor& qs_in, const at::Tensor& d_in,
                     const c10::optional<at::Tensor>& m_in, int64_t r, const c10::optional<at::Tensor>& b_in,
                     int64_t act, bool gate_only) {
  TORCH_CHECK(r == 1 || r == 2, "rows per neuron must be 1 or 2");
  const int64_t d = x_in.size(-1);
  MlpArgs a = mlp_args(fmt_in, qs_in, d_in, m_in, -1, qs_in, d_in, m_in, d, b_in, act);
  a.r = r;
  TORCH_CHECK(a.win.rows % r == 0, "w_in rows must be a multiple of ", r);
  const int64_t d_ff = a.win.rows / r;
  const at::Tensor x = as_rows(x_in, d, "q_mlp_act").reshape({-1, d});
  const int64_t n = x.size(0);
  std::vector<XQ>& xq = quantize_rows(x.data_ptr<float>(), n, d, a.win.nb);
  at::Tensor out = at::empty({n, d_ff}, x.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, d_ff, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i)
      for (int64_t q = 0; q < n; ++q) neuron(a, xq[q], i, op + q * d_ff + i, gate_only);
  });
  return out;
}

// ------------------------------------------------------------------ whole decode layers

// Decode plan: every layer of a pre-norm decoder with quantized linears run by one call per
// token. Per layer: RMSNorm, fused qkv (+bias), per-head q/k RMSNorms (optional), attention
// with RoPE and the cache write, o (+bias), an output RMSNorm (optional, Gemma 2/3),
// residual, RMSNorm, the fused MLP (dense, gate or act threshold), an output RMSNorm
// (optional), residual.
// The kernels are the ones the per-op path calls; what goes away is the ~70 us per layer
// of Python, argument conversion and tensor allocation around them.
class Plan {
 public:
  Plan(int64_t d, int64_t heads, int64_t n_kv, int64_t head_dim)
      : d_(d), heads_(heads), n_kv_(n_kv), hd_(head_dim), x_(d), y_(d), qkv_((heads + 2 * n_kv) * head_dim),
        att_(heads * head_dim) {
    TORCH_CHECK(d > 0 && heads > 0 && n_kv > 0 && head_dim > 0 && heads % n_kv == 0, "Plan: bad shape");
  }

  void add_layer(const at::Tensor& ln1, double eps1, const at::Tensor& ln2, double eps2,
                 int64_t fmt_qkv, const at::Tensor& qs_qkv, const at::Tensor& d_qkv,
                 const c10::optional<at::Tensor>& m_qkv, const c10::optional<at::Tensor>& b_qkv,
                 int64_t fmt_o, const at::Tensor& qs_o, const at::Tensor& d_o, const c10::optional<at::Tensor>& m_o,
                 const c10::optional<at::Tensor>& b_o,
                 int64_t fmt_in, const at::Tensor& qs_in, const at::Tensor& d_in, const c10::optional<at::Tensor>& m_in,
                 int64_t fmt_dt, const at::Tensor& qs_dt, const at::Tensor& d_dt, const c10::optional<at::Tensor>& m_dt,
                 const c10::optional<at::Tensor>& b_in, const c10::optional<at::Tensor>& b_down, int64_t act,
                 int64_t mode, double tau, const c10::optional<at::Tensor>& down_norm,
                 const at::Tensor& k_cache, const at::Tensor& v_cache, const c10::optional<at::Tensor>& cos,
                 const c10::optional<at::Tensor>& sin, int64_t window, double scale, double softcap,
                 const c10::optional<at::Tensor>& ln_attn_out, double eps_ao,
                 const c10::optional<at::Tensor>& ln_mlp_out, double eps_mo,
                 const c10::optional<at::Tensor>& q_norm, const c10::optional<at::Tensor>& k_norm, double eps_qk) {
    Layer L;
    L.ln_ao = f32_ptr(ln_attn_out, d_, "attention output norm");
    L.ln_mo = f32_ptr(ln_mlp_out, d_, "MLP output norm");
    L.eps_ao = eps_ao;
    L.eps_mo = eps_mo;
    L.qn = f32_ptr(q_norm, hd_, "q norm");
    L.kn = f32_ptr(k_norm, hd_, "k norm");
    TORCH_CHECK(!L.qn == !L.kn, "Plan: q and k norms come together");
    L.eps_qk = eps_qk;
    const int64_t qkv_rows = (heads_ + 2 * n_kv_) * hd_;
    for (const at::Tensor& t : {ln1, ln2}) TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == d_,
                                                      "Plan: norm weights must be float32 [", d_, "]");
    L.ln1 = ln1.data_ptr<float>();
    L.ln2 = ln2.data_ptr<float>();
    L.eps1 = eps1;
    L.eps2 = eps2;
    L.qkv = as_qm(fmt_qkv, d_, qs_qkv, d_qkv, m_qkv, "Plan qkv");
    TORCH_CHECK(L.qkv.rows == qkv_rows, "Plan: qkv has ", L.qkv.rows, " rows, expected ", qkv_rows);
    L.b_qkv = f32_ptr(b_qkv, qkv_rows, "qkv bias");
    L.o = as_qm(fmt_o, heads_ * hd_, qs_o, d_o, m_o, "Plan o");
    TORCH_CHECK(L.o.rows == d_, "Plan: o has ", L.o.rows, " rows, expected ", d_);
    L.b_o = f32_ptr(b_o, d_, "o bias");
    TORCH_CHECK(mode >= kAll && mode <= kActMode, "unknown mode ", mode);
    L.mlp = mlp_args(fmt_in, qs_in, d_in, m_in, fmt_dt, qs_dt, d_dt, m_dt, d_, b_in, act);
    L.mlp.mode = mode;
    L.mlp.tau = static_cast<float>(tau);
    L.mlp.down_norm = f32_ptr(down_norm, L.mlp.wdt.rows, "down_norm");
    L.b_down = f32_ptr(b_down, d_, "b_down");
    TORCH_CHECK(k_cache.scalar_type() == at::kFloat && k_cache.is_contiguous() && k_cache.dim() == 3 &&
                    k_cache.size(0) == n_kv_ && k_cache.size(2) == hd_ && v_cache.sizes() == k_cache.sizes() &&
                    v_cache.is_contiguous() && v_cache.scalar_type() == at::kFloat,
                "Plan: caches must be contiguous float32 [n_kv, S, head_dim]");
    L.kc = k_cache.data_ptr<float>();
    L.vc = v_cache.data_ptr<float>();
    L.S = k_cache.size(1);
    if (cos.has_value()) {
      TORCH_CHECK(sin.has_value() && cos->scalar_type() == at::kFloat && cos->is_contiguous() && cos->dim() == 2 &&
                      sin->sizes() == cos->sizes() && sin->is_contiguous() && sin->scalar_type() == at::kFloat &&
                      cos->size(0) >= L.S && 2 * cos->size(1) <= hd_,
                  "Plan: RoPE tables must be float32 [>= cache length, half] with 2*half <= head_dim");
      L.cos = cos->data_ptr<float>();
      L.sin = sin->data_ptr<float>();
      L.half = cos->size(1);
    }
    L.window = window;
    L.scale = static_cast<float>(scale);
    L.cap = static_cast<float>(softcap);
    // the tensors the pointers refer to stay alive as long as the plan
    for (const at::Tensor& t : {ln1, ln2, qs_qkv, d_qkv, qs_o, d_o, qs_in, d_in, qs_dt, d_dt, k_cache, v_cache})
      keep_.push_back(t);
    for (const c10::optional<at::Tensor>* t : {&m_qkv, &b_qkv, &m_o, &b_o, &m_in, &m_dt, &b_in, &b_down, &down_norm, &cos,
                                                &sin, &ln_attn_out, &ln_mlp_out, &q_norm, &k_norm})
      if (t->has_value()) keep_.push_back(**t);
    layers_.push_back(L);
  }

  // Runs every layer on h (float32 [d], updated in place) at position pos; returns the
  // neurons each layer's MLP computed (int64 [layers]).
  at::Tensor step(at::Tensor& h, int64_t pos) {
    TORCH_CHECK(h.scalar_type() == at::kFloat && h.is_contiguous() && h.numel() == d_, "Plan.step: h must be float32 [",
                d_, "]");
    const int64_t qn = heads_ * hd_, kn = n_kv_ * hd_;
    at::Tensor kept = at::empty({static_cast<int64_t>(layers_.size())}, at::kLong);
    int64_t* kp = kept.data_ptr<int64_t>();
    float* hp = h.data_ptr<float>();
    const auto rms = rms_fn();
#if MOYUQ_X86
    auto prepare = g_isa >= kAvx2 ? avx2::attend_prepare : scalar::attend_prepare;
    auto attend_heads = g_isa >= kAvx2 ? avx2::attend_heads : scalar::attend_heads;
#else
    auto prepare = scalar::attend_prepare;
    auto attend_heads = scalar::attend_heads;
#endif
    Clock clock(timing_ ? &times_ : nullptr);
    for (size_t li = 0; li < layers_.size(); ++li) {
      const Layer& L = layers_[li];
      TORCH_CHECK(pos >= 0 && pos < L.S, "Plan.step: position ", pos, " outside the cache (", L.S, ")");
      rms(hp, L.ln1, d_, L.eps1, x_.data());
      clock.lap(kRest);
      matvec_all(L.qkv, x_.data(), L.b_qkv, qkv_.data());
      clock.lap(kAttnLinears);
      if (L.qn) {   // per-head norms of q and k (in place), before RoPE
        for (int64_t j = 0; j < heads_; ++j) rms(qkv_.data() + j * hd_, L.qn, hd_, L.eps_qk, qkv_.data() + j * hd_);
        for (int64_t j = 0; j < n_kv_; ++j) rms(qkv_.data() + qn + j * hd_, L.kn, hd_, L.eps_qk, qkv_.data() + qn + j * hd_);
      }
      const int64_t lo = L.window > 0 ? std::max<int64_t>(0, pos - L.window + 1) : 0;
      AttnArgs a{L.kc, L.vc, L.S, hd_, n_kv_, heads_, pos, lo, L.cos ? L.cos + pos * L.half : nullptr,
                 L.sin ? L.sin + pos * L.half : nullptr, L.half, L.scale, L.cap};
      float* scr = scratch<float, 20>(qn + heads_ * (pos - lo + 1));
      prepare(a, qkv_.data(), qkv_.data() + qn, qkv_.data() + qn + kn, scr);
      at::parallel_for(0, heads_, scalar::attend_grain(heads_, pos - lo + 1, hd_), [&](int64_t h0, int64_t h1) {
        attend_heads(a, scr, h0, h1, att_.data(), scr + qn);
      });
      clock.lap(kAttnCore);
      matvec_all(L.o, att_.data(), L.b_o, y_.data());
      clock.lap(kAttnLinears);
      if (L.ln_ao) rms(y_.data(), L.ln_ao, d_, L.eps_ao, y_.data());
      for (int64_t i = 0; i < d_; ++i) hp[i] += y_[i];
      rms(hp, L.ln2, d_, L.eps2, x_.data());
      std::vector<XQ>& xq = quantize_rows(x_.data(), 1, d_, L.mlp.win.nb);
      const List all = index_list(c10::nullopt, L.mlp.wdt.rows, false);
      clock.lap(kRest);
      kp[li] = mlp_row(L.mlp, all, xq[0], L.b_down, y_.data());
      clock.lap(kMlp);
      if (L.ln_mo) rms(y_.data(), L.ln_mo, d_, L.eps_mo, y_.data());
      for (int64_t i = 0; i < d_; ++i) hp[i] += y_[i];
    }
    clock.lap(kRest);
    return kept;
  }

  int64_t size() const { return static_cast<int64_t>(layers_.size()); }

  // The token's two ends, for decode_token: the embedding table (a quantized matrix whose
  // row t is token t's vector, times embed_scale) and the final RMSNorm + quantized lm_head
  // (+ bias). The tables may be one matrix (tied embeddings).
  void set_ends(int64_t fmt_e, int64_t cols_e, const at::Tensor& qs_e, const at::Tensor& d_e,
                const c10::optional<at::Tensor>& m_e, double embed_scale, const at::Tensor& norm, double eps,
                int64_t fmt_h, const at::Tensor& qs_h, const at::Tensor& d_h, const c10::optional<at::Tensor>& m_h,
                const c10::optional<at::Tensor>& b_h) {
    TORCH_CHECK(cols_e == d_, "Plan.set_ends: embedding width ", cols_e, " != model width ", d_);
    embed_ = as_qm(fmt_e, d_, qs_e, d_e, m_e, "Plan embedding");
    head_ = as_qm(fmt_h, d_, qs_h, d_h, m_h, "Plan lm_head");
    TORCH_CHECK(norm.scalar_type() == at::kFloat && norm.is_contiguous() && norm.numel() == d_,
                "Plan: final norm weight must be float32 [", d_, "]");
    final_norm_ = norm.data_ptr<float>();
    final_eps_ = eps;
    embed_scale_ = static_cast<float>(embed_scale);
    b_head_ = f32_ptr(b_h, head_.rows, "lm_head bias");
    for (const at::Tensor& t : {qs_e, d_e, norm, qs_h, d_h}) keep_.push_back(t);
    for (const c10::optional<at::Tensor>* t : {&m_e, &m_h, &b_h})
      if (t->has_value()) keep_.push_back(**t);
    has_ends_ = true;
  }

  // One whole decode step: token's embedding into h (float32 [d]), every layer (as step),
  // the final RMSNorm and the lm_head into logits (float32 [vocab]). Returns step's kept counts.
  at::Tensor decode_token(int64_t token, int64_t pos, at::Tensor& h, at::Tensor& logits) {
    TORCH_CHECK(has_ends_, "Plan.decode_token: call set_ends first");
    TORCH_CHECK(token >= 0 && token < embed_.rows, "token id ", token, " outside the vocabulary [0, ", embed_.rows, ")");
    TORCH_CHECK(h.scalar_type() == at::kFloat && h.is_contiguous() && h.numel() == d_, "Plan.decode_token: h must be float32 [",
                d_, "]");
    TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.is_contiguous() && logits.numel() == head_.rows,
                "Plan.decode_token: logits must be float32 [", head_.rows, "]");
    float* row = scratch<float, 21>(embed_.nb * kBlk);
    dequant_row(embed_, token, row);
    float* hp = h.data_ptr<float>();
    if (embed_scale_ != 1.0f) for (int64_t i = 0; i < d_; ++i) hp[i] = row[i] * embed_scale_;
    else std::memcpy(hp, row, d_ * sizeof(float));
    at::Tensor kept = step(h, pos);
    rms_fn()(hp, final_norm_, d_, final_eps_, x_.data());
    matvec_all(head_, x_.data(), b_head_, logits.data_ptr<float>());
    return kept;
  }

  // Per-part timers of step() (seconds summed over the steps since the last read; off by
  // default): [MLP, attention linears (qkv, o), attention core, the rest (norms, residuals,
  // activation quantization)]. Reading them resets them.
  void set_timing(bool on) { timing_ = on; }
  at::Tensor read_times() {
    at::Tensor t = at::empty({kParts}, at::kDouble);
    for (int i = 0; i < kParts; ++i) t.data_ptr<double>()[i] = times_[i];
    times_.fill(0.0);
    return t;
  }

 private:
  struct Layer {
    const float *ln1 = nullptr, *ln2 = nullptr, *ln_ao = nullptr, *ln_mo = nullptr, *qn = nullptr, *kn = nullptr;
    double eps1 = 0, eps2 = 0, eps_ao = 0, eps_mo = 0, eps_qk = 0;
    QM qkv{}, o{};
    const float *b_qkv = nullptr, *b_o = nullptr, *b_down = nullptr;
    MlpArgs mlp{};
    float *kc = nullptr, *vc = nullptr;
    int64_t S = 0;
    const float *cos = nullptr, *sin = nullptr;
    int64_t half = 0, window = 0;
    float scale = 1.0f, cap = 0.0f;
  };

  // RMSNorm of one row on the widest path this CPU runs.
  using RmsFn = void (*)(const float*, const float*, int64_t, double, float*);
  static RmsFn rms_fn() {
#if MOYUQ_X86
    return g_isa >= kAvx2 ? avx2::rms_row : scalar::rms_row;
#else
    return scalar::rms_row;
#endif
  }

  // y = W x (+ b) over every row of W.
  static void matvec_all(const QM& w, const float* x, const float* b, float* y) {
    std::vector<XQ>& xq = quantize_rows(x, 1, w.cols, w.nb);
    matvec_rows(w, kernels(w.fmt), index_list(c10::nullopt, w.rows, false), xq, 1, b, y);
  }

  enum Part { kMlp, kAttnLinears, kAttnCore, kRest, kParts };
  using Times = std::array<double, kParts>;
  // Adds the time since the previous lap to one part; does nothing when times is null.
  struct Clock {
    Times* times;
    std::chrono::steady_clock::time_point t;
    explicit Clock(Times* tt) : times(tt) {
      if (times) t = std::chrono::steady_clock::now();
    }
    void lap(int part) {
      if (!times) return;
      const auto now = std::chrono::steady_clock::now();
      (*times)[part] += std::chrono::duration<double>(now - t).count();
      t = now;
    }
  };

  bool timing_ = false;
  Times times_{};
  bool has_ends_ = false;
  QM embed_{}, head_{};
  const float* final_norm_ = nullptr;
  const float* b_head_ = nullptr;
  double final_eps_ = 0.0;
  float embed_scale_ = 1.0f;
  int64_t d_, heads_, n_kv_, hd_;
  std::vector<float> x_, y_, qkv_, att_;   // one token's activations, reused (steps run one at a time)
  std::vector<Layer> layers_;
  std::vector<at::Tensor> keep_;
};

}  // namespace moyuq

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  auto release = [] { return pybind11::call_guard<pybind11::gil_scoped_release>(); };
  m.def("quantize_act", &moyuq::quantize_act, "activation rows -> (int8 codes, fp32 block scales)", release());
  m.def("q_matvec", &moyuq::q_matvec, "y[j] = W[rows[j]] . x over quantized rows", release());
  m.def("q_axpy", &moyuq::q_axpy, "y = sum_r a[r] * W[r] over listed quantized rows", release());
  m.def("q_mlp", &moyuq::q_mlp, "fused quantized MLP (dense, kept list, or threshold)", release());
  m.def("q_mlp_act", &moyuq::q_mlp_act, "activations of every neuron from quantized gate/up", release());
  m.def("dequant_rows", &moyuq::dequant_rows, "rows r0..r1 of a quantized matrix as float32", release());
  m.def("best_isa", &moyuq::best_isa, "widest code path this CPU runs (0 scalar, 1 avx2, 2 avx512-vnni)");
  m.def("get_isa", &moyuq::get_isa, "code path in use");
  m.def("set_isa", &moyuq::set_isa, "force a code path no wider than best_isa()");
  pybind11::class_<moyuq::Plan>(m, "Plan", "whole decode layers over quantized weights, one call per token")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t>())
      .def("add_layer", &moyuq::Plan::add_layer)
      .def("step", &moyuq::Plan::step, release())
      .def("set_ends", &moyuq::Plan::set_ends, "embedding table, final RMSNorm and lm_head for decode_token")
      .def("decode_token", &moyuq::Plan::decode_token, release())
      .def("set_timing", &moyuq::Plan::set_timing, "turn the per-part timers of step() on or off")
      .def("read_times", &moyuq::Plan::read_times,
           "seconds per part since the last read: [mlp, attn_linears, attn_core, rest]; resets them")
      .def("__len__", &moyuq::Plan::size);
  m.def("set_dot_prefetch", &moyuq::set_dot_prefetch, "rows ahead that the four-row dot products prefetch");
  m.def("set_axpy_prefetch", &moyuq::set_axpy_prefetch, "passes ahead whose rows an axpy pass prefetches");
  m.def("set_prefetch", &moyuq::set_prefetch, "software prefetch: -1 none, 0 axpy passes only (default), n > 0 also n rows ahead in dot loops");
}
