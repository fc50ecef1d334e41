// The "jax_bq_qmatmul" CUDA handler: out[M, N] = x[M, K] . w[N, K]^T.
//
// Paths (chosen in Python by jax_bq.plan, checked again here):
//  * kCublasFp8: cuBLASLt FP8 GEMM. A = weights (K x N column-major, op T),
//    B = activations (K x M column-major, op N), D = out (N x M column-major,
//    which is out[M, N] row-major). Scale modes: per-tensor (SCALAR_32F),
//    per-channel x per-token (OUTER_VEC_32F), 1x128 / 128x128 blocks
//    (VEC128_32F / BLK128x128_32F). Plain activations are quantized first on
//    the same stream, straight into the workspace and into cuBLASLt's scale
//    layout: one launch for 1x128 blocks and per-token, the deterministic
//    two-pass sequence for per-tensor (its amax spans the whole tensor).
//  * kWeightOnly: W8A16 kernel (w8a16_kernels.cuh, w4a16_kernels.cuh).
//  * kCublasBlockFp: MXFP8 / NVFP4 with cuBLASLt's VEC32_UE8M0 / VEC16_UE4M3
//    modes (Blackwell only; compiled everywhere, untested on hardware).
//
// Epilogues ("epilogue" bits, cuBLASLt paths only): + bias (BIAS), tanh GELU
// (GELU / GELU_BIAS), + residual (C with beta = 1), an FP8 output written
// with a D scale (out = RNE(sat(y * d_scale))), and the amax of y before
// that conversion (AMAX_D_POINTER).
//
// cuBLASLt itself sits behind cublaslt_gemm.h (handle per device, one cached
// plan per GEMM spec: descriptors, layouts, algorithm). Nothing synchronizes or allocates, and
// every launch (cuBLASLt included) is stream-capturable, so the handler is
// registered command-buffer (CUDA graph) compatible; tests/test_cuda.py checks
// that graph replays give the bytes of eager execution. The cuBLASLt paths
// replay their work from graphs cached by the call's arguments
// (graph_cache.h): no host work between the quantize kernel and the GEMM.
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "act_quantize.cuh"
#include "cublaslt_gemm.h"
#include "epilogue_kernels.cuh"
#include "graph_cache.h"
#include "jax_bq/ffi_util.h"
#include "launch.cuh"
#include "qmatmul.h"
#include "scale_relayout.cuh"
#include "w4a16_kernels.cuh"
#include "w8a16_kernels.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_bq::cuda {
namespace {

int64_t Align256(int64_t b) { return (b + 255) / 256 * 256; }
__host__ __device__ inline int64_t RoundUp(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

cudaDataType_t Fp8Type(Format f) { return f == Format::kFP8E5M2 ? CUDA_R_8F_E5M2 : CUDA_R_8F_E4M3; }

// ---- Blackwell block-scale swizzle ------------------------------------------------------
// cuBLASLt's VEC16/VEC32 scale tensors: rows padded to 128, scale columns to
// 4, stored in 128 x 4 tiles (512 bytes, row-tile major); inside a tile,
// (r, c) sits at (r % 32) * 16 + (r % 128) / 32 * 4 + c. Padding is zero.
__global__ void __launch_bounds__(kThreads)
    SwizzleBlockScalesKernel(const uint8_t* __restrict__ in, int64_t rows, int64_t cols,
                             uint8_t* __restrict__ out) {
  const int64_t cols_pad = RoundUp(cols, 4);
  const int64_t total = RoundUp(rows, 128) * cols_pad;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t r = i / cols_pad, c = i - r * cols_pad;
  const int64_t tile = (r / 128) * (cols_pad / 4) + c / 4;
  const int64_t o = tile * 512 + (r % 32) * 16 + (r % 128) / 32 * 4 + (c % 4);
  out[o] = (r < rows && c < cols) ? in[r * cols + c] : 0;
}

__global__ void AlphaBetaKernel(const float* __restrict__ ts_a, const float* __restrict__ ts_b,
                                bool use_ts, float beta, float* __restrict__ ab) {
  ab[0] = use_ts ? ts_a[0] * ts_b[0] : 1.0f;
  ab[1] = beta;
}

int64_t BlockFpBlock(Format f) { return f == Format::kNVFP4 ? 16 : 32; }

// ---- The handler ---------------------------------------------------------------------
struct QmmArgs {
  int32_t path, act_format, act_gran, w_format, w_gran;
  bool act_dynamic;
  int64_t w_block_n, w_block_k;
  int64_t m, n, k;
};

ffi::Error ToFfi(const Status& s) {
  return s.ok() ? ffi::Error::Success() : ffi::Error::Internal(s.message);
}

template <InDtype D>
Status QuantizeActivations(cudaStream_t stream, const QmmArgs& a, const void* x, uint8_t* base,
                           const QmmWorkspace& ws) {
  const Format af = static_cast<Format>(a.act_format);
  uint8_t* xq = base + ws.xq;
  void* xs = base + ws.xs;
  uint32_t* qws = reinterpret_cast<uint32_t*>(base + ws.quant);
  float* ts = reinterpret_cast<float*>(base + ws.misc) + 2;
  const ActGran gran = static_cast<ActGran>(a.act_gran);
  return DispatchFormat(af, [&]<Format F>() -> Status {
    if constexpr (F == Format::kFP8E4M3 || F == Format::kFP8E5M2) {
      using In = typename InTraits<D>::Storage;
      if (gran == ActGran::kToken) {
        return LaunchRowQuantize<F, D>(stream, static_cast<const In*>(x), a.m, a.k, xq,
                                       static_cast<float*>(xs));
      }
      if (gran == ActGran::kBlock128) {
        const Layout l{1, a.m, a.k, 1, 128, 1, false};
        return LaunchQuantize<F, D>(stream, x, xq, xs, nullptr, qws, l, /*transposed=*/true);
      }
      return LaunchTensorQuantize<F, D>(stream, static_cast<const In*>(x), a.m * a.k, xq,
                                        static_cast<float*>(xs), qws);
    } else if constexpr (F == Format::kMXFP8 || F == Format::kNVFP4) {
      // Row-major scales go to the quantize scratch, then get swizzled.
      const int64_t bs = BlockFpBlock(F);
      const Layout l{1, a.m, a.k, 1, bs, 1, false};
      uint8_t* raw = reinterpret_cast<uint8_t*>(qws);
      uint32_t* scratch = reinterpret_cast<uint32_t*>(raw + Align256(a.m * CeilDiv(a.k, bs)));
      Status s = LaunchQuantize<F, D>(stream, x, xq, raw, ts, scratch, l);
      if (!s.ok()) return s;
      const int64_t cols = CeilDiv(a.k, bs);
      SwizzleBlockScalesKernel<<<Grid(RoundUp(a.m, 128) * RoundUp(cols, 4)), kThreads, 0, stream>>>(
          raw, a.m, cols, static_cast<uint8_t*>(xs));
      return LastCudaError("SwizzleBlockScalesKernel");
    } else {
      return Status("jax_bq: unsupported activation format for qmatmul");
    }
  });
}

// Pre-quantized activation scales -> cuBLASLt layout (only 1x128 needs a copy).
Status RelayoutActScales(cudaStream_t stream, const QmmArgs& a, const float* xs_in, uint8_t* base,
                         const QmmWorkspace& ws, const void** xs_out) {
  if (static_cast<ActGran>(a.act_gran) != ActGran::kBlock128) {
    *xs_out = xs_in;
    return Status();
  }
  const int64_t cols = CeilDiv(a.k, 128);
  float* dst = reinterpret_cast<float*>(base + ws.xs);
  RelayoutScalesKernel<<<Grid(a.m * cols), kThreads, 0, stream>>>(xs_in, a.m, cols, true, a.m, dst);
  *xs_out = dst;
  return LastCudaError("RelayoutScalesKernel");
}

Status RelayoutWeightScales(cudaStream_t stream, const QmmArgs& a, const float* w_scales,
                            bool outer_vec, uint8_t* base, const QmmWorkspace& ws,
                            const void** out) {
  float* dst = reinterpret_cast<float*>(base + ws.ws);
  const WGran g = static_cast<WGran>(a.w_gran);
  *out = w_scales;
  if (g == WGran::kTensor && outer_vec) {
    BroadcastScaleKernel<<<Grid(a.n), kThreads, 0, stream>>>(w_scales, a.n, dst);
    *out = dst;
  } else if (g == WGran::kBlock) {  // [N, Kb] -> [Kb, N]
    const int64_t cols = CeilDiv(a.k, 128);
    RelayoutScalesKernel<<<Grid(a.n * cols), kThreads, 0, stream>>>(w_scales, a.n, cols, true, a.n,
                                                                    dst);
    *out = dst;
  } else if (g == WGran::kTile) {  // row pitch padded to a multiple of 4
    const int64_t rows = CeilDiv(a.n, 128), cols = CeilDiv(a.k, 128);
    if (cols % 4 != 0) {
      RelayoutScalesKernel<<<Grid(rows * cols), kThreads, 0, stream>>>(w_scales, rows, cols, false,
                                                                       RoundUp(cols, 4), dst);
      *out = dst;
    }
  } else {
    return Status();
  }
  return LastCudaError("RelayoutScalesKernel");
}

// Per-tensor activations broadcast when the weights use OUTER_VEC.
Status BroadcastActScale(cudaStream_t stream, const QmmArgs& a, const void* xs, uint8_t* base,
                         const QmmWorkspace& ws, const void** out) {
  float* dst = reinterpret_cast<float*>(base + ws.xs) + RoundUp(a.m, 64);
  BroadcastScaleKernel<<<Grid(a.m), kThreads, 0, stream>>>(static_cast<const float*>(xs), a.m, dst);
  *out = dst;
  return LastCudaError("BroadcastScaleKernel");
}

int OutKind(ffi::DataType t) {
  return t == ffi::DataType::F32 ? 0 : (t == ffi::DataType::BF16 ? 1 : 2);
}
cudaDataType_t OutCudaType(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32:
      return CUDA_R_32F;
    case ffi::DataType::BF16:
      return CUDA_R_16BF;
    case ffi::DataType::F8E4M3FN:
      return CUDA_R_8F_E4M3;
    case ffi::DataType::F8E5M2:
      return CUDA_R_8F_E5M2;
    default:
      return CUDA_R_16F;
  }
}
bool IsFp8Out(ffi::DataType t) {
  return t == ffi::DataType::F8E4M3FN || t == ffi::DataType::F8E5M2;
}

// Checks the epilogue operands against the "epilogue" bits and the out type.
ffi::Error CheckEpilogue(int32_t epilogue, int64_t m, int64_t n, ffi::DataType out_type,
                         const ffi::AnyBuffer& bias, const ffi::AnyBuffer& residual,
                         const ffi::AnyBuffer& d_scale, const ffi::AnyBuffer& amax) {
  auto count = [](const ffi::AnyBuffer& b) { return static_cast<int64_t>(b.element_count()); };
  const bool fp8 = IsFp8Out(out_type);
  const bool gelu_erf = epilogue & kEpiGeluErf;
  const ffi::DataType c_type = fp8 ? ffi::DataType::BF16 : out_type;
  if (epilogue & ~(kEpiBias | kEpiGelu | kEpiResidual | kEpiAmax | kEpiGeluErf)) {
    return ffi::Error::InvalidArgument("jax_bq_qmatmul: unknown epilogue bits " +
                                       std::to_string(epilogue));
  }
  if ((epilogue & kEpiBias) && (count(bias) != n || bias.element_type() != c_type)) {
    return ffi::Error::InvalidArgument("jax_bq_qmatmul: bias must be [N] = [" + std::to_string(n) +
                                       "] of the output's 16/32-bit type");
  }
  if ((epilogue & kEpiResidual) &&
      (fp8 || count(residual) != m * n || residual.element_type() != out_type)) {
    return ffi::Error::InvalidArgument(
        "jax_bq_qmatmul: residual must be [M, N] of the (non-FP8) output type");
  }
  if (fp8 && (count(d_scale) != 1 || d_scale.element_type() != ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument("jax_bq_qmatmul: FP8 output needs a float32 [1] D scale");
  }
  if (gelu_erf && (epilogue & (kEpiGelu | kEpiResidual))) {
    return ffi::Error::InvalidArgument(
        "jax_bq_qmatmul: exact GELU excludes the tanh GELU and the residual");
  }
  if ((epilogue & kEpiAmax) && (count(amax) != 1 || amax.element_type() != ffi::DataType::F32)) {
    return ffi::Error::InvalidArgument("jax_bq_qmatmul: the amax output must be float32 [1]");
  }
  return ffi::Error::Success();
}

Status RunWeightOnly(cudaStream_t stream, const QmmArgs& a, const void* x, ffi::DataType x_type,
                     const uint8_t* w, const void* w_scales, const float* w_tensor_scale, void* out,
                     ffi::DataType out_type) {
  const Format wf = static_cast<Format>(a.w_format);
  const bool fp4 = wf == Format::kFP4 || wf == Format::kNVFP4;
  if (a.m > 64) return Status("jax_bq: the weight-only kernels take M <= 64");
  if (a.k % 16 != 0) return Status("jax_bq: the weight-only kernels need K % 16 == 0");
  WeightScaleLayout sl{};
  const WGran g = static_cast<WGran>(a.w_gran);
  sl.block_n = g == WGran::kTensor ? a.n : (g == WGran::kTile ? a.w_block_n : 1);
  const bool one_col = g == WGran::kTensor || g == WGran::kChannel;
  // FP4 scales are applied per 4 codes, FP8 scales per 128-wide unit.
  const int64_t min_block = fp4 ? 16 : 128;
  if (!one_col && (a.w_block_k < min_block || (a.w_block_k & (a.w_block_k - 1)) != 0)) {
    return Status("jax_bq: weight-only kernels need power-of-two weight blocks of >= " +
                  std::to_string(min_block) + " along K");
  }
  if (sl.block_n < 1) return Status("jax_bq: bad weight block rows");
  sl.cols = one_col ? 1 : CeilDiv(a.k, a.w_block_k);
  sl.k_shift = 0;
  while (!one_col && (int64_t{1} << sl.k_shift) < a.w_block_k) ++sl.k_shift;
  const bool bf16 = x_type == ffi::DataType::BF16;
  const unsigned grid = static_cast<unsigned>(CeilDiv(a.n, 16));
  const auto* xp = static_cast<const uint16_t*>(x);
  const int ok = OutKind(out_type);
  if (fp4) {
    if (!bf16) return Status("jax_bq: the W4A16 kernel takes bf16 activations");
    if (a.k % 32 != 0) return Status("jax_bq: the W4A16 kernel needs K % 32 == 0");
    // NVFP4 (E4M3 scales per 16 along K) takes the shifted-widening kernel;
    // FP4 with float32 scales keeps the byte-permute table.
    const bool nv16 = wf == Format::kNVFP4 && g == WGran::kBlock && a.w_block_k == 16;
    if (nv16) {
      LaunchW4A16Nv(stream, xp, w, static_cast<const uint8_t*>(w_scales), w_tensor_scale, a.m, a.n,
                    a.k, out, ok);
      return LastCudaError("W4A16NvKernel");
    }
    auto launch4 = [&]<Format WF, int T>() {
      constexpr int kWarps = T == 1 ? kW8A16Warps : 4;
      W4A16Kernel<WF, T, kWarps><<<grid, 32 * kWarps, 0, stream>>>(xp, w, w_scales, w_tensor_scale,
                                                                   sl, a.m, a.n, a.k, out, ok);
    };
    auto tiles4 = [&]<Format WF>() {
      if (a.m <= 8) {
        launch4.template operator()<WF, 1>();
      } else if (a.m <= 16) {
        launch4.template operator()<WF, 2>();
      } else if (a.m <= 32) {
        launch4.template operator()<WF, 4>();
      } else {
        launch4.template operator()<WF, 8>();
      }
    };
    wf == Format::kNVFP4 ? tiles4.template operator()<Format::kNVFP4>()
                         : tiles4.template operator()<Format::kFP4>();
    return LastCudaError("W4A16Kernel");
  }
  const auto* wsf = static_cast<const float*>(w_scales);
  // One M tile: 8 warps (64 registers, 4 CTAs per SM). More tiles need more
  // registers, so 4 warps per CTA keep the grid within one wave on 132 SMs.
  auto launch = [&]<Format WF, bool B, int T>() {
    constexpr int kWarps = T == 1 ? kW8A16Warps : 4;
    W8A16Kernel<WF, B, T, kWarps>
        <<<grid, 32 * kWarps, 0, stream>>>(xp, w, wsf, sl, a.m, a.n, a.k, out, ok);
  };

  auto by_tiles = [&]<Format WF, bool B>() {
    if (a.m <= 8) {
      launch.template operator()<WF, B, 1>();
    } else if (a.m <= 16) {
      launch.template operator()<WF, B, 2>();
    } else if (a.m <= 32) {
      launch.template operator()<WF, B, 4>();
    } else {
      launch.template operator()<WF, B, 8>();
    }
  };
  if (wf == Format::kFP8E4M3) {
    bf16 ? by_tiles.template operator()<Format::kFP8E4M3, true>()
         : by_tiles.template operator()<Format::kFP8E4M3, false>();
  } else if (wf == Format::kFP8E5M2) {
    bf16 ? by_tiles.template operator()<Format::kFP8E5M2, true>()
         : by_tiles.template operator()<Format::kFP8E5M2, false>();
  } else {
    return Status("jax_bq: the weight-only kernels take FP8 or FP4 weights");
  }
  return LastCudaError("W8A16Kernel");
}

// One call of the handler: its buffers and attributes as XLA passed them.
struct QmmCall {
  ffi::AnyBuffer x, x_scales, w, w_scales, w_tensor_scale, bias, residual, d_scale;
  ffi::AnyBuffer out, workspace, amax;  // the results
  int32_t path, act_dynamic, act_format, act_gran, w_format, w_gran;
  int64_t w_block_n, w_block_k;
  int32_t epilogue;

  // Checks the call and enqueues all of its GPU work on `stream`.
  ffi::Error Enqueue(cudaStream_t stream) const;
};

ffi::Error QmmCall::Enqueue(cudaStream_t stream) const {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const auto od = out.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || od.size() != 2) {
    return ffi::Error::InvalidArgument("jax_bq_qmatmul: x, w and out must be rank 2");
  }
  QmmArgs a{path,      act_format, act_gran, w_format, w_gran, act_dynamic != 0,
            w_block_n, w_block_k,  xd[0],    wd[0],    0};
  // The kernels below read bytes (FP8) or nibbles (FP4); a format packed
  // otherwise (MXFP6) has no qmatmul kernel.
  // act_format 0: the activations stay in 16 bits (weight-only).
  auto no_kernel = [](int32_t id) {
    return !ValidFormat(id) ||
           (IsPacked(static_cast<Format>(id)) && InfoOf(static_cast<Format>(id)).bits != 4);
  };
  if (no_kernel(w_format) || (act_format != 0 && no_kernel(act_format))) {
    return ffi::Error::InvalidArgument("jax_bq_qmatmul: no kernel for weight format id " +
                                       std::to_string(w_format) + " with activation format id " +
                                       std::to_string(act_format));
  }
  const Format wf = static_cast<Format>(w_format);
  const bool w_packed = IsPacked(wf);
  a.k = w_packed ? 2 * wd[1] : wd[1];
  const int64_t x_k =
      (!act_dynamic && IsPacked(static_cast<Format>(act_format))) ? 2 * xd[1] : xd[1];
  if (x_k != a.k || od[0] != a.m || od[1] != a.n) {
    return ffi::Error::InvalidArgument(
        "jax_bq_qmatmul: shapes disagree: x [" + std::to_string(xd[0]) + ", " +
        std::to_string(xd[1]) + "], w [" + std::to_string(wd[0]) + ", " + std::to_string(wd[1]) +
        "], out [" + std::to_string(od[0]) + ", " + std::to_string(od[1]) + "]");
  }
  const QmmWorkspace ws =
      QmatmulWorkspace(path, a.act_dynamic, act_format, act_gran, w_gran, a.m, a.n, a.k, epilogue);
  if (static_cast<int64_t>(workspace.size_bytes()) < ws.total) {
    return ffi::Error::InvalidArgument("jax_bq_qmatmul: workspace has " +
                                       std::to_string(workspace.size_bytes()) + " bytes, needs " +
                                       std::to_string(ws.total));
  }
  if (a.m == 0 || a.n == 0) return ffi::Error::Success();
  const auto out_type = out.element_type();
  if (out_type != ffi::DataType::F32 && out_type != ffi::DataType::BF16 &&
      out_type != ffi::DataType::F16 && !IsFp8Out(out_type)) {
    return ffi::Error::InvalidArgument("jax_bq_qmatmul: out must be f32, bf16, f16 or FP8");
  }
  if (ffi::Error e = CheckEpilogue(epilogue, a.m, a.n, out_type, bias, residual, d_scale, amax);
      e.failure()) {
    return e;
  }
  const bool fused = epilogue != 0 || IsFp8Out(out_type);
  if (fused && static_cast<QmmPath>(path) == QmmPath::kWeightOnly) {
    return ffi::Error::InvalidArgument(
        "jax_bq_qmatmul: epilogues and FP8 output run on the cuBLASLt paths only");
  }
  uint8_t* base = static_cast<uint8_t*>(workspace.untyped_data());
  const auto* wptr = static_cast<const uint8_t*>(w.untyped_data());
  const auto* wsc = static_cast<const float*>(w_scales.untyped_data());

  if (static_cast<QmmPath>(path) == QmmPath::kWeightOnly) {
    const auto xt = x.element_type();
    if (xt != ffi::DataType::BF16 && xt != ffi::DataType::F16) {
      return ffi::Error::InvalidArgument("jax_bq_qmatmul: W8A16 takes bf16 or f16 activations");
    }
    return ToFfi(RunWeightOnly(stream, a, x.untyped_data(), xt, wptr, w_scales.untyped_data(),
                               static_cast<const float*>(w_tensor_scale.untyped_data()),
                               out.untyped_data(), out_type));
  }
  if (a.k == 0) {
    if (fused) return ffi::Error::InvalidArgument("jax_bq_qmatmul: K = 0 with an epilogue");
    cudaMemsetAsync(out.untyped_data(), 0, out.size_bytes(), stream);
    return ToFfi(LastCudaError("cudaMemsetAsync"));
  }
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return ToFfi(LastCudaError("cudaGetDevice"));

  // Activations: quantize now, or take the given codes and scales.
  const void* xq = x.untyped_data();
  const void* xs = x_scales.untyped_data();
  if (a.act_dynamic) {
    const Status s = DispatchInDtype(ToInDtype(x.element_type()), [&]<InDtype D>() {
      return QuantizeActivations<D>(stream, a, x.untyped_data(), base, ws);
    });
    if (!s.ok()) return ToFfi(s);
    xq = base + ws.xq;
    xs = base + ws.xs;
  } else if (static_cast<QmmPath>(path) == QmmPath::kCublasFp8) {
    const Status s = RelayoutActScales(
        stream, a, static_cast<const float*>(x_scales.untyped_data()), base, ws, &xs);
    if (!s.ok()) return ToFfi(s);
  }

  GemmSpec g{device, a.m, a.n,  a.k, CUDA_R_8F_E4M3, CUDA_R_8F_E4M3, OutCudaType(out_type),
             0,      0,   false};
  // Exact GELU: the GEMM writes y + bias to the workspace in the output's
  // type (bf16 for an FP8 output), then jax_bq's epilogue kernel
  // (epilogue_kernels.cuh) makes the output.
  const bool gelu_erf = epilogue & kEpiGeluErf;
  g.epilogue = gelu_erf ? (epilogue & kEpiBias) : epilogue;
  if (gelu_erf && IsFp8Out(out_type)) g.d_type = CUDA_R_16BF;
  g.c_type = IsFp8Out(out_type) ? CUDA_R_16BF : g.d_type;
  g.bias_type = g.c_type;
  const void* a_scale = wsc;
  const void* b_scale = xs;
  const float* alpha_beta = nullptr;
  if (static_cast<QmmPath>(path) == QmmPath::kCublasFp8) {
    g.a_type = Fp8Type(wf);
    g.b_type = Fp8Type(static_cast<Format>(act_format));
    const WGran wg = static_cast<WGran>(w_gran);
    const ActGran ag = static_cast<ActGran>(act_gran);
    const bool outer = wg == WGran::kChannel || ag == ActGran::kToken;
    if (wg == WGran::kBlock || wg == WGran::kTile) {
      if (ag != ActGran::kBlock128) {
        return ffi::Error::InvalidArgument("jax_bq_qmatmul: block weights need 1x128 activations");
      }
      g.a_mode = wg == WGran::kTile ? kScaleBlk128 : kScaleVec128;
      g.b_mode = kScaleVec128;
    } else if (outer) {
      g.a_mode = g.b_mode = kScaleOuterVec;
      if (ag == ActGran::kTensor) {
        const Status s = BroadcastActScale(stream, a, xs, base, ws, &b_scale);
        if (!s.ok()) return ToFfi(s);
      }
    } else {
      g.a_mode = g.b_mode = kScaleScalar;
    }
    const Status s = RelayoutWeightScales(stream, a, wsc, outer, base, ws, &a_scale);
    if (!s.ok()) return ToFfi(s);
  } else if (static_cast<QmmPath>(path) == QmmPath::kCublasBlockFp) {
    const bool nvfp4 = wf == Format::kNVFP4;
    g.a_type = g.b_type = nvfp4 ? CUDA_R_4F_E2M1 : CUDA_R_8F_E4M3;
    g.a_mode = g.b_mode = nvfp4 ? kScaleVec16Ue4m3 : kScaleVec32Ue8m0;
    g.device_alpha = true;
    const int64_t bs = BlockFpBlock(wf);
    const int64_t cols = CeilDiv(a.k, bs);
    uint8_t* wsw = base + ws.ws;
    SwizzleBlockScalesKernel<<<Grid(RoundUp(a.n, 128) * RoundUp(cols, 4)), kThreads, 0, stream>>>(
        static_cast<const uint8_t*>(w_scales.untyped_data()), a.n, cols, wsw);
    a_scale = wsw;
    if (!a.act_dynamic) {
      return ffi::Error::InvalidArgument(
          "jax_bq_qmatmul: MXFP8/NVFP4 GEMMs quantize the activations themselves");
    }
    float* ab = reinterpret_cast<float*>(base + ws.misc);
    const float* ts_x = ab + 2;  // written by the activation quantize
    AlphaBetaKernel<<<1, 1, 0, stream>>>(static_cast<const float*>(w_tensor_scale.untyped_data()),
                                         ts_x, nvfp4, (epilogue & kEpiResidual) ? 1.0f : 0.0f, ab);
    alpha_beta = ab;
    const Status s = LastCudaError("AlphaBetaKernel");
    if (!s.ok()) return ToFfi(s);
  } else {
    return ffi::Error::InvalidArgument("jax_bq_qmatmul: unknown path " + std::to_string(path));
  }
  GemmPointers p;
  p.a = wptr;
  p.a_scale = a_scale;
  p.b = xq;
  p.b_scale = b_scale;
  p.bias = bias.untyped_data();
  p.residual = residual.untyped_data();
  p.d = gelu_erf ? static_cast<void*>(base + ws.epi) : out.untyped_data();
  p.d_scale = static_cast<const float*>(d_scale.untyped_data());
  p.amax = static_cast<float*>(amax.untyped_data());
  p.workspace = base + ws.cublas;
  p.alpha_beta = alpha_beta;
  Status st = RunGemm(stream, g, p);
  if (!st.ok() || !gelu_erf) return ToFfi(st);
  const EpiOut o = out_type == ffi::DataType::F8E4M3FN ? EpiOut::kE4M3
                   : out_type == ffi::DataType::F8E5M2 ? EpiOut::kE5M2
                   : out_type == ffi::DataType::BF16   ? EpiOut::kBf16
                   : out_type == ffi::DataType::F16    ? EpiOut::kF16
                                                       : EpiOut::kF32;
  return ToFfi(LaunchGeluErfEpilogue(stream, o, p.d, a.m * a.n,
                                     IsFp8Out(out_type) ? p.d_scale : nullptr, out.untyped_data(),
                                     (epilogue & kEpiAmax) ? p.amax : nullptr));
}

void PushBuffer(GraphKey& key, const ffi::AnyBuffer& b) {
  key.push_back(reinterpret_cast<uintptr_t>(b.untyped_data()));
  key.push_back(static_cast<uint64_t>(b.element_type()));
  key.push_back(b.size_bytes());
  for (const int64_t d : b.dimensions()) key.push_back(static_cast<uint64_t>(d));
}

// The handler: the cuBLASLt paths run through the graph cache (graph_cache.h),
// keyed by the device, the attributes and every buffer (address, type, shape);
// the weight-only path is one kernel launch and runs directly.
ffi::Error QmatmulImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer x_scales,
                       ffi::AnyBuffer w, ffi::AnyBuffer w_scales, ffi::AnyBuffer w_tensor_scale,
                       ffi::AnyBuffer bias, ffi::AnyBuffer residual, ffi::AnyBuffer d_scale,
                       ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> workspace,
                       ffi::Result<ffi::AnyBuffer> amax, int32_t path, int32_t act_dynamic,
                       int32_t act_format, int32_t act_gran, int32_t w_format, int32_t w_gran,
                       int64_t w_block_n, int64_t w_block_k, int32_t epilogue) {
  const QmmCall c{x,        x_scales, w,           w_scales,   w_tensor_scale,
                  bias,     residual, d_scale,     *out,       *workspace,
                  *amax,    path,     act_dynamic, act_format, act_gran,
                  w_format, w_gran,   w_block_n,   w_block_k,  epilogue};
  if (static_cast<QmmPath>(path) == QmmPath::kWeightOnly) return c.Enqueue(stream);
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return ToFfi(LastCudaError("cudaGetDevice"));
  GraphKey key = {static_cast<uint64_t>(device),      static_cast<uint64_t>(path),
                  static_cast<uint64_t>(act_dynamic), static_cast<uint64_t>(act_format),
                  static_cast<uint64_t>(act_gran),    static_cast<uint64_t>(w_format),
                  static_cast<uint64_t>(w_gran),      static_cast<uint64_t>(w_block_n),
                  static_cast<uint64_t>(w_block_k),   static_cast<uint64_t>(epilogue)};
  for (const ffi::AnyBuffer* b : {&c.x, &c.x_scales, &c.w, &c.w_scales, &c.w_tensor_scale, &c.bias,
                                  &c.residual, &c.d_scale, &c.out, &c.workspace, &c.amax}) {
    PushBuffer(key, *b);
  }
  ffi::Error direct = ffi::Error::Success();  // the error of a direct run, code kept
  const Status st = LaunchCached(stream, key, [&](cudaStream_t s) {
    ffi::Error e = c.Enqueue(s);
    if (e.success()) return Status();
    if (s == stream) direct = e;
    return Status(e.message());
  });
  if (direct.failure()) return direct;
  return ToFfi(st);
}

}  // namespace

QmmWorkspace QmatmulWorkspace(int32_t path, bool act_dynamic, int32_t act_format, int32_t act_gran,
                              int32_t w_gran, int64_t m, int64_t n, int64_t k, int32_t epilogue) {
  QmmWorkspace w;
  if (static_cast<QmmPath>(path) == QmmPath::kWeightOnly) return w;
  const Format af = static_cast<Format>(act_format);
  const bool blockfp = static_cast<QmmPath>(path) == QmmPath::kCublasBlockFp;
  int64_t off = Align256(kCublasWorkspaceBytes);
  w.xq = off;
  if (act_dynamic) off += Align256(IsPacked(af) ? m * ((k + 1) / 2) : m * k);
  w.xs = off;
  if (blockfp) {
    const int64_t bs = af == Format::kNVFP4 ? 16 : 32;
    off += Align256(RoundUp(m, 128) * RoundUp(CeilDiv(k, bs), 4));
  } else {
    // 1x128 scales, or per-token scales, plus a broadcast vector of M.
    off += Align256(4 * (m * CeilDiv(k, 128) + RoundUp(m, 64) + m));
  }
  w.ws = off;
  if (blockfp) {
    const int64_t bs = af == Format::kNVFP4 ? 16 : 32;
    off += Align256(RoundUp(n, 128) * RoundUp(CeilDiv(k, bs), 4));
  } else {
    const WGran g = static_cast<WGran>(w_gran);
    int64_t floats = n;  // broadcast per-tensor weight scale
    if (g == WGran::kBlock) floats = n * CeilDiv(k, 128);
    if (g == WGran::kTile) floats = CeilDiv(n, 128) * RoundUp(CeilDiv(k, 128), 4);
    off += Align256(4 * floats);
  }
  w.quant = off;
  if (act_dynamic) {
    if (blockfp) {
      const int64_t bs = af == Format::kNVFP4 ? 16 : 32;
      const Layout l{1, m, k, 1, bs, 1, false};
      off += Align256(m * CeilDiv(k, bs)) +
             Align256(4 * QuantizeWorkspaceWords(l, af == Format::kNVFP4));
    } else if (static_cast<ActGran>(act_gran) == ActGran::kTensor) {
      off += Align256(4 * kMaxTensorQuantCtas);  // per-CTA amax keys
    }
  }
  w.misc = off;
  off += 256;  // alpha, beta, activation tensor scale
  w.epi = off;
  if (epilogue & kEpiGeluErf) off += Align256(4 * m * n);  // GEMM result (<= 4 bytes each)
  w.total = off;
  return w;
}

}  // namespace jax_bq::cuda

XLA_FFI_DEFINE_HANDLER_SYMBOL(BqQmatmulCuda, jax_bq::cuda::QmatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // x [M, K]: float, or codes
                                  .Arg<ffi::AnyBuffer>()  // x scales (f32), or unused
                                  .Arg<ffi::AnyBuffer>()  // w codes [N, K] (or [N, K/2])
                                  .Arg<ffi::AnyBuffer>()  // w scales
                                  .Arg<ffi::AnyBuffer>()  // w tensor scale [1] (NVFP4)
                                  .Arg<ffi::AnyBuffer>()  // bias [N] or empty
                                  .Arg<ffi::AnyBuffer>()  // residual [M, N] or empty
                                  .Arg<ffi::AnyBuffer>()  // FP8 out: D scale [1] (1 / s)
                                  .Ret<ffi::AnyBuffer>()  // out [M, N]
                                  .Ret<ffi::AnyBuffer>()  // workspace (uint8)
                                  .Ret<ffi::AnyBuffer>()  // amax [1] or empty
                                  .Attr<int32_t>("path")
                                  .Attr<int32_t>("act_dynamic")
                                  .Attr<int32_t>("act_format")
                                  .Attr<int32_t>("act_gran")
                                  .Attr<int32_t>("w_format")
                                  .Attr<int32_t>("w_gran")
                                  .Attr<int64_t>("w_block_n")
                                  .Attr<int64_t>("w_block_k")
                                  .Attr<int32_t>("epilogue"),
                              {ffi::Traits::kCmdBufferCompatible});
