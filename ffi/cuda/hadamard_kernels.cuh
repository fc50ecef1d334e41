// Kernels of the jax_bq_hadamard FFI target: y = scale * H_n x on every block
// of n consecutive elements of a [rows, d] input, with the stage order of
// jax_bq/hadamard_math.h (so every output is the same tree of IEEE additions
// as in the CPU kernel and the jnp twin; built with --fmad=false, the final
// product is a separate multiply). Shared by the FFI handler (hadamard.cu) and
// the compute-sanitizer driver (tests/cuda/sanitize_driver.cu).
//
// Two kernels:
// * HadamardWarpKernel, n = 32 E with E in {1, ..., 32}: one warp per
//   transform block, lane L holding v[E L, E L + E) in registers. Stages
//   h < E pair values inside a lane; stages h >= E pair lane L with lane
//   L ^ (h / E) through a shuffle (the lower lane keeps a + b, the upper
//   a - b). No shared memory and no block-wide barrier: the transform is
//   bound by memory bandwidth.
// * HadamardSharedKernel, any n: one CUDA block per transform block, the n
//   values in shared memory, one __syncthreads per stage.
#ifndef JAX_BQ_HADAMARD_KERNELS_CUH_
#define JAX_BQ_HADAMARD_KERNELS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "jax_bq/element_io.h"
#include "jax_bq/formats.h"

namespace jax_bq::cuda {

constexpr int kHadamardWarpThreads = 256;  // 8 transform blocks per CUDA block

template <InDtype D>
__global__ void HadamardSharedKernel(const void* __restrict__ x, void* __restrict__ y, int n,
                                     float scale) {
  extern __shared__ float v[];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) v[i] = LoadAsFloat<D>(x, base + i);
  __syncthreads();
  const int half = n / 2;
  for (int h = 1; h < n; h <<= 1) {
    for (int p = threadIdx.x; p < half; p += blockDim.x) {
      const int i = (p / h) * 2 * h + (p % h);
      const float a = v[i], b = v[i + h];
      v[i] = __fadd_rn(a, b);
      v[i + h] = __fsub_rn(a, b);
    }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    // NaNs as the arithmetic makes them (no canonicalization).
    static_cast<typename InTraits<D>::Storage*>(y)[base + i] =
        FloatToElement<D>(__fmul_rn(v[i], scale));
  }
}

// E consecutive elements starting at `first`, 16-byte vectors where E fills
// them (the caller checks the alignment), else one element at a time.
template <InDtype D, int E>
__device__ __forceinline__ void LoadRun(const void* x, int64_t first, float (&v)[E]) {
  using S = typename InTraits<D>::Storage;
  constexpr int kPerVec = 16 / sizeof(S);
  const S* src = static_cast<const S*>(x) + first;
  if constexpr (E % kPerVec == 0) {
#pragma unroll
    for (int c = 0; c < E / kPerVec; ++c) {
      const uint4 w = reinterpret_cast<const uint4*>(src)[c];
      const S* s = reinterpret_cast<const S*>(&w);
#pragma unroll
      for (int k = 0; k < kPerVec; ++k) v[c * kPerVec + k] = ElementToFloat<D>(s[k]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < E; ++e) v[e] = ElementToFloat<D>(src[e]);
  }
}

template <InDtype D, int E>
__device__ __forceinline__ void StoreRun(void* y, int64_t first, const float (&v)[E], float scale) {
  using S = typename InTraits<D>::Storage;
  constexpr int kPerVec = 16 / sizeof(S);
  S* dst = static_cast<S*>(y) + first;
  if constexpr (E % kPerVec == 0) {
#pragma unroll
    for (int c = 0; c < E / kPerVec; ++c) {
      uint4 w;
      S* s = reinterpret_cast<S*>(&w);
#pragma unroll
      for (int k = 0; k < kPerVec; k += 2) {
        const float a = __fmul_rn(v[c * kPerVec + k], scale);
        const float b = __fmul_rn(v[c * kPerVec + k + 1], scale);
        if constexpr (D == InDtype::kBF16) {
          // Hardware RNE pair conversion (cvt.rn.bf16x2.f32): the same bits
          // as FloatToElement for every non-NaN value.
          const __nv_bfloat162 h = __float22bfloat162_rn(make_float2(a, b));
          s[k] = __bfloat16_as_ushort(h.x);
          s[k + 1] = __bfloat16_as_ushort(h.y);
        } else if constexpr (D == InDtype::kF16) {
          const __half2 h = __float22half2_rn(make_float2(a, b));
          s[k] = __half_as_ushort(h.x);
          s[k + 1] = __half_as_ushort(h.y);
        } else {
          s[k] = a;
          s[k + 1] = b;
        }
      }
      reinterpret_cast<uint4*>(dst)[c] = w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < E; ++e) dst[e] = FloatToElement<D>(__fmul_rn(v[e], scale));
  }
}

template <InDtype D, int E>
__global__ void __launch_bounds__(kHadamardWarpThreads)
    HadamardWarpKernel(const void* __restrict__ x, void* __restrict__ y, int64_t blocks,
                       float scale) {
  const int64_t block =
      static_cast<int64_t>(blockIdx.x) * (kHadamardWarpThreads / 32) + threadIdx.x / 32;
  if (block >= blocks) return;  // the whole warp leaves together: the shuffles stay full
  const int lane = threadIdx.x & 31;
  const int64_t first = block * (32 * E) + lane * E;
  float v[E];
  LoadRun<D, E>(x, first, v);
#pragma unroll
  for (int h = 1; h < E; h <<= 1) {
#pragma unroll
    for (int i = 0; i < E; ++i) {
      if ((i & h) == 0) {
        const float a = v[i], b = v[i + h];
        v[i] = __fadd_rn(a, b);
        v[i + h] = __fsub_rn(a, b);
      }
    }
  }
#pragma unroll
  for (int s = 1; s < 32; s <<= 1) {  // stage h = E s: partner lane L ^ s
    // The lower lane keeps v + other, the upper other - v = other + (-v): one
    // IEEE addition either way (addition commutes exactly), the sign flipped
    // by an XOR instead of a select between two results.
    const uint32_t flip = (lane & s) != 0 ? 0x80000000u : 0u;
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const float other = __shfl_xor_sync(0xffffffffu, v[i], s);
      v[i] = __fadd_rn(other, __uint_as_float(__float_as_uint(v[i]) ^ flip));
    }
  }
  StoreRun<D, E>(y, first, v, scale);
}

// The warp kernel for n = 32 E, trying E = 1, 2, ..., 32 in turn; false when
// n is none of those sizes (nothing launched).
template <InDtype D, int E = 1>
bool LaunchHadamardWarp(cudaStream_t stream, const void* x, void* y, int64_t blocks, int n,
                        float scale) {
  if (n == 32 * E) {
    constexpr int64_t kWarps = kHadamardWarpThreads / 32;
    const auto grid = static_cast<unsigned>((blocks + kWarps - 1) / kWarps);
    HadamardWarpKernel<D, E><<<grid, kHadamardWarpThreads, 0, stream>>>(x, y, blocks, scale);
    return true;
  }
  if constexpr (E < 32) {
    return LaunchHadamardWarp<D, 2 * E>(stream, x, y, blocks, n, scale);
  } else {
    return false;
  }
}

// Launches the transform of `blocks` consecutive blocks of n values (n a
// power of two, 2 <= n <= kMaxHadamardBlock); returns the launch error. The
// warp kernel needs 16-byte aligned buffers; other sizes and unaligned buffers
// take the shared-memory kernel.
template <InDtype D>
cudaError_t LaunchHadamard(cudaStream_t stream, const void* x, void* y, int64_t blocks, int n,
                           float scale) {
  const bool aligned =
      ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y)) & 15u) == 0;
  if (aligned && LaunchHadamardWarp<D>(stream, x, y, blocks, n, scale)) return cudaGetLastError();
  const int threads = n / 2 < 512 ? n / 2 : 512;
  const size_t smem = static_cast<size_t>(n) * sizeof(float);
  HadamardSharedKernel<D><<<static_cast<unsigned>(blocks), threads, smem, stream>>>(x, y, n, scale);
  return cudaGetLastError();
}

}  // namespace jax_bq::cuda

#endif  // JAX_BQ_HADAMARD_KERNELS_CUH_
