// CUDA FFI handlers (targets "jax_bq_quantize" / "jax_bq_dequantize", and
// "jax_bq_calibrate" / "jax_bq_fp4_to_fp8") and the
// nanobind module that exports them. Handlers launch on XLA's stream, never
// synchronize or allocate (the quantize workspace is an extra XLA output),
// check cudaGetLastError after launching, and return ffi::Error on every bad
// path; so they are registered as command-buffer (CUDA graph) compatible.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <utility>

#include "cublaslt_gemm.h"
#include "cuda_handler.h"
#include "graph_cache.h"
#include "hadamard.h"
#include "jax_bq/ffi_util.h"
#include "launch.cuh"
#include "nanobind/nanobind.h"
#include "nanobind/stl/string.h"
#include "qmatmul.h"
#include "xla/ffi/api/c_api.h"
#include "xla/ffi/api/ffi.h"

namespace nb = nanobind;
namespace ffi = xla::ffi;

namespace jax_bq::cuda {
namespace {

ffi::Error ToFfi(const Status& s) {
  return s.ok() ? ffi::Error::Success() : ffi::Error::Internal(s.message);
}

// The quantize kernels' scratch (block partials, NVFP4 tensor amax) is an
// extra XLA output of QuantizeWorkspaceWords(l) words.
ffi::Error CheckWorkspace(const char* op, const ffi::AnyBuffer& workspace, const Layout& l,
                          Format f) {
  const int64_t need = 4 * QuantizeWorkspaceWords(l, f == Format::kNVFP4);
  if (static_cast<int64_t>(workspace.size_bytes()) >= need) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(std::string("jax_bq: ") + op + " workspace has " +
                                     std::to_string(workspace.size_bytes()) + " bytes, needs " +
                                     std::to_string(need));
}

ffi::Error QuantizeImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> data,
                        ffi::Result<ffi::AnyBuffer> scales,
                        ffi::Result<ffi::AnyBuffer> tensor_scale,
                        ffi::Result<ffi::AnyBuffer> workspace, int32_t format, int64_t block_a,
                        int64_t block_b, int32_t pack_b) {
  Layout l;
  JAX_BQ_RETURN_IF_ERROR(MakeLayout(x.dimensions(), format, block_a, block_b, pack_b, &l));
  const Format f = static_cast<Format>(format);
  JAX_BQ_RETURN_IF_ERROR(CheckQuantizeOperands(x, *data, *scales, *tensor_scale, f, l));
  JAX_BQ_RETURN_IF_ERROR(CheckWorkspace("quantize", *workspace, l, f));
  return DispatchFormatInDtype(f, ToInDtype(x.element_type()), [&]<Format F, InDtype D>() {
    return ToFfi(LaunchQuantize<F, D>(
        stream, x.untyped_data(), static_cast<uint8_t*>(data->untyped_data()),
        scales->untyped_data(), static_cast<float*>(tensor_scale->untyped_data()),
        static_cast<uint32_t*>(workspace->untyped_data()), l));
  });
}

ffi::Error DequantizeImpl(cudaStream_t stream, ffi::AnyBuffer data, ffi::AnyBuffer scales,
                          ffi::AnyBuffer tensor_scale, ffi::Result<ffi::AnyBuffer> out,
                          int32_t format, int64_t block_a, int64_t block_b, int32_t pack_b) {
  Layout l;
  JAX_BQ_RETURN_IF_ERROR(MakeLayout(out->dimensions(), format, block_a, block_b, pack_b, &l));
  const Format f = static_cast<Format>(format);
  JAX_BQ_RETURN_IF_ERROR(CheckDequantizeOut(*out));
  JAX_BQ_RETURN_IF_ERROR(CheckQuantizeOperands(*out, data, scales, tensor_scale, f, l));
  const auto* dp = static_cast<const uint8_t*>(data.untyped_data());
  const auto* tp = static_cast<const float*>(tensor_scale.untyped_data());
  void* op = out->untyped_data();
  const void* sp = scales.untyped_data();
  return DispatchFormatInDtype(f, ToInDtype(out->element_type()), [&]<Format F, InDtype D>() {
    return ToFfi(LaunchDequantize<F, D>(stream, dp, sp, tp, op, l));
  });
}

ffi::Error CalibrateImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> data,
                         ffi::Result<ffi::AnyBuffer> scales,
                         ffi::Result<ffi::AnyBuffer> tensor_scale,
                         ffi::Result<ffi::AnyBuffer> mse_absmax,
                         ffi::Result<ffi::AnyBuffer> mse_best, ffi::Result<ffi::AnyBuffer> clipped,
                         ffi::Result<ffi::AnyBuffer> workspace, int32_t format, int64_t block_a) {
  Layout l;
  JAX_BQ_RETURN_IF_ERROR(MakeLayout(x.dimensions(), format, block_a, 1, 0, &l));
  const Format f = static_cast<Format>(format);
  JAX_BQ_RETURN_IF_ERROR(CheckCalibrateOperands(x, *data, *scales, *tensor_scale, *mse_absmax,
                                                *mse_best, *clipped, f, l));
  JAX_BQ_RETURN_IF_ERROR(CheckWorkspace("calibrate", *workspace, l, f));
  return DispatchFormatInDtype(f, ToInDtype(x.element_type()), [&]<Format F, InDtype D>() {
    return ToFfi(LaunchCalibrate<F, D>(
        stream, x.untyped_data(), static_cast<uint8_t*>(data->untyped_data()),
        scales->untyped_data(), static_cast<float*>(tensor_scale->untyped_data()),
        static_cast<float*>(mse_absmax->untyped_data()),
        static_cast<float*>(mse_best->untyped_data()),
        static_cast<int32_t*>(clipped->untyped_data()),
        static_cast<uint32_t*>(workspace->untyped_data()), l));
  });
}

// fp4_to_fp8 in one launch (target "jax_bq_fp4_to_fp8", CUDA only; elsewhere
// the primitive lowers to dequantize + quantize): 4-bit codes [n, ceil(k/2)],
// their scales [n, ceil(k/block)], a 1-element tensor scale -> FP8 E4M3 codes
// [n, k] and float32 scales [n, ceil(k/128)].
ffi::Error Fp4ToFp8Impl(cudaStream_t stream, ffi::AnyBuffer data, ffi::AnyBuffer scales,
                        ffi::AnyBuffer tensor_scale, ffi::Result<ffi::AnyBuffer> out,
                        ffi::Result<ffi::AnyBuffer> out_scales, int32_t format, int64_t block,
                        int64_t k) {
  if (!ValidFormat(format)) {
    return ffi::Error::InvalidArgument("jax_bq: bad format id " + std::to_string(format));
  }
  const Format f = static_cast<Format>(format);
  if (InfoOf(f).bits != 4) {
    return ffi::Error::InvalidArgument(std::string("jax_bq: fp4_to_fp8 takes 4-bit formats, got ") +
                                       InfoOf(f).name);
  }
  if (data.dimensions().size() != 2) {
    return ffi::Error::InvalidArgument("jax_bq: fp4_to_fp8 takes [N, K/2] codes, got " +
                                       DimsToString(data.dimensions()));
  }
  const int64_t n = data.dimensions()[0];
  if (k % 16 != 0 || block < 16 || (block & (block - 1)) != 0) {
    return ffi::Error::InvalidArgument(
        "jax_bq: fp4_to_fp8 needs K % 16 == 0 and a power-of-two block >= 16, got K=" +
        std::to_string(k) + ", block " + std::to_string(block));
  }
  const int64_t nk[2] = {n, k};
  const int64_t codes[2] = {n, k / 2};
  const int64_t in_scales[2] = {n, CeilDiv(k, block)};
  const int64_t fp8_scales[2] = {n, CeilDiv(k, 128)};
  const int64_t one[1] = {1};
  JAX_BQ_RETURN_IF_ERROR(ExpectDims("data", data.dimensions(), codes));
  JAX_BQ_RETURN_IF_ERROR(ExpectDims("scales", scales.dimensions(), in_scales));
  JAX_BQ_RETURN_IF_ERROR(ExpectDims("tensor_scale", tensor_scale.dimensions(), one));
  JAX_BQ_RETURN_IF_ERROR(ExpectDims("out", out->dimensions(), nk));
  JAX_BQ_RETURN_IF_ERROR(ExpectDims("out_scales", out_scales->dimensions(), fp8_scales));
  JAX_BQ_RETURN_IF_ERROR(ExpectDtype("data", data.element_type(), DataDtype(f)));
  JAX_BQ_RETURN_IF_ERROR(ExpectDtype("scales", scales.element_type(), ScaleDtype(f)));
  JAX_BQ_RETURN_IF_ERROR(
      ExpectDtype("tensor_scale", tensor_scale.element_type(), ffi::DataType::F32));
  JAX_BQ_RETURN_IF_ERROR(ExpectDtype("out", out->element_type(), ffi::DataType::F8E4M3FN));
  JAX_BQ_RETURN_IF_ERROR(ExpectDtype("out_scales", out_scales->element_type(), ffi::DataType::F32));
  const auto* dp = static_cast<const uint8_t*>(data.untyped_data());
  const auto* tp = static_cast<const float*>(tensor_scale.untyped_data());
  auto* op = static_cast<uint8_t*>(out->untyped_data());
  auto* sp = static_cast<uint32_t*>(out_scales->untyped_data());
  return DispatchFormat(f, [&]<Format WF>() -> ffi::Error {
    if constexpr (Packing<WF>::kNibbles) {
      return ToFfi(LaunchFp4ToFp8<WF>(stream, dp, scales.untyped_data(), tp, n, k, block, op, sp));
    } else {
      return ffi::Error::Internal("jax_bq: unreachable (format checked above)");
    }
  });
}

// The operands and attributes of "jax_bq_fp4_to_fp8".
template <typename Binding>
auto BindFp4ToFp8(Binding b) {
  return std::move(b)
      .template Arg<ffi::AnyBuffer>()  // data: 4-bit codes [N, K/2]
      .template Arg<ffi::AnyBuffer>()  // scales [N, ceil(K/block)]
      .template Arg<ffi::AnyBuffer>()  // tensor_scale [1]
      .template Ret<ffi::AnyBuffer>()  // out: E4M3 codes [N, K]
      .template Ret<ffi::AnyBuffer>()  // out_scales f32 [N, ceil(K/128)]
      .template Attr<int32_t>("format")
      .template Attr<int64_t>("block")
      .template Attr<int64_t>("k");
}

}  // namespace
}  // namespace jax_bq::cuda

JAX_BQ_DEFINE_CUDA_HANDLER(BqQuantizeCuda, jax_bq::cuda::QuantizeImpl, jax_bq::BindQuantize);
JAX_BQ_DEFINE_CUDA_HANDLER(BqDequantizeCuda, jax_bq::cuda::DequantizeImpl, jax_bq::BindDequantize);
JAX_BQ_DEFINE_CUDA_HANDLER(BqFp4ToFp8Cuda, jax_bq::cuda::Fp4ToFp8Impl, jax_bq::cuda::BindFp4ToFp8);
JAX_BQ_DEFINE_CUDA_HANDLER(BqCalibrateCuda, jax_bq::cuda::CalibrateImpl, jax_bq::BindCalibrate);

XLA_FFI_DECLARE_HANDLER_SYMBOL(BqLayernormQuantizeCuda);  // layernorm_quantize.cu

#ifndef JAX_BQ_CUDA_ARCHS_STR
#define JAX_BQ_CUDA_ARCHS_STR "unknown"
#endif

NB_MODULE(_jax_bq_cuda, m) {
  JAX_BQ_MODULE_BODY(
      m, BqQuantizeCuda, BqDequantizeCuda,
      d["jax_bq_qmatmul"] = nanobind::capsule(reinterpret_cast<void*>(BqQmatmulCuda));
      d["jax_bq_calibrate"] = nanobind::capsule(reinterpret_cast<void*>(BqCalibrateCuda));
      d["jax_bq_fp4_to_fp8"] = nanobind::capsule(reinterpret_cast<void*>(BqFp4ToFp8Cuda));
      d["jax_bq_layernorm_quantize"] =
          nanobind::capsule(reinterpret_cast<void*>(BqLayernormQuantizeCuda));
      d["jax_bq_hadamard"] = nanobind::capsule(reinterpret_cast<void*>(BqHadamardCuda)););
  m.def("compiled_archs", []() { return std::string(JAX_BQ_CUDA_ARCHS_STR); });
  m.def("qmatmul_workspace_bytes",
        [](int32_t path, bool act_dynamic, int32_t act_format, int32_t act_gran, int32_t w_gran,
           int64_t m, int64_t n, int64_t k, int32_t epilogue) {
          return jax_bq::cuda::QmatmulWorkspace(path, act_dynamic, act_format, act_gran, w_gran, m,
                                                n, k, epilogue)
              .total;
        });
  m.def("cublaslt_probe", &jax_bq::cuda::CublasLtProbe,
        "Empty string if cuBLASLt has an algorithm for the GEMM (and its plan is now cached), "
        "else the reason.");
  m.def("cublaslt_version", &jax_bq::cuda::CublasLtVersion,
        "cublasLtGetVersion(), or 0 when built without cuBLASLt.");
  m.def(
      "graph_cache_stats",
      []() {
        const jax_bq::cuda::GraphCacheStats s = jax_bq::cuda::GetGraphCacheStats();
        nanobind::dict d;
        d["launches"] = s.launches;
        d["traced"] = s.traced;
        d["captures"] = s.captures;
        d["evictions"] = s.evictions;
        d["direct"] = s.direct;
        d["refused"] = s.refused;
        d["last_refusal"] = s.last_refusal;
        d["traced_ns"] = s.traced_ns;
        d["direct_ns"] = s.direct_ns;
        d["launch_ns"] = s.launch_ns;
        d["capture_ns"] = s.capture_ns;
        return d;
      },
      "Counters of qmatmul's CUDA graph cache (graph_cache.h).");
  m.def("clear_graph_cache", &jax_bq::cuda::ClearGraphCache,
        "Drops every graph of qmatmul's CUDA graph cache.");
}
