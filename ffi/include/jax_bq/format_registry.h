// The format registry: one row per quantized storage format, the single source
// of truth for the C++ kernels (enum, traits, dispatch, validation) and for
// jax_bq/formats.py, which builds its specs from the table the CPU module
// exports (format_table()).
//
// Columns:
//   enumerator, FFI id, name (QuantFormat value in Python),
//   element bits, exponent bits, mantissa bits, largest finite element,
//   block-scale kind, default block, whether the block is fixed by the format,
//   packing: elements per packed unit and bytes per unit (FP4: 2 codes per
//   byte, the first in the low nibble; FP6: 4 codes per 3 bytes, code e at
//   bits 6e..6e+5 of the little-endian 24-bit word; unpacked formats: 1 and 1;
//   layout.h's Packing has the bit order).
#ifndef JAX_BQ_FORMAT_REGISTRY_H_
#define JAX_BQ_FORMAT_REGISTRY_H_

#include <cstdint>

#if defined(__CUDACC__)
#define JAX_BQ_REGISTRY_HD __host__ __device__ constexpr
#else
#define JAX_BQ_REGISTRY_HD constexpr
#endif

namespace jax_bq {

// How a block's scale is stored: float32 (FP8, FP4), E4M3 times a float32
// tensor scale (NVFP4), or an E8M0 power of two (OCP MX).
enum class ScaleKind : int32_t { kF32 = 0, kE4M3 = 1, kE8M0 = 2 };

inline const char* ScaleKindName(ScaleKind k) {
  return k == ScaleKind::kF32 ? "f32" : (k == ScaleKind::kE4M3 ? "e4m3" : "e8m0");
}

// clang-format off
#define JAX_BQ_FORMAT_TABLE(X)                                                                  \
  /* enumerator, id, name,     bits, exp, man, max,      scale,           block, fixed, unit, bytes */ \
  X(kFP8E4M3,    2, "fp8_e4m3",  8,   4,   3,   448.0f,   ScaleKind::kF32,  128,   false, 1,    1)  \
  X(kFP8E5M2,    3, "fp8_e5m2",  8,   5,   2,   57344.0f, ScaleKind::kF32,  128,   false, 1,    1)  \
  X(kFP4,        4, "fp4",       4,   2,   1,   6.0f,     ScaleKind::kF32,  32,    false, 2,    1)  \
  X(kNVFP4,      5, "nvfp4",     4,   2,   1,   6.0f,     ScaleKind::kE4M3, 16,    true,  2,    1)  \
  X(kMXFP8,      6, "mxfp8",     8,   4,   3,   448.0f,   ScaleKind::kE8M0, 32,    true,  1,    1)  \
  X(kMXFP4,      7, "mxfp4",     4,   2,   1,   6.0f,     ScaleKind::kE8M0, 32,    true,  2,    1)  \
  X(kMXFP6E2M3,  8, "mxfp6_e2m3", 6,  2,   3,   7.5f,     ScaleKind::kE8M0, 32,    true,  4,    3)  \
  X(kMXFP6E3M2,  9, "mxfp6_e3m2", 6,  3,   2,   28.0f,    ScaleKind::kE8M0, 32,    true,  4,    3)
// clang-format on

// Format ids, shared with jax_bq/formats.py through format_table().
#define JAX_BQ_FORMAT_ENUMERATOR(e, id, ...) e = id,
enum class Format : int32_t { JAX_BQ_FORMAT_TABLE(JAX_BQ_FORMAT_ENUMERATOR) };
#undef JAX_BQ_FORMAT_ENUMERATOR

// One row of the table.
struct FormatInfo {
  Format format;
  int32_t id;
  const char* name;
  int32_t bits;
  int32_t exponent_bits;
  int32_t mantissa_bits;
  float max_value;
  ScaleKind scale;
  int32_t default_block;
  bool fixed_block;
  int32_t elements_per_unit;
  int32_t bytes_per_unit;

  JAX_BQ_REGISTRY_HD bool Packed() const { return elements_per_unit > 1; }
  // Stored units (bytes for every format so far) holding n elements along
  // the packing axis; a partial last unit is zero-padded.
  JAX_BQ_REGISTRY_HD int64_t PackedExtent(int64_t n) const {
    return (n + elements_per_unit - 1) / elements_per_unit * bytes_per_unit;
  }
};

#define JAX_BQ_FORMAT_INFO(e, id, name, bits, exp, man, max, scale, block, fixed, unit, bytes) \
  FormatInfo{Format::e, id, name, bits, exp, man, max, scale, block, fixed, unit, bytes},
inline constexpr FormatInfo kFormatTable[] = {JAX_BQ_FORMAT_TABLE(JAX_BQ_FORMAT_INFO)};
#undef JAX_BQ_FORMAT_INFO

inline constexpr int kNumFormats = sizeof(kFormatTable) / sizeof(kFormatTable[0]);

// True when `id` is a row of the table.
JAX_BQ_REGISTRY_HD bool ValidFormat(int32_t id) {
#define JAX_BQ_FORMAT_CASE(e, id, ...) \
  case id:                             \
    return true;
  switch (id) {
    JAX_BQ_FORMAT_TABLE(JAX_BQ_FORMAT_CASE)
    default:
      return false;
  }
#undef JAX_BQ_FORMAT_CASE
}

// The row of a valid format (callers validate ids first: ValidFormat).
JAX_BQ_REGISTRY_HD FormatInfo InfoOf(Format f) {
#define JAX_BQ_FORMAT_CASE(e, id, name, bits, exp, man, max, scale, block, fixed, unit, bytes) \
  case Format::e:                                                                              \
    return FormatInfo{Format::e, id, name, bits, exp, man, max, scale, block, fixed, unit, bytes};
  switch (f) { JAX_BQ_FORMAT_TABLE(JAX_BQ_FORMAT_CASE) }
#undef JAX_BQ_FORMAT_CASE
  return FormatInfo{f, -1, "", 0, 0, 0, 0.0f, ScaleKind::kF32, 0, false, 1, 1};
}

JAX_BQ_REGISTRY_HD bool IsPacked(Format f) { return InfoOf(f).Packed(); }
JAX_BQ_REGISTRY_HD bool HasF32Scale(Format f) { return InfoOf(f).scale == ScaleKind::kF32; }
JAX_BQ_REGISTRY_HD bool IsMX(Format f) { return InfoOf(f).scale == ScaleKind::kE8M0; }
JAX_BQ_REGISTRY_HD int64_t PackedExtent(Format f, int64_t n) { return InfoOf(f).PackedExtent(n); }

// Calls fn.template operator()<F>() for the format with id `id`; an id that
// is not in the table returns UnknownFormat<R>::Make(id), R being fn's result
// type (ffi::Error in ffi_util.h; the CUDA launchers' Status in launch.cuh).
template <typename R>
struct UnknownFormat;

template <typename Fn>
auto DispatchFormat(Format f, Fn&& fn) {
  using R = decltype(fn.template operator()<kFormatTable[0].format>());
#define JAX_BQ_FORMAT_CASE(e, ...) \
  case Format::e:                  \
    return fn.template operator()<Format::e>();
  switch (f) { JAX_BQ_FORMAT_TABLE(JAX_BQ_FORMAT_CASE) }
#undef JAX_BQ_FORMAT_CASE
  return UnknownFormat<R>::Make(static_cast<int32_t>(f));
}

}  // namespace jax_bq

#endif  // JAX_BQ_FORMAT_REGISTRY_H_
