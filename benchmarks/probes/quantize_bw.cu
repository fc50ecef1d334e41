// Kernel-level bandwidth of the CUDA quantize/dequantize launches, timed with
// CUDA events (no JAX, no XLA dispatch in the numbers), against a
// device-to-device copy measured in the same process.
//   nvcc -std=c++20 -O2 -gencode arch=compute_90a,code=sm_90a -Iffi/include \
//        -Iffi/cuda benchmarks/probes/quantize_bw.cu -o quantize_bw
//   ./quantize_bw > quantize_bw.json
// Method: random normal inputs (never zeros), R input buffers rotated so that
// consecutive launches never hit L2 (each >= 128 MB, L2 is 60 MB), 5 warm-up
// launches, then the median of 40 launches each bracketed by its own events.
// Bytes = input read + codes + scales written (dequantize: the reverse); the
// NVFP4 tensor-amax pass reads the input a second time, which the counted
// bytes leave out on purpose (it is what the format costs). Also checks that
// the wide and the original fused kernels write identical bytes.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "check_cuda.h"
#include "launch.cuh"
#include "probe_util.cuh"

using jax_bq::Format;
using jax_bq::InDtype;
using jax_bq::Layout;

namespace {

constexpr int kRotate = 4;
// QBW_ONCE=1 runs every launch once (for ncu, which times kernels itself).
const bool kOnce = std::getenv("QBW_ONCE") != nullptr;
const int kWarmup = kOnce ? 0 : 5;
const int kIters = kOnce ? 1 : 40;

__device__ uint32_t Hash(uint64_t i) {
  uint64_t z = i + 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return static_cast<uint32_t>(z ^ (z >> 31));
}

// Approximately standard normal (sum of four uniforms, rescaled), times `scale`.
template <InDtype D>
__global__ void FillNormal(void* out, int64_t n, uint64_t seed, float scale) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float s = 0.0f;
  for (int k = 0; k < 4; ++k) s += Hash(seed * 0x100000000ull + 4 * i + k) * 0x1p-32f;
  const float v = (s - 2.0f) * 1.7320508f * scale;
  if constexpr (D == InDtype::kF32) {
    static_cast<float*>(out)[i] = v;
  } else if constexpr (D == InDtype::kBF16) {
    static_cast<uint16_t*>(out)[i] = jax_bq::FloatToBF16Bits(v);
  } else {
    static_cast<uint16_t*>(out)[i] = jax_bq::FloatToF16Bits(v);
  }
}

struct Buffers {
  void* x;
  uint8_t* data;
  void* scales;
  float* ts;
  uint32_t* ws;
  void* out;
};

// Median device time (us) of launch(r), inputs rotated over kRotate sets.
template <typename Fn>
double MedianUs(Fn&& launch) {
  return ProbeMedianUs([&](int i) { launch(i % kRotate); }, kWarmup, kIters);
}

const char* Name(Format f) {
  switch (f) {
    case Format::kFP8E4M3:
      return "fp8_e4m3";
    case Format::kNVFP4:
      return "nvfp4";
    case Format::kMXFP8:
      return "mxfp8";
    default:
      return "?";
  }
}
const char* Name(InDtype d) { return d == InDtype::kF32 ? "float32" : "bfloat16"; }

bool g_first = true;
void Row(const char* op, const char* in, const char* fmt, const char* shape, double us,
         double bytes, double copy_tbps, const std::string& extra = "") {
  const double tbps = bytes / us * 1e-6;
  std::printf(
      "%s{\"op\": \"%s\", \"input\": \"%s\", \"format\": \"%s\", \"shape\": \"%s\", "
      "\"us\": %.2f, \"TBps\": %.3f, \"pct_copy\": %.1f%s}\n",
      g_first ? "" : ",", op, in, fmt, shape, us, tbps, 100.0 * tbps / copy_tbps, extra.c_str());
  g_first = false;
  std::fprintf(stderr, "%-22s %-9s %-9s %-10s %8.2f us %6.3f TB/s %5.1f%%%s\n", op, in, fmt, shape,
               us, tbps, 100.0 * tbps / copy_tbps, extra.c_str());
}

template <Format F, InDtype D>
void Case(int64_t rows, int64_t cols, int64_t block, double copy_tbps) {
  const Layout l{1, rows, cols, 1, block, 1, false};
  const int64_t n = l.NumElements();
  const size_t in_bytes = n * (D == InDtype::kF32 ? 4 : 2);
  const size_t data_bytes = jax_bq::IsPacked(F) ? n / 2 : n;
  const size_t scale_bytes = l.NumScales() * (jax_bq::HasF32Scale(F) ? 4 : 1);
  const size_t ws_bytes = 4 * jax_bq::QuantizeWorkspaceWords(l, F == Format::kNVFP4) + 16;
  Buffers b[kRotate];
  for (int r = 0; r < kRotate; ++r) {
    CHECK_CUDA(cudaMalloc(&b[r].x, in_bytes));
    CHECK_CUDA(cudaMalloc(&b[r].data, data_bytes));
    CHECK_CUDA(cudaMalloc(&b[r].scales, scale_bytes));
    CHECK_CUDA(cudaMalloc(&b[r].ts, 16));
    CHECK_CUDA(cudaMalloc(&b[r].ws, ws_bytes));
    CHECK_CUDA(cudaMalloc(&b[r].out, in_bytes));
    FillNormal<D><<<static_cast<unsigned>((n + 255) / 256), 256>>>(b[r].x, n, r + 1, 1.0f + r);
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  auto quantize = [&](int r, bool wide) {
    const auto s = jax_bq::cuda::LaunchQuantize<F, D>(0, b[r].x, b[r].data, b[r].scales, b[r].ts,
                                                      b[r].ws, l, false, wide);
    if (!s.ok()) {
      std::fprintf(stderr, "%s\n", s.message.c_str());
      std::exit(1);
    }
  };
  // Identical bytes from the wide and the original fused kernel.
  std::vector<uint8_t> d0(data_bytes), d1(data_bytes), s0(scale_bytes), s1(scale_bytes);
  quantize(0, false);
  CHECK_CUDA(cudaMemcpy(d0.data(), b[0].data, data_bytes, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(s0.data(), b[0].scales, scale_bytes, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemset(b[0].data, 0xAB, data_bytes));
  CHECK_CUDA(cudaMemset(b[0].scales, 0xAB, scale_bytes));
  quantize(0, true);
  CHECK_CUDA(cudaMemcpy(d1.data(), b[0].data, data_bytes, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(s1.data(), b[0].scales, scale_bytes, cudaMemcpyDeviceToHost));
  const bool same = d0 == d1 && s0 == s1;
  if (!same) std::fprintf(stderr, "MISMATCH wide vs fused: %s %s\n", Name(D), Name(F));

  char shape[32];
  std::snprintf(shape, sizeof(shape), "%lldx%lld", static_cast<long long>(rows),
                static_cast<long long>(cols));
  const double q_bytes = in_bytes + data_bytes + scale_bytes;
  const std::string eq = std::string(", \"wide_equals_fused\": ") + (same ? "true" : "false");
  const double q_us = MedianUs([&](int r) { quantize(r, true); });
  std::string q_extra = eq;
  if (F == Format::kNVFP4) {
    // NVFP4's definition reads the input twice (tensor amax, then blocks):
    // the same time against the bytes actually moved.
    char both[64];
    std::snprintf(both, sizeof(both), ", \"pct_copy_both_reads\": %.1f",
                  100.0 * (q_bytes + in_bytes) / q_us * 1e-6 / copy_tbps);
    q_extra += both;
  }
  Row("quantize", Name(D), Name(F), shape, q_us, q_bytes, copy_tbps, q_extra);
  if (F == Format::kNVFP4) {
    // The first pass alone: finite amax partials and the tensor scale.
    Row("quantize: tensor-amax pass", Name(D), Name(F), shape, MedianUs([&](int r) {
          using In = typename jax_bq::InTraits<D>::Storage;
          jax_bq::cuda::LaunchNvfp4TensorScale<D>(0, static_cast<const In*>(b[r].x), l, b[r].ws,
                                                  b[r].ts);
        }),
        in_bytes, copy_tbps);
  }
  Row("quantize (fused v6)", Name(D), Name(F), shape, MedianUs([&](int r) { quantize(r, false); }),
      q_bytes, copy_tbps);
  for (int r = 0; r < kRotate; ++r) quantize(r, true);
  Row("dequantize", Name(D), Name(F), shape, MedianUs([&](int r) {
        const auto s =
            jax_bq::cuda::LaunchDequantize<F, D>(0, b[r].data, b[r].scales, b[r].ts, b[r].out, l);
        if (!s.ok()) std::exit(1);
      }),
      q_bytes, copy_tbps);
  for (int r = 0; r < kRotate; ++r) {
    CHECK_CUDA(cudaFree(b[r].x));
    CHECK_CUDA(cudaFree(b[r].data));
    CHECK_CUDA(cudaFree(b[r].scales));
    CHECK_CUDA(cudaFree(b[r].ts));
    CHECK_CUDA(cudaFree(b[r].ws));
    CHECK_CUDA(cudaFree(b[r].out));
  }
}

// The same memory traffic as dequantize with no arithmetic: each thread reads
// one uint2 of bytes and writes them widened to 16 bits (or 32), so the rows
// show what this read:write mix reaches on its own.
template <typename Out>
__global__ void WidenKernel(const uint2* __restrict__ in, Out* __restrict__ out, int64_t n8) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= n8) return;
  const uint2 v = in[t];
  const uint8_t* b = reinterpret_cast<const uint8_t*>(&v);
  if constexpr (sizeof(Out) == 2) {
    uint4 o;
    o.x = b[0] | (b[1] << 16);
    o.y = b[2] | (b[3] << 16);
    o.z = b[4] | (b[5] << 16);
    o.w = b[6] | (b[7] << 16);
    reinterpret_cast<uint4*>(out)[t] = o;
  } else {
    reinterpret_cast<uint4*>(out)[2 * t] = make_uint4(b[0], b[1], b[2], b[3]);
    reinterpret_cast<uint4*>(out)[2 * t + 1] = make_uint4(b[4], b[5], b[6], b[7]);
  }
}

void WidenCeiling(double copy_tbps) {
  const int64_t n = int64_t{8192} * 8192;
  uint8_t* in[kRotate];
  void* out[kRotate];
  for (int r = 0; r < kRotate; ++r) {
    CHECK_CUDA(cudaMalloc(&in[r], n));
    CHECK_CUDA(cudaMalloc(&out[r], 4 * n));
    FillNormal<InDtype::kF32>
        <<<static_cast<unsigned>(n / 4 / 256), 256>>>(in[r], n / 4, r + 21, 1.0f);
  }
  const unsigned grid = static_cast<unsigned>(n / 8 / 256);
  Row("ceiling: uint8 -> 16-bit widen", "bfloat16", "none", "8192x8192", MedianUs([&](int r) {
        WidenKernel<uint16_t><<<grid, 256>>>(reinterpret_cast<const uint2*>(in[r]),
                                             static_cast<uint16_t*>(out[r]), n / 8);
      }),
      3.0 * n, copy_tbps);
  Row("ceiling: uint8 -> 32-bit widen", "float32", "none", "8192x8192", MedianUs([&](int r) {
        WidenKernel<uint32_t><<<grid, 256>>>(reinterpret_cast<const uint2*>(in[r]),
                                             static_cast<uint32_t*>(out[r]), n / 8);
      }),
      5.0 * n, copy_tbps);
  for (int r = 0; r < kRotate; ++r) {
    CHECK_CUDA(cudaFree(in[r]));
    CHECK_CUDA(cudaFree(out[r]));
  }
}

// NVFP4 -> bf16 dequantize's traffic without its arithmetic: per 8 elements a
// thread reads 4 bytes of codes and one scale byte (shared by two threads)
// and writes 16 bytes, kU vectors per thread (grid stride, loads first) as in
// DequantizeKernel. Tells whether 85% of copy is within reach of this 1:4.4
// read:write mix at all.
template <int kU>
__global__ void Nvfp4MixKernel(const uint32_t* __restrict__ codes, const uint8_t* __restrict__ sc,
                               uint4* __restrict__ out, int64_t n8) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  uint32_t c[kU], s[kU];
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    const int64_t i = t + u * stride;
    c[u] = i < n8 ? __ldg(codes + i) : 0u;
    s[u] = i < n8 ? __ldg(sc + i / 2) : 0u;
  }
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    const int64_t i = t + u * stride;
    if (i < n8) out[i] = make_uint4(c[u] ^ s[u], c[u] + s[u], c[u] | s[u], c[u] - s[u]);
  }
}

void Nvfp4MixCeiling(double copy_tbps) {
  const int64_t n = int64_t{8192} * 8192, n8 = n / 8;
  uint8_t* in[kRotate];
  uint8_t* sc[kRotate];
  void* out[kRotate];
  for (int r = 0; r < kRotate; ++r) {
    CHECK_CUDA(cudaMalloc(&in[r], n / 2));
    CHECK_CUDA(cudaMalloc(&sc[r], n / 16));
    CHECK_CUDA(cudaMalloc(&out[r], 2 * n));
    FillNormal<InDtype::kF32>
        <<<static_cast<unsigned>(n / 8 / 256), 256>>>(in[r], n / 8, r + 31, 1.0f);
    CHECK_CUDA(cudaMemset(sc[r], 0x38, n / 16));
  }
  const double bytes = n / 2.0 + n / 16.0 + 2.0 * n;
  auto row = [&](const char* name, auto kernel, int unroll) {
    const unsigned grid = static_cast<unsigned>((n8 + 256LL * unroll - 1) / (256LL * unroll));
    Row(name, "bfloat16", "none", "8192x8192", MedianUs([&](int r) {
          kernel<<<grid, 256>>>(reinterpret_cast<const uint32_t*>(in[r]), sc[r],
                                static_cast<uint4*>(out[r]), n8);
        }),
        bytes, copy_tbps);
  };
  row("ceiling: NVFP4 dequantize mix, 1 vector/thread", Nvfp4MixKernel<1>, 1);
  row("ceiling: NVFP4 dequantize mix, 4 vectors/thread", Nvfp4MixKernel<4>, 4);
  row("ceiling: NVFP4 dequantize mix, 8 vectors/thread", Nvfp4MixKernel<8>, 8);
  for (int r = 0; r < kRotate; ++r) {
    CHECK_CUDA(cudaFree(in[r]));
    CHECK_CUDA(cudaFree(sc[r]));
    CHECK_CUDA(cudaFree(out[r]));
  }
}

// Back-to-back launches of a small quantize: per-launch time on the stream
// (kernel + launch gap), the figure a decode step pays.
void SmallLatency(double copy_tbps) {
  const Layout l{1, 16, 8192, 1, 128, 1, false};
  const int64_t n = l.NumElements();
  void* x;
  uint8_t* data;
  void* scales;
  float* ts;
  CHECK_CUDA(cudaMalloc(&x, 2 * n));
  CHECK_CUDA(cudaMalloc(&data, n));
  CHECK_CUDA(cudaMalloc(&scales, 4 * l.NumScales()));
  CHECK_CUDA(cudaMalloc(&ts, 16));
  FillNormal<InDtype::kBF16><<<static_cast<unsigned>((n + 255) / 256), 256>>>(x, n, 7, 1.0f);
  const double bytes = 2.0 * n + n + 4.0 * l.NumScales();
  for (const bool tensor_scale : {true, false}) {
    auto launch = [&](int) {
      for (int k = 0; k < (kOnce ? 1 : 100); ++k) {
        const auto s = jax_bq::cuda::LaunchQuantize<Format::kFP8E4M3, InDtype::kBF16>(
            0, x, data, scales, tensor_scale ? ts : nullptr, nullptr, l);
        if (!s.ok()) std::exit(1);
      }
    };
    Row(tensor_scale ? "quantize x100 (with tensor-scale kernel)" : "quantize x100 (fused only)",
        "bfloat16", "fp8_e4m3", "16x8192", MedianUs(launch) / 100, bytes, copy_tbps);
  }
  CHECK_CUDA(cudaFree(x));
  CHECK_CUDA(cudaFree(data));
  CHECK_CUDA(cudaFree(scales));
  CHECK_CUDA(cudaFree(ts));
}

double CopyTbps() {
  const size_t bytes = size_t{1} << 30;
  void* src[kRotate];
  void* dst[kRotate];
  for (int r = 0; r < kRotate; ++r) {
    CHECK_CUDA(cudaMalloc(&src[r], bytes));
    CHECK_CUDA(cudaMalloc(&dst[r], bytes));
    FillNormal<InDtype::kF32>
        <<<static_cast<unsigned>(bytes / 4 / 256), 256>>>(src[r], bytes / 4, r + 11, 1.0f);
  }
  const double us = MedianUs(
      [&](int r) { CHECK_CUDA(cudaMemcpyAsync(dst[r], src[r], bytes, cudaMemcpyDeviceToDevice)); });
  for (int r = 0; r < kRotate; ++r) {
    CHECK_CUDA(cudaFree(src[r]));
    CHECK_CUDA(cudaFree(dst[r]));
  }
  return 2.0 * bytes / us * 1e-6;
}

}  // namespace

int main() {
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  const double copy = CopyTbps();
  std::printf("{\"device\": \"%s\", \"copy_TBps\": %.3f, \"rows\": [\n", prop.name, copy);
  std::fprintf(stderr, "%s: device-to-device copy %.3f TB/s (read + write)\n", prop.name, copy);
  Case<Format::kFP8E4M3, InDtype::kBF16>(8192, 8192, 128, copy);
  Case<Format::kNVFP4, InDtype::kBF16>(8192, 8192, 16, copy);
  Case<Format::kMXFP8, InDtype::kBF16>(8192, 8192, 32, copy);
  Case<Format::kFP8E4M3, InDtype::kF32>(8192, 8192, 128, copy);
  Case<Format::kNVFP4, InDtype::kF32>(8192, 8192, 16, copy);
  Case<Format::kMXFP8, InDtype::kF32>(8192, 8192, 32, copy);
  WidenCeiling(copy);
  Nvfp4MixCeiling(copy);
  SmallLatency(copy);
  std::printf("]}\n");
  return 0;
}
