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

// Epilogue bits (attribute "epilogue" of jax_bq_qmatmul; jax_bq/primitives/qmatmul.py
// has the same values): what cuBLASLt fuses after the product.
//   out = gelu_tanh?( alpha * A.B + bias ) + residual, then FP8 with d_scale.
enum EpilogueBits : int32_t {
  kEpiBias = 1,      // + bias[N] (BIAS / GELU_BIAS epilogue)
  kEpiGelu = 2,      // tanh-approximated GELU (cuBLASLt's GELU epilogue)
  kEpiResidual = 4,  // + residual[M, N] through C with beta = 1
  kEpiAmax = 8,      // amax of the result before the FP8 conversion (AMAX_D_POINTER)
  kEpiGeluErf = 16,  // exact GELU: jax_bq's epilogue kernel after a bf16 BIAS GEMM
};

// One FP8/FP4 GEMM as cuBLASLt sees it: A = weights [N, K] (op T), B =
// activations [M, K] (op N), D = out [M, N]; scale modes are
// cublasLtMatmulMatrixScale_t values. Everything here is fixed per call site,
// so the descriptors, layouts and algorithm are built once per GemmSpec.
struct GemmSpec {
  int device;
  int64_t m, n, k;  // our M (tokens), N (out features), K
  cudaDataType_t a_type, b_type, d_type;
  int a_mode, b_mode;
  bool device_alpha;
  int32_t epilogue = 0;                    // EpilogueBits
  cudaDataType_t c_type = CUDA_R_16BF;     // residual / C type (== d_type unless D is FP8)
  cudaDataType_t bias_type = CUDA_R_16BF;  // bias type (bf16 for FP8 D, else d_type)
  auto Key() const {
    return std::make_tuple(device, m, n, k, static_cast<int>(a_type), static_cast<int>(b_type),
                           static_cast<int>(d_type), a_mode, b_mode, device_alpha, epilogue,
                           static_cast<int>(c_type), static_cast<int>(bias_type));
  }
};

// Per-call device pointers of one GEMM.
struct GemmPointers {
  const void* a = nullptr;
  const void* a_scale = nullptr;
  const void* b = nullptr;
  const void* b_scale = nullptr;
  const void* bias = nullptr;      // kEpiBias
  const void* residual = nullptr;  // kEpiResidual
  void* d = nullptr;
  const float* d_scale = nullptr;     // FP8 D: multiplier applied before the conversion
  float* amax = nullptr;              // kEpiAmax
  void* workspace = nullptr;          // kCublasWorkspaceBytes
  const float* alpha_beta = nullptr;  // device alpha, beta when spec.device_alpha
};

// Runs the GEMM of `g` on `stream` with its cached plan (descriptors,
// layouts and the heuristic's first algorithm, built on first use). Host
// work per call: one map lookup and the per-call pointer attributes.
Status RunGemm(cudaStream_t stream, const GemmSpec& g, const GemmPointers& p);

// Whether t is an FP8 data type (an FP8 D takes a D scale, bf16 C and bias).
bool IsFp8Type(cudaDataType_t t);

// cublasLtGetVersion(), or 0 when built without cuBLASLt.
int64_t CublasLtVersion();

}  // namespace jax_bq::cuda

#endif  // JAX_BQ_CUBLASLT_GEMM_H_
