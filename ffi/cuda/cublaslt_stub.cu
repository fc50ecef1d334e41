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

bool IsFp8Type(cudaDataType_t t) { return t == CUDA_R_8F_E4M3 || t == CUDA_R_8F_E5M2; }

Status RunGemm(cudaStream_t, const GemmSpec&, const GemmPointers&) { return Status(kWhy); }

std::string CublasLtProbe(int, int64_t, int64_t, int64_t, int, int, int, int, int, int32_t, int,
                          int) {
  return kWhy;
}

int64_t CublasLtVersion() { return 0; }

}  // namespace jax_bq::cuda
