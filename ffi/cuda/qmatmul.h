// qmatmul on CUDA: enums shared with jax_bq/primitives/qmatmul.py, the
// workspace layout (one formula, exported to Python), the cuBLASLt probe and
// the FFI handler symbol.
#ifndef JAX_BQ_QMATMUL_H_
#define JAX_BQ_QMATMUL_H_

#include <cstdint>
#include <string>

#include "xla/ffi/api/c_api.h"

namespace jax_bq::cuda {

// Which kernel sequence the handler runs (attribute "path").
enum class QmmPath : int32_t {
  kCublasFp8 = 0,     // cuBLASLt FP8 x FP8 (Hopper/Ada/Blackwell), f32 scales
  kWeightOnly = 1,    // W8A16: our FP8-weight x bf16/f16-activation kernel
  kCublasBlockFp = 2  // cuBLASLt MXFP8 / NVFP4 (VEC32_UE8M0 / VEC16_UE4M3), Blackwell
};

// Activation scale granularity (attribute "act_gran").
enum class ActGran : int32_t { kTensor = 0, kToken = 1, kBlock128 = 2, kBlockFp = 3 };
// Weight scale granularity (attribute "w_gran").
enum class WGran : int32_t { kTensor = 0, kChannel = 1, kBlock = 2, kTile = 3 };

// cuBLASLt scale modes as plain ints (values of cublasLtMatmulMatrixScale_t).
constexpr int kScaleScalar = 0, kScaleVec16Ue4m3 = 1, kScaleVec32Ue8m0 = 2, kScaleOuterVec = 3,
              kScaleVec128 = 4, kScaleBlk128 = 5;

// cuBLASLt workspace requested by the GEMM paths (NVIDIA's guidance for Hopper).
constexpr int64_t kCublasWorkspaceBytes = int64_t{32} << 20;

struct QmmWorkspace {
  int64_t cublas = 0, xq = 0, xs = 0, ws = 0, quant = 0, misc = 0, epi = 0;  // offsets
  int64_t total = 0;
};

// Byte offsets of the regions of the qmatmul workspace output: cuBLASLt
// scratch, quantized activations, activation scales and weight scales in
// cuBLASLt's layouts, quantize scratch, alpha/beta/tensor scale, and the bf16
// GEMM result that jax_bq's own epilogue kernel reads (exact GELU).
QmmWorkspace QmatmulWorkspace(int32_t path, bool act_dynamic, int32_t act_format, int32_t act_gran,
                              int32_t w_gran, int64_t m, int64_t n, int64_t k, int32_t epilogue);

// Asks cuBLASLt (heuristic query only, nothing runs) whether it has an
// algorithm for this GEMM on `device`, and caches the plan the calls will
// use. Types are cudaDataType_t values, `epilogue` EpilogueBits.
// Returns "" when supported, else the reason.
std::string CublasLtProbe(int device, int64_t m, int64_t n, int64_t k, int a_type, int b_type,
                          int a_mode, int b_mode, int d_type, int32_t epilogue, int c_type,
                          int bias_type);

}  // namespace jax_bq::cuda

extern "C" XLA_FFI_Error* BqQmatmulCuda(XLA_FFI_CallFrame* call_frame);

#endif  // JAX_BQ_QMATMUL_H_
