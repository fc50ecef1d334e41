// Does cuBLASLt's FP8 GEMM speed depend on the data? Times the same
// per-tensor E4M3 GEMM (8192^3, bf16 out, heuristic's first algorithm) on
// three fillings of the operands: all codes 0x38 (1.0), uniform values in
// [-1, 1], and normal values scaled to the full E4M3 range (what quantize()
// produces). Tensor cores draw more power when more bits toggle, and the
// H200 lowers its clock at the power limit.
//   nvcc -O2 -arch=sm_90a fp8_gemm_data.cu -lcublasLt -o fp8_gemm_data
#include <cublasLt.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>

#include "probe_util.cuh"

__global__ void Fill(__nv_fp8_e4m3* p, size_t n, int kind, unsigned seed) {
  const size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const unsigned h = ProbeHash(i, seed);
  const float u1 = ((h & 0xffff) + 0.5f) / 65536.0f, u2 = ((h >> 16) + 0.5f) / 65536.0f;
  float v = 1.0f;
  if (kind == 1) v = 2.0f * u1 - 1.0f;
  if (kind == 2) v = 100.0f * sqrtf(-2.0f * logf(u1)) * cosf(6.2831853f * u2);  // ~N(0, 100^2)
  p[i] = __nv_fp8_e4m3(v);
}

int main() {
  const int n = 8192;
  const size_t e = static_cast<size_t>(n) * n;
  __nv_fp8_e4m3 *a, *b;
  __nv_bfloat16* d;
  float* s;
  void* ws;
  const size_t wsz = 32 << 20;
  cudaMalloc(&a, e);
  cudaMalloc(&b, e);
  cudaMalloc(&d, 2 * e);
  cudaMalloc(&s, 8);
  cudaMalloc(&ws, wsz);
  const float ones[2] = {1.0f, 1.0f};
  cudaMemcpy(s, ones, 8, cudaMemcpyHostToDevice);
  cublasLtHandle_t h;
  cublasLtCreate(&h);
  cublasLtMatmulDesc_t op;
  cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F);
  const cublasOperation_t t = CUBLAS_OP_T, nn = CUBLAS_OP_N;
  cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof(t));
  cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &nn, sizeof(nn));
  const float* sa = s;
  const float* sb = s + 1;
  cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sa, sizeof(sa));
  cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sb, sizeof(sb));
  cublasLtMatrixLayout_t la, lb, ld;
  cublasLtMatrixLayoutCreate(&la, CUDA_R_8F_E4M3, n, n, n);
  cublasLtMatrixLayoutCreate(&lb, CUDA_R_8F_E4M3, n, n, n);
  cublasLtMatrixLayoutCreate(&ld, CUDA_R_16BF, n, n, n);
  cublasLtMatmulPreference_t pref;
  cublasLtMatmulPreferenceCreate(&pref);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsz,
                                       sizeof(wsz));
  cublasLtMatmulHeuristicResult_t res;
  int found = 0;
  cublasLtMatmulAlgoGetHeuristic(h, op, la, lb, ld, ld, pref, 1, &res, &found);
  if (!found) {
    std::printf("no algorithm\n");
    return 1;
  }
  const char* names[3] = {"all 1.0 (0x38)", "uniform [-1, 1]", "normal, full E4M3 range"};
  const float alpha = 1.0f, beta = 0.0f;
  for (int kind = 0; kind < 3; ++kind) {
    Fill<<<(e + 255) / 256, 256>>>(a, e, kind, 1);
    Fill<<<(e + 255) / 256, 256>>>(b, e, kind, 2);
    cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
    for (int i = 0; i < 10; ++i)
      st = cublasLtMatmul(h, op, &alpha, a, la, b, lb, &beta, d, ld, d, ld, &res.algo, ws, wsz, 0);
    if (st != CUBLAS_STATUS_SUCCESS || cudaDeviceSynchronize() != cudaSuccess) {
      std::printf("matmul failed: %s / %s\n", cublasLtGetStatusString(st),
                  cudaGetErrorString(cudaGetLastError()));
      return 1;
    }
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    const int iters = 50;
    cudaEventRecord(e0);
    for (int i = 0; i < iters; ++i)
      cublasLtMatmul(h, op, &alpha, a, la, b, lb, &beta, d, ld, d, ld, &res.algo, ws, wsz, 0);
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    const double sec = ms / iters * 1e-3;
    std::printf("fp8 per-tensor 8192^3, %-24s %8.1f us %7.0f TFLOP/s\n", names[kind], sec * 1e6,
                2.0 * n * n * n / sec / 1e12);
  }
  return cudaGetLastError() == cudaSuccess ? 0 : 1;
}
