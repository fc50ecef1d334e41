// Element and scale codecs shared by the CPU and CUDA kernels.
//
// Every function here is usable from host and device code and follows the
// pinned numerics of jax_bq (README "Numerics"):
//   * encode = round-to-nearest-even straight from float32, on a value that
//     the caller has already clipped to [-MAX, MAX];
//   * decode is exact (every code of these formats is a float32 value).
//
// Formats (OCP FP8 / OCP MX v1.0 / NVIDIA NVFP4):
//   E4M3FN  bias 7,  no Inf, NaN = S.1111.111, max 448
//   E5M2    bias 15, IEEE-like Inf/NaN, max 57344
//   E2M1    bias 1,  no Inf/NaN, {0, .5, 1, 1.5, 2, 3, 4, 6}
//   E8M0    unsigned power of two 2^(code - 127), 0xFF = NaN
#ifndef JAX_BQ_FORMATS_H_
#define JAX_BQ_FORMATS_H_

#include <cmath>
#include <cstdint>
#include <cstring>

#include "jax_bq/format_registry.h"

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#define JAX_BQ_HD __host__ __device__ __forceinline__
#define JAX_BQ_HD_CONSTEXPR __host__ __device__ constexpr
#else
#define JAX_BQ_HD inline
#define JAX_BQ_HD_CONSTEXPR constexpr
#endif

namespace jax_bq {

// Input dtypes shared with the Python side.
enum class InDtype : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

// The bits of x as a To of the same size (std::bit_cast, which device code
// cannot call); the copy compiles to a register move on host and device.
template <typename To, typename From>
JAX_BQ_HD To BitCast(From x) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  To y;
  memcpy(&y, &x, sizeof(y));
  return y;
}
JAX_BQ_HD uint32_t FloatBits(float x) { return BitCast<uint32_t>(x); }
JAX_BQ_HD float BitsFloat(uint32_t u) { return BitCast<float>(u); }

JAX_BQ_HD bool IsFinite(float x) { return (FloatBits(x) & 0x7f800000u) != 0x7f800000u; }

JAX_BQ_HD float QuietNaN() { return BitsFloat(0x7fc00000u); }

// Smallest positive float32 (2^-149); the floor of a non-zero block scale.
JAX_BQ_HD float MinPositiveF32() { return BitsFloat(1u); }

// Round a float in [0, 2^22] to the nearest integer, ties to even. Adding and
// subtracting 2^23 rounds under the default (nearest-even) mode; exact in this
// range and branch-free, so host loops vectorize.
JAX_BQ_HD uint32_t RoundHalfEven(float y) {
#if defined(__CUDA_ARCH__)
  return __float2uint_rn(y);
#else
  // IEEE arithmetic (no fast-math) forbids folding (y + m) - m into y.
  constexpr float kMagic = 8388608.0f;
  return static_cast<uint32_t>(static_cast<int32_t>((y + kMagic) - kMagic));
#endif
}

// Minifloat with kExp exponent bits, kMan mantissa bits and bias kBias.
// Encode expects |x| <= format max (clipped by the caller) and x not NaN.
// Branch-free: both the subnormal and the normal encodings are computed.
template <int kExp, int kMan, int kBias>
JAX_BQ_HD uint8_t EncodeMinifloat(float x) {
  const uint32_t bits = FloatBits(x);
  const uint32_t sign = (bits >> 31) << (kExp + kMan);
  const uint32_t abits = bits & 0x7fffffffu;
  // Target subnormal: count quanta of 2^(1 - bias - man); the product with a
  // power of two is exact, and 2^kMan quanta is the smallest normal code.
  float quanta = BitsFloat(abits) * BitsFloat(static_cast<uint32_t>(127 + kBias + kMan - 1) << 23);
  quanta = quanta < 4194304.0f ? quanta : 4194304.0f;  // only used when subnormal
  const uint32_t sub = RoundHalfEven(quanta);
  constexpr uint32_t kShift = 23 - kMan;
  const uint32_t rounded = abits + ((1u << (kShift - 1)) - 1u) + ((abits >> kShift) & 1u);
  const uint32_t normal = (rounded >> kShift) - (static_cast<uint32_t>(127 - kBias) << kMan);
  const bool is_sub = abits < (static_cast<uint32_t>(127 + 1 - kBias) << 23);
  return static_cast<uint8_t>(sign | (is_sub ? sub : normal));
}

// Decodes finite codes of a minifloat; NaN/Inf codes are handled by the
// format-specific wrappers.
template <int kExp, int kMan, int kBias>
JAX_BQ_HD float DecodeMinifloatFinite(uint32_t code) {
  const uint32_t sign = ((code >> (kExp + kMan)) & 1u) << 31;
  const uint32_t exponent = (code >> kMan) & ((1u << kExp) - 1u);
  const uint32_t mantissa = code & ((1u << kMan) - 1u);
  // mantissa * 2^(1 - bias - man), exact, for exponent == 0.
  const float sub =
      static_cast<float>(mantissa) * BitsFloat(static_cast<uint32_t>(127 + 1 - kBias - kMan) << 23);
  const uint32_t normal = ((exponent - kBias + 127) << 23) | (mantissa << (23 - kMan));
  return BitsFloat(sign | (exponent == 0 ? FloatBits(sub) : normal));
}

// ---- OCP FP8: E4M3FN and E5M2 ------------------------------------------------
constexpr float kE4M3Max = 448.0f;
constexpr uint8_t kE4M3NaN = 0x7f;
constexpr float kE5M2Max = 57344.0f;
constexpr uint8_t kE5M2NaN = 0x7e;
// On sm_89+ the hardware conversions (cvt.rn.satfinite.e4m3x2.f32 and the
// fp8 -> f16 widening) round to nearest even straight from float32 and decode
// exactly, so they give the same bits as the software path for clipped,
// non-NaN inputs; the bitwise tests check every code and midpoint on the GPU.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
#define JAX_BQ_HW_FP8 1
#endif

// The codec of FP8 with kExp exponent and kMan mantissa bits (E4M3FN or E5M2).
// They differ only in their special codes: E4M3FN has no Inf and one NaN
// magnitude (S.1111.111); E5M2 is IEEE-like (exponent all ones: Inf or NaN).
template <int kExp, int kMan>
struct Fp8Codec {
  static_assert((kExp == 4 && kMan == 3) || (kExp == 5 && kMan == 2), "OCP FP8: E4M3 or E5M2");
  static constexpr bool kE4M3 = kExp == 4;
  static constexpr int kBias = (1 << (kExp - 1)) - 1;
  static constexpr uint8_t kNaNCode = kE4M3 ? kE4M3NaN : kE5M2NaN;
#if defined(JAX_BQ_HW_FP8)
  static constexpr __nv_fp8_interpretation_t kHw = kE4M3 ? __NV_E4M3 : __NV_E5M2;
#endif

  JAX_BQ_HD static uint8_t Encode(float x) {
#if defined(JAX_BQ_HW_FP8)
    return __nv_cvt_float_to_fp8(x, __NV_SATFINITE, kHw);
#else
    return EncodeMinifloat<kExp, kMan, kBias>(x);
#endif
  }

  JAX_BQ_HD static float Decode(uint8_t c) {
#if defined(JAX_BQ_HW_FP8)
    return __half2float(__half(__nv_cvt_fp8_to_halfraw(c, kHw)));
#else
    if constexpr (kE4M3) {
      if ((c & 0x7f) == 0x7f) return QuietNaN();
    } else if ((c & 0x7c) == 0x7c) {
      if ((c & 0x03) != 0) return QuietNaN();
      return BitsFloat(((c & 0x80u) << 24) | 0x7f800000u);
    }
    return DecodeMinifloatFinite<kExp, kMan, kBias>(c);
#endif
  }
};

JAX_BQ_HD uint8_t EncodeE4M3(float x) { return Fp8Codec<4, 3>::Encode(x); }
JAX_BQ_HD float DecodeE4M3(uint8_t c) { return Fp8Codec<4, 3>::Decode(c); }
JAX_BQ_HD uint8_t EncodeE5M2(float x) { return Fp8Codec<5, 2>::Encode(x); }
JAX_BQ_HD float DecodeE5M2(uint8_t c) { return Fp8Codec<5, 2>::Decode(c); }

// ---- E2M1 (4-bit code in the low nibble) -------------------------------------
constexpr float kE2M1Max = 6.0f;
// RNE to {0, .5, 1, 1.5, 2, 3, 4, 6}, saturating (Inf -> 6), NaN -> a signed
// zero; the same bits as EncodeMinifloat<2, 1, 1> on clipped inputs (checked
// over every float32 by tests/native/e2m1_exhaustive.cc). Below 2 the grid is
// uniform (step 0.5): the code is RNE(2|x|), which adding 2^23 computes (2|x|
// is exact). From 2 up the code is the float32 exponent and top mantissa bit
// after rounding the mantissa to one bit, RNE done on the integer bits.
JAX_BQ_HD uint8_t EncodeE2M1(float x) {
  const uint32_t bits = FloatBits(x);
  const uint32_t u = bits & 0x7fffffffu;
  uint32_t code;
  if (u < 0x40000000u) {
    code = FloatBits(BitsFloat(u) * 2.0f + 8388608.0f) - 0x4b000000u;
  } else {
    const uint32_t t = u + 0x1fffffu + ((u >> 22) & 1u);
    code = (t >> 22) - 252u;  // exponent 2^1: 4 + m; 2^2: 6 + m; above: >= 8
    code = u > 0x7f800000u ? 0u : (code < 7u ? code : 7u);
  }
  return static_cast<uint8_t>(((bits >> 28) & 0x8u) | code);
}

// The same code as EncodeE2M1 for every x that is not NaN (NaN gives 7 | sign:
// callers exclude it), in fused multiply-adds and integer minima instead of
// branches and compares (the CUDA quantize kernels' hot path; E2M1 has no
// hardware conversion before SM 10.0). Why it is exact: on a = |x| the E2M1
// grid is the integer grid under the concave, piecewise-linear
//   f(a) = min(2a, a + 2, a / 2 + 4)        ([0, 2], [2, 4], [4, 6] -> codes 0-7),
// and RNE to integers is monotonic, so RNE(f(a)) = min(RNE(2a), RNE(a) + 2,
// RNE(a / 2) + 4); ties go to the even integer, i.e. the even mantissa. Each
// term is one FMA against 2^23 (+2, +4): its result is 2^23 + the rounded
// integer (the parity of the result is that of the integer), so the minimum
// can be taken on the float32 bit patterns, clamped at 2^23 + 7 (which also
// saturates |x| >= 6 and Inf: any larger a gives larger patterns).
JAX_BQ_HD float FmaRN(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
JAX_BQ_HD uint32_t MinU32(uint32_t a, uint32_t b) { return a < b ? a : b; }
constexpr uint32_t kE2M1PatternBase = 0x4b000000u;  // float32 bits of 2^23
// 2^23 + the magnitude code of |x|, as float32 bits (kE2M1PatternBase + 0..7).
JAX_BQ_HD uint32_t E2M1MagnitudePattern(float x) {
  const float a = fabsf(x);
  const uint32_t twice = FloatBits(FmaRN(a, 2.0f, 0x1p23f));
  const uint32_t plus2 = FloatBits(FmaRN(a, 1.0f, 0x1p23f + 2.0f));
  const uint32_t half4 = FloatBits(FmaRN(a, 0.5f, 0x1p23f + 4.0f));
  return MinU32(MinU32(twice, plus2), MinU32(half4, kE2M1PatternBase + 7u));
}
JAX_BQ_HD uint8_t EncodeE2M1ByMinima(float x) {
  return static_cast<uint8_t>(((FloatBits(x) >> 28) & 0x8u) |
                              (E2M1MagnitudePattern(x) - kE2M1PatternBase));
}

JAX_BQ_HD float DecodeE2M1(uint8_t c) {
#if defined(__CUDA_ARCH__)
  // (c & 7) << 22 puts E2M1's exponent and mantissa bits where float32 keeps
  // them, 2^126 too small (code 1 becomes the subnormal 2^-127); scaling by
  // 2^126 is exact. Needs IEEE subnormals: CUDA builds use --ftz=false (the
  // host path below does not rely on them, XLA:CPU threads run with DAZ).
  return BitsFloat(((c & 0x8u) << 28) | ((c & 0x7u) << 22)) * 0x1p126f;
#else
  return DecodeMinifloatFinite<2, 1, 1>(c & 0xfu);
#endif
}

// E2M1 has no NaN code: a non-finite block stores 0 (its scale is the NaN).
struct E2M1Codec {
  static constexpr uint8_t kNaNCode = 0;
  JAX_BQ_HD static uint8_t Encode(float x) { return EncodeE2M1(x); }
  JAX_BQ_HD static float Decode(uint8_t c) { return DecodeE2M1(c); }
};

// ---- Minifloats without Inf/NaN codes (OCP MX FP6 E2M3 / E3M2) ------------------
// Bias 2^(exp-1) - 1, every code finite; a non-finite block stores 0 (its
// scale is the NaN).
template <int kExp, int kMan>
struct FiniteMinifloatCodec {
  static constexpr int kBias = (1 << (kExp - 1)) - 1;
  static constexpr uint8_t kNaNCode = 0;
  JAX_BQ_HD static uint8_t Encode(float x) { return EncodeMinifloat<kExp, kMan, kBias>(x); }
  JAX_BQ_HD static float Decode(uint8_t c) {
    return DecodeMinifloatFinite<kExp, kMan, kBias>(c & ((1u << (1 + kExp + kMan)) - 1u));
  }
};

// ---- E8M0 (OCP MX shared scale) ----------------------------------------------
constexpr uint8_t kE8M0NaN = 0xff;
JAX_BQ_HD float DecodeE8M0(uint8_t c) {
  if (c == kE8M0NaN) return QuietNaN();
  // 2^-127 is the float32 subnormal 0x00400000.
  return c == 0 ? BitsFloat(0x00400000u) : BitsFloat(static_cast<uint32_t>(c) << 23);
}

// floor(log2(a)) for finite a > 0, subnormals included.
JAX_BQ_HD int FloorLog2(float a) {
  const uint32_t bits = FloatBits(a) & 0x7fffffffu;
  const int biased = static_cast<int>(bits >> 23);
  if (biased != 0) return biased - 127;
  // Subnormal: position of the leading mantissa bit.
  int lead = 22;
  while (lead > 0 && ((bits >> lead) & 1u) == 0) --lead;
  return lead - 149;
}

// ---- Input and output element conversion -----------------------------------
// NaN outputs are canonical quiet NaNs (float32 0x7FC00000, bf16 0x7FC0, f16
// 0x7E00) on every platform: CUDA and x86 propagate NaN payloads differently.
JAX_BQ_HD float CanonicalizeNaN(float x) { return x != x ? QuietNaN() : x; }

JAX_BQ_HD float BF16BitsToFloat(uint16_t h) { return BitsFloat(static_cast<uint32_t>(h) << 16); }

JAX_BQ_HD float F16BitsToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return BitsFloat(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    // Subnormal or zero: mantissa * 2^-24, exact in float32.
    const float magnitude = static_cast<float>(mantissa) * BitsFloat(0x33800000u);
    return BitsFloat(FloatBits(magnitude) | sign);
  }
  return BitsFloat(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// float32 -> bfloat16, round to nearest even; NaN stays a quiet NaN.
JAX_BQ_HD uint16_t FloatToBF16Bits(float x) {
  const uint32_t bits = FloatBits(x);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    return static_cast<uint16_t>((bits >> 16) | 0x40u);
  }
  const uint32_t rounded = bits + 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(rounded >> 16);
}

// float32 -> IEEE half, round to nearest even, overflow to Inf.
JAX_BQ_HD uint16_t FloatToF16Bits(float x) {
  const uint32_t bits = FloatBits(x);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abits = bits & 0x7fffffffu;
  if (abits > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (abits >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: Inf
  if (abits < 0x38800000u) {
    // Below the smallest normal half (2^-14): count quanta of 2^-24.
    const float quanta = BitsFloat(abits) * BitsFloat(0x4b800000u);  // * 2^24
    return sign | static_cast<uint16_t>(RoundHalfEven(quanta));
  }
  const uint32_t rounded = abits + 0xfffu + ((abits >> 13) & 1u);
  return sign | static_cast<uint16_t>((rounded >> 13) - (112u << 10));
}

}  // namespace jax_bq

#endif  // JAX_BQ_FORMATS_H_
