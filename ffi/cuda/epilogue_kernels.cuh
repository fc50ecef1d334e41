// qmatmul's own epilogue kernel, for what cuBLASLt's epilogues do not compute:
// exact (erf) GELU. The GEMM writes y = x.w^T + bias into the workspace
// (cuBLASLt BIAS epilogue) in the output's own type (bf16 for an FP8 output,
// so a float32 output keeps float32 precision); this kernel reads it once and
// writes
//   out = gelu(y) = 0.5 y (1 + erf(y / sqrt(2)))      (float32 math)
// as FP8 codes RNE(clip(out * d_scale)) (NaN/Inf -> the NaN code, the static
// encoder's contract) or as the 16/32-bit output type, and the amax of out
// over its finite values (max is order-independent, so deterministic).
#ifndef JAX_BQ_EPILOGUE_KERNELS_CUH_
#define JAX_BQ_EPILOGUE_KERNELS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "jax_bq/formats.h"
#include "launch.cuh"

namespace jax_bq::cuda {

enum class EpiOut : int { kE4M3, kE5M2, kBf16, kF16, kF32 };

__device__ __forceinline__ float GeluErf(float v) {
  return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
}

template <EpiOut O>
__device__ __forceinline__ void StoreEpi(void* out, int64_t i, float v, float inv) {
  if constexpr (O == EpiOut::kE4M3 || O == EpiOut::kE5M2) {
    constexpr bool e4 = O == EpiOut::kE4M3;
    const float mx = e4 ? kE4M3Max : kE5M2Max;
    const float s = v * inv;
    uint8_t code = e4 ? kE4M3NaN : kE5M2NaN;
    if (isfinite(v) && !isnan(inv)) {
      const float c = fminf(fmaxf(s, -mx), mx);
      code = e4 ? EncodeE4M3(c) : EncodeE5M2(c);
    }
    static_cast<uint8_t*>(out)[i] = code;
  } else if constexpr (O == EpiOut::kBf16) {
    static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v);
  } else if constexpr (O == EpiOut::kF16) {
    static_cast<__half*>(out)[i] = __float2half_rn(v);
  } else {
    static_cast<float*>(out)[i] = v;
  }
}

__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }
__device__ __forceinline__ float ToFloat(float v) { return v; }

// 8 elements of type In per thread (16-byte loads); count % 8 == 0 (N % 16 == 0).
template <typename In, EpiOut O>
__global__ void __launch_bounds__(kThreads)
    GeluErfEpilogueKernel(const In* __restrict__ y, int64_t count,
                          const float* __restrict__ d_scale, void* __restrict__ out,
                          unsigned* __restrict__ amax_bits) {
  const int64_t base = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
  float local = 0.0f;
  if (base < count) {
    const float inv = d_scale != nullptr ? d_scale[0] : 1.0f;
    constexpr int kLoads = static_cast<int>(sizeof(In)) * 8 / 16;
    uint4 raw[kLoads];
#pragma unroll
    for (int l = 0; l < kLoads; ++l) raw[l] = reinterpret_cast<const uint4*>(y + base)[l];
    const In* v = reinterpret_cast<const In*>(raw);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float g = GeluErf(ToFloat(v[j]));
      if (isfinite(g)) local = fmaxf(local, fabsf(g));
      StoreEpi<O>(out, base + j, g, inv);
    }
  }
  if (amax_bits == nullptr) return;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
    local = fmaxf(local, __shfl_xor_sync(0xffffffffu, local, off));
  // Non-negative floats order like their bit patterns.
  if ((threadIdx.x & 31) == 0) atomicMax(amax_bits, __float_as_uint(local));
}

// The type of the GEMM result the kernel reads for output O: the output's own
// type, bf16 for an FP8 output.
template <EpiOut O>
using EpiIn = std::conditional_t<O == EpiOut::kF32, float,
                                 std::conditional_t<O == EpiOut::kF16, __half, __nv_bfloat16>>;

// Launches the kernel for `count` elements of the GEMM's result `y`, whose
// type is the output's (bf16 for an FP8 output).
inline Status LaunchGeluErfEpilogue(cudaStream_t stream, EpiOut o, const void* y, int64_t count,
                                    const float* d_scale, void* out, float* amax) {
  if (count % 8 != 0) return Status("jax_bq: the GELU epilogue needs M * N % 8 == 0");
  if (amax != nullptr && cudaMemsetAsync(amax, 0, sizeof(float), stream) != cudaSuccess) {
    return LastCudaError("cudaMemsetAsync(amax)");
  }
  auto* bits = reinterpret_cast<unsigned*>(amax);
  const unsigned grid = static_cast<unsigned>(CeilDiv(count / 8, kThreads));
  const auto launch = [&]<EpiOut O>() {
    using In = EpiIn<O>;
    constexpr bool kFp8 = O == EpiOut::kE4M3 || O == EpiOut::kE5M2;
    GeluErfEpilogueKernel<In, O><<<grid, kThreads, 0, stream>>>(
        static_cast<const In*>(y), count, kFp8 ? d_scale : nullptr, out, bits);
    return LastCudaError("GeluErfEpilogueKernel");
  };
  switch (o) {
    case EpiOut::kE4M3:
      return launch.template operator()<EpiOut::kE4M3>();
    case EpiOut::kE5M2:
      return launch.template operator()<EpiOut::kE5M2>();
    case EpiOut::kBf16:
      return launch.template operator()<EpiOut::kBf16>();
    case EpiOut::kF16:
      return launch.template operator()<EpiOut::kF16>();
    case EpiOut::kF32:
      return launch.template operator()<EpiOut::kF32>();
  }
  return Status("jax_bq: unknown epilogue output type");
}

}  // namespace jax_bq::cuda

#endif  // JAX_BQ_EPILOGUE_KERNELS_CUH_
