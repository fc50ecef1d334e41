// The pinned arithmetic of the fused residual-add + LayerNorm + FP8 quantize
// op, shared by the CPU and CUDA kernels (the jnp twin is
// jax_bq/reference_layernorm.py, which documents the order in full).
//
// Row reduction order: V = 8 values per lane, L = 32 * W lanes with
// W = min(8, ceil(H / 256)), C = ceil(H / (L * V)) chunks; element
// i = (c * L + l) * V + v (i >= H counts as +0). Each lane sums its values in
// (c, v) order starting from the first; each warp adds its 32 lane partials by
// halving (xor butterfly 16, 8, 4, 2, 1); the W warp totals are added in
// order. Then, one IEEE float32 rounding per operation and no FMA:
//   mean = total * RN(1/H)  (a zero mean is +0)
//   var  = total((s - mean)^2) * RN(1/H)
//   rstd = 1 / sqrt(var + eps)
//   y32  = ((s - mean) * rstd) * gamma + beta
#ifndef JAX_BQ_LAYERNORM_MATH_H_
#define JAX_BQ_LAYERNORM_MATH_H_

#include <cstdint>

#include "jax_bq/block_math.h"

namespace jax_bq {

// Scale modes, shared with jax_bq/primitives/layernorm_quantize.py (MODES).
enum class LnqMode : int32_t { kStatic = 0, kPerToken = 1, kPerTensor = 2 };

constexpr int kLnqVec = 8;
constexpr int kLnqWarp = 32;
constexpr int kLnqMaxWarps = 8;

JAX_BQ_HD int LnqWarps(int64_t h) {
  const int64_t w = (h + kLnqWarp * kLnqVec - 1) / (kLnqWarp * kLnqVec);
  return static_cast<int>(w < 1 ? 1 : (w > kLnqMaxWarps ? kLnqMaxWarps : w));
}

JAX_BQ_HD int64_t LnqChunks(int64_t h) {
  const int64_t per_chunk = int64_t{kLnqWarp} * LnqWarps(h) * kLnqVec;
  const int64_t c = (h + per_chunk - 1) / per_chunk;
  return c < 1 ? 1 : c;
}

JAX_BQ_HD float LnqMean(float total, float inv_h) {
  const float m = total * inv_h;
  return m == 0.0f ? 0.0f : m;
}

JAX_BQ_HD float LnqRstd(float var, float eps) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(var, eps)));
#else
  return 1.0f / std::sqrt(var + eps);
#endif
}

JAX_BQ_HD float LnqNormalize(float d, float rstd, float gamma, float beta) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(__fmul_rn(d, rstd), gamma), beta);
#else
  return d * rstd * gamma + beta;  // built with -ffp-contract=off
#endif
}

// Static per-tensor code (jax_bq.static.encode_scaled): inv = 1 / s exactly
// (s a power of two) or NaN for an invalid scale.
template <Format F>
JAX_BQ_HD uint8_t LnqEncodeStatic(float y, float inv) {
  using T = FormatTraits<F>;
  if (!IsFinite(y) || inv != inv) return T::kNaNCode;
  float v = y * inv;
  v = v > T::kMax ? T::kMax : (v < -T::kMax ? -T::kMax : v);
  return T::Encode(v);
}

// |y| of a finite value, 0 otherwise (the amax of the dynamic scales).
JAX_BQ_HD float LnqFiniteMag(float y) {
  const uint32_t bits = FloatBits(y) & 0x7fffffffu;
  return bits < 0x7f800000u ? BitsFloat(bits) : 0.0f;
}

}  // namespace jax_bq

#endif  // JAX_BQ_LAYERNORM_MATH_H_
