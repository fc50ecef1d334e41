// Stand-in for cublaslt_gemm.cu where the build found no cuBLASLt: the CUDA
// module still provides quantize, dequantize and the W8A16 kernel, and the
// GEMM entry points say why they cannot run (qmatmul's plan then falls back).
#include <string>

#include "cublaslt_gemm.h"
#include "qmatmul.h"

namespace jax_bq::cuda {

namespace {
constexpr const char* kWhy =
    "jax_bq was built without cuBLASLt (install nvidia-cublas or a "
    "CUDA toolkit with cuBLAS, then rebuild)";
}  // namespace

Status RunGemm(cudaStream_t, const GemmSpec&, const void*, const void*, const void*, const void*,
               void*, void*, const float*) {
  return Status(kWhy);
}

std::string CublasLtProbe(int, int64_t, int64_t, int64_t, int, int, int, int, int) { return kWhy; }

int64_t CublasLtVersion() { return 0; }

}  // namespace jax_bq::cuda
