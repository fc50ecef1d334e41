// cuBLASLt behind a narrow interface, so that the CUDA module still builds
// (with these entry points returning errors) where no cuBLASLt is available:
// cublaslt_gemm.cu or cublaslt_stub.cu is compiled, never both.
#ifndef JAX_BQ_CUBLASLT_GEMM_H_
#define JAX_BQ_CUBLASLT_GEMM_H_

#include <cuda_runtime.h>
#include <library_types.h>

#include <cstdint>
#include <string>
#include <tuple>

#include "launch.cuh"

namespace jax_bq::cuda {

// One FP8/FP4 GEMM as cuBLASLt sees it: A = weights [N, K] (op T), B =
// activations [M, K] (op N), D = out [M, N]; scale modes are
// cublasLtMatmulMatrixScale_t values.
struct GemmSpec {
  int device;
  int64_t m, n, k;  // our M (tokens), N (out features), K
  cudaDataType_t a_type, b_type, d_type;
  int a_mode, b_mode;
  bool device_alpha;
  auto Key() const {
    return std::make_tuple(device, m, n, k, static_cast<int>(a_type), static_cast<int>(b_type),
                           static_cast<int>(d_type), a_mode, b_mode, device_alpha);
  }
};

// Runs D = alpha * (A * a_scale) . (B * b_scale) on `stream` with the cached
// (or heuristic) algorithm; `workspace` holds kCublasWorkspaceBytes.
// device_alpha_beta: device pointers to alpha, beta when g.device_alpha.
Status RunGemm(cudaStream_t stream, const GemmSpec& g, const void* a, const void* a_scale,
               const void* b, const void* b_scale, void* out, void* workspace,
               const float* device_alpha_beta);

// cublasLtGetVersion(), or 0 when built without cuBLASLt.
int64_t CublasLtVersion();

}  // namespace jax_bq::cuda

#endif  // JAX_BQ_CUBLASLT_GEMM_H_
