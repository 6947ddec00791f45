// Arguments of one decode position of attention (decode_core.h's attend), shared by the
// fp32 and the quantized extensions.
#pragma once

#include <cstdint>

namespace moyu_core {

struct AttnArgs {
  float* kc;             // [n_kv, S, hd] cache of rotated keys
  float* vc;             // [n_kv, S, hd]
  int64_t S, hd, n_kv, heads, pos, lo;
  const float* cos;      // [half] rows of this position, or null (no RoPE)
  const float* sin;
  int64_t half;
  float scale, cap;      // query scale; logit soft-cap (0: none)
};

}  // namespace moyu_core
