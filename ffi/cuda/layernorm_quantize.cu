// CUDA FFI handler of "jax_bq_layernorm_quantize" (kernels in
// layernorm_quantize.cuh). It launches on XLA's stream, never synchronizes,
// never allocates (per-tensor scratch is the workspace output) and reads no
// host state beyond attributes and buffer pointers, so it is marked
// command-buffer compatible; the cudaMemsetAsync of the per-tensor amax words
// is a capturable stream operation.
#include <cuda_runtime.h>

#include <cstdint>

#include "jax_bq/layernorm_ffi.h"
#include "layernorm_quantize.cuh"
#include "xla/ffi/api/c_api.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_bq::cuda {
namespace {

ffi::Error LayernormQuantizeImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer residual,
                                 ffi::AnyBuffer gamma, ffi::AnyBuffer beta, ffi::AnyBuffer scale,
                                 ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> codes,
                                 ffi::Result<ffi::AnyBuffer> scales,
                                 ffi::Result<ffi::AnyBuffer> workspace, int32_t format,
                                 int32_t mode, float eps) {
  LnqShape s;
  JAX_BQ_RETURN_IF_ERROR(CheckLayernormQuantize(x, residual, gamma, beta, scale, *y, *codes,
                                                *scales, *workspace, format, mode, eps, &s));
  lnq::Params p{};
  p.x = x.untyped_data();
  p.residual = s.has_residual ? residual.untyped_data() : nullptr;
  p.gamma = gamma.untyped_data();
  p.beta = beta.untyped_data();
  p.param = ToInDtype(gamma.element_type());
  p.scale = s.mode == LnqMode::kStatic ? static_cast<const float*>(scale.untyped_data()) : nullptr;
  p.y = y->untyped_data();
  p.codes = static_cast<uint8_t*>(codes->untyped_data());
  p.scales = static_cast<float*>(scales->untyped_data());
  if (s.mode == LnqMode::kPerTensor) {
    auto* ws = static_cast<uint8_t*>(workspace->untyped_data());
    p.amax_key = reinterpret_cast<uint32_t*>(ws);
    p.stats = reinterpret_cast<float2*>(ws + 8 * s.g);  // after 8 bytes per group
  }
  p.r = s.r;
  p.h = s.h;
  p.inv_h = 1.0f / static_cast<float>(s.h);
  p.eps = eps;
  p.out = ToInDtype(y->element_type());
  p.format = s.format;
  p.mode = s.mode;
  lnq::LnqStatus st;
  switch (ToInDtype(x.element_type())) {
    case InDtype::kF32:
      st = lnq::LaunchLayernormQuantize<InDtype::kF32>(p, s.g, stream);
      break;
    case InDtype::kBF16:
      st = lnq::LaunchLayernormQuantize<InDtype::kBF16>(p, s.g, stream);
      break;
    case InDtype::kF16:
      st = lnq::LaunchLayernormQuantize<InDtype::kF16>(p, s.g, stream);
      break;
    default:
      return ffi::Error::InvalidArgument("jax_bq: layernorm_quantize input dtype");
  }
  if (!st.ok) return ffi::Error::Internal(st.message);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_bq::cuda

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BqLayernormQuantizeCuda, jax_bq::cuda::LayernormQuantizeImpl,
    jax_bq::BindLayernormQuantize(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()),
    {ffi::Traits::kCmdBufferCompatible});
