// Weight-only W4A16 GEMM: FP4 E2M1 weights (packed along K; float32 scales,
// or NVFP4's E4M3 block scales and tensor scale) x bf16 activations on the
// tensor cores: W4A16Kernel (byte-permute widening) and W4A16NvKernel (the
// NVFP4 kernel qmatmul runs: shifted widening, cp.async weight pipeline).
#ifndef JAX_BQ_W4A16_KERNELS_CUH_
#define JAX_BQ_W4A16_KERNELS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "jax_bq/block_math.h"
#include "weight_only_mma.cuh"

namespace jax_bq::cuda {

// ---- Weight-only W4A16: FP4 weights (E2M1, packed along K) x bf16 activations ----------
// Same split as W8A16 (16 rows per CTA, K in 128-wide units across warps,
// next unit prefetched, deterministic epilogue). A thread's 16-byte load is
// 32 codes of one row (K % 32 == 0 keeps rows 16-byte aligned); the MMA
// k-slots map onto them as in W8A16. Codes are
// widened to bf16 with two byte-permute lookups (no FP4 conversion on SM 9.0)
// and multiplied by the block scale in bf16: exact for NVFP4 (E2M1 x E4M3
// needs 6 significand bits), rounded to bf16 for float32 FP4 scales. The
// NVFP4 tensor scale multiplies the f32 sums at the end.

// Four E2M1 codes (bits 0-3, 4-7, 8-11, 12-15 of q) -> bf16 pairs (e0, e1), (e2, e3).
__device__ __forceinline__ void E2M1x4ToBF16(uint32_t q, uint32_t* w01, uint32_t* w23) {
  // bf16 of the magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6, split into low and high bytes.
  constexpr uint32_t kLoA = 0xC0800000u, kLoB = 0xC0804000u;
  constexpr uint32_t kHiA = 0x3F3F3F00u, kHiB = 0x40404040u;
  const uint32_t sel = q & 0x7777u;
  const uint32_t lo = __byte_perm(kLoA, kLoB, sel);
  const uint32_t hi = __byte_perm(kHiA, kHiB, sel);
  *w01 = __byte_perm(lo, hi, 0x5140) | ((q & 0x8u) << 12) | ((q & 0x80u) << 24);
  *w23 = __byte_perm(lo, hi, 0x7362) | ((q & 0x800u) << 4) | ((q & 0x8000u) << 16);
}

__device__ __forceinline__ uint32_t ScaleBF16x2(uint32_t w, uint32_t scale2) {
  const __nv_bfloat162 r = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&w),
                                   *reinterpret_cast<const __nv_bfloat162*>(&scale2));
  return *reinterpret_cast<const uint32_t*>(&r);
}

template <Format WF, int kMTiles, int kWarps = kW8A16Warps>
__global__ void __launch_bounds__(32 * kWarps)
    W4A16Kernel(const uint16_t* __restrict__ x, const uint8_t* __restrict__ w,
                const void* __restrict__ w_scales, const float* __restrict__ tensor_scale,
                WeightScaleLayout sl, int64_t m, int64_t n, int64_t k, void* __restrict__ out,
                int out_kind) {
  static_assert(WF == Format::kFP4 || WF == Format::kNVFP4, "FP4 weights");
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * 16;
  const int64_t rows[2] = {n0 + g, n0 + g + 8};
  const int64_t units = (k + kW8A16Unit - 1) / kW8A16Unit;
  const int64_t row_bytes = k / 2;
  int64_t srow[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) srow[r] = ((rows[r] < n ? rows[r] : n - 1) / sl.block_n) * sl.cols;

  float acc[kMTiles][4];
#pragma unroll
  for (int j = 0; j < kMTiles; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

  // 32 codes of rows g and g+8 at k = 128 u + 32 t (K % 32 == 0: 16-byte rows).
  auto load_weights = [&](int64_t u, uint4(&wv)[2]) {
    const int64_t kk = u * kW8A16Unit + t * 32;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      wv[r] = (u < units && rows[r] < n && kk < k)
                  ? __ldg(reinterpret_cast<const uint4*>(w + rows[r] * row_bytes + kk / 2))
                  : make_uint4(0, 0, 0, 0);
    }
  };
  auto scale_bf16x2 = [&](int r, int64_t kk) -> uint32_t {
    // A slice past K (the last unit when K % 128 != 0) has zero codes; it
    // reads the row's last scale instead of one past the row (or the buffer).
    // Harmless: a non-finite last scale makes the row's sum non-finite anyway.
    // (Clamped, not branched: a branch here cost the loop 30%.)
    const int64_t col = sl.cols == 1 ? 0 : min(kk >> sl.k_shift, sl.cols - 1);
    float s;
    if constexpr (WF == Format::kNVFP4) {
      s = DecodeE4M3(__ldg(static_cast<const uint8_t*>(w_scales) + srow[r] + col));
    } else {
      s = __ldg(static_cast<const float*>(w_scales) + srow[r] + col);
    }
    const __nv_bfloat162 b = __floats2bfloat162_rn(s, s);
    return *reinterpret_cast<const uint32_t*>(&b);
  };

  uint4 wv[2];
  load_weights(warp, wv);
  for (int64_t u = warp; u < units; u += kWarps) {
    const int64_t kbase = u * kW8A16Unit + t * 32;
    uint4 wnext[2];
    load_weights(u + kWarps, wnext);
    uint4 xv[kMTiles][4];  // 32 activations of token j * 8 + g
#pragma unroll
    for (int j = 0; j < kMTiles; ++j) {
      const int64_t tok = j * 8 + g;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int64_t kk = kbase + c * 8;
        xv[j][c] = (tok < m && kk < k) ? __ldg(reinterpret_cast<const uint4*>(x + tok * k + kk))
                                       : make_uint4(0, 0, 0, 0);
      }
    }
    const uint32_t* w0 = reinterpret_cast<const uint32_t*>(&wv[0]);
    const uint32_t* w1 = reinterpret_cast<const uint32_t*>(&wv[1]);
    // Steps 0-3 read codes kbase .. kbase+15, steps 4-7 the next 16: one scale
    // block each (blocks are >= 16 and kbase is a multiple of 32).
    const uint32_t sc[2][2] = {{scale_bf16x2(0, kbase), scale_bf16x2(0, kbase + 16)},
                               {scale_bf16x2(1, kbase), scale_bf16x2(1, kbase + 16)}};
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      const uint32_t sc0 = sc[0][s / 4], sc1 = sc[1][s / 4];
      uint32_t a[4];
      E2M1x4ToBF16((w0[s / 2] >> (16 * (s % 2))) & 0xffffu, &a[0], &a[2]);
      E2M1x4ToBF16((w1[s / 2] >> (16 * (s % 2))) & 0xffffu, &a[1], &a[3]);
      a[0] = ScaleBF16x2(a[0], sc0);
      a[2] = ScaleBF16x2(a[2], sc0);
      a[1] = ScaleBF16x2(a[1], sc1);
      a[3] = ScaleBF16x2(a[3], sc1);
#pragma unroll
      for (int j = 0; j < kMTiles; ++j) {
        const uint32_t* xs = reinterpret_cast<const uint32_t*>(&xv[j][0]);
        const uint32_t b[2] = {xs[2 * s], xs[2 * s + 1]};
        Mma16816<true>::Run(acc[j], a, b);
      }
    }
    wv[0] = wnext[0];
    wv[1] = wnext[1];
  }
  const float ts = WF == Format::kNVFP4 ? tensor_scale[0] : 1.0f;
  StoreTileSums<kMTiles, kWarps>(acc, ts, n0, m, n, out, out_kind);
}

// ---- NVFP4 W4A16, shifted widening, cp.async weight pipeline -----------------------
// The NVFP4 kernel of qmatmul's weight-only path (W4A16Kernel keeps FP4 with
// float32 scales). Same split and epilogue as W4A16Kernel, two differences:
//
// Widening. A code's magnitude bits e1 e0 m go to bf16 bits 8..6 and its sign
// to bit 15, which makes the bf16 pattern exactly code * 2^-126 (e >= 1:
// exponent field e, 2^(e-127)(1+m/2); e = 0: the bf16 subnormal m * 2^-127).
// The factor is undone in two exact power-of-two steps: the E4M3 block scale s
// (2^-9 <= |s| <= 448) is widened as bf16(s * 2^118), so each weight is
// code * s * 2^-8 (normal, <= 6 significand bits, exact), and the f32 sums
// are multiplied by 2^8 with the tensor scale. One mask and one multiply move
// two codes (the two shifts of a nibble pair do not overlap, so the product is
// an OR); a pair is codes j and j + 4 of an 8-code word, so activations are
// paired (k, k + 4) by one byte permute each; an MMA's sum over its k-slots
// does not care which k sits in which slot as long as A and B agree. SASS of
// the loop: 235 instructions per 64 codes per lane with loop-carried pointers
// (285 with indices recomputed; the byte-permute table decode: 406).
//
// Loads. Weights go global -> shared by cp.async, kStages - 1 units ahead of
// use, each thread copying (and later reading) only its own two 16-byte
// slices, so no barrier is needed. With registers only, the compiler sank the
// one-unit-ahead prefetch to the end of the loop, and ncu showed 45% of warp
// stalls waiting on those loads. Block scales are read kScalesAhead units
// ahead, in registers.

// Ring slots: 4 (three units ahead) where the CTA's static shared memory
// allows, else 3 or 2. ptxas accepts more than 48 KB of static shared memory
// per CTA for SM 9.0 (where the 4-slot ring of every configuration was
// measured) and refuses it for sm_89 (so the wide configurations get fewer
// slots on the other architectures, untested on their hardware).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900
constexpr int kW4StaticSmemBytes = 227 * 1024;
#else
constexpr int kW4StaticSmemBytes = 48 * 1024;
#endif
template <int kRows, int kWarps, int kMTiles>
__host__ __device__ constexpr int W4RingStages() {
  constexpr int slot = kRows * 32 * kWarps * 16;           // one uint4 per thread and row
  constexpr int epilogue = kWarps * kMTiles * 4 * 32 * 4;  // StoreTileSums' buffer
  return 4 * slot + epilogue <= kW4StaticSmemBytes   ? 4
         : 3 * slot + epilogue <= kW4StaticSmemBytes ? 3
                                                     : 2;
}
constexpr int kScalesAhead = 3;

// 16 bytes global -> shared (a shared-window address), bypassing L1; zeros
// instead when !valid (gmem unread).
__device__ __forceinline__ void CpAsync16(uint32_t s, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
               "r"(valid ? 16 : 0)
               : "memory");
#endif
}
__device__ __forceinline__ void CpAsyncCommit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// Codes j and j + 4 of the 8-code word w (j = 0, 1: nibbles 0/4 or 1/5; callers
// pass w >> 8 for nibbles 2/6 and 3/7) -> bf16 pair of code * 2^-126.
template <int kJ>
__device__ __forceinline__ uint32_t E2M1PairShifted(uint32_t w) {
  static_assert(kJ == 0 || kJ == 1, "nibble 0 or 1 of each 16-bit half");
  constexpr uint32_t kNibbles = kJ == 0 ? 0x000F000Fu : 0x00F000F0u;
  // nibble << (6 - 4j) puts e1 e0 m at bits 8..6; nibble << (12 - 4j) the sign at 15.
  constexpr uint32_t kShifts = kJ == 0 ? (1u << 6) + (1u << 12) : (1u << 2) + (1u << 8);
  return ((w & kNibbles) * kShifts) & 0x81C081C0u;
}

// Two E4M3 block scales (low byte first) -> bf16 pairs (s0 * 2^118, s0 * 2^118)
// and (s1 * 2^118, s1 * 2^118); exact (E4M3 * 2^118 <= 2^127), NaN stays NaN.
__device__ __forceinline__ void NvScalePairs(uint32_t two, uint32_t* s0, uint32_t* s1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  const float2 f = __half22float2(
      __half2(__nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two), __NV_E4M3)));
  const float a = f.x * 0x1p118f, b = f.y * 0x1p118f;
#else
  const float a = DecodeE4M3(static_cast<uint8_t>(two)) * 0x1p118f;
  const float b = DecodeE4M3(static_cast<uint8_t>(two >> 8)) * 0x1p118f;
#endif
  const __nv_bfloat162 pa = __floats2bfloat162_rn(a, a), pb = __floats2bfloat162_rn(b, b);
  *s0 = *reinterpret_cast<const uint32_t*>(&pa);
  *s1 = *reinterpret_cast<const uint32_t*>(&pb);
}

template <int kMTiles, int kWarps = kW8A16Warps, int kNTiles = 1>
__global__ void __launch_bounds__(32 * kWarps)
    W4A16NvKernel(const uint16_t* __restrict__ x, const uint8_t* __restrict__ w,
                  const uint8_t* __restrict__ w_scales, const float* __restrict__ tensor_scale,
                  int64_t m, int64_t n, int64_t k, void* __restrict__ out, int out_kind) {
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * 16 * kNTiles;
  constexpr int kRows = 2 * kNTiles;  // rows g + 8 r of the CTA's 16 kNTiles, r < kRows
  // Iterations of this warp (units u = warp, warp + kWarps, ...), and how many
  // of them have this thread's 32-code slice inside K: all, or all but the
  // last (K % 32 == 0, so a slice is wholly inside or wholly past the end).
  const int64_t units = (k + kW8A16Unit - 1) / kW8A16Unit;
  const int64_t my_units = (k - t * 32 + kW8A16Unit - 1) / kW8A16Unit;
  const int iters = units > warp ? static_cast<int>((units - warp + kWarps - 1) / kWarps) : 0;
  const int valid = my_units > warp ? static_cast<int>((my_units - warp + kWarps - 1) / kWarps) : 0;
  // Rows past N and tokens past M read row N-1 / token M-1 (their sums are
  // never stored). Pointers start at this warp's first unit and advance by
  // kWarps units per iteration.
  // (All loop-carried, so that the compiler does not recompute them per unit.)
  const uint8_t* wnext[kRows];
  const uint16_t* snext_p[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = n0 + g + 8 * r < n ? n0 + g + 8 * r : n - 1;
    wnext[r] = w + row * (k / 2) + t * 16 + warp * 64;
    snext_p[r] = reinterpret_cast<const uint16_t*>(w_scales + row * (k / 16) + t * 2 + warp * 8);
  }
  const uint16_t* xp[kMTiles];
#pragma unroll
  for (int j = 0; j < kMTiles; ++j) {
    const int64_t tok = j * 8 + g < m ? j * 8 + g : m - 1;
    xp[j] = x + tok * k + t * 32 + warp * kW8A16Unit;
  }

  constexpr int kStages = W4RingStages<kRows, kWarps, kMTiles>();
  __shared__ uint4 ring[kStages][kRows][32 * kWarps];
  constexpr uint32_t kRowBytes = 32 * kWarps * 16, kSlotBytes = kRows * kRowBytes;
  const uint32_t ring_base = static_cast<uint32_t>(__cvta_generic_to_shared(&ring[0][0][tid]));
  // Weights of iteration i into ring slot i % kStages (zeros past K), one
  // commit group per iteration, empty past the end so the count stays in step.
  int issued = 0;
  auto issue = [&]() {
    if (issued < iters) {
      const uint32_t dst = ring_base + (issued % kStages) * kSlotBytes;
      const bool ok = issued < valid;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        CpAsync16(dst + r * kRowBytes, ok ? wnext[r] : w, ok);
        wnext[r] += kWarps * 64;
      }
    }
    ++issued;
    CpAsyncCommit();
  };
  // Block scales of iteration i (two E4M3 bytes per row), called for i = 0, 1, ...
  auto load_scales = [&](int i, uint32_t (&s)[kRows]) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      s[r] = i < valid ? __ldg(snext_p[r]) : 0u;
      snext_p[r] += kWarps * 4;
    }
  };

  float acc[kNTiles][kMTiles][4];
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
    for (int j = 0; j < kMTiles; ++j) {
      acc[nt][j][0] = acc[nt][j][1] = acc[nt][j][2] = acc[nt][j][3] = 0.0f;
    }
  }

#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) issue();
  // Block scales kScalesAhead iterations ahead in registers (sq[d]: iteration i + d).
  uint32_t sq[kScalesAhead][kRows];
#pragma unroll
  for (int d = 0; d < kScalesAhead; ++d) load_scales(d, sq[d]);
  // kTail: the warp's last iteration, where a slice may lie past K (zeros).
  auto body = [&](int i, auto tail) {
    constexpr bool kTail = decltype(tail)::value;
    issue();
    uint4 xv[kMTiles][4];  // 32 activations of token j * 8 + g
#pragma unroll
    for (int j = 0; j < kMTiles; ++j) {
      const uint4* p = reinterpret_cast<const uint4*>(xp[j] + i * (kWarps * kW8A16Unit));
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        xv[j][c] = !kTail || i < valid ? __ldg(p + c) : make_uint4(0, 0, 0, 0);
      }
    }
    CpAsyncWait<kStages - 1>();
    const int slot = i % kStages;
    uint4 wv[kRows];
    uint32_t sc[kRows][2];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      wv[r] = ring[slot][r][tid];
      NvScalePairs(sq[0][r], &sc[r][0], &sc[r][1]);
    }
    // Word q (codes 8q .. 8q+7) feeds two MMAs: pairs (0,4), (1,5), then (2,6), (3,7).
    // Activation pairs are formed once per (q, h) and shared by the row tiles.
#pragma unroll
    for (int q = 0; q < 4; ++q) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t b[kMTiles][2];
#pragma unroll
        for (int j = 0; j < kMTiles; ++j) {
          const uint32_t* xs = reinterpret_cast<const uint32_t*>(&xv[j][0]);
          const uint32_t lo = xs[4 * q + h], hi = xs[4 * q + h + 2];  // (x0, x1), (x4, x5)
          b[j][0] = __byte_perm(lo, hi, 0x5410);
          b[j][1] = __byte_perm(lo, hi, 0x7632);
        }
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
          const uint32_t v0 = reinterpret_cast<const uint32_t*>(&wv[2 * nt])[q] >> (8 * h);
          const uint32_t v1 = reinterpret_cast<const uint32_t*>(&wv[2 * nt + 1])[q] >> (8 * h);
          const uint32_t s0 = sc[2 * nt][q / 2], s1 = sc[2 * nt + 1][q / 2];
          uint32_t a[4];
          a[0] = ScaleBF16x2(E2M1PairShifted<0>(v0), s0);
          a[2] = ScaleBF16x2(E2M1PairShifted<1>(v0), s0);
          a[1] = ScaleBF16x2(E2M1PairShifted<0>(v1), s1);
          a[3] = ScaleBF16x2(E2M1PairShifted<1>(v1), s1);
#pragma unroll
          for (int j = 0; j < kMTiles; ++j) Mma16816<true>::Run(acc[nt][j], a, b[j]);
        }
      }
    }
#pragma unroll
    for (int d = 0; d + 1 < kScalesAhead; ++d) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) sq[d][r] = sq[d + 1][r];
    }
    load_scales(i + kScalesAhead, sq[kScalesAhead - 1]);
  };
  for (int i = 0; i + 1 < iters; ++i) body(i, std::false_type{});
  if (iters > 0) body(iters - 1, std::true_type{});
  CpAsyncWait<0>();
  const float factor = tensor_scale[0] * 0x1p8f;
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt) {
    if (nt > 0) __syncthreads();  // StoreTileSums' shared buffer is reused
    StoreTileSums<kMTiles, kWarps>(acc[nt], factor, n0 + 16 * nt, m, n, out, out_kind);
  }
}

// One W4A16NvKernel configuration: kMTiles 8-token tiles, kWarps warps splitting
// K, kNTiles 16-row tiles per CTA (sharing each activation load).
template <int kMTiles, int kWarps, int kNTiles>
void LaunchW4A16NvConfig(cudaStream_t stream, const uint16_t* x, const uint8_t* w,
                         const uint8_t* w_scales, const float* tensor_scale, int64_t m, int64_t n,
                         int64_t k, void* out, int out_kind) {
  const auto grid = static_cast<unsigned>((n + 16 * kNTiles - 1) / (16 * kNTiles));
  W4A16NvKernel<kMTiles, kWarps, kNTiles>
      <<<grid, 32 * kWarps, 0, stream>>>(x, w, w_scales, tensor_scale, m, n, k, out, out_kind);
}

// The configuration qmatmul runs for M tokens and N rows. Each CTA reads all
// M x K activations once for its rows, so more rows per CTA cut that (L2)
// traffic, which dominates from M = 8; fewer CTAs cost parallelism, which
// matters at M = 1 and for small N. 4 warps per CTA instead of 8 pay off where
// the grid is large (N >= 12288: >= 768 CTAs) and each warp's share of K short
// (K <= 8192: <= 8 units at 8 warps), so that the extra units per warp after
// the pipeline fill outweigh the lost split: 6% at 1 x 28672 x 8192, 12% at
// 1 x 12288 x 4096; at N = 8192 or K = 28672 8 warps stay faster. Chosen from
// same-run H200 timings of the candidates at N = 1024-28672, K = 4096-28672
// (benchmarks/NOTES.md).
inline void LaunchW4A16Nv(cudaStream_t stream, const uint16_t* x, const uint8_t* w,
                          const uint8_t* w_scales, const float* tensor_scale, int64_t m, int64_t n,
                          int64_t k, void* out, int out_kind) {
  const bool wide = n >= 16384;
  const bool one_tile = m <= 4 || (m <= 8 && !wide);  // one 8-token tile, one row tile
  auto run = [&]<int T, int W, int NT>() {
    LaunchW4A16NvConfig<T, W, NT>(stream, x, w, w_scales, tensor_scale, m, n, k, out, out_kind);
  };
  if (one_tile && n >= 12288 && k <= 8192) {
    run.template operator()<1, 4, 1>();
  } else if (one_tile) {
    run.template operator()<1, 8, 1>();
  } else if (m <= 8) {
    run.template operator()<1, 8, 2>();
  } else if (m <= 16) {
    run.template operator()<2, 8, 2>();
  } else if (m <= 32 && wide) {
    run.template operator()<4, 4, 4>();
  } else if (m <= 32) {
    run.template operator()<4, 4, 2>();
  } else {
    run.template operator()<8, 4, 2>();
  }
}

}  // namespace jax_bq::cuda

#endif  // JAX_BQ_W4A16_KERNELS_CUH_
