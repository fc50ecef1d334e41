// CUDA FFI handler of "jax_bq_layernorm_quantize" (kernels in
// layernorm_quantize.cuh). It launches on XLA's stream, never synchronizes,
// never allocates (per-tensor scratch is the workspace output) and reads no
// host state beyond attributes and buffer pointers, so it is marked
// command-buffer compatible; the cudaMemsetAsync of the per-tensor amax words
// is a capturable stream operation.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_handler.h"
#include "jax_bq/layernorm_ffi.h"
#include "layernorm_quantize.cuh"
#include "xla/ffi/api/c_api.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_bq::cuda {
namespace {

// Runs a validated call (LayernormQuantizeHandler) on XLA's stream.
ffi::Error LayernormQuantizeRun(cudaStream_t stream, const LnqOperands& o, const LnqShape& s,
                                float eps) {
  lnq::Params p{};
  p.x = o.x.untyped_data();
  p.residual = s.has_residual ? o.residual.untyped_data() : nullptr;
  p.gamma = o.gamma.untyped_data();
  p.beta = o.beta.untyped_data();
  p.param = ToInDtype(o.gamma.element_type());
  p.scale =
      s.mode == LnqMode::kStatic ? static_cast<const float*>(o.scale.untyped_data()) : nullptr;
  p.y = o.y.untyped_data();
  p.codes = static_cast<uint8_t*>(o.codes.untyped_data());
  p.scales = static_cast<float*>(o.scales.untyped_data());
  if (s.mode == LnqMode::kPerTensor) {
    auto* ws = static_cast<uint8_t*>(o.workspace.untyped_data());
    p.amax_key = reinterpret_cast<uint32_t*>(ws);
    p.stats = reinterpret_cast<float2*>(ws + 8 * s.g);  // after 8 bytes per group
  }
  p.r = s.r;
  p.h = s.h;
  p.inv_h = 1.0f / static_cast<float>(s.h);
  p.eps = eps;
  p.out = ToInDtype(o.y.element_type());
  p.format = s.format;
  p.mode = s.mode;
  lnq::LnqStatus st;
  switch (ToInDtype(o.x.element_type())) {
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

JAX_BQ_DEFINE_CUDA_HANDLER(
    BqLayernormQuantizeCuda,
    (jax_bq::LayernormQuantizeHandler<jax_bq::cuda::LayernormQuantizeRun, cudaStream_t>),
    jax_bq::BindLayernormQuantize);
