// Device building blocks of every CUDA quantizer: the quantize op's kernels
// (quantize_kernels.cuh), qmatmul's activation quantization (act_quantize.cuh)
// and fp4_to_fp8. One definition each of the per-block math, so that all of
// them give the same codes and scales bit for bit:
//  * amax "keys" (float32 bits of |x|, kNonFiniteKey for NaN/Inf) and their
//    warp / CTA max reductions (exact and order-free);
//  * the block scale from a key (block_math.h's ComputeBlockScale);
//  * the encoders: guarded per element, or the unguarded fast path for
//    whole 16-byte vectors of a block that qualifies (UsesUnguardedEncode).
#ifndef JAX_BQ_QUANTIZE_DEVICE_CUH_
#define JAX_BQ_QUANTIZE_DEVICE_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "jax_bq/block_math.h"
#include "jax_bq/element_io.h"

namespace jax_bq::cuda {

constexpr uint32_t kNonFiniteKey = 0xffffffffu;
constexpr int kThreads = 256;

// One element as float32; f16 by the hardware conversion (exact, like
// ElementToFloat's).
template <InDtype D>
__device__ __forceinline__ float ToFloat(typename InTraits<D>::Storage v) {
  if constexpr (D == InDtype::kF16) {
    return __half2float(__ushort_as_half(v));
  } else {
    return ElementToFloat<D>(v);
  }
}

// |x| as an order-preserving key; non-finite elements map to kNonFiniteKey.
__device__ __forceinline__ uint32_t AmaxKey(float x) {
  const uint32_t bits = FloatBits(x) & 0x7fffffffu;
  return bits >= 0x7f800000u ? kNonFiniteKey : bits;
}
// Same, but non-finite elements are ignored (NVFP4 tensor amax).
__device__ __forceinline__ uint32_t FiniteAmaxKey(float x) {
  const uint32_t bits = FloatBits(x) & 0x7fffffffu;
  return bits >= 0x7f800000u ? 0u : bits;
}

template <Format F>
__device__ __forceinline__ BlockScale ScaleFromKey(uint32_t key, float tensor_scale) {
  const bool finite = key != kNonFiniteKey;
  return ComputeBlockScale<F>(finite ? BitsFloat(key) : 0.0f, finite, tensor_scale);
}

template <Format F>
__device__ __forceinline__ uint32_t LoadScale(const void* scales, int64_t i) {
  if constexpr (HasF32Scale(F)) {
    return static_cast<const uint32_t*>(scales)[i];
  } else {
    return static_cast<const uint8_t*>(scales)[i];
  }
}

__device__ __forceinline__ uint32_t WarpMax(uint32_t v, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    const uint32_t o = __shfl_xor_sync(0xffffffffu, v, offset, width);
    v = o > v ? o : v;
  }
  return v;
}

// Max of `key` over the CTA (blockDim.x == kThreads); valid in thread 0.
__device__ __forceinline__ uint32_t CtaMax(uint32_t key) {
  __shared__ uint32_t warp_keys[kThreads / 32];
  key = WarpMax(key, 32);
  if ((threadIdx.x & 31) == 0) warp_keys[threadIdx.x >> 5] = key;
  __syncthreads();
  if (threadIdx.x < 32) {
    key = threadIdx.x < blockDim.x / 32 ? warp_keys[threadIdx.x] : 0u;
    key = WarpMax(key, 32);
  }
  return key;
}

// ---- 16-byte vectors of inputs ------------------------------------------------
// kVec = 16 / sizeof(element) elements (8 bf16/f16, 4 float32), first element
// in the lowest bytes.
template <InDtype D>
__device__ __forceinline__ float VectorElement(const uint4& raw, int k) {
  using In = typename InTraits<D>::Storage;
  if constexpr (D == InDtype::kBF16) {
    // bf16 -> f32 is the 16 bits moved up: one shift or one mask per element.
    const uint32_t w = k / 2 == 0 ? raw.x : (k / 2 == 1 ? raw.y : (k / 2 == 2 ? raw.z : raw.w));
    return BitsFloat(k % 2 == 0 ? w << 16 : w & 0xffff0000u);
  } else {
    return ToFloat<D>(reinterpret_cast<const In*>(&raw)[k]);
  }
}

// x / s for every element of a block whose amax is >= 2^-60 and whose divisor
// is normal (s.inverse != 0), without ScaledElement's per-element guard (a
// compare and a branch per element, a third of the kernel's instructions).
// Elements with |x| >= 2^-100 are the guarded case: Markstein is exact. For
// |x| < 2^-100 the residual may underflow and the quotient be off, but both
// the true and the computed |x / s| are below 2^-24 (s >= amax / 57344, or
// >= amax / 12 for NVFP4, whose E4M3 block scale is within 2x of amax / 6), and
// every format encodes such a value as a zero with the sign of x.
template <Format F>
__device__ __forceinline__ float QuotientUnguarded(float x, const BlockScale& s) {
  if constexpr (IsMX(F)) {
    return x * s.inverse;  // exact power-of-two inverse
  } else {
    // The residual is formed negated, e' = RN(q0 s - x) = -RN(x - q0 s), and
    // q = RN(q0 - e' r): the same number, but a zero x keeps its sign with no
    // copysign (x = -0: q0 = -0, e' = +0, q = -0 + -0 = -0), and a non-zero x
    // never yields a zero of the wrong sign (q0 carries the sign of x, or is a
    // signed zero and then e' r is the whole, same-signed, result).
    const float q0 = x * s.inverse;
    const float e_neg = __fmaf_rn(q0, s.divisor, -x);
    return __fmaf_rn(e_neg, -s.inverse, q0);
  }
}
constexpr float kUnguardedMinAmax = 0x1p-60f;

// Two codes as one 16-bit word (first element in the low byte) for a block on
// the unguarded path. FP8 on SM >= 8.9: one paired conversion; .satfinite
// clamps to +-max after rounding, which equals rounding the clamped value
// because +-max is representable and rounding is monotonic. E2M1's encoder
// counts thresholds, so it saturates at 6 by itself (and never sees a NaN).
template <Format F>
__device__ __forceinline__ uint32_t EncodePairUnguarded(float a, float b, const BlockScale& s) {
  using T = FormatTraits<F>;
  const float va = QuotientUnguarded<F>(a, s), vb = QuotientUnguarded<F>(b, s);
  if constexpr (IsPacked(F)) {
    return T::Encode(va) | (static_cast<uint32_t>(T::Encode(vb)) << 8);
  } else {
#if defined(JAX_BQ_HW_FP8)
    return __nv_cvt_float2_to_fp8x2(make_float2(va, vb), __NV_SATFINITE, T::kHw);
#else
    const float ca = fminf(fmaxf(va, -T::kMax), T::kMax);
    const float cb = fminf(fmaxf(vb, -T::kMax), T::kMax);
    return T::Encode(ca) | (static_cast<uint32_t>(T::Encode(cb)) << 8);
#endif
  }
}

// Two codes, any block (NaN blocks, zero divisors, tiny blocks): the guarded
// per-element path.
template <Format F>
__device__ __forceinline__ uint32_t EncodePairGuarded(float a, float b, const BlockScale& s) {
  return QuantizeElement<F>(a, s) | (static_cast<uint32_t>(QuantizeElement<F>(b, s)) << 8);
}

// The running maximum m folded with the magnitude(s) of one 32-bit word: one
// float32 (an unsigned max of |bits|), or two bf16/f16 halves at once (an
// unsigned 16x2 max of the masked word).
template <bool kPairs>
__device__ __forceinline__ uint32_t MaxMagnitudeBits(uint32_t m, uint32_t word) {
  if constexpr (kPairs) {
    return __vmaxu2(m, word & 0x7fff7fffu);
  } else {
    return max(m, word & 0x7fffffffu);
  }
}

// Key (see AmaxKey) of the largest |x| over kV 16-byte vectors. 16-bit inputs
// reduce pairs at once: |bits| of bf16/f16 order like magnitudes, so an
// unsigned 16x2 max of the masked words finds the largest element, and any
// NaN/Inf makes that maximum >= the format's exponent-all-ones pattern.
template <InDtype D, int kV>
__device__ __forceinline__ uint32_t VectorsKey(const uint4 (&raw)[kV]) {
  constexpr bool kPairs = D != InDtype::kF32;
  uint32_t m = 0;
#pragma unroll
  for (int u = 0; u < kV; ++u) {
    m = MaxMagnitudeBits<kPairs>(m, raw[u].x);
    m = MaxMagnitudeBits<kPairs>(m, raw[u].y);
    m = MaxMagnitudeBits<kPairs>(m, raw[u].z);
    m = MaxMagnitudeBits<kPairs>(m, raw[u].w);
  }
  if constexpr (!kPairs) {
    return m >= 0x7f800000u ? kNonFiniteKey : m;
  } else {
    const uint32_t h = max(m & 0xffffu, m >> 16);
    constexpr uint32_t kExpAllOnes = D == InDtype::kBF16 ? 0x7f80u : 0x7c00u;
    if (h >= kExpAllOnes) return kNonFiniteKey;
    return FloatBits(ToFloat<D>(static_cast<uint16_t>(h)));
  }
}

// The kVec E2M1 codes of one 16-byte vector (first element in the low
// nibble) for a block on the unguarded path. Each magnitude comes from
// E2M1MagnitudePattern (three FMAs and integer minima, ~6 instructions where
// the compare-and-branch encoder took ~12) as the float32 pattern 2^23 +
// code; Horner's rule folds the patterns into one word, and the 2^23 offsets
// are removed at the end: sum_k (B + c_k) 16^k = sum_k c_k 16^k + 17 B mod 2^32
// (B 16^k vanishes mod 2^32 from k = 2 on). Signs are those of x (the scale is
// positive), -0 included.
template <Format F, InDtype D>
__device__ __forceinline__ uint32_t EncodeE2M1VectorUnguarded(const uint4& raw,
                                                              const BlockScale& s) {
  constexpr int kVec = 16 / sizeof(typename InTraits<D>::Storage);
  uint32_t patterns = 0, signs = 0;
#pragma unroll
  for (int k = kVec - 1; k >= 0; --k) {
    const float x = VectorElement<D>(raw, k);
    patterns = patterns * 16u + E2M1MagnitudePattern(QuotientUnguarded<F>(x, s));
    signs |= (FloatBits(x) >> 31) << (4 * k + 3);
  }
  return (patterns - 17u * kE2M1PatternBase) | signs;
}

// Whether a block (row, tensor) with amax key `key` and scale s takes the
// unguarded encoders (see QuotientUnguarded); uniform over the block.
__device__ __forceinline__ bool UsesUnguardedEncode(uint32_t key, const BlockScale& s) {
  return s.finite && s.inverse != 0.0f && key >= FloatBits(kUnguardedMinAmax);
}

// Encodes the 16-byte vector `raw` of inputs, elements e0 .. e0 + kVec - 1 of
// the block with scale s, and stores their codes at data: byte e0 (FP8), or
// e0 / 2 (E2M1 pairs; e0 even). kUnguarded: UsesUnguardedEncode held.
template <Format F, InDtype D, bool kUnguarded>
__device__ __forceinline__ void EncodeStoreVector(const uint4& raw, const BlockScale& s,
                                                  uint8_t* __restrict__ data, int64_t e0) {
  constexpr int kVec = 16 / sizeof(typename InTraits<D>::Storage);
  if constexpr (IsPacked(F) && kUnguarded) {
    const uint32_t codes = EncodeE2M1VectorUnguarded<F, D>(raw, s);
    if constexpr (kVec == 8) {
      *reinterpret_cast<uint32_t*>(data + e0 / 2) = codes;
    } else {
      *reinterpret_cast<uint16_t*>(data + e0 / 2) = static_cast<uint16_t>(codes);
    }
  } else {
    uint32_t pairs[kVec / 2];
#pragma unroll
    for (int k = 0; k < kVec; k += 2) {
      const float a = VectorElement<D>(raw, k), b = VectorElement<D>(raw, k + 1);
      pairs[k / 2] = kUnguarded ? EncodePairUnguarded<F>(a, b, s) : EncodePairGuarded<F>(a, b, s);
    }
    if constexpr (IsPacked(F)) {
      uint32_t bytes = 0;  // two E2M1 codes per byte
#pragma unroll
      for (int k = 0; k < kVec / 2; ++k) {
        bytes |= ((pairs[k] & 0xfu) | ((pairs[k] >> 4) & 0xf0u)) << (8 * k);
      }
      if constexpr (kVec == 8) {
        *reinterpret_cast<uint32_t*>(data + e0 / 2) = bytes;
      } else {
        *reinterpret_cast<uint16_t*>(data + e0 / 2) = static_cast<uint16_t>(bytes);
      }
    } else if constexpr (kVec == 8) {
      *reinterpret_cast<uint2*>(data + e0) =
          make_uint2(pairs[0] | (pairs[1] << 16), pairs[2] | (pairs[3] << 16));
    } else {
      *reinterpret_cast<uint32_t*>(data + e0) = pairs[0] | (pairs[1] << 16);
    }
  }
}

}  // namespace jax_bq::cuda

#endif  // JAX_BQ_QUANTIZE_DEVICE_CUH_
