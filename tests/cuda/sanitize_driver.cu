// Standalone driver for compute-sanitizer: runs every quantize/dequantize
// launch path (fused and two-pass, vector and scalar, packed along A and B,
// NVFP4 with several groups, ragged tails) for every format and input dtype,
// without JAX, whose process does not survive being sanitized here. Numerics
// are checked by the pytest suite; this only has to touch every code path.
//   nvcc -std=c++20 -O2 -arch=sm_90a -Iffi/include -Iffi/cuda \
//        tests/cuda/sanitize_driver.cu -o sanitize_driver
//   compute-sanitizer --tool memcheck ./sanitize_driver
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "launch.cuh"

using jax_bq::Format;
using jax_bq::InDtype;
using jax_bq::Layout;

#define CHECK_CUDA(x)                                                                     \
  do {                                                                                    \
    cudaError_t e = (x);                                                                  \
    if (e != cudaSuccess) {                                                               \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__); \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

static int g_cases = 0;

template <Format F, InDtype D>
void RunCase(const Layout& l) {
  const int64_t n = l.NumElements();
  const size_t in_bytes = n * (D == InDtype::kF32 ? 4 : 2);
  const bool packed = jax_bq::IsPacked(F);
  const size_t data_bytes = packed ? l.g * l.p * l.PackedA() * l.PackedB() : n;
  const size_t scale_bytes = l.NumScales() * (jax_bq::HasF32Scale(F) ? 4 : 1);
  const size_t ws_bytes = 4 * jax_bq::QuantizeWorkspaceWords(l, F == Format::kNVFP4);
  std::vector<uint8_t> host(in_bytes);
  std::mt19937 rng(static_cast<unsigned>(n));
  std::normal_distribution<float> normal;
  for (int64_t i = 0; i < n; ++i) {
    float v = normal(rng) * (i % 97 == 0 ? 300.0f : 1.0f);
    if (i == n / 2) v = (g_cases % 3 == 0) ? NAN : v;  // a non-finite block sometimes
    if (D == InDtype::kF32) {
      std::memcpy(&host[4 * i], &v, 4);
    } else {
      const uint16_t h =
          D == InDtype::kBF16 ? jax_bq::FloatToBF16Bits(v) : jax_bq::FloatToF16Bits(v);
      std::memcpy(&host[2 * i], &h, 2);
    }
  }
  void *x, *scales, *out;
  uint8_t* data;
  float* ts;
  uint32_t* ws;
  CHECK_CUDA(cudaMalloc(&x, in_bytes + 16));
  CHECK_CUDA(cudaMalloc(&data, data_bytes + 16));
  CHECK_CUDA(cudaMalloc(&scales, scale_bytes + 16));
  CHECK_CUDA(cudaMalloc(&ts, 4 * l.g));
  CHECK_CUDA(cudaMalloc(&ws, ws_bytes + 16));
  CHECK_CUDA(cudaMalloc(&out, in_bytes + 16));
  CHECK_CUDA(cudaMemcpy(x, host.data(), in_bytes, cudaMemcpyHostToDevice));
  jax_bq::cuda::Status s = jax_bq::cuda::LaunchQuantize<F, D>(0, x, data, scales, ts, ws, l);
  if (!s.ok()) {
    std::printf("quantize failed: %s\n", s.message.c_str());
    std::exit(1);
  }
  s = jax_bq::cuda::LaunchDequantize<F, D>(0, data, scales, ts, out, l);
  if (!s.ok()) {
    std::printf("dequantize failed: %s\n", s.message.c_str());
    std::exit(1);
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  for (void* p :
       {x, static_cast<void*>(data), scales, static_cast<void*>(ts), static_cast<void*>(ws), out}) {
    CHECK_CUDA(cudaFree(p));
  }
  ++g_cases;
}

template <Format F>
void RunFormat() {
  const bool fixed = F == Format::kNVFP4 || jax_bq::IsMX(F);
  const int64_t blk = F == Format::kNVFP4 ? 16 : (jax_bq::IsMX(F) ? 32 : 128);
  const bool pk = jax_bq::IsPacked(F);
  std::vector<Layout> cases = {
      {1, 33, 130, 1, blk, 1, false},   // fused, ragged rows: scalar path
      {1, 64, 1024, 1, blk, 1, false},  // fused, vector path
      {1, 3, 64, 5, blk, 1, false},     // blocked axis not last: two-pass
      {3, 8, 64, 1, blk, 1, false},     // several groups (vmap)
      {1, 0, 64, 1, blk, 1, false},     // empty
  };
  if (!fixed) {
    cases.push_back({1, 7, 100, 1, 16, 1, false});       // small blocks
    cases.push_back({1, 5, 20001, 1, 20001, 1, false});  // per-channel, multi-chunk
    cases.push_back({1, 1, 99, 131, 99, 131, pk});       // per-tensor
    cases.push_back({1, 2, 300, 260, 128, 128, pk});     // 128x128 tiles
    cases.push_back({1, 1, 50, 40, 16, 32, pk});         // small tiles
  }
  for (const Layout& l : cases) {
    RunCase<F, InDtype::kF32>(l);
    RunCase<F, InDtype::kBF16>(l);
    RunCase<F, InDtype::kF16>(l);
  }
}

int main() {
  RunFormat<Format::kFP8E4M3>();
  RunFormat<Format::kFP8E5M2>();
  RunFormat<Format::kFP4>();
  RunFormat<Format::kNVFP4>();
  RunFormat<Format::kMXFP8>();
  RunFormat<Format::kMXFP4>();
  std::printf("SANITIZE DRIVER OK: %d cases\n", g_cases);
  return 0;
}
