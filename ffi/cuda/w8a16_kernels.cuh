// Weight-only W8A16 GEMM: FP8 (E4M3 / E5M2) weights x bf16/f16 activations
// on the tensor cores, float32 scales per row, tile or tensor.
#ifndef JAX_BQ_W8A16_KERNELS_CUH_
#define JAX_BQ_W8A16_KERNELS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "jax_bq/block_math.h"
#include "weight_only_mma.cuh"

namespace jax_bq::cuda {

// ---- Weight-only W8A16: out[M, N] = x[M, K] . dequant(w[N, K])^T -------------------------
// FP8 weights are widened to 16 bits in registers (E4M3 and E5M2 values are
// exact in bf16 and f16) and multiplied on the tensor cores with
// mma.sync.m16n8k16 (f32 accumulation); each weight byte is read once.
//
// Work split as weight_only_mma.cuh says (16 rows per CTA, K in units of 128
// across the warps). For each unit the warp computes a 16 x 8*kMTiles partial
// product in f32, multiplies it by the weight scale of (row, unit) and adds it
// to its accumulator. A weight scale block must cover whole units along K
// (block_k a multiple of 128, or the whole row).
//
// K permutation: an MMA sums over its 16 k-slots in any order, so slot j of
// thread t (t = lane % 4) is mapped to physical k = 16 t + (j < 8 ? ...) such
// that each thread loads 16 contiguous weight bytes per row and 32 contiguous
// activation bytes per token for a 64-wide half unit; A and B use the same map.

// Two FP8 codes (low byte first) -> two 16-bit values packed in a uint32.
template <Format WF, bool kBF16>
__device__ __forceinline__ uint32_t WidenFp8x2(uint16_t pair) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  constexpr __nv_fp8_interpretation_t kInterp = WF == Format::kFP8E5M2 ? __NV_E5M2 : __NV_E4M3;
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(pair, kInterp);
  if constexpr (!kBF16) {
    return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
  } else {
    const float2 f = __half22float2(__half2(h));
    const __nv_bfloat162 b = __floats2bfloat162_rn(f.x, f.y);  // exact: <= 3 mantissa bits
    return *reinterpret_cast<const uint32_t*>(&b);
  }
#else
  const float lo = FormatTraits<WF>::Decode(static_cast<uint8_t>(pair & 0xff));
  const float hi = FormatTraits<WF>::Decode(static_cast<uint8_t>(pair >> 8));
  if constexpr (kBF16) {
    return FloatToBF16Bits(lo) | (static_cast<uint32_t>(FloatToBF16Bits(hi)) << 16);
  } else {
    return FloatToF16Bits(lo) | (static_cast<uint32_t>(FloatToF16Bits(hi)) << 16);
  }
#endif
}

template <Format WF, bool kBF16, int kMTiles, int kWarps = kW8A16Warps>
__global__ void __launch_bounds__(32 * kWarps)
    W8A16Kernel(const uint16_t* __restrict__ x, const uint8_t* __restrict__ w,
                const float* __restrict__ w_scales, WeightScaleLayout sl, int64_t m, int64_t n,
                int64_t k, void* __restrict__ out, int out_kind /*0 f32, 1 bf16, 2 f16*/) {
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;  // group id: row g and g + 8 of the tile; token g of an m-tile
  const int t = lane & 3;   // thread in group: its 16-byte slice of a 64-wide half unit
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * 16;
  const int64_t rows[2] = {n0 + g, n0 + g + 8};
  const int64_t units = (k + kW8A16Unit - 1) / kW8A16Unit;
  // Scale rows of the two weight rows (one division per thread, not per unit).
  const float* srow[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = rows[r] < n ? rows[r] : n - 1;
    srow[r] = w_scales + (row / sl.block_n) * sl.cols;
  }

  float acc[kMTiles][4];
#pragma unroll
  for (int j = 0; j < kMTiles; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;

  // Weights of unit u: rows g and g+8, bytes [16 t, 16 t + 16) of each 64-byte
  // half. The next unit's weights are loaded before the current one is
  // multiplied, so every warp keeps two units (4 KB) of loads in flight.
  auto load_weights = [&](int64_t u, uint4(&wv)[2][2]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t kk = u * kW8A16Unit + h * 64 + t * 16;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (u < units && rows[r] < n && kk < k) {
          wv[h][r] = __ldg(reinterpret_cast<const uint4*>(w + rows[r] * k + kk));
        } else {
          wv[h][r] = make_uint4(0, 0, 0, 0);
        }
      }
    }
  };
  uint4 wv[2][2];
  load_weights(warp, wv);
  for (int64_t u = warp; u < units; u += kWarps) {
    const int64_t kbase = u * kW8A16Unit;
    uint4 wnext[2][2];
    load_weights(u + kWarps, wnext);
    float part[kMTiles][4];
#pragma unroll
    for (int j = 0; j < kMTiles; ++j) part[j][0] = part[j][1] = part[j][2] = part[j][3] = 0.0f;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t kk = kbase + h * 64 + t * 16;
      // Activations: token g of each m-tile, 16 values (32 bytes) at kk.
      uint4 xv[kMTiles][2];
#pragma unroll
      for (int j = 0; j < kMTiles; ++j) {
        const int64_t tok = j * 8 + g;
        if (tok < m && kk < k) {
          const uint4* p = reinterpret_cast<const uint4*>(x + tok * k + kk);
          xv[j][0] = __ldg(p);
          xv[j][1] = __ldg(p + 1);
        } else {
          xv[j][0] = xv[j][1] = make_uint4(0, 0, 0, 0);
        }
      }
      const uint32_t* w0 = reinterpret_cast<const uint32_t*>(&wv[h][0]);
      const uint32_t* w1 = reinterpret_cast<const uint32_t*>(&wv[h][1]);
      // Four k16 steps; step s covers physical bytes 4 s .. 4 s + 3 of the slice:
      // slots (2t, 2t+1) <- bytes 4s, 4s+1 and slots (2t+8, 2t+9) <- 4s+2, 4s+3.
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        uint32_t a[4];
        a[0] = WidenFp8x2<WF, kBF16>(static_cast<uint16_t>(w0[s] & 0xffff));
        a[1] = WidenFp8x2<WF, kBF16>(static_cast<uint16_t>(w1[s] & 0xffff));
        a[2] = WidenFp8x2<WF, kBF16>(static_cast<uint16_t>(w0[s] >> 16));
        a[3] = WidenFp8x2<WF, kBF16>(static_cast<uint16_t>(w1[s] >> 16));
#pragma unroll
        for (int j = 0; j < kMTiles; ++j) {
          const uint32_t* xs = reinterpret_cast<const uint32_t*>(&xv[j][0]);
          // Activation elements 4 s .. 4 s + 3 of the 16 = words 2 s and 2 s + 1.
          const uint32_t b[2] = {xs[2 * s], xs[2 * s + 1]};
          Mma16816<kBF16>::Run(part[j], a, b);
        }
      }
    }
    // Scale the unit's partial product per weight row and accumulate.
    const int64_t col = sl.cols == 1 ? 0 : kbase >> sl.k_shift;
    const float sc[2] = {__ldg(srow[0] + col), __ldg(srow[1] + col)};
#pragma unroll
    for (int j = 0; j < kMTiles; ++j) {
      acc[j][0] += part[j][0] * sc[0];
      acc[j][1] += part[j][1] * sc[0];
      acc[j][2] += part[j][2] * sc[1];
      acc[j][3] += part[j][3] * sc[1];
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      wv[h][0] = wnext[h][0];
      wv[h][1] = wnext[h][1];
    }
  }

  StoreTileSums<kMTiles, kWarps>(acc, 1.0f, n0, m, n, out, out_kind);
}

}  // namespace jax_bq::cuda

#endif  // JAX_BQ_W8A16_KERNELS_CUH_
