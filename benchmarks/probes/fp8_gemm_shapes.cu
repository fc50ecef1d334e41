// cuBLASLt at the dense shapes of an E5-large block (M = 4096 tokens): how fast
// is the per-tensor E4M3 GEMM qmatmul runs (bf16 out, heuristic's first
// algorithm), how much do the heuristic's other candidates and FP8 fast
// accumulation change that, and what does the bf16 GEMM take on the same
// shapes. CUDA events around 8 back-to-back launches queued behind a spin kernel,
// median of 15 such samples after warm-up; operands rotated over 4 copies,
// random codes.
//   nvcc -O2 -arch=sm_90a fp8_gemm_shapes.cu -lcublasLt -o fp8_gemm_shapes
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <vector>

#include "probe_util.cuh"

#define CHECK(x)                                                                      \
  do {                                                                                \
    auto s_ = (x);                                                                    \
    if (static_cast<int>(s_) != 0) {                                                  \
      std::printf("%s failed (%d) at line %d\n", #x, static_cast<int>(s_), __LINE__); \
      return 1;                                                                       \
    }                                                                                 \
  } while (0)

__global__ void FillBytes(unsigned char* p, size_t n, unsigned seed, bool bf16) {
  const size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const unsigned h = ProbeHash(i, seed);
  // FP8: codes with exponent <= 14 (no NaN); bf16: small random values.
  if (bf16) {
    p[i] = (i & 1) ? static_cast<unsigned char>(0x3C | (h & 0x81)) : static_cast<unsigned char>(h);
  } else {
    p[i] = static_cast<unsigned char>(h & 0xF7);
  }
}

struct Shape {
  int m, n, k;
  const char* what;
};

int main() {
  const Shape shapes[] = {{4096, 1024, 1024, "Q/K/V/O"},
                          {4096, 3072, 1024, "fused QKV"},
                          {4096, 4096, 1024, "FFN in"},
                          {4096, 1024, 4096, "FFN out"},
                          {8192, 8192, 8192, "8192^3"}};
  cublasLtHandle_t h;
  CHECK(cublasLtCreate(&h));
  const size_t wsz = 32 << 20;
  void* ws;
  CHECK(cudaMalloc(&ws, wsz));
  float* one;
  CHECK(cudaMalloc(&one, sizeof(float)));
  const float h_one = 1.0f;
  CHECK(cudaMemcpy(one, &h_one, sizeof(float), cudaMemcpyHostToDevice));
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  constexpr int kCopies = 4, kSamples = 15, kBatch = 8;
  for (const Shape& s : shapes) {
    for (int mode = 0; mode < 3; ++mode) {  // 0: FP8, 1: FP8 fast accumulation, 2: bf16
      const bool fp8 = mode < 2;
      const size_t el = fp8 ? 1 : 2;
      std::vector<void*> a(kCopies), b(kCopies);
      void* d;
      for (int c = 0; c < kCopies; ++c) {
        CHECK(cudaMalloc(&a[c], el * s.n * s.k));
        CHECK(cudaMalloc(&b[c], el * s.m * s.k));
        FillBytes<<<(el * s.n * s.k + 255) / 256, 256>>>(static_cast<unsigned char*>(a[c]),
                                                         el * s.n * s.k, 17 + c, !fp8);
        FillBytes<<<(el * s.m * s.k + 255) / 256, 256>>>(static_cast<unsigned char*>(b[c]),
                                                         el * s.m * s.k, 91 + c, !fp8);
      }
      CHECK(cudaMalloc(&d, 2ull * s.m * s.n));
      const cudaDataType_t in = fp8 ? CUDA_R_8F_E4M3 : CUDA_R_16BF;
      cublasLtMatmulDesc_t op;
      CHECK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
      const cublasOperation_t t = CUBLAS_OP_T, nt = CUBLAS_OP_N;
      CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof(t)));
      CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &nt, sizeof(nt)));
      if (fp8) {
        CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &one,
                                             sizeof(one)));
        CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &one,
                                             sizeof(one)));
        const int8_t fast = mode == 1;
        CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast,
                                             sizeof(fast)));
      }
      // out[M, N] row-major = D[N, M] column-major = W[N, K] x^T: A = W (K x N, op T), B = x.
      cublasLtMatrixLayout_t la, lb, ld;
      CHECK(cublasLtMatrixLayoutCreate(&la, in, s.k, s.n, s.k));
      CHECK(cublasLtMatrixLayoutCreate(&lb, in, s.k, s.m, s.k));
      CHECK(cublasLtMatrixLayoutCreate(&ld, CUDA_R_16BF, s.n, s.m, s.n));
      cublasLtMatmulPreference_t pref;
      CHECK(cublasLtMatmulPreferenceCreate(&pref));
      CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                 &wsz, sizeof(wsz)));
      cublasLtMatmulHeuristicResult_t res[8];
      int found = 0;
      CHECK(cublasLtMatmulAlgoGetHeuristic(h, op, la, lb, ld, ld, pref, 8, res, &found));
      const float alpha = 1.0f, beta = 0.0f;
      const int shown = mode == 2 ? 1 : found;
      for (int r = 0; r < shown; ++r) {
        auto run = [&](int i) {
          return cublasLtMatmul(h, op, &alpha, a[i % kCopies], la, b[i % kCopies], lb, &beta, d, ld,
                                d, ld, &res[r].algo, ws, wsz, 0);
        };
        for (int i = 0; i < 5; ++i) CHECK(run(i));
        // Each sample: a 100 us spin fills the queue, then kBatch back-to-back GEMMs.
        std::vector<float> ms(kSamples);
        for (int i = 0; i < kSamples; ++i) {
          ProbeSpinKernel<<<1, 1>>>(200000);
          cudaEventRecord(e0);
          for (int j = 0; j < kBatch; ++j) CHECK(run(i * kBatch + j));
          cudaEventRecord(e1);
          cudaEventSynchronize(e1);
          cudaEventElapsedTime(&ms[i], e0, e1);
        }
        std::sort(ms.begin(), ms.end());
        const double us = 1e3 * ms[kSamples / 2] / kBatch;
        const double tf = 2.0 * s.m * s.n * s.k / (us * 1e-6) / 1e12;
        std::printf("%-9s M=%5d N=%5d K=%5d %-13s cand %d/%d: %8.1f us %7.0f TFLOP/s\n", s.what,
                    s.m, s.n, s.k,
                    mode == 0   ? "fp8"
                    : mode == 1 ? "fp8 fastacc"
                                : "bf16",
                    r, found, us, tf);
      }
      cublasLtMatmulPreferenceDestroy(pref);
      cublasLtMatrixLayoutDestroy(la);
      cublasLtMatrixLayoutDestroy(lb);
      cublasLtMatrixLayoutDestroy(ld);
      cublasLtMatmulDescDestroy(op);
      for (int c = 0; c < kCopies; ++c) {
        cudaFree(a[c]);
        cudaFree(b[c]);
      }
      cudaFree(d);
    }
  }
  return 0;
}
