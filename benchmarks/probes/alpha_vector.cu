// Does cuBLASLt's FP8 GEMM on this GPU take a per-output-feature alpha vector
// (CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_ZERO), and at what cost?
// If it does, a per-channel weight scale (and Q/K/V fused into one GEMM with
// their own scales) costs nothing over per-tensor.
//
//   nvcc -std=c++17 -O2 -arch=sm_90a benchmarks/probes/alpha_vector.cu -lcublasLt -o /tmp/alpha_vector
//   /tmp/alpha_vector            # prints one line per configuration and shape
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CK(x)                                                                         \
  do {                                                                                \
    auto _s = (x);                                                                    \
    if (_s != 0) {                                                                    \
      std::printf("  %s failed: %d (line %d)\n", #x, static_cast<int>(_s), __LINE__); \
      return -1.0;                                                                    \
    }                                                                                 \
  } while (0)

__global__ void FillFp8(__nv_fp8_e4m3* p, size_t n, unsigned seed) {
  size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  unsigned h = (unsigned(i) * 2654435761u) ^ seed;
  h ^= h >> 13;
  h *= 0x5bd1e995u;
  h ^= h >> 15;
  p[i] = __nv_fp8_e4m3((float(h % 2001u) - 1000.0f) / 250.0f);
}

// mode 0: host alpha = 1 (jax_bq's per-tensor path today); 1: alpha device
// vector (length n = output features), beta 0. bias: BIAS epilogue (bf16).
// Returns the median-of-5 time per GEMM in microseconds, -1 if refused.
double Run(cublasLtHandle_t h, int m, int n, int k, int mode, bool bias, bool scales,
           __nv_fp8_e4m3* A, __nv_fp8_e4m3* B, __nv_bfloat16* D, float* vec, __nv_bfloat16* bvec,
           float* one_dev, void* ws, size_t ws_bytes, cudaStream_t st) {
  cublasLtMatmulDesc_t op;
  CK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  if (scales) {
    CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &one_dev,
                                      sizeof(one_dev)));
    CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &one_dev,
                                      sizeof(one_dev)));
  }
  if (mode == 1) {
    int32_t pm = CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_ZERO;
    CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_POINTER_MODE, &pm, sizeof(pm)));
  }
  if (bias) {
    cublasLtEpilogue_t e = CUBLASLT_EPILOGUE_BIAS;
    CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &e, sizeof(e)));
    int32_t bt = CUDA_R_16BF;
    CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof(bt)));
    CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bvec, sizeof(bvec)));
  }
  cublasLtMatrixLayout_t la, lb, lc, ld;
  CK(cublasLtMatrixLayoutCreate(&la, CUDA_R_8F_E4M3, k, n, k));
  CK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_8F_E4M3, k, m, k));
  CK(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, n, m, n));
  CK(cublasLtMatrixLayoutCreate(&ld, CUDA_R_16BF, n, m, n));
  cublasLtMatmulPreference_t pref;
  CK(cublasLtMatmulPreferenceCreate(&pref));
  CK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes,
                                          sizeof(ws_bytes)));
  cublasLtMatmulHeuristicResult_t res{};
  int found = 0;
  cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(h, op, la, lb, lc, ld, pref, 1, &res, &found);
  if (s != CUBLAS_STATUS_SUCCESS || found == 0) {
    std::printf("  heuristic refused: status %d found %d\n", int(s), found);
    return -1.0;
  }
  const float one = 1.0f, zero = 0.0f;
  const void* alpha = mode == 1 ? static_cast<const void*>(vec) : &one;
  const void* beta = mode == 1 ? nullptr : &zero;
  auto call = [&]() {
    return cublasLtMatmul(h, op, alpha, A, la, B, lb, beta, D, lc, D, ld, &res.algo, ws, ws_bytes,
                          st);
  };
  CK(call());
  CK(cudaStreamSynchronize(st));
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  std::vector<double> t;
  for (int rep = 0; rep < 5; ++rep) {
    cudaEventRecord(e0, st);
    for (int i = 0; i < 50; ++i) CK(call());
    cudaEventRecord(e1, st);
    cudaEventSynchronize(e1);
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    t.push_back(ms * 1000.0 / 50);
  }
  std::sort(t.begin(), t.end());
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(lc);
  cublasLtMatrixLayoutDestroy(ld);
  cublasLtMatmulDescDestroy(op);
  return t[2];
}

int main() {
  cublasLtHandle_t h;
  cublasLtCreate(&h);
  cudaStream_t st;
  cudaStreamCreate(&st);
  const size_t ws_bytes = 32 << 20;
  void* ws;
  cudaMalloc(&ws, ws_bytes);
  const int shapes[][3] = {{4096, 3072, 1024}, {4096, 1024, 1024}, {4096, 4096, 1024},
                           {4096, 1024, 4096}, {128, 3072, 1024},  {8192, 8192, 8192}};
  for (auto& s : shapes) {
    const int m = s[0], n = s[1], k = s[2];
    __nv_fp8_e4m3 *A, *B;
    __nv_bfloat16 *D, *bvec;
    float *vec, *one_dev;
    cudaMalloc(&A, size_t(n) * k);
    cudaMalloc(&B, size_t(m) * k);
    cudaMalloc(&D, size_t(m) * n * 2);
    cudaMalloc(&vec, n * 4);
    cudaMalloc(&bvec, n * 2);
    cudaMalloc(&one_dev, 4);
    FillFp8<<<(size_t(n) * k + 255) / 256, 256, 0, st>>>(A, size_t(n) * k, 1u);
    FillFp8<<<(size_t(m) * k + 255) / 256, 256, 0, st>>>(B, size_t(m) * k, 7u);
    std::vector<float> hv(n);
    std::vector<__nv_bfloat16> hb(n);
    for (int i = 0; i < n; ++i) hv[i] = 0.5f + float(i % 7) * 0.25f, hb[i] = __float2bfloat16(0);
    const float o = 1.0f;
    cudaMemcpy(vec, hv.data(), n * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(bvec, hb.data(), n * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(one_dev, &o, 4, cudaMemcpyHostToDevice);
    // Correctness: D(vector) == D(scalar) * vec[row] to bf16 rounding.
    std::vector<__nv_bfloat16> d0(size_t(m) * n), d1(size_t(m) * n);
    double base = Run(h, m, n, k, 0, false, true, A, B, D, vec, bvec, one_dev, ws, ws_bytes, st);
    cudaMemcpy(d0.data(), D, d0.size() * 2, cudaMemcpyDeviceToHost);
    double vecs = Run(h, m, n, k, 1, false, true, A, B, D, vec, bvec, one_dev, ws, ws_bytes, st);
    double maxrel = -1;
    if (vecs > 0) {
      cudaMemcpy(d1.data(), D, d1.size() * 2, cudaMemcpyDeviceToHost);
      maxrel = 0;
      for (size_t i = 0; i < d0.size(); ++i) {
        const double want = double(__bfloat162float(d0[i])) * hv[i % n];
        const double got = __bfloat162float(d1[i]);
        const double den = std::max(std::fabs(want), 1.0);
        maxrel = std::max(maxrel, std::fabs(got - want) / den);
      }
    }
    double vec_noscale =
        Run(h, m, n, k, 1, false, false, A, B, D, vec, bvec, one_dev, ws, ws_bytes, st);
    double base_bias =
        Run(h, m, n, k, 0, true, true, A, B, D, vec, bvec, one_dev, ws, ws_bytes, st);
    double vec_bias = Run(h, m, n, k, 1, true, true, A, B, D, vec, bvec, one_dev, ws, ws_bytes, st);
    std::printf(
        "%dx%dx%d us: scalar %.2f | alpha-vector %.2f (max rel err vs scalar*vec %.2e) | "
        "alpha-vector no A/B scales %.2f | scalar+bias %.2f | alpha-vector+bias %.2f\n",
        m, n, k, base, vecs, maxrel, vec_noscale, base_bias, vec_bias);
    cudaFree(A), cudaFree(B), cudaFree(D), cudaFree(vec), cudaFree(bvec), cudaFree(one_dev);
  }
  std::printf("cuBLASLt version %zu\n", cublasLtGetVersion());
  return 0;
}
