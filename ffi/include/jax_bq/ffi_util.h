// Host-side helpers shared by the CPU and CUDA FFI handlers: decoding and
// validating operands into a Layout, and dispatching on format and dtype.
// Every failure is an ffi::Error; nothing here throws.
#ifndef JAX_BQ_FFI_UTIL_H_
#define JAX_BQ_FFI_UTIL_H_

#include <cstdint>
#include <string>
#include <utility>

#include "jax_bq/block_math.h"
#include "jax_bq/calibrate_math.h"
#include "jax_bq/layout.h"
#include "xla/ffi/api/ffi.h"

namespace jax_bq {

namespace ffi = xla::ffi;

#define JAX_BQ_RETURN_IF_ERROR(expr)               \
  do {                                             \
    ::xla::ffi::Error jax_bq_err_ = (expr);        \
    if (jax_bq_err_.failure()) return jax_bq_err_; \
  } while (0)

inline std::string DimsToString(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(dims[i]);
  }
  return s + "]";
}

// DispatchFormat's result for an id outside the format registry.
template <>
struct UnknownFormat<ffi::Error> {
  static ffi::Error Make(int32_t id) {
    return ffi::Error::InvalidArgument("jax_bq: unknown format id " + std::to_string(id));
  }
};

// XLA dtypes of the stored codes and scales, from the registry row: packed
// codes are bytes, unpacked ones the FP8 type of their exponent/mantissa split.
inline ffi::DataType DataDtype(Format f) {
  const FormatInfo r = InfoOf(f);
  if (r.Packed()) return ffi::DataType::U8;
  if (r.bits == 8 && r.exponent_bits == 4) return ffi::DataType::F8E4M3FN;
  if (r.bits == 8 && r.exponent_bits == 5) return ffi::DataType::F8E5M2;
  return ffi::DataType::INVALID;  // a new unpacked format needs its XLA dtype here
}

inline ffi::DataType ScaleDtype(Format f) {
  switch (InfoOf(f).scale) {
    case ScaleKind::kF32:
      return ffi::DataType::F32;
    case ScaleKind::kE4M3:
      return ffi::DataType::F8E4M3FN;
    case ScaleKind::kE8M0:
      return ffi::DataType::F8E8M0FNU;
  }
  return ffi::DataType::INVALID;
}

inline bool IsSupportedFloat(ffi::DataType t) {
  return t == ffi::DataType::F32 || t == ffi::DataType::BF16 || t == ffi::DataType::F16;
}

template <size_t N>
ffi::Error ExpectDims(const char* what, ffi::Span<const int64_t> got, const int64_t (&want)[N]) {
  bool ok = got.size() == N;
  for (size_t i = 0; ok && i < N; ++i) ok = got[i] == want[i];
  if (ok) return ffi::Error::Success();
  std::string w = "[";
  for (size_t i = 0; i < N; ++i) w += (i ? ", " : "") + std::to_string(want[i]);
  return ffi::Error::InvalidArgument(std::string("jax_bq: ") + what + " has dims " +
                                     DimsToString(got) + ", expected " + w + "]");
}

inline ffi::Error ExpectDtype(const char* what, ffi::DataType got, ffi::DataType want) {
  if (got == want) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string("jax_bq: ") + what + " has XLA dtype id " +
                                     std::to_string(static_cast<int>(got)) + ", expected " +
                                     std::to_string(static_cast<int>(want)));
}

// Checks the attributes and the logical extents; fills `layout`.
inline ffi::Error MakeLayout(ffi::Span<const int64_t> logical, int32_t format, int64_t block_a,
                             int64_t block_b, int32_t pack_b, Layout* layout) {
  if (!ValidFormat(format)) {
    return ffi::Error::InvalidArgument("jax_bq: unknown format id " + std::to_string(format));
  }
  if (logical.size() != 4) {
    return ffi::Error::InvalidArgument(
        "jax_bq: operands must be the rank-4 [G, P, A, B] view, got dims " + DimsToString(logical));
  }
  if (block_a < 1 || block_b < 1) {
    return ffi::Error::InvalidArgument("jax_bq: block extents must be >= 1, got " +
                                       std::to_string(block_a) + " x " + std::to_string(block_b));
  }
  const Format f = static_cast<Format>(format);
  if (pack_b && !IsPacked(f)) {
    return ffi::Error::InvalidArgument("jax_bq: pack_b is only meaningful for packed formats");
  }
  // A packed unit never straddles two blocks: blocks along the packing axis
  // are whole units, unless one block covers the axis.
  const int64_t unit = InfoOf(f).elements_per_unit;
  const int64_t block = pack_b ? block_b : block_a;
  if (IsPacked(f) && block % unit != 0 && block < logical[pack_b ? 3 : 2]) {
    return ffi::Error::InvalidArgument(
        std::string("jax_bq: ") + InfoOf(f).name + " packs " + std::to_string(unit) +
        " codes per unit, so its block along " + (pack_b ? "B" : "A") + " must be a multiple of " +
        std::to_string(unit) + ", got " + std::to_string(block));
  }
  *layout = Layout{logical[0], logical[1], logical[2], logical[3], block_a, block_b, pack_b != 0};
  return ffi::Error::Success();
}

// Validates the quantize operands against the layout derived from x.
inline ffi::Error CheckQuantizeOperands(const ffi::AnyBuffer& x, const ffi::AnyBuffer& data,
                                        const ffi::AnyBuffer& scales,
                                        const ffi::AnyBuffer& tensor_scale, Format f,
                                        const Layout& l) {
  if (!IsSupportedFloat(x.element_type())) {
    return ffi::Error::InvalidArgument(
        "jax_bq: quantize input must be float32, bfloat16 or float16 (XLA dtype id " +
        std::to_string(static_cast<int>(x.element_type())) + ")");
  }
  const bool packed = IsPacked(f);
  const int64_t data_a = packed && !l.pack_b ? PackedExtent(f, l.a) : l.a;
  const int64_t data_b = packed && l.pack_b ? PackedExtent(f, l.b) : l.b;
  const int64_t data_dims[4] = {l.g, l.p, data_a, data_b};
  const int64_t scale_dims[4] = {l.g, l.p, l.BlocksA(), l.BlocksB()};
  JAX_BQ_RETURN_IF_ERROR(ExpectDims("data", data.dimensions(), data_dims));
  JAX_BQ_RETURN_IF_ERROR(ExpectDims("scales", scales.dimensions(), scale_dims));
  JAX_BQ_RETURN_IF_ERROR(ExpectDtype("data", data.element_type(), DataDtype(f)));
  JAX_BQ_RETURN_IF_ERROR(ExpectDtype("scales", scales.element_type(), ScaleDtype(f)));
  JAX_BQ_RETURN_IF_ERROR(
      ExpectDtype("tensor_scale", tensor_scale.element_type(), ffi::DataType::F32));
  if (tensor_scale.dimensions().size() != 1 || tensor_scale.dimensions()[0] != l.g) {
    return ffi::Error::InvalidArgument("jax_bq: tensor_scale has dims " +
                                       DimsToString(tensor_scale.dimensions()) + ", expected [" +
                                       std::to_string(l.g) + "]");
  }
  return ffi::Error::Success();
}

inline ffi::Error CheckDequantizeOut(const ffi::AnyBuffer& out) {
  if (!IsSupportedFloat(out.element_type())) {
    return ffi::Error::InvalidArgument(
        "jax_bq: dequantize output must be float32, bfloat16 or float16");
  }
  return ffi::Error::Success();
}

inline InDtype ToInDtype(ffi::DataType t) {
  return t == ffi::DataType::F32 ? InDtype::kF32
                                 : (t == ffi::DataType::BF16 ? InDtype::kBF16 : InDtype::kF16);
}

// DispatchFormat (the runtime format id -> a template on it) is generated
// from the registry: format_registry.h.

// Calls fn.template operator()<D>() for the runtime input/output dtype.
template <typename Fn>
auto DispatchInDtype(InDtype d, Fn&& fn) {
  switch (d) {
    case InDtype::kF32:
      return fn.template operator()<InDtype::kF32>();
    case InDtype::kBF16:
      return fn.template operator()<InDtype::kBF16>();
    default:
      return fn.template operator()<InDtype::kF16>();
  }
}

// Calls fn.template operator()<F, D>() for the runtime format and dtype of a
// quantize/dequantize/calibrate handler.
template <typename Fn>
auto DispatchFormatInDtype(Format f, InDtype d, Fn&& fn) {
  return DispatchInDtype(d, [&]<InDtype D>() {
    return DispatchFormat(f, [&]<Format F>() { return fn.template operator()<F, D>(); });
  });
}

// The attributes MakeLayout takes: the format id, the block extents along A
// and B, and the packing axis.
template <typename Binding>
auto BindLayoutAttrs(Binding b) {
  return std::move(b)
      .template Attr<int32_t>("format")
      .template Attr<int64_t>("block_a")
      .template Attr<int64_t>("block_b")
      .template Attr<int32_t>("pack_b");
}

// The operands and attributes of "jax_bq_quantize", after any platform context.
template <typename Binding>
auto BindQuantize(Binding b) {
  return BindLayoutAttrs(std::move(b)
                             .template Arg<ffi::AnyBuffer>()    // x [G, P, A, B]
                             .template Ret<ffi::AnyBuffer>()    // data (codes)
                             .template Ret<ffi::AnyBuffer>()    // scales [G, P, nA, nB]
                             .template Ret<ffi::AnyBuffer>()    // tensor_scale [G]
                             .template Ret<ffi::AnyBuffer>());  // workspace (uint8; used on CUDA)
}

// The operands and attributes of "jax_bq_dequantize".
template <typename Binding>
auto BindDequantize(Binding b) {
  return BindLayoutAttrs(std::move(b)
                             .template Arg<ffi::AnyBuffer>()    // data (codes)
                             .template Arg<ffi::AnyBuffer>()    // scales
                             .template Arg<ffi::AnyBuffer>()    // tensor_scale [G]
                             .template Ret<ffi::AnyBuffer>());  // out [G, P, A, B]
}

// The operands and attributes of "jax_bq_calibrate" (blocks along a
// contiguous last axis: x is [G, P, A, 1]).
template <typename Binding>
auto BindCalibrate(Binding b) {
  return std::move(b)
      .template Arg<ffi::AnyBuffer>()  // x [G, P, A, 1]
      .template Ret<ffi::AnyBuffer>()  // data (codes)
      .template Ret<ffi::AnyBuffer>()  // scales [G, P, nA, 1]
      .template Ret<ffi::AnyBuffer>()  // tensor_scale [G]
      .template Ret<ffi::AnyBuffer>()  // mse with the absmax scale, f32 [G, P, nA, 1]
      .template Ret<ffi::AnyBuffer>()  // mse with the chosen scale, f32
      .template Ret<ffi::AnyBuffer>()  // clipped elements, s32
      .template Ret<ffi::AnyBuffer>()  // workspace (uint8; used on CUDA)
      .template Attr<int32_t>("format")
      .template Attr<int64_t>("block_a");
}

// Checks the calibrate operands: blocks along a contiguous axis of at most
// kMaxCalibBlock elements, and statistics buffers of one value per block.
inline ffi::Error CheckCalibrateOperands(const ffi::AnyBuffer& x, const ffi::AnyBuffer& data,
                                         const ffi::AnyBuffer& scales,
                                         const ffi::AnyBuffer& tensor_scale,
                                         const ffi::AnyBuffer& mse0, const ffi::AnyBuffer& mse1,
                                         const ffi::AnyBuffer& clipped, Format f, const Layout& l) {
  if (l.b != 1 || l.ba > kMaxCalibBlock || l.ba < 1) {
    return ffi::Error::InvalidArgument(
        "jax_bq: calibrate takes blocks of <= 256 elements along a contiguous last axis");
  }
  JAX_BQ_RETURN_IF_ERROR(CheckQuantizeOperands(x, data, scales, tensor_scale, f, l));
  const size_t n = static_cast<size_t>(l.NumScales());
  if (mse0.element_count() != n || mse1.element_count() != n || clipped.element_count() != n ||
      mse0.element_type() != ffi::DataType::F32 || mse1.element_type() != ffi::DataType::F32 ||
      clipped.element_type() != ffi::DataType::S32) {
    return ffi::Error::InvalidArgument(
        "jax_bq: calibrate statistics must be f32, f32, s32 with one value per block (" +
        std::to_string(n) + ")");
  }
  return ffi::Error::Success();
}

}  // namespace jax_bq

#ifndef JAX_BQ_BUILT_WITH_JAXLIB
#define JAX_BQ_BUILT_WITH_JAXLIB "unknown"
#endif

// The body of a platform module: capsules for the quantize/dequantize targets
// (plus any `extra` "name", handler pairs), the format registry as a list of
// dicts (jax_bq/formats.py builds its specs from it), the FFI API version the
// handlers were compiled against, and the jaxlib that provided it.
#define JAX_BQ_MODULE_BODY(m, quantize_handler, dequantize_handler, ...)                     \
  m.def("registrations", []() {                                                              \
    nanobind::dict d;                                                                        \
    d["jax_bq_quantize"] = nanobind::capsule(reinterpret_cast<void*>(quantize_handler));     \
    d["jax_bq_dequantize"] = nanobind::capsule(reinterpret_cast<void*>(dequantize_handler)); \
    __VA_ARGS__                                                                              \
    return d;                                                                                \
  });                                                                                        \
  m.def("format_table", []() {                                                               \
    nanobind::list rows;                                                                     \
    for (const ::jax_bq::FormatInfo& r : ::jax_bq::kFormatTable) {                           \
      nanobind::dict d;                                                                      \
      d["id"] = r.id;                                                                        \
      d["name"] = r.name;                                                                    \
      d["bits"] = r.bits;                                                                    \
      d["exponent_bits"] = r.exponent_bits;                                                  \
      d["mantissa_bits"] = r.mantissa_bits;                                                  \
      d["max_value"] = r.max_value;                                                          \
      d["scale"] = ::jax_bq::ScaleKindName(r.scale);                                         \
      d["default_block"] = r.default_block;                                                  \
      d["fixed_block"] = r.fixed_block;                                                      \
      d["elements_per_unit"] = r.elements_per_unit;                                          \
      d["bytes_per_unit"] = r.bytes_per_unit;                                                \
      rows.append(d);                                                                        \
    }                                                                                        \
    return rows;                                                                             \
  });                                                                                        \
  m.def("ffi_api_version",                                                                   \
        []() { return nanobind::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR); });        \
  m.attr("built_with_jaxlib") = JAX_BQ_BUILT_WITH_JAXLIB

#endif  // JAX_BQ_FFI_UTIL_H_
