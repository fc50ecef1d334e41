// Activation quantization for qmatmul's FP8 GEMM, one launch each: per token
// (per row, one float32 scale per row) and per tensor (one cooperative
// launch). The codes and scales are those of quantize(x, F, per_channel
// axis=-1 / per_tensor) bit for bit: the per-block math (amax keys, block
// scale, encoders) is quantize_device.cuh's, shared with the quantize op.
#ifndef JAX_BQ_ACT_QUANTIZE_CUH_
#define JAX_BQ_ACT_QUANTIZE_CUH_

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <string>

#include "launch.cuh"
#include "quantize_device.cuh"

namespace jax_bq::cuda {

// Both kernels below visit x[t] for t = first, first + stride, ... < n: the
// first nvec * kVec elements as 16-byte vectors (vector t = elements t * kVec
// .. t * kVec + kVec - 1), the rest one by one.

// Amax key (AmaxKey) of this thread's elements.
template <InDtype D>
__device__ __forceinline__ uint32_t StridedAmaxKey(const typename InTraits<D>::Storage* x,
                                                   int64_t n, int64_t nvec, int64_t first,
                                                   int64_t stride) {
  constexpr int kVec = 16 / sizeof(typename InTraits<D>::Storage);
  uint32_t key = 0;
  for (int64_t t = first; t < nvec; t += stride) {
    const uint4 raw[1] = {reinterpret_cast<const uint4*>(x)[t]};
    key = max(key, VectorsKey<D, 1>(raw));
  }
  for (int64_t t = nvec * kVec + first; t < n; t += stride) {
    key = max(key, AmaxKey(ToFloat<D>(x[t])));
  }
  return key;
}

// Codes q[t] of this thread's elements, with the scale s of the whole row or
// tensor (amax key `key`).
template <Format F, InDtype D>
__device__ __forceinline__ void StridedEncode(const typename InTraits<D>::Storage* x, int64_t n,
                                              int64_t nvec, int64_t first, int64_t stride,
                                              uint32_t key, const BlockScale& s, uint8_t* q) {
  constexpr int kVec = 16 / sizeof(typename InTraits<D>::Storage);
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  if (UsesUnguardedEncode(key, s)) {  // uniform: no divergence
    for (int64_t t = first; t < nvec; t += stride) {
      EncodeStoreVector<F, D, true>(xv[t], s, q, t * kVec);
    }
  } else {
    for (int64_t t = first; t < nvec; t += stride) {
      EncodeStoreVector<F, D, false>(xv[t], s, q, t * kVec);
    }
  }
  for (int64_t t = nvec * kVec + first; t < n; t += stride) {
    q[t] = QuantizeElement<F>(ToFloat<D>(x[t]), s);
  }
}

// ---- Per-token (per-row) dynamic quantization: one launch -----------------------
// One CTA per row of x[M, K]: pass 1 reduces the row's amax key, pass 2 encodes
// (the row is re-read from L1/L2, so HBM sees it once). Bit-identical to
// quantize(x, F, granularity=per_channel, axis=-1): same ComputeBlockScale and
// QuantizeElement. Scales: one float32 per row.
template <Format F, InDtype D>
__global__ void __launch_bounds__(kThreads)
    RowQuantizeKernel(const typename InTraits<D>::Storage* __restrict__ x, int64_t k,
                      uint8_t* __restrict__ q, float* __restrict__ scales) {
  static_assert(HasF32Scale(F) && !IsPacked(F), "per-token activations are FP8 with f32 scales");
  using In = typename InTraits<D>::Storage;
  constexpr int kVec = 16 / sizeof(In);
  const int64_t row = blockIdx.x;
  const In* xr = x + row * k;
  uint8_t* qr = q + row * k;
  const bool vec = k % kVec == 0 && (reinterpret_cast<uintptr_t>(x) & 15u) == 0;
  const int64_t nvec = vec ? k / kVec : 0;
  __shared__ uint32_t row_key;
  const uint32_t key = CtaMax(StridedAmaxKey<D>(xr, k, nvec, threadIdx.x, blockDim.x));
  if (threadIdx.x == 0) row_key = key;
  __syncthreads();
  const BlockScale s = ScaleFromKey<F>(row_key, 1.0f);
  if (threadIdx.x == 0) scales[row] = BitsFloat(s.stored);
  StridedEncode<F, D>(xr, k, nvec, threadIdx.x, blockDim.x, row_key, s, qr);
}

// Rows of up to 32 * kMaxRowVecs 16-byte vectors (K <= 2048 bf16, 1024 f32):
// one warp per row, the row held in registers, so x is read once and no CTA
// barrier is needed; same codes and scales as RowQuantizeKernel.
constexpr int kMaxRowVecs = 8;
constexpr int kRowWarps = 4;  // rows per CTA

template <Format F, InDtype D, int kV>
__global__ void __launch_bounds__(32 * kRowWarps)
    RowQuantizeWarpKernel(const typename InTraits<D>::Storage* __restrict__ x, int64_t m, int64_t k,
                          uint8_t* __restrict__ q, float* __restrict__ scales) {
  using In = typename InTraits<D>::Storage;
  constexpr int kVec = 16 / sizeof(In);
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (row >= m) return;  // whole warps only
  const uint4* xr = reinterpret_cast<const uint4*>(x + row * k);
  const int64_t nvec = k / kVec;  // k % kVec == 0 and x 16-byte aligned (launcher checks)
  uint4 v[kV];
#pragma unroll
  for (int i = 0; i < kV; ++i) {
    const int64_t t = lane + 32 * i;
    v[i] = t < nvec ? xr[t] : make_uint4(0, 0, 0, 0);  // zeros leave the max alone
  }
  const uint32_t key = WarpMax(VectorsKey<D, kV>(v), 32);
  const BlockScale s = ScaleFromKey<F>(key, 1.0f);
  if (lane == 0) scales[row] = BitsFloat(s.stored);
  uint8_t* qr = q + row * k;
  auto encode = [&]<bool kUnguarded>() {
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const int64_t t = lane + 32 * i;
      if (t < nvec) EncodeStoreVector<F, D, kUnguarded>(v[i], s, qr, t * kVec);
    }
  };
  if (UsesUnguardedEncode(key, s)) {
    encode.template operator()<true>();
  } else {
    encode.template operator()<false>();
  }
}

// Per-token quantization of x[M, K]: the warp-per-row kernel where the row fits
// in registers, else one CTA per row.
template <Format F, InDtype D>
Status LaunchRowQuantize(cudaStream_t stream, const typename InTraits<D>::Storage* x, int64_t m,
                         int64_t k, uint8_t* q, float* scales) {
  using In = typename InTraits<D>::Storage;
  constexpr int kVec = 16 / sizeof(In);
  const bool vec = k % kVec == 0 && (reinterpret_cast<uintptr_t>(x) & 15u) == 0;
  const int64_t nvec = k / kVec;
  if (m == 0) return Status();
  if (vec && nvec <= 32 * kMaxRowVecs) {
    const unsigned grid = static_cast<unsigned>((m + kRowWarps - 1) / kRowWarps);
    auto go = [&]<int kV>() {
      RowQuantizeWarpKernel<F, D, kV><<<grid, 32 * kRowWarps, 0, stream>>>(x, m, k, q, scales);
    };
    if (nvec <= 32 * 2) {
      go.template operator()<2>();
    } else if (nvec <= 32 * 4) {
      go.template operator()<4>();
    } else {
      go.template operator()<kMaxRowVecs>();
    }
    return LastCudaError("RowQuantizeWarpKernel");
  }
  RowQuantizeKernel<F, D><<<static_cast<unsigned>(m), kThreads, 0, stream>>>(x, k, q, scales);
  return LastCudaError("RowQuantizeKernel");
}

// ---- Per-tensor dynamic quantization: one cooperative launch --------------------------
// Phase 1 reduces each CTA's amax key (grid-stride over x) into cta_keys;
// after a grid-wide barrier every CTA reduces the same cta_keys (a max, so
// the result is exact and order-free) and encodes its grid-stride share.
// Bit-identical to quantize(x, F, granularity=per_tensor). Must be launched
// with cudaLaunchCooperativeKernel and at most kMaxTensorQuantCtas CTAs.
constexpr int kMaxTensorQuantCtas = 2048;

template <Format F, InDtype D>
__global__ void __launch_bounds__(kThreads)
    TensorQuantizeKernel(const typename InTraits<D>::Storage* __restrict__ x, int64_t n, bool vec,
                         uint8_t* __restrict__ q, float* __restrict__ scale,
                         uint32_t* __restrict__ cta_keys) {
  static_assert(HasF32Scale(F) && !IsPacked(F), "per-tensor activations are FP8");
  using In = typename InTraits<D>::Storage;
  constexpr int kVec = 16 / sizeof(In);
  namespace cg = cooperative_groups;
  cg::grid_group grid = cg::this_grid();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = vec ? n / kVec : 0;
  uint32_t key = CtaMax(StridedAmaxKey<D>(x, n, nvec, first, stride));
  if (threadIdx.x == 0) cta_keys[blockIdx.x] = key;
  grid.sync();
  key = 0;
  for (unsigned i = threadIdx.x; i < gridDim.x; i += blockDim.x) {
    const uint32_t kk = cta_keys[i];
    key = kk > key ? kk : key;
  }
  __syncthreads();  // CtaMax's shared scratch is reused
  key = CtaMax(key);
  __shared__ uint32_t tensor_key;
  if (threadIdx.x == 0) tensor_key = key;
  __syncthreads();
  const BlockScale s = ScaleFromKey<F>(tensor_key, 1.0f);
  if (blockIdx.x == 0 && threadIdx.x == 0) scale[0] = BitsFloat(s.stored);
  StridedEncode<F, D>(x, n, nvec, first, stride, tensor_key, s, q);
}

// Grid of the cooperative per-tensor quantize: every CTA resident at once.
template <Format F, InDtype D>
inline Status LaunchTensorQuantize(cudaStream_t stream, const typename InTraits<D>::Storage* x,
                                   int64_t n, uint8_t* q, float* scale, uint32_t* cta_keys) {
  // Resident CTAs per device, queried once per kernel instantiation and device.
  static std::atomic<int> resident[64];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) {
    return LastCudaError("cudaGetDevice");
  }
  int slots = resident[device].load(std::memory_order_relaxed);
  if (slots == 0) {
    int sms = 0, per_sm = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, TensorQuantizeKernel<F, D>, kThreads,
                                                      0) != cudaSuccess) {
      return LastCudaError("cooperative launch setup");
    }
    slots = sms * per_sm;
    resident[device].store(slots, std::memory_order_relaxed);
  }
  constexpr int kVec = 16 / sizeof(typename InTraits<D>::Storage);
  bool vec = n % kVec == 0 && Aligned16(x) && Aligned16(q);
  const int64_t want = CeilDiv(vec ? n / kVec : n, kThreads);
  int64_t grid = slots;
  grid = grid < want ? grid : want;
  grid = grid < kMaxTensorQuantCtas ? grid : kMaxTensorQuantCtas;
  grid = grid < 1 ? 1 : grid;
  void* args[] = {&x, &n, &vec, &q, &scale, &cta_keys};
  const cudaError_t e = cudaLaunchCooperativeKernel(
      reinterpret_cast<const void*>(TensorQuantizeKernel<F, D>), dim3(static_cast<unsigned>(grid)),
      dim3(kThreads), args, 0, stream);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return Status(std::string("jax_bq: cooperative launch failed: ") + cudaGetErrorString(e));
  }
  return LastCudaError("TensorQuantizeKernel");
}

}  // namespace jax_bq::cuda

#endif  // JAX_BQ_ACT_QUANTIZE_CUH_
