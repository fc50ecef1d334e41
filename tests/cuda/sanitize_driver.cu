// Standalone driver for compute-sanitizer: runs every quantize/dequantize
// (and the fused LayerNorm + quantize kernels, the Hadamard transform)
// (and calibrate, where the layout allows) launch path (fused and two-pass, vector and scalar,
// packed along A and B, NVFP4 with several groups, ragged tails) for every format and input dtype,
// without JAX, whose process does not survive being sanitized here. Numerics
// are checked by the pytest suite; this only has to touch every code path.
//   nvcc -std=c++20 -O2 -arch=sm_90a -Iffi/include -Iffi/cuda \
//        tests/cuda/sanitize_driver.cu -o sanitize_driver
//   compute-sanitizer --tool memcheck ./sanitize_driver
#include <cuda_runtime.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "act_quantize.cuh"
#include "check_cuda.h"
#include "epilogue_kernels.cuh"
#include "hadamard_kernels.cuh"
#include "launch.cuh"
#include "layernorm_quantize.cuh"
#include "w4a16_kernels.cuh"
#include "w8a16_kernels.cuh"

using jax_bq::Format;
using jax_bq::InDtype;
using jax_bq::Layout;

static int g_cases = 0;

template <Format F, InDtype D>
void RunCase(const Layout& l) {
  const int64_t n = l.NumElements();
  const size_t in_bytes = n * (D == InDtype::kF32 ? 4 : 2);
  const bool packed = jax_bq::IsPacked(F);
  const size_t data_bytes = packed ? l.g * l.p * l.PackedA<F>() * l.PackedB<F>() : n;
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
  if (l.b == 1 && l.ba <= jax_bq::kMaxCalibBlock) {  // calibrate takes these layouts
    float *m0, *m1;
    int32_t* cl;
    const int64_t nb = l.NumScales() + 1;
    CHECK_CUDA(cudaMalloc(&m0, 4 * nb));
    CHECK_CUDA(cudaMalloc(&m1, 4 * nb));
    CHECK_CUDA(cudaMalloc(&cl, 4 * nb));
    s = jax_bq::cuda::LaunchCalibrate<F, D>(0, x, data, scales, ts, m0, m1, cl, ws, l);
    if (!s.ok()) {
      std::printf("calibrate failed: %s\n", s.message.c_str());
      std::exit(1);
    }
    CHECK_CUDA(cudaDeviceSynchronize());
    for (void* p : {static_cast<void*>(m0), static_cast<void*>(m1), static_cast<void*>(cl)}) {
      CHECK_CUDA(cudaFree(p));
    }
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

// qmatmul helpers: the one-launch activation quantizers must give the bytes
// of LaunchQuantize (per-token = per-channel rows; 1x128 with transposed
// scales), and the W8A16 kernel must touch only valid memory for ragged N/K
// and every M tile count. Returns the number of mismatching bytes.
template <Format F>
int64_t RunQmatmulCases(int64_t m, int64_t k, int64_t n) {
  using jax_bq::cuda::kThreads;
  const int64_t elems = m * k;
  std::vector<uint16_t> hx(elems);
  std::mt19937 rng(static_cast<unsigned>(m * 131 + k));
  std::normal_distribution<float> normal;
  for (int64_t i = 0; i < elems; ++i) {
    hx[i] = jax_bq::FloatToBF16Bits(normal(rng) * (i % 53 == 0 ? 200.0f : 1.0f));
  }
  uint16_t* x;
  uint8_t *q1, *q2;
  float *s1, *s2;
  uint32_t* ws;
  const int64_t kb = (k + 127) / 128;
  const Layout chan{1, m, k, 1, k, 1, false};
  const int64_t ws_words = jax_bq::QuantizeWorkspaceWords(chan, false) + 4096;
  CHECK_CUDA(cudaMalloc(&x, 2 * elems));
  CHECK_CUDA(cudaMalloc(&q1, elems));
  CHECK_CUDA(cudaMalloc(&q2, elems));
  CHECK_CUDA(cudaMalloc(&s1, 4 * m * kb));
  CHECK_CUDA(cudaMalloc(&s2, 4 * m * kb));
  CHECK_CUDA(cudaMalloc(&ws, 4 * ws_words));
  CHECK_CUDA(cudaMemcpy(x, hx.data(), 2 * elems, cudaMemcpyHostToDevice));
  int64_t bad = 0;
  auto compare = [&](size_t qbytes, size_t sbytes, const std::vector<float>* perm) {
    std::vector<uint8_t> a(qbytes), b(qbytes);
    std::vector<float> sa(sbytes / 4), sb(sbytes / 4);
    CHECK_CUDA(cudaMemcpy(a.data(), q1, qbytes, cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(b.data(), q2, qbytes, cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(sa.data(), s1, sbytes, cudaMemcpyDeviceToHost));
    CHECK_CUDA(cudaMemcpy(sb.data(), s2, sbytes, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < qbytes; ++i) bad += a[i] != b[i];
    for (size_t i = 0; i < sa.size(); ++i) {
      const float want = perm ? (*perm)[i] : sb[i];
      bad += std::memcmp(&sa[i], &want, 4) != 0;
    }
  };
  // Per-token: RowQuantizeKernel (one CTA per row) and LaunchRowQuantize (the
  // warp-per-row kernel where the row fits) vs the two-pass per-channel quantize.
  jax_bq::cuda::RowQuantizeKernel<F, InDtype::kBF16>
      <<<static_cast<unsigned>(m), kThreads>>>(x, k, q1, s1);
  CHECK_CUDA(cudaGetLastError());
  auto st = jax_bq::cuda::LaunchQuantize<F, InDtype::kBF16>(0, x, q2, s2, nullptr, ws, chan);
  if (!st.ok()) std::printf("LaunchQuantize: %s\n", st.message.c_str());
  CHECK_CUDA(cudaDeviceSynchronize());
  compare(elems, 4 * m, nullptr);
  st = jax_bq::cuda::LaunchRowQuantize<F, InDtype::kBF16>(0, x, m, k, q1, s1);
  if (!st.ok()) std::printf("LaunchRowQuantize: %s\n", st.message.c_str());
  CHECK_CUDA(cudaDeviceSynchronize());
  compare(elems, 4 * m, nullptr);
  // 1x128 with transposed scales vs row-major scales.
  const Layout blk{1, m, k, 1, 128, 1, false};
  st = jax_bq::cuda::LaunchQuantize<F, InDtype::kBF16>(0, x, q1, s1, nullptr, ws, blk, true);
  if (!st.ok()) std::printf("LaunchQuantize T: %s\n", st.message.c_str());
  st = jax_bq::cuda::LaunchQuantize<F, InDtype::kBF16>(0, x, q2, s2, nullptr, ws, blk);
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<float> rowmajor(m * kb), transposed(m * kb);
  CHECK_CUDA(cudaMemcpy(rowmajor.data(), s2, 4 * m * kb, cudaMemcpyDeviceToHost));
  for (int64_t r = 0; r < m; ++r)
    for (int64_t c = 0; c < kb; ++c) transposed[c * m + r] = rowmajor[r * kb + c];
  compare(elems, 4 * m * kb, &transposed);
  // Per-tensor: one cooperative launch vs the two-pass per-tensor quantize.
  const Layout tens{1, 1, m, k, m, k, true};
  uint32_t* ws2;
  CHECK_CUDA(cudaMalloc(&ws2, 4 * (jax_bq::QuantizeWorkspaceWords(tens, false) + 64)));
  st = jax_bq::cuda::LaunchTensorQuantize<F, InDtype::kBF16>(0, x, elems, q1, s1, ws);
  if (!st.ok()) std::printf("LaunchTensorQuantize: %s\n", st.message.c_str());
  st = jax_bq::cuda::LaunchQuantize<F, InDtype::kBF16>(0, x, q2, s2, nullptr, ws2, tens);
  CHECK_CUDA(cudaDeviceSynchronize());
  CHECK_CUDA(cudaFree(ws2));
  compare(elems, 4, nullptr);
  // Restore q2/s2 as 1x128 codes and row-major scales for the W8A16 cases.
  st = jax_bq::cuda::LaunchQuantize<F, InDtype::kBF16>(0, x, q2, s2, nullptr, ws, blk);
  // W8A16 over q2 (FP8 codes of an [m, k] matrix reused as weights [n <= m, k]).
  const int64_t nn = n < m ? n : m;
  void* out;
  CHECK_CUDA(cudaMalloc(&out, 4 * 64 * nn));
  // NVFP4 block scales of the [nn, k] weights: E4M3 1.0 everywhere.
  uint8_t* s16;
  CHECK_CUDA(cudaMalloc(&s16, nn * ((k + 15) / 16)));
  CHECK_CUDA(cudaMemset(s16, 0x38, nn * ((k + 15) / 16)));
  const jax_bq::cuda::WeightScaleLayout sl{1, 7, kb};
  for (int mm : {1, 7, 16, 33, 64}) {
    const unsigned grid = static_cast<unsigned>((nn + 15) / 16);
    const int tiles = (mm + 7) / 8;
    const int64_t mx = mm < m ? mm : m;
    auto launch = [&](auto tag) {
      constexpr int T = decltype(tag)::value;
      constexpr int kWarps = T == 1 ? jax_bq::cuda::kW8A16Warps : 4;
      jax_bq::cuda::W8A16Kernel<F, true, T, kWarps>
          <<<grid, 32 * kWarps>>>(x, q2, s2, sl, mx, nn, k, out, 1);
    };
    if (tiles <= 1)
      launch(std::integral_constant<int, 1>{});
    else if (tiles <= 2)
      launch(std::integral_constant<int, 2>{});
    else if (tiles <= 4)
      launch(std::integral_constant<int, 4>{});
    else
      launch(std::integral_constant<int, 8>{});
    CHECK_CUDA(cudaGetLastError());
    // W4A16 over the same bytes read as packed FP4 codes (k/2 bytes per row),
    // with float32 block scales (FP4, block 128) and E4M3 ones (NVFP4, 16).
    const jax_bq::cuda::WeightScaleLayout sl4{1, 7, kb};
    const jax_bq::cuda::WeightScaleLayout sl16{1, 4, (k + 15) / 16};
    auto launch4 = [&](auto tag) {
      if (k % 32 != 0) return;  // the W4A16 kernel needs 16-byte rows
      constexpr int T = decltype(tag)::value;
      constexpr int kWarps = T == 1 ? jax_bq::cuda::kW8A16Warps : 4;
      jax_bq::cuda::W4A16Kernel<Format::kFP4, T, kWarps>
          <<<grid, 32 * kWarps>>>(x, q2, s2, s1, sl4, mx, nn, k, out, 1);
      const jax_bq::cuda::WeightScaleLayout tile{128, 7, kb};  // 128-row tiles
      jax_bq::cuda::W4A16Kernel<Format::kFP4, T, kWarps>
          <<<grid, 32 * kWarps>>>(x, q2, s2, s1, tile, mx, nn, k, out, 1);
      jax_bq::cuda::W4A16Kernel<Format::kNVFP4, T, kWarps>
          <<<grid, 32 * kWarps>>>(x, q2, s16, s1, sl16, mx, nn, k, out, 1);
    };
    // Every W4A16NvKernel configuration LaunchW4A16Nv can pick (row tiles per
    // CTA 1, 2, 4), whatever M; tokens past a configuration's tiles are not
    // computed, rows past N are clamped.
    if (k % 32 == 0) {
      using jax_bq::cuda::LaunchW4A16NvConfig;
      LaunchW4A16NvConfig<1, 8, 1>(0, x, q2, s16, s1, mx, nn, k, out, 1);
      LaunchW4A16NvConfig<1, 4, 1>(0, x, q2, s16, s1, mx, nn, k, out, 1);
      LaunchW4A16NvConfig<1, 8, 2>(0, x, q2, s16, s1, mx, nn, k, out, 1);
      LaunchW4A16NvConfig<2, 8, 2>(0, x, q2, s16, s1, mx, nn, k, out, 1);
      LaunchW4A16NvConfig<4, 4, 4>(0, x, q2, s16, s1, mx, nn, k, out, 1);
      LaunchW4A16NvConfig<4, 4, 2>(0, x, q2, s16, s1, mx, nn, k, out, 1);
      LaunchW4A16NvConfig<8, 4, 2>(0, x, q2, s16, s1, mx, nn, k, out, 1);
    }
    if (tiles <= 1)
      launch4(std::integral_constant<int, 1>{});
    else if (tiles <= 2)
      launch4(std::integral_constant<int, 2>{});
    else if (tiles <= 4)
      launch4(std::integral_constant<int, 4>{});
    else
      launch4(std::integral_constant<int, 8>{});
    CHECK_CUDA(cudaGetLastError());
    ++g_cases;
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  for (void* p : {static_cast<void*>(x), static_cast<void*>(q1), static_cast<void*>(q2),
                  static_cast<void*>(s1), static_cast<void*>(s2), static_cast<void*>(ws), out,
                  static_cast<void*>(s16)}) {
    CHECK_CUDA(cudaFree(p));
  }
  g_cases += 2;
  return bad;
}

// fp4_to_fp8 in one launch over [n, k] 4-bit codes with arbitrary bytes and
// scales (E4M3 1.0 for NVFP4, 2^0 for MXFP4, 1.0f for FP4; tensor scale 1).
template <Format WF>
void RunFp4ToFp8(int64_t n, int64_t k, int64_t bs) {
  const int64_t cols = (k + bs - 1) / bs, out_cols = (k + 127) / 128;
  const size_t scale_bytes = WF == Format::kFP4 ? 4 * n * cols : n * cols;
  uint8_t *data, *scales, *out;
  uint32_t* out_scales;
  float* ts;
  CHECK_CUDA(cudaMalloc(&data, n * k / 2));
  CHECK_CUDA(cudaMalloc(&scales, scale_bytes));
  CHECK_CUDA(cudaMalloc(&out, n * k));
  CHECK_CUDA(cudaMalloc(&out_scales, 4 * n * out_cols));
  CHECK_CUDA(cudaMalloc(&ts, 4));
  std::vector<uint8_t> bytes(n * k / 2);
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<uint8_t>(i * 151 + 7);
  CHECK_CUDA(cudaMemcpy(data, bytes.data(), bytes.size(), cudaMemcpyHostToDevice));
  if constexpr (WF == Format::kFP4) {
    std::vector<float> one(n * cols, 1.0f);
    CHECK_CUDA(cudaMemcpy(scales, one.data(), scale_bytes, cudaMemcpyHostToDevice));
  } else {
    CHECK_CUDA(cudaMemset(scales, WF == Format::kNVFP4 ? 0x38 : 0x7f, scale_bytes));
  }
  const float one_f = 1.0f;
  CHECK_CUDA(cudaMemcpy(ts, &one_f, 4, cudaMemcpyHostToDevice));
  const auto st = jax_bq::cuda::LaunchFp4ToFp8<WF>(0, data, scales, ts, n, k, bs, out, out_scales);
  if (!st.ok()) std::printf("LaunchFp4ToFp8: %s\n", st.message.c_str());
  CHECK_CUDA(cudaDeviceSynchronize());
  for (void* p : {static_cast<void*>(data), static_cast<void*>(scales), static_cast<void*>(out),
                  static_cast<void*>(out_scales), static_cast<void*>(ts)}) {
    CHECK_CUDA(cudaFree(p));
  }
  ++g_cases;
}

// qmatmul's exact-GELU epilogue kernel over a bf16 [m, n] product with
// finite, infinite and NaN values, into every output type, with the amax.
void RunGeluEpilogue(int64_t m, int64_t n) {
  using jax_bq::cuda::EpiOut;
  const int64_t count = m * n;
  // The GEMM result y is in the output's type (bf16 for FP8 outputs), up to
  // 4 bytes per element: the handler's workspace is sized like this buffer.
  // Random 16-bit patterns serve every type (as the low/high halves of f32).
  std::vector<uint16_t> y(2 * count);
  for (int64_t i = 0; i < 2 * count; ++i) y[i] = static_cast<uint16_t>(i * 2654435761u >> 16);
  void *dy, *out;
  float *scale, *amax;
  CHECK_CUDA(cudaMalloc(&dy, 4 * count));
  CHECK_CUDA(cudaMalloc(&out, 4 * count));
  CHECK_CUDA(cudaMalloc(&scale, 4));
  CHECK_CUDA(cudaMalloc(&amax, 4));
  CHECK_CUDA(cudaMemcpy(dy, y.data(), 4 * count, cudaMemcpyHostToDevice));
  const float inv = 0.25f;
  CHECK_CUDA(cudaMemcpy(scale, &inv, 4, cudaMemcpyHostToDevice));
  for (EpiOut o : {EpiOut::kE4M3, EpiOut::kE5M2, EpiOut::kBf16, EpiOut::kF16, EpiOut::kF32}) {
    const bool fp8 = o == EpiOut::kE4M3 || o == EpiOut::kE5M2;
    const auto st =
        jax_bq::cuda::LaunchGeluErfEpilogue(0, o, dy, count, fp8 ? scale : nullptr, out, amax);
    if (!st.ok()) std::printf("LaunchGeluErfEpilogue: %s\n", st.message.c_str());
    CHECK_CUDA(cudaDeviceSynchronize());
    ++g_cases;
  }
  for (void* p : {dy, out, static_cast<void*>(scale), static_cast<void*>(amax)}) {
    CHECK_CUDA(cudaFree(p));
  }
}

// Fused residual + LayerNorm + FP8 quantize: every mode, residual or not,
// register (H <= 16384) and re-read paths, vector and scalar access, groups.
template <InDtype D>
void RunLayernormQuantize(int64_t g, int64_t r, int64_t h, jax_bq::LnqMode mode, bool residual,
                          InDtype out, Format f) {
  namespace lnq = jax_bq::cuda::lnq;
  const size_t n = static_cast<size_t>(g * r * h), in = D == InDtype::kF32 ? 4 : 2;
  const size_t out_b = out == InDtype::kF32 ? 4 : 2;
  std::vector<uint8_t> host(n * in);
  std::mt19937 rng(static_cast<unsigned>(n + h));
  for (auto& b : host) b = static_cast<uint8_t>(rng() & 0x3f);  // finite, modest values
  std::vector<float> gb(static_cast<size_t>(h), 1.0f);
  void *x, *res = nullptr, *y;
  float *gamma, *beta, *scale, *scales;
  uint8_t *codes, *ws;
  const size_t ws_bytes = static_cast<size_t>(8 * g + 8 * g * r);
  CHECK_CUDA(cudaMalloc(&x, n * in));
  CHECK_CUDA(cudaMemcpy(x, host.data(), n * in, cudaMemcpyHostToDevice));
  if (residual) {
    CHECK_CUDA(cudaMalloc(&res, n * in));
    CHECK_CUDA(cudaMemcpy(res, host.data(), n * in, cudaMemcpyHostToDevice));
  }
  CHECK_CUDA(cudaMalloc(&y, n * out_b));
  CHECK_CUDA(cudaMalloc(&codes, n));
  CHECK_CUDA(cudaMalloc(&gamma, h * 4));
  CHECK_CUDA(cudaMalloc(&beta, h * 4));
  CHECK_CUDA(cudaMalloc(&scale, g * 4));
  CHECK_CUDA(cudaMalloc(&scales, g * r * 4));
  CHECK_CUDA(cudaMalloc(&ws, ws_bytes));
  CHECK_CUDA(cudaMemcpy(gamma, gb.data(), h * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(beta, gb.data(), h * 4, cudaMemcpyHostToDevice));
  std::vector<float> s(static_cast<size_t>(g), 0.0625f);
  CHECK_CUDA(cudaMemcpy(scale, s.data(), g * 4, cudaMemcpyHostToDevice));
  lnq::Params p{};
  p.x = x, p.residual = res, p.gamma = gamma, p.beta = beta, p.scale = scale, p.y = y;
  p.codes = codes, p.scales = scales, p.amax_key = reinterpret_cast<uint32_t*>(ws);
  p.stats = reinterpret_cast<float2*>(ws + 8 * g);
  p.r = r, p.h = h, p.inv_h = 1.0f / static_cast<float>(h), p.eps = 1e-12f;
  p.out = out, p.format = f, p.mode = mode;
  const lnq::LnqStatus st = lnq::LaunchLayernormQuantize<D>(p, g, nullptr);
  if (!st.ok) {
    std::fprintf(stderr, "%s\n", st.message.c_str());
    std::exit(1);
  }
  CHECK_CUDA(cudaDeviceSynchronize());
  for (void* q :
       {x, res, y, static_cast<void*>(codes), static_cast<void*>(gamma), static_cast<void*>(beta),
        static_cast<void*>(scale), static_cast<void*>(scales), static_cast<void*>(ws)}) {
    if (q != nullptr) CHECK_CUDA(cudaFree(q));
  }
  ++g_cases;
}

void RunLayernormQuantizeCases() {
  using jax_bq::LnqMode;
  for (int64_t h : {384, 1024, 4096, 100, 16392, 16390}) {
    for (LnqMode mode : {LnqMode::kStatic, LnqMode::kPerToken, LnqMode::kPerTensor}) {
      RunLayernormQuantize<InDtype::kBF16>(2, 5, h, mode, true, InDtype::kBF16, Format::kFP8E4M3);
      RunLayernormQuantize<InDtype::kF32>(1, 3, h, mode, false, InDtype::kF32, Format::kFP8E5M2);
      RunLayernormQuantize<InDtype::kF16>(3, 1, h, mode, true, InDtype::kBF16, Format::kFP8E4M3);
    }
  }
  // Many single-chunk rows: blocks of several rows with the next prefetched.
  for (LnqMode mode : {LnqMode::kStatic, LnqMode::kPerToken, LnqMode::kPerTensor}) {
    RunLayernormQuantize<InDtype::kBF16>(1, 2003, 1024, mode, true, InDtype::kBF16,
                                         Format::kFP8E4M3);
    RunLayernormQuantize<InDtype::kF32>(2, 4501, 100, mode, false, InDtype::kF32, Format::kFP8E5M2);
  }
}

// The Hadamard transform: the warp kernel (n = 32 .. 1024, aligned), the
// shared-memory kernel (other n, and a misaligned input), in and out of place.
template <InDtype D>
void RunHadamard(int64_t rows, int n, bool misalign) {
  const size_t es = D == InDtype::kF32 ? 4 : 2;
  const size_t bytes = rows * n * es;
  std::vector<uint8_t> host(bytes + es);
  std::mt19937 rng(static_cast<unsigned>(rows * n));
  for (auto& b : host) b = static_cast<uint8_t>(rng() & 0x3f);  // finite values
  uint8_t *x, *y;
  CHECK_CUDA(cudaMalloc(&x, bytes + es));
  CHECK_CUDA(cudaMalloc(&y, bytes + es));
  CHECK_CUDA(cudaMemcpy(x, host.data(), bytes + es, cudaMemcpyHostToDevice));
  const size_t off = misalign ? es : 0;
  CHECK_CUDA(jax_bq::cuda::LaunchHadamard<D>(nullptr, x + off, y + off, rows, n, 0.5f));
  CHECK_CUDA(cudaDeviceSynchronize());
  CHECK_CUDA(cudaFree(x));
  CHECK_CUDA(cudaFree(y));
  ++g_cases;
}

void RunHadamardCases() {
  for (int n : {2, 16, 32, 64, 128, 256, 512, 1024, 2048, 8192}) {
    RunHadamard<InDtype::kBF16>(37, n, false);
    RunHadamard<InDtype::kF32>(5, n, false);
    RunHadamard<InDtype::kF16>(3, n, n == 512);
  }
}

int main() {
  int64_t qmm_bad = 0;
  for (auto [m, k, n] : {std::array<int64_t, 3>{64, 384, 48},
                         {7, 2064, 40},
                         {65, 4096, 65},
                         {1, 16, 1},
                         {33, 1024, 32},
                         {5, 2048, 16},
                         {9, 1008, 16},
                         {40, 160, 40}}) {
    qmm_bad += RunQmatmulCases<Format::kFP8E4M3>(m, k, n);
    qmm_bad += RunQmatmulCases<Format::kFP8E5M2>(m, k, n);
  }
  std::printf("QMATMUL HELPERS: %lld mismatching bytes vs LaunchQuantize\n",
              static_cast<long long>(qmm_bad));
  if (qmm_bad != 0) return 2;
  RunFormat<Format::kFP8E4M3>();
  RunFormat<Format::kFP8E5M2>();
  RunFormat<Format::kFP4>();
  RunFormat<Format::kNVFP4>();
  RunFormat<Format::kMXFP8>();
  RunFormat<Format::kMXFP4>();
  RunFormat<Format::kMXFP6E2M3>();
  RunFormat<Format::kMXFP6E3M2>();
  for (auto [n, k] : {std::array<int64_t, 2>{40, 160}, {3, 16}, {24, 2064}, {1, 4096}}) {
    RunFp4ToFp8<Format::kNVFP4>(n, k, 16);
    RunFp4ToFp8<Format::kMXFP4>(n, k, 32);
    RunFp4ToFp8<Format::kFP4>(n, k, 64);
  }
  for (auto [m, n] : {std::array<int64_t, 2>{1, 16}, {7, 48}, {129, 4096}}) RunGeluEpilogue(m, n);
  RunLayernormQuantizeCases();
  RunHadamardCases();
  std::printf("SANITIZE DRIVER OK: %d cases\n", g_cases);
  return 0;
}
