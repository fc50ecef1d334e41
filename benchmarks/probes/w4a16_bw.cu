// Kernel-level time of the NVFP4 W4A16 (FP4 weights x bf16 activations)
// kernels, timed with CUDA events (no JAX), against a device-to-device copy
// measured in the same process: W4A16NvKernel (shifted widening, cp.async
// pipeline; what qmatmul runs for NVFP4) and W4A16Kernel (byte-permute table,
// register prefetch; the previous NVFP4 kernel, still FP4's). Both are checked
// against a double-precision host reference over every code and scale. Also
// times fp4_to_fp8's one-pass kernel (Fp4ToFp8Kernel) on the same weights.
//   nvcc -std=c++20 -O2 -gencode arch=compute_90a,code=sm_90a -Iffi/include \
//        -Iffi/cuda benchmarks/probes/w4a16_bw.cu -o w4a16_bw
//   ./w4a16_bw > w4a16_bw.json   (or: python benchmarks/bench_w4a16_kernels.py)
// Method: random codes and E4M3 scales (every byte but NaN), random normal
// activations; weight copies rotated so that consecutive launches never hit
// L2 (>= 240 MB of weights in all, L2 is 60 MB); 5 warm-up launches, then the
// median of 50 launches each bracketed by its own events. Bytes = codes +
// block scales read (activations and output are < 0.1% at M <= 16).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "check_cuda.h"
#include "launch.cuh"
#include "probe_util.cuh"
#include "w4a16_kernels.cuh"

using jax_bq::Format;
using jax_bq::cuda::kW8A16Warps;
using jax_bq::cuda::LaunchW4A16Nv;
using jax_bq::cuda::W4A16Kernel;
using jax_bq::cuda::WeightScaleLayout;

namespace {

constexpr int kWarmup = 5;
constexpr int kIters = 50;

float BF16ToFloat(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t FloatToBF16(float f) {  // RNE, finite inputs only
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

double E2M1Value(int c) {
  static const double kMag[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};
  return (c & 8 ? -1.0 : 1.0) * kMag[c & 7];
}

double E4M3Value(int c) {
  const int e = (c >> 3) & 15, m = c & 7;
  const double v = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
  return c & 0x80 ? -v : v;
}

template <int kVariant, int T>
void Launch(const uint16_t* x, const uint8_t* w, const uint8_t* s, const float* ts,
            WeightScaleLayout sl, int64_t m, int64_t n, int64_t k, float* out) {
  constexpr int kWarps = T == 1 ? kW8A16Warps : 4;
  const unsigned grid = static_cast<unsigned>((n + 15) / 16);
  if constexpr (kVariant > 0) {
    LaunchW4A16Nv(0, x, w, s, ts, m, n, k, out, /*f32 out*/ 0);  // qmatmul's choice for M, N
  } else {
    W4A16Kernel<Format::kNVFP4, T, kWarps><<<grid, 32 * kWarps>>>(x, w, s, ts, sl, m, n, k, out, 0);
  }
}

template <int kVariant>
void LaunchM(const uint16_t* x, const uint8_t* w, const uint8_t* s, const float* ts,
             WeightScaleLayout sl, int64_t m, int64_t n, int64_t k, float* out) {
  if (m <= 8) {
    Launch<kVariant, 1>(x, w, s, ts, sl, m, n, k, out);
  } else if (m <= 16) {
    Launch<kVariant, 2>(x, w, s, ts, sl, m, n, k, out);
  } else if (m <= 32) {
    Launch<kVariant, 4>(x, w, s, ts, sl, m, n, k, out);
  } else {
    Launch<kVariant, 8>(x, w, s, ts, sl, m, n, k, out);
  }
}

// One JSON row on stdout (and a log line on stderr).
void EmitRow(bool& first, const char* name, int64_t m, int64_t n, int64_t k, float us, double bytes,
             double copy_tbs) {
  const double tbs = bytes / (us * 1e-6) / 1e12;
  std::fprintf(stderr, "  %-6s %ldx%ldx%ld: %.1f us, %.2f TB/s, %.1f%% of copy\n", name, m, n, k,
               us, tbs, 100.0 * tbs / copy_tbs);
  std::printf(
      "%s{\"kernel\": \"%s\", \"m\": %ld, \"n\": %ld, \"k\": %ld, \"us\": %.2f, "
      "\"TBps\": %.4f, \"pct_copy\": %.2f}\n",
      first ? "" : ",", name, m, n, k, us, tbs, 100.0 * tbs / copy_tbs);
  first = false;
}

double CopyTBs() {
  const size_t bytes = size_t{256} << 20;
  void *a, *b;
  CHECK_CUDA(cudaMalloc(&a, bytes));
  CHECK_CUDA(cudaMalloc(&b, bytes));
  CHECK_CUDA(cudaMemset(a, 1, bytes));
  const float us = ProbeMedianUs(
      [&](int) { CHECK_CUDA(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); }, kWarmup,
      20);
  CHECK_CUDA(cudaFree(a));
  CHECK_CUDA(cudaFree(b));
  return 2.0 * bytes / (us * 1e-6) / 1e12;
}

struct Case {
  int64_t m, n, k;
};

}  // namespace

int main() {
  const double copy_tbs = CopyTBs();
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::fprintf(stderr, "%s: device-to-device copy %.3f TB/s (read + write)\n", prop.name, copy_tbs);
  std::printf("{\"device\": \"%s\", \"copy_TBps\": %.3f, \"rows\": [\n", prop.name, copy_tbs);
  // M = 1-5, 7, 8 (LaunchW4A16Nv's small-M rules), then the tile-row configurations.
  const Case cases[] = {{1, 8192, 8192},  {2, 8192, 8192},   {3, 8192, 8192},   {4, 8192, 8192},
                        {5, 8192, 8192},  {7, 8192, 8192},   {8, 8192, 8192},   {16, 8192, 8192},
                        {32, 8192, 8192}, {64, 8192, 8192},  {1, 28672, 8192},  {2, 28672, 8192},
                        {3, 28672, 8192}, {4, 28672, 8192},  {5, 28672, 8192},  {7, 28672, 8192},
                        {8, 28672, 8192}, {16, 28672, 8192}, {32, 28672, 8192}, {64, 28672, 8192}};
  std::mt19937_64 rng(7);
  bool first = true;
  int failures = 0;
  for (const Case& c : cases) {
    const int64_t wbytes = c.n * c.k / 2, sbytes = c.n * c.k / 16;
    const int rot = static_cast<int>(std::max<int64_t>(2, (int64_t{240} << 20) / wbytes + 1));
    std::vector<uint8_t> hw(wbytes), hs(sbytes);
    std::vector<uint16_t> hx(c.m * c.k);
    for (auto& b : hw) b = static_cast<uint8_t>(rng());
    for (auto& b : hs) {
      b = static_cast<uint8_t>(rng());
      if ((b & 0x7f) == 0x7f) b ^= 1;  // no NaN scales: the sums must stay comparable
    }
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (auto& v : hx) v = FloatToBF16(nd(rng));
    const float hts = 0.0123f;
    uint8_t *dw, *ds;
    uint16_t* dx;
    float *dts, *dout;
    CHECK_CUDA(cudaMalloc(&dw, wbytes * rot));
    CHECK_CUDA(cudaMalloc(&ds, sbytes * rot));
    CHECK_CUDA(cudaMalloc(&dx, hx.size() * 2));
    CHECK_CUDA(cudaMalloc(&dts, 4));
    CHECK_CUDA(cudaMalloc(&dout, c.m * c.n * 4));
    for (int r = 0; r < rot; ++r) {
      CHECK_CUDA(cudaMemcpy(dw + r * wbytes, hw.data(), wbytes, cudaMemcpyHostToDevice));
      CHECK_CUDA(cudaMemcpy(ds + r * sbytes, hs.data(), sbytes, cudaMemcpyHostToDevice));
    }
    CHECK_CUDA(cudaMemcpy(dx, hx.data(), hx.size() * 2, cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(dts, &hts, 4, cudaMemcpyHostToDevice));
    WeightScaleLayout sl{};
    sl.block_n = 1;
    sl.k_shift = 4;
    sl.cols = c.k / 16;

    // Correctness on 64 rows at each end (every token): |err| <= 2^-16 sum |x w|.
    auto check = [&](const char* name, auto launch) {
      CHECK_CUDA(cudaMemset(dout, 0xff, c.m * c.n * 4));
      launch(dx, dw, ds, dts, sl, c.m, c.n, c.k, dout);
      CHECK_CUDA(cudaGetLastError());
      std::vector<float> out(c.m * c.n);
      CHECK_CUDA(cudaMemcpy(out.data(), dout, out.size() * 4, cudaMemcpyDeviceToHost));
      double worst = 0.0;
      for (int64_t row = 0; row < c.n; ++row) {
        if (row == 64) row = c.n - 64;
        for (int64_t tok = 0; tok < c.m; ++tok) {
          double sum = 0.0, mag = 0.0;
          for (int64_t kk = 0; kk < c.k; ++kk) {
            const uint8_t byte = hw[(row * c.k + kk) / 2];
            const double wv = E2M1Value(kk % 2 ? byte >> 4 : byte & 15) *
                              E4M3Value(hs[row * (c.k / 16) + kk / 16]) * hts;
            const double p = BF16ToFloat(hx[tok * c.k + kk]) * wv;
            sum += p;
            mag += std::fabs(p);
          }
          const double err = std::fabs(out[tok * c.n + row] - sum) / std::max(mag, 1e-30);
          worst = std::max(worst, std::isfinite(err) ? err : 1e30);
        }
      }
      const bool ok = worst <= 0x1p-16;
      failures += !ok;
      std::fprintf(stderr, "  %s %ldx%ldx%ld: worst |err|/sum|xw| = %.3g %s\n", name, c.m, c.n, c.k,
                   worst, ok ? "ok" : "FAIL");
    };
    check("W4A16NvKernel", LaunchM<1>);
    check("W4A16Kernel", LaunchM<0>);

    auto time = [&](const char* name, auto launch, double bytes) {
      const float us = ProbeMedianUs(
          [&](int i) {
            const int r = i % rot;
            launch(dx, dw + r * wbytes, ds + r * sbytes, dts, sl, c.m, c.n, c.k, dout);
          },
          kWarmup, kIters);
      EmitRow(first, name, c.m, c.n, c.k, us, bytes, copy_tbs);
    };
    time("W4A16NvKernel", LaunchM<1>, wbytes + sbytes);
    time("W4A16Kernel", LaunchM<0>, wbytes + sbytes);
    if (c.m == 1) {
      // fp4_to_fp8 in one pass over the same weights (M is not involved):
      // bytes = codes + scales read, FP8 codes + float32 1x128 scales written.
      uint8_t* d8;
      uint32_t* s8;
      const int64_t s8_count = c.n * ((c.k + 127) / 128);
      CHECK_CUDA(cudaMalloc(&d8, c.n * c.k));
      CHECK_CUDA(cudaMalloc(&s8, 4 * s8_count));
      auto convert = [&](const uint16_t*, const uint8_t* w, const uint8_t* s, const float* ts,
                         WeightScaleLayout, int64_t, int64_t n, int64_t k, float*) {
        const auto st = jax_bq::cuda::LaunchFp4ToFp8<Format::kNVFP4>(0, w, s, ts, n, k, 16, d8, s8);
        if (!st.ok()) std::fprintf(stderr, "%s\n", st.message.c_str());
      };
      time("Fp4ToFp8Kernel", convert, wbytes + sbytes + c.n * c.k + 4.0 * s8_count);
      CHECK_CUDA(cudaFree(d8));
      CHECK_CUDA(cudaFree(s8));
    }
    CHECK_CUDA(cudaFree(dw));
    CHECK_CUDA(cudaFree(ds));
    CHECK_CUDA(cudaFree(dx));
    CHECK_CUDA(cudaFree(dts));
    CHECK_CUDA(cudaFree(dout));
  }
  // The M = 1 and M = 16 configurations that run at 28672 x 8192 (<1, 4, 1>
  // and <2, 8, 2>) with the same weights every launch: at N <= 8192 (<= 36 MB)
  // they stay in the 60 MB L2, so the time is the kernel's own (instructions,
  // latency, L2), without HBM traffic; rotated weights beside them. (Small N
  // leaves the GPU part-empty, so these rows do not extrapolate to 28672.)
  for (const int64_t m : {int64_t{1}, int64_t{16}}) {
    for (const int64_t n : {int64_t{2048}, int64_t{4096}, int64_t{8192}}) {
      const int64_t k = 8192, wbytes = n * k / 2, sbytes = n * k / 16;
      const int rot = static_cast<int>((int64_t{240} << 20) / wbytes + 1);
      uint8_t *dw, *ds;
      uint16_t* dx;
      float *dts, *dout;
      CHECK_CUDA(cudaMalloc(&dw, wbytes * rot));
      CHECK_CUDA(cudaMalloc(&ds, sbytes * rot));
      CHECK_CUDA(cudaMalloc(&dx, m * k * 2));
      CHECK_CUDA(cudaMalloc(&dts, 4));
      CHECK_CUDA(cudaMalloc(&dout, m * n * 4));
      std::vector<uint8_t> hb(wbytes * rot);
      for (auto& b : hb) b = static_cast<uint8_t>(rng());
      CHECK_CUDA(cudaMemcpy(dw, hb.data(), wbytes * rot, cudaMemcpyHostToDevice));
      for (int64_t i = 0; i < sbytes * rot; ++i) hb[i] = 0x30 + (rng() & 0xf);  // E4M3 ~0.2-0.5
      CHECK_CUDA(cudaMemcpy(ds, hb.data(), sbytes * rot, cudaMemcpyHostToDevice));
      std::vector<uint16_t> hx(m * k);
      std::normal_distribution<float> nd(0.0f, 1.0f);
      for (auto& v : hx) v = FloatToBF16(nd(rng));
      CHECK_CUDA(cudaMemcpy(dx, hx.data(), hx.size() * 2, cudaMemcpyHostToDevice));
      const float hts = 0.5f;
      CHECK_CUDA(cudaMemcpy(dts, &hts, 4, cudaMemcpyHostToDevice));
      for (const bool resident : {true, false}) {
        const int used = resident ? 1 : rot;
        const float us = ProbeMedianUs(
            [&](int i) {
              const int r = i % used;
              const uint8_t* wr = dw + r * wbytes;
              const uint8_t* sr = ds + r * sbytes;
              if (m == 1) {
                jax_bq::cuda::LaunchW4A16NvConfig<1, 4, 1>(0, dx, wr, sr, dts, m, n, k, dout, 0);
              } else {
                jax_bq::cuda::LaunchW4A16NvConfig<2, 8, 2>(0, dx, wr, sr, dts, m, n, k, dout, 0);
              }
            },
            kWarmup, kIters);
        EmitRow(first,
                resident ? "W4A16NvKernel L2-resident (arithmetic floor)"
                         : "W4A16NvKernel same config, rotated (HBM)",
                m, n, k, us, wbytes + sbytes, copy_tbs);
      }
      CHECK_CUDA(cudaFree(dw));
      CHECK_CUDA(cudaFree(ds));
      CHECK_CUDA(cudaFree(dx));
      CHECK_CUDA(cudaFree(dts));
      CHECK_CUDA(cudaFree(dout));
    }
  }
  std::printf("], \"check_failures\": %d}\n", failures);
  return failures == 0 ? 0 : 2;
}
