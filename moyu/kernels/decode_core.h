// moyu decode core: RMSNorm of one row and one decode position of attention (RoPE, cache
// write, scores, softmax, weighted sum), in plain loops the compiler vectorises for the
// instruction set of the region that includes this file.
//
// Included inside an ISA namespace of quant_kernels.cpp (after its standard headers), once
// per code path, so each copy is compiled with that path's target options. It must
// therefore include nothing and define only inline functions; AttnArgs (attn_args.h) must
// be visible where it is included.

// Dot product with eight independent partial sums (vectorisable without -ffast-math).
inline float dot_f(const float* a, const float* b, int64_t n) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += a[i + j] * b[i + j];
  float t = 0.0f;
  for (; i < n; ++i) t += a[i] * b[i];
  return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7])) + t;
}

// out = x / rms(x) * w (w may be null); the sum of squares in double, as the fp32
// extension's rms_norm computes it.
inline void rms_row(const float* x, const float* w, int64_t d, double eps, float* out) {
  double ss = 0.0;
  for (int64_t i = 0; i < d; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(d) + eps));
  if (w) for (int64_t i = 0; i < d; ++i) out[i] = x[i] * inv * w[i];
  else for (int64_t i = 0; i < d; ++i) out[i] = x[i] * inv;
}

// dst = rotate(src) * mul (GPT-NeoX half rotation over the first 2*half channels).
inline void rope_row(const AttnArgs& a, const float* src, float* dst, float mul) {
  for (int64_t i = 0; i < a.hd; ++i) dst[i] = src[i];
  for (int64_t i = 0; i < a.half; ++i) {
    const float x1 = src[i], x2 = src[i + a.half];
    dst[i] = x1 * a.cos[i] - x2 * a.sin[i];
    dst[i + a.half] = x2 * a.cos[i] + x1 * a.sin[i];
  }
  if (mul != 1.0f)
    for (int64_t i = 0; i < a.hd; ++i) dst[i] *= mul;
}

// exp(x) for x <= 0 (softmax after subtracting the maximum), in plain arithmetic the compiler
// vectorises: x = n ln2 + r with |r| <= ln2/2, a degree-6 polynomial for e^r (Cephes' expf
// coefficients, ~1 ulp), and 2^n from the exponent bits. Below -87.3 it returns ~1e-38 (a
// weight that vanishes next to the maximum's 1) instead of a denormal or zero.
inline float exp_neg(float x) {
  x = x < -87.3f ? -87.3f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float p2;
  std::memcpy(&p2, &bits, sizeof(p2));
  return y * p2;
}

// Writes k and v of position pos into the caches and the rotated, scaled queries into
// qs[heads * hd]: the part of a decode position every head's attention needs first.
inline void attend_prepare(const AttnArgs& a, const float* q, const float* k, const float* v, float* qs) {
  const int64_t hd = a.hd, S = a.S;
  for (int64_t j = 0; j < a.n_kv; ++j) {
    float* kd = a.kc + (j * S + a.pos) * hd;
    if (a.cos) rope_row(a, k + j * hd, kd, 1.0f);
    else for (int64_t i = 0; i < hd; ++i) kd[i] = k[j * hd + i];
    std::memcpy(a.vc + (j * S + a.pos) * hd, v + j * hd, hd * sizeof(float));
  }
  for (int64_t h = 0; h < a.heads; ++h) {
    if (a.cos) rope_row(a, q + h * hd, qs + h * hd, a.scale);
    else for (int64_t i = 0; i < hd; ++i) qs[h * hd + i] = q[h * hd + i] * a.scale;
  }
}

constexpr int64_t kAttendAcc = 128;   // head dims summed per pass over the values

// Heads per thread for one decode position's attention (the grain of a parallel loop over
// heads): all on the calling thread while the work (heads x positions x head_dim) is too
// small to pay for a parallel region (~3-5 us), one head per task past 2^15.
inline int64_t attend_grain(int64_t heads, int64_t n, int64_t hd) {
  return heads * n * hd >= (int64_t{1} << 15) ? 1 : heads;
}

// out[h * hd ..] = attention of head h over positions lo..pos, for heads h0 <= h < h1
// (after attend_prepare). p: scratch of heads * (pos - lo + 1) floats; head h uses only its
// own slice, so disjoint head ranges can run on different threads.
inline void attend_heads(const AttnArgs& a, const float* qs, int64_t h0, int64_t h1, float* out, float* p) {
  const int64_t hd = a.hd, S = a.S, group = a.heads / a.n_kv, n = a.pos - a.lo + 1;
  for (int64_t h = h0; h < h1; ++h) {
    const int64_t j = h / group;
    const float* kr = a.kc + (j * S + a.lo) * hd;
    const float* vr = a.vc + (j * S + a.lo) * hd;
    float* ph = p + h * n;
    float mx = -INFINITY;
    for (int64_t t = 0; t < n; ++t) {
      float s = dot_f(qs + h * hd, kr + t * hd, hd);
      if (a.cap > 0.0f) s = std::tanh(s / a.cap) * a.cap;
      mx = std::max(mx, ph[t] = s);
    }
    for (int64_t t = 0; t < n; ++t) ph[t] = exp_neg(ph[t] - mx);
    float sum = 0.0f;
    for (int64_t t = 0; t < n; ++t) sum += ph[t];
    const float inv = 1.0f / sum;
    // The weighted sum of v in a local accumulator: with `out` as the target the compiler
    // must assume it may alias the cache and reloads and stores it for every position.
    float acc[kAttendAcc];
    for (int64_t i0 = 0; i0 < hd; i0 += kAttendAcc) {
      const int64_t m = std::min<int64_t>(kAttendAcc, hd - i0);
      for (int64_t i = 0; i < m; ++i) acc[i] = 0.0f;
      for (int64_t t = 0; t < n; ++t) {
        const float w = ph[t] * inv;
        const float* __restrict vt = vr + t * hd + i0;
        for (int64_t i = 0; i < m; ++i) acc[i] += w * vt[i];
      }
      for (int64_t i = 0; i < m; ++i) out[h * hd + i0 + i] = acc[i];
    }
  }
}

// Writes k and v of position pos into the caches and out[heads * hd] = attention of q over
// positions lo..pos, on the calling thread. scratch: heads * hd + heads * (pos - lo + 1) floats.
inline void attend(const AttnArgs& a, const float* q, const float* k, const float* v, float* out,
                   float* scratch) {
  attend_prepare(a, q, k, v, scratch);
  attend_heads(a, scratch, 0, a.heads, out, scratch + a.heads * a.hd);
}
