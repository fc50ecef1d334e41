// Scale relayouts for the cuBLASLt GEMM of qmatmul: float32 scale matrices
// transposed or re-pitched, and a per-tensor scale broadcast to a vector.
#ifndef JAX_BQ_SCALE_RELAYOUT_CUH_
#define JAX_BQ_SCALE_RELAYOUT_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "quantize_device.cuh"  // kThreads

namespace jax_bq::cuda {

// ---- Scale relayouts ----------------------------------------------------------------
// out[c * out_ld + r] = in[r * cols + c] for r < rows, c < cols (transpose),
// or out[r * out_ld + c] = in[r * cols + c] (row pitch change) when !transpose.
static __global__ void __launch_bounds__(kThreads)
    RelayoutScalesKernel(const float* __restrict__ in, int64_t rows, int64_t cols, bool transpose,
                         int64_t out_ld, float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * cols) return;
  const int64_t r = i / cols, c = i - r * cols;
  out[transpose ? c * out_ld + r : r * out_ld + c] = in[i];
}

// out[i] = *value for i < n (a per-tensor scale as an OUTER_VEC vector).
static __global__ void __launch_bounds__(kThreads)
    BroadcastScaleKernel(const float* __restrict__ value, int64_t n, float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = value[0];
}

}  // namespace jax_bq::cuda

#endif  // JAX_BQ_SCALE_RELAYOUT_CUH_
