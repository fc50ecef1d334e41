// Input/output elements (float32, bfloat16, float16) to and from float32: the
// loads and stores of the CPU and CUDA kernels (host and device code).
//
// Loads are exact. Stores round to nearest even (formats.h's FloatToBF16Bits
// / FloatToF16Bits). StoreFromFloat writes a NaN as the canonical quiet NaN
// (float32 0x7FC00000, bf16 0x7FC0, f16 0x7E00), the output contract of the
// quantize, dequantize and LayerNorm kernels; FloatToElement leaves NaNs as
// the conversion makes them, for the ops that do not canonicalize.
#ifndef JAX_BQ_ELEMENT_IO_H_
#define JAX_BQ_ELEMENT_IO_H_

#include <cstdint>

#include "jax_bq/formats.h"

namespace jax_bq {

// Element dtype D: its storage (bf16 and f16 as their bits) and its exact
// widening to / round-to-nearest-even narrowing from float32.
template <InDtype D>
struct InTraits;
template <>
struct InTraits<InDtype::kF32> {
  using Storage = float;
  JAX_BQ_HD static float ToFloat(float v) { return v; }
  JAX_BQ_HD static float FromFloat(float v) { return v; }
};
template <>
struct InTraits<InDtype::kBF16> {
  using Storage = uint16_t;
  JAX_BQ_HD static float ToFloat(uint16_t v) { return BF16BitsToFloat(v); }
  JAX_BQ_HD static uint16_t FromFloat(float v) { return FloatToBF16Bits(v); }
};
template <>
struct InTraits<InDtype::kF16> {
  using Storage = uint16_t;
  JAX_BQ_HD static float ToFloat(uint16_t v) { return F16BitsToFloat(v); }
  JAX_BQ_HD static uint16_t FromFloat(float v) { return FloatToF16Bits(v); }
};

template <InDtype D>
JAX_BQ_HD float ElementToFloat(typename InTraits<D>::Storage v) {
  return InTraits<D>::ToFloat(v);
}

template <InDtype D>
JAX_BQ_HD typename InTraits<D>::Storage FloatToElement(float v) {
  return InTraits<D>::FromFloat(v);
}

// Element i of a D array, as float32.
template <InDtype D>
JAX_BQ_HD float LoadAsFloat(const void* base, int64_t i) {
  return ElementToFloat<D>(static_cast<const typename InTraits<D>::Storage*>(base)[i]);
}

// Element i of a D array = v rounded to D, NaN canonical.
template <InDtype D>
JAX_BQ_HD void StoreFromFloat(void* base, int64_t i, float v) {
  static_cast<typename InTraits<D>::Storage*>(base)[i] = FloatToElement<D>(CanonicalizeNaN(v));
}

}  // namespace jax_bq

#endif  // JAX_BQ_ELEMENT_IO_H_
