// The pinned per-block arithmetic of every format, shared by CPU and CUDA.
//
// A kernel computes, for each block, amax = max|x| over its real elements and
// whether all of them are finite, then calls ComputeBlockScale, then
// QuantizeElement on each element. Dequantize is DecodeElement(q) * scale,
// with scale = EffectiveScale(stored, tensor_scale), in float32.
//
//   FP32-scale (FP8_E4M3, FP8_E5M2, FP4):
//     s = amax / MAX (RN); s = 1 if amax == 0; s = 2^-149 if amax/MAX
//     underflows to 0. q = encode(clip(x / s, -MAX, MAX)).
//   NVFP4 (E2M1 data, E4M3 scale per 16, float32 tensor scale st):
//     st = amax_tensor / (448 * 6) over the finite elements (1 if zero);
//     sb = e4m3(min((amax / 6) / st, 448)); se = float(sb) * st;
//     q = encode(clip(x / se, -6, 6)), or a signed zero when se == 0.
//   MX (OCP MX v1.0; E8M0 scale per 32):
//     X = clamp(floor(log2(amax)) - emax_elem, -127, 127), emax_elem = 8
//     (E4M3), 2 (E2M1, E2M3) or 4 (E3M2); X = 0 if amax == 0;
//     q = encode(clip(x / 2^X)).
//   A block holding NaN or +-Inf gets a NaN scale (float NaN, E4M3 0x7F or
//   E8M0 0xFF) and NaN codes (0 for E2M1 and FP6, which have no NaN), so
//   exactly that block dequantizes to NaN.
#ifndef JAX_BQ_BLOCK_MATH_H_
#define JAX_BQ_BLOCK_MATH_H_

#include <cstdint>
#include <type_traits>

#include "jax_bq/formats.h"

namespace jax_bq {

// Element codec of format F, picked from its registry row: FP8 (E4M3FN, E5M2)
// takes Fp8Codec (hardware conversions on sm_89+), E2M1 its dedicated codec,
// and any other minifloat (OCP MX FP6 E2M3 / E3M2) FiniteMinifloatCodec.
template <Format F>
using ElementCodec = std::conditional_t<
    InfoOf(F).bits == 8, Fp8Codec<InfoOf(F).exponent_bits, InfoOf(F).mantissa_bits>,
    std::conditional_t<InfoOf(F).exponent_bits == 2 && InfoOf(F).mantissa_bits == 1, E2M1Codec,
                       FiniteMinifloatCodec<InfoOf(F).exponent_bits, InfoOf(F).mantissa_bits>>>;

// Codec (Encode, Decode, kNaNCode: the code of a non-finite block) and
// registry properties of format F.
template <Format F>
struct FormatTraits : ElementCodec<F> {
  static_assert(InfoOf(F).bits == 1 + InfoOf(F).exponent_bits + InfoOf(F).mantissa_bits,
                "sign, exponent and mantissa fill the code");
  static constexpr bool kPacked = InfoOf(F).Packed();
  static constexpr float kMax = InfoOf(F).max_value;
};

// OCP MX emax_elem: the exponent of the element format's largest normal
// (8 for E4M3, 2 for E2M1 and E2M3, 4 for E3M2), from the registry's max.
JAX_BQ_HD_CONSTEXPR int ElementEmax(float max_value) {
  int e = 0;
  while (max_value >= 2.0f) {
    max_value *= 0.5f;
    ++e;
  }
  return e;
}

constexpr float kNVFP4TensorDivisor = kE4M3Max * kE2M1Max;  // 2688
constexpr float kMinNormalF32 = 1.17549435e-38f;            // 2^-126

// Scale of one block as the kernels use it.
struct BlockScale {
  float divisor;  // x / divisor is encoded; 0 means "all codes are zero".
  // MX: 2^-X, exact, so x * inverse == x / divisor. Otherwise RN(1 / divisor)
  // for the device's Markstein division, or 0 when the divisor is subnormal.
  float inverse;
  bool finite;      // false: the block held NaN/Inf, codes are the NaN code.
  uint32_t stored;  // float32 bits, or the E4M3 / E8M0 code.
};

// Tensor scale of NVFP4 from the amax of the finite elements of the tensor.
JAX_BQ_HD float NVFP4TensorScale(float finite_amax) {
  if (finite_amax == 0.0f) return 1.0f;
  const float st = finite_amax / kNVFP4TensorDivisor;
  return st == 0.0f ? MinPositiveF32() : st;
}

template <Format F>
JAX_BQ_HD BlockScale ComputeBlockScale(float amax, bool finite, float tensor_scale) {
  using T = FormatTraits<F>;
  BlockScale r;
  r.finite = finite;
  if constexpr (HasF32Scale(F)) {
    if (!finite) {
      r.divisor = QuietNaN();
      r.stored = FloatBits(r.divisor);
      return r;
    }
    float s = amax == 0.0f ? 1.0f : amax / T::kMax;
    if (s == 0.0f) s = MinPositiveF32();
    r.divisor = s;
    r.inverse = s >= kMinNormalF32 ? 1.0f / s : 0.0f;
    r.stored = FloatBits(s);
  } else if constexpr (F == Format::kNVFP4) {
    if (!finite) {
      r.divisor = QuietNaN();
      r.stored = kE4M3NaN;
      return r;
    }
    float sb = (amax / kE2M1Max) / tensor_scale;
    sb = sb < kE4M3Max ? sb : kE4M3Max;  // saturate; also catches +Inf
    const uint8_t code = EncodeE4M3(sb);
    r.stored = code;
    r.divisor = DecodeE4M3(code) * tensor_scale;
    r.inverse = r.divisor >= kMinNormalF32 ? 1.0f / r.divisor : 0.0f;
  } else {  // MX
    if (!finite) {
      r.divisor = QuietNaN();
      r.stored = kE8M0NaN;
      return r;
    }
    constexpr int kEmaxElem = ElementEmax(InfoOf(F).max_value);
    int x = amax == 0.0f ? 0 : FloorLog2(amax) - kEmaxElem;
    x = x < -127 ? -127 : (x > 127 ? 127 : x);
    r.stored = static_cast<uint32_t>(x + 127);
    r.divisor = DecodeE8M0(static_cast<uint8_t>(r.stored));
    // 2^-X for X in [-127, 127]: exact (2^-127 is the subnormal 0x00400000).
    r.inverse = x == 127 ? BitsFloat(0x00400000u) : BitsFloat(static_cast<uint32_t>(127 - x) << 23);
  }
  return r;
}

// RN(x / s.divisor), bit for bit, for a finite block with a non-zero scale.
template <Format F>
JAX_BQ_HD float ScaledElement(float x, const BlockScale& s) {
  if constexpr (IsMX(F)) {
    // The divisor is a power of two: multiplying by its exact inverse rounds
    // the same real number as the division.
    return x * s.inverse;
  } else {
#if defined(__CUDA_ARCH__)
    // Markstein: with r = RN(1/s), q0 = RN(x r) is within 1 ulp and the FMA
    // residual x - q0 s is exact unless it underflows, so RN(q0 + e r) is the
    // correctly rounded quotient. Guarded to inputs where nothing underflows
    // (|x| >= 2^-100, s normal); 193M random pairs matched x / s exactly.
    if (s.inverse != 0.0f && fabsf(x) >= 0x1p-100f) {
      const float q0 = x * s.inverse;
      const float e = __fmaf_rn(-q0, s.divisor, x);
      return copysignf(__fmaf_rn(e, s.inverse, q0), x);
    }
#endif
    return x / s.divisor;
  }
}

// Code of x in a finite block with a non-zero scale (the hot path).
template <Format F>
JAX_BQ_HD uint8_t QuantizeFinite(float x, const BlockScale& s) {
  using T = FormatTraits<F>;
  float v = ScaledElement<F>(x, s);
#if defined(__CUDA_ARCH__)
  v = fminf(fmaxf(v, -T::kMax), T::kMax);  // v is never NaN here
#else
  v = v > T::kMax ? T::kMax : (v < -T::kMax ? -T::kMax : v);
#endif
  return T::Encode(v);
}

template <Format F>
JAX_BQ_HD uint8_t QuantizeElement(float x, const BlockScale& s) {
  if (!s.finite) return FormatTraits<F>::kNaNCode;
  // NVFP4 block whose E4M3 scale is 0: a signed zero (keeps -0).
  if (s.divisor == 0.0f) return static_cast<uint8_t>((FloatBits(x) >> 31) << 3);
  return QuantizeFinite<F>(x, s);
}

// The float32 multiplier that dequantize applies to a decoded element.
template <Format F>
JAX_BQ_HD float EffectiveScale(uint32_t stored, float tensor_scale) {
  if constexpr (HasF32Scale(F)) {
    return BitsFloat(stored);
  } else if constexpr (F == Format::kNVFP4) {
    return DecodeE4M3(static_cast<uint8_t>(stored)) * tensor_scale;
  } else {
    return DecodeE8M0(static_cast<uint8_t>(stored));
  }
}

// Writes a block's stored scale (BlockScale::stored) to slot i of the scales:
// float32 bits, or the one-byte E4M3 / E8M0 code.
template <Format F>
JAX_BQ_HD void StoreScale(void* scales, int64_t i, uint32_t stored) {
  if constexpr (HasF32Scale(F)) {
    static_cast<uint32_t*>(scales)[i] = stored;
  } else {
    static_cast<uint8_t*>(scales)[i] = static_cast<uint8_t>(stored);
  }
}

template <Format F>
JAX_BQ_HD float DequantizeElement(uint8_t code, float scale) {
  return FormatTraits<F>::Decode(code) * scale;
}

}  // namespace jax_bq

#endif  // JAX_BQ_BLOCK_MATH_H_
