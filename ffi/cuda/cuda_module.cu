// CUDA FFI handlers (targets "jax_bq_quantize" / "jax_bq_dequantize") and the
// nanobind module that exports them. Handlers launch on XLA's stream, never
// synchronize or allocate (the quantize workspace is an extra XLA output),
// check cudaGetLastError after launching, and return ffi::Error on every bad
// path; so they are registered as command-buffer (CUDA graph) compatible.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "jax_bq/ffi_util.h"
#include "nanobind/nanobind.h"
#include "quantize_kernels.cuh"
#include "xla/ffi/api/c_api.h"
#include "xla/ffi/api/ffi.h"

namespace nb = nanobind;
namespace ffi = xla::ffi;

namespace jax_bq::cuda {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

ffi::Error LastCudaError(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("jax_bq: CUDA error after ") + what + ": " +
                              cudaGetErrorString(err));
}

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

unsigned Grid(int64_t threads) { return static_cast<unsigned>(CeilDiv(threads, kThreads)); }

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

constexpr int64_t kMaxGrid = 0x7fffffff;

template <Format F, InDtype D>
ffi::Error LaunchQuantize(cudaStream_t stream, const void* xv, uint8_t* data, void* scales,
                          float* tensor_scale, uint32_t* workspace, const Layout& l) {
  using In = typename InTraits<D>::Storage;
  const In* x = static_cast<const In*>(xv);
  uint32_t* ws = workspace;
  // Tensor scales: NVFP4 reduces the finite amax of each group first.
  if (F == Format::kNVFP4) {
    const int64_t group_n = l.p * l.a * l.b;
    const int64_t chunks = CeilDiv(group_n, kReduceChunk);
    if (l.g * chunks > kMaxGrid) return ffi::Error::InvalidArgument("jax_bq: tensor too large");
    PartialKeysKernel<D, true>
        <<<static_cast<unsigned>(l.g * chunks), kThreads, 0, stream>>>(x, l, chunks, ws, true);
    TensorScaleKernel<<<static_cast<unsigned>(l.g), kThreads, 0, stream>>>(ws, chunks, true,
                                                                           tensor_scale);
    ws += l.g * chunks;
  } else {
    TensorScaleKernel<<<static_cast<unsigned>(l.g), 32, 0, stream>>>(nullptr, 0, false,
                                                                     tensor_scale);
  }
  if (l.FusedRowBlocks()) {
    constexpr int kVecAligned = 16 / sizeof(In);
    const bool vec =
        l.a % kVecAligned == 0 && l.ba % kVecAligned == 0 && Aligned16(x) && Aligned16(data);
    const int64_t vec_elems = vec ? kVecAligned : 2;
    int64_t lanes = l.ba / vec_elems;
    lanes = lanes < 1 ? 1 : (lanes > 32 ? 32 : lanes);
    int lanes_log2 = 0;
    while ((int64_t{1} << lanes_log2) < lanes) ++lanes_log2;
    const int64_t threads = l.Rows() * l.BlocksA() << lanes_log2;
    if (CeilDiv(threads, kThreads) > kMaxGrid) {
      return ffi::Error::InvalidArgument("jax_bq: tensor too large");
    }
    if (vec) {
      FusedQuantizeKernel<F, D, kVecAligned>
          <<<Grid(threads), kThreads, 0, stream>>>(x, data, scales, tensor_scale, l, lanes_log2);
    } else {
      FusedQuantizeKernel<F, D, 2>
          <<<Grid(threads), kThreads, 0, stream>>>(x, data, scales, tensor_scale, l, lanes_log2);
    }
    return LastCudaError("FusedQuantizeKernel");
  }
  const int64_t nblocks = l.NumScales();
  const int64_t chunks = CeilDiv(l.MaxBlockElements(), kReduceChunk);
  uint32_t* partial = ws;
  uint32_t* keys = ws + nblocks * chunks;
  if (nblocks * chunks > kMaxGrid) return ffi::Error::InvalidArgument("jax_bq: tensor too large");
  PartialKeysKernel<D, false><<<static_cast<unsigned>(nblocks * chunks), kThreads, 0, stream>>>(
      x, l, chunks, partial, false);
  BlockKeysKernel<F>
      <<<Grid(nblocks * 32), kThreads, 0, stream>>>(partial, chunks, l, tensor_scale, keys, scales);
  const int64_t items = IsPacked(F) ? l.g * l.p * l.PackedA() * l.PackedB() : l.NumElements();
  EncodeKernel<F, D><<<Grid(items), kThreads, 0, stream>>>(x, l, keys, tensor_scale, data, items);
  return LastCudaError("EncodeKernel");
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
  const int64_t need = 4 * QuantizeWorkspaceWords(l, f == Format::kNVFP4);
  if (static_cast<int64_t>(workspace->size_bytes()) < need) {
    return ffi::Error::InvalidArgument("jax_bq: quantize workspace has " +
                                       std::to_string(workspace->size_bytes()) + " bytes, needs " +
                                       std::to_string(need));
  }
  if (l.NumElements() == 0) {
    if (l.g == 0) return ffi::Error::Success();
    TensorScaleKernel<<<static_cast<unsigned>(l.g), 32, 0, stream>>>(
        nullptr, 0, false, static_cast<float*>(tensor_scale->untyped_data()));
    // Per-tensor scales of an empty tensor are 1 (amax 0); other scales are empty.
    if (l.NumScales() > 0) {
      return ffi::Error::InvalidArgument("jax_bq: empty input with non-empty scales");
    }
    return LastCudaError("TensorScaleKernel");
  }
  return DispatchInDtype(ToInDtype(x.element_type()), [&]<InDtype D>() {
    return DispatchFormat(f, [&]<Format F>() {
      return LaunchQuantize<F, D>(
          stream, x.untyped_data(), static_cast<uint8_t*>(data->untyped_data()),
          scales->untyped_data(), static_cast<float*>(tensor_scale->untyped_data()),
          static_cast<uint32_t*>(workspace->untyped_data()), l);
    });
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
  if (l.NumElements() == 0) return ffi::Error::Success();
  const InDtype d = ToInDtype(out->element_type());
  const int64_t vec = d == InDtype::kF32 ? 4 : 8;
  const bool fast = l.b == 1 && l.bb == 1 && l.a % vec == 0 && l.ba % vec == 0 &&
                    Aligned16(out->untyped_data()) && Aligned16(data.untyped_data());
  const int64_t items = fast ? l.NumElements() / vec : l.NumElements();
  if (CeilDiv(items, kThreads) > kMaxGrid) {
    return ffi::Error::InvalidArgument("jax_bq: tensor too large");
  }
  // Scale index by shift when power-of-two blocks tile the rows exactly.
  int ba_shift = -1;
  if (l.a % l.ba == 0 && (l.ba & (l.ba - 1)) == 0) {
    ba_shift = 0;
    while ((int64_t{1} << ba_shift) < l.ba) ++ba_shift;
  }
  const auto* dp = static_cast<const uint8_t*>(data.untyped_data());
  const auto* tp = static_cast<const float*>(tensor_scale.untyped_data());
  void* op = out->untyped_data();
  const void* sp = scales.untyped_data();
  return DispatchInDtype(d, [&]<InDtype D>() {
    return DispatchFormat(f, [&]<Format F>() {
      constexpr int kVec = D == InDtype::kF32 ? 4 : 8;
      if (fast) {
        DequantizeKernel<F, D, kVec>
            <<<Grid(items), kThreads, 0, stream>>>(dp, sp, tp, op, l, items, ba_shift);
      } else {
        DequantizeKernel<F, D, 1>
            <<<Grid(items), kThreads, 0, stream>>>(dp, sp, tp, op, l, items, ba_shift);
      }
      return LastCudaError("DequantizeKernel");
    });
  });
}

}  // namespace
}  // namespace jax_bq::cuda

XLA_FFI_DEFINE_HANDLER_SYMBOL(BqQuantizeCuda, jax_bq::cuda::QuantizeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // x [G, P, A, B]
                                  .Ret<ffi::AnyBuffer>()  // data (codes)
                                  .Ret<ffi::AnyBuffer>()  // scales [G, P, nA, nB]
                                  .Ret<ffi::AnyBuffer>()  // tensor_scale [G]
                                  .Ret<ffi::AnyBuffer>()  // workspace (uint8)
                                  .Attr<int32_t>("format")
                                  .Attr<int64_t>("block_a")
                                  .Attr<int64_t>("block_b")
                                  .Attr<int32_t>("pack_b"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(BqDequantizeCuda, jax_bq::cuda::DequantizeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // data (codes)
                                  .Arg<ffi::AnyBuffer>()  // scales
                                  .Arg<ffi::AnyBuffer>()  // tensor_scale [G]
                                  .Ret<ffi::AnyBuffer>()  // out [G, P, A, B]
                                  .Attr<int32_t>("format")
                                  .Attr<int64_t>("block_a")
                                  .Attr<int64_t>("block_b")
                                  .Attr<int32_t>("pack_b"),
                              {ffi::Traits::kCmdBufferCompatible});

#ifndef JAX_BQ_BUILT_WITH_JAXLIB
#define JAX_BQ_BUILT_WITH_JAXLIB "unknown"
#endif
#ifndef JAX_BQ_CUDA_ARCHS_STR
#define JAX_BQ_CUDA_ARCHS_STR "unknown"
#endif

NB_MODULE(_jax_bq_cuda, m) {
  m.def("registrations", []() {
    nb::dict d;
    d["jax_bq_quantize"] = nb::capsule(reinterpret_cast<void*>(BqQuantizeCuda));
    d["jax_bq_dequantize"] = nb::capsule(reinterpret_cast<void*>(BqDequantizeCuda));
    return d;
  });
  m.def("ffi_api_version", []() { return nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR); });
  m.attr("built_with_jaxlib") = JAX_BQ_BUILT_WITH_JAXLIB;
  m.def("compiled_archs", []() { return std::string(JAX_BQ_CUDA_ARCHS_STR); });
}
