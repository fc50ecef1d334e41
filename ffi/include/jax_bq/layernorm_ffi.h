// Operands of "jax_bq_layernorm_quantize" and their validation, shared by the
// CPU and CUDA handlers (see jax_bq/primitives/layernorm_quantize.py).
#ifndef JAX_BQ_LAYERNORM_FFI_H_
#define JAX_BQ_LAYERNORM_FFI_H_

#include <cstdint>
#include <string>
#include <utility>

#include "jax_bq/ffi_util.h"
#include "jax_bq/layernorm_math.h"
#include "xla/ffi/api/ffi.h"

namespace jax_bq {

template <typename Binding>
auto BindLayernormQuantize(Binding b) {
  return std::move(b)
      .template Arg<ffi::AnyBuffer>()  // x [G, R, H]
      .template Arg<ffi::AnyBuffer>()  // residual [G, R, H] or empty [0]
      .template Arg<ffi::AnyBuffer>()  // gamma [H] (f32, bf16 or f16)
      .template Arg<ffi::AnyBuffer>()  // beta [H] (gamma's dtype)
      .template Arg<ffi::AnyBuffer>()  // scale f32 [G] (static mode) or empty [0]
      .template Ret<ffi::AnyBuffer>()  // y [G, R, H] (f32/bf16/f16)
      .template Ret<ffi::AnyBuffer>()  // codes [G, R, H] (FP8)
      .template Ret<ffi::AnyBuffer>()  // scales f32: [G, R] per token, else [G]
      .template Ret<ffi::AnyBuffer>()  // workspace u8 (CUDA per-tensor scratch)
      .template Attr<int32_t>("format")
      .template Attr<int32_t>("mode")
      .template Attr<float>("eps");
}

// Extents of a validated call.
struct LnqShape {
  int64_t g, r, h;
  bool has_residual;
  LnqMode mode;
  Format format;
};

inline ffi::Error CheckLayernormQuantize(const ffi::AnyBuffer& x, const ffi::AnyBuffer& residual,
                                         const ffi::AnyBuffer& gamma, const ffi::AnyBuffer& beta,
                                         const ffi::AnyBuffer& scale, const ffi::AnyBuffer& y,
                                         const ffi::AnyBuffer& codes, const ffi::AnyBuffer& scales,
                                         const ffi::AnyBuffer& workspace, int32_t format,
                                         int32_t mode, float eps, LnqShape* out) {
  if (format != static_cast<int32_t>(Format::kFP8E4M3) &&
      format != static_cast<int32_t>(Format::kFP8E5M2)) {
    return ffi::Error::InvalidArgument("jax_bq: layernorm_quantize writes FP8 only, format id " +
                                       std::to_string(format));
  }
  if (mode < 0 || mode > 2) {
    return ffi::Error::InvalidArgument("jax_bq: layernorm_quantize unknown mode " +
                                       std::to_string(mode));
  }
  if (!(eps >= 0.0f)) {
    return ffi::Error::InvalidArgument("jax_bq: layernorm_quantize needs eps >= 0");
  }
  const auto dims = x.dimensions();
  if (dims.size() != 3 || dims[2] < 1 || !IsSupportedFloat(x.element_type()) ||
      !IsSupportedFloat(y.element_type())) {
    return ffi::Error::InvalidArgument(
        "jax_bq: layernorm_quantize x/y must be float [G, R, H] with H >= 1, x dims " +
        DimsToString(dims));
  }
  const LnqShape s{dims[0],
                   dims[1],
                   dims[2],
                   residual.element_count() != 0,
                   static_cast<LnqMode>(mode),
                   static_cast<Format>(format)};
  const int64_t full[3] = {s.g, s.r, s.h};
  const int64_t vec[1] = {s.h};
  if (s.has_residual) {
    JAX_BQ_RETURN_IF_ERROR(ExpectDims("residual", residual.dimensions(), full));
    JAX_BQ_RETURN_IF_ERROR(ExpectDtype("residual", residual.element_type(), x.element_type()));
  }
  JAX_BQ_RETURN_IF_ERROR(ExpectDims("gamma", gamma.dimensions(), vec));
  JAX_BQ_RETURN_IF_ERROR(ExpectDims("beta", beta.dimensions(), vec));
  if (!IsSupportedFloat(gamma.element_type())) {
    return ffi::Error::InvalidArgument(
        "jax_bq: layernorm_quantize gamma must be float32, bfloat16 or float16");
  }
  JAX_BQ_RETURN_IF_ERROR(ExpectDtype("beta", beta.element_type(), gamma.element_type()));
  JAX_BQ_RETURN_IF_ERROR(ExpectDims("y", y.dimensions(), full));
  JAX_BQ_RETURN_IF_ERROR(ExpectDims("codes", codes.dimensions(), full));
  JAX_BQ_RETURN_IF_ERROR(ExpectDtype("codes", codes.element_type(), DataDtype(s.format)));
  JAX_BQ_RETURN_IF_ERROR(ExpectDtype("scales", scales.element_type(), ffi::DataType::F32));
  if (s.mode == LnqMode::kPerToken) {
    const int64_t want[2] = {s.g, s.r};
    JAX_BQ_RETURN_IF_ERROR(ExpectDims("scales", scales.dimensions(), want));
  } else {
    const int64_t want[1] = {s.g};
    JAX_BQ_RETURN_IF_ERROR(ExpectDims("scales", scales.dimensions(), want));
  }
  if (s.mode == LnqMode::kStatic) {
    const int64_t want[1] = {s.g};
    JAX_BQ_RETURN_IF_ERROR(ExpectDims("scale", scale.dimensions(), want));
    JAX_BQ_RETURN_IF_ERROR(ExpectDtype("scale", scale.element_type(), ffi::DataType::F32));
  }
  const size_t ws =
      s.mode == LnqMode::kPerTensor ? static_cast<size_t>(8 * s.g + 8 * s.g * s.r) : 0;
  if (workspace.size_bytes() < ws) {
    return ffi::Error::InvalidArgument("jax_bq: layernorm_quantize workspace has " +
                                       std::to_string(workspace.size_bytes()) + " bytes, needs " +
                                       std::to_string(ws));
  }
  *out = s;
  return ffi::Error::Success();
}

// The operands of one call, as its handler received them.
struct LnqOperands {
  const ffi::AnyBuffer& x;
  const ffi::AnyBuffer& residual;
  const ffi::AnyBuffer& gamma;
  const ffi::AnyBuffer& beta;
  const ffi::AnyBuffer& scale;
  ffi::AnyBuffer& y;
  ffi::AnyBuffer& codes;
  ffi::AnyBuffer& scales;
  ffi::AnyBuffer& workspace;
};

// The handler of "jax_bq_layernorm_quantize" on a platform whose context
// arguments (bound before the operands) are Ctx: none on CPU, XLA's stream on
// CUDA. Validates the operands and attributes, then returns
// kRun(ctx..., operands, shape, eps).
template <auto kRun, typename... Ctx>
ffi::Error LayernormQuantizeHandler(Ctx... ctx, ffi::AnyBuffer x, ffi::AnyBuffer residual,
                                    ffi::AnyBuffer gamma, ffi::AnyBuffer beta, ffi::AnyBuffer scale,
                                    ffi::Result<ffi::AnyBuffer> y,
                                    ffi::Result<ffi::AnyBuffer> codes,
                                    ffi::Result<ffi::AnyBuffer> scales,
                                    ffi::Result<ffi::AnyBuffer> workspace, int32_t format,
                                    int32_t mode, float eps) {
  LnqShape s;
  JAX_BQ_RETURN_IF_ERROR(CheckLayernormQuantize(x, residual, gamma, beta, scale, *y, *codes,
                                                *scales, *workspace, format, mode, eps, &s));
  return kRun(ctx..., LnqOperands{x, residual, gamma, beta, scale, *y, *codes, *scales, *workspace},
              s, eps);
}

}  // namespace jax_bq

#endif  // JAX_BQ_LAYERNORM_FFI_H_
