// What the weight-only GEMM kernels (w8a16_kernels.cuh, w4a16_kernels.cuh)
// share: the work split, the m16n8k16 tensor-core MMA, the layout of the
// weight scales and the deterministic epilogue.
//
// Work split: a CTA owns 16 weight rows (n) and all M; its kWarps warps split
// K in units of kW8A16Unit (warp w takes units w, w + kWarps, ...), and the
// warps' accumulators are summed in shared memory in warp order
// (StoreTileSums), so results are deterministic.
#ifndef JAX_BQ_WEIGHT_ONLY_MMA_CUH_
#define JAX_BQ_WEIGHT_ONLY_MMA_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "jax_bq/element_io.h"

namespace jax_bq::cuda {

constexpr int kW8A16Warps = 8;  // warps per CTA for one M tile (fewer for more tiles)
constexpr int kW8A16Unit = 128;

template <bool kBF16>
struct Mma16816 {
  // D = A(16x16) * B(16x8) + D, A row-major, B column-major, f32 accumulate.
  __device__ __forceinline__ static void Run(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (kBF16) {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
          "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
          "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
#endif
  }
};

struct WeightScaleLayout {
  int64_t block_n;  // rows per scale (1, 128, or N for per-tensor)
  int k_shift;      // log2 of columns per scale (a power of two >= 128)
  int64_t cols;     // scales per row of the scale matrix (1: one scale per row)
};

// The epilogue of the weight-only kernels: the warps' [16 x 8 kMTiles]
// accumulators are summed in shared memory in warp order (deterministic),
// multiplied by `factor` and stored as out[tok, row] in f32/bf16/f16.
template <int kMTiles, int kWarps>
__device__ __forceinline__ void StoreTileSums(const float (&acc)[kMTiles][4], float factor,
                                              int64_t n0, int64_t m, int64_t n, void* out,
                                              int out_kind) {
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  __shared__ float red[kWarps][kMTiles * 4][32];
#pragma unroll
  for (int j = 0; j < kMTiles; ++j) {
#pragma unroll
    for (int c = 0; c < 4; ++c) red[warp][j * 4 + c][lane] = acc[j][c];
  }
  __syncthreads();
  // Thread i of the CTA finalizes value slots i, i + blockDim, ...
  for (int slot = threadIdx.x; slot < kMTiles * 4 * 32; slot += blockDim.x) {
    const int jc = slot / 32, ln = slot % 32;
    float v = 0.0f;
#pragma unroll
    for (int wi = 0; wi < kWarps; ++wi) v += red[wi][jc][ln];
    v *= factor;
    const int j = jc / 4, c = jc % 4;
    const int gg = ln >> 2, tt = ln & 3;
    const int64_t row = n0 + gg + (c >= 2 ? 8 : 0);
    const int64_t tok = j * 8 + tt * 2 + (c & 1);
    if (row < n && tok < m) {
      const int64_t o = tok * n + row;
      if (out_kind == 0) {
        static_cast<float*>(out)[o] = v;  // as is, like the cuBLASLt path's float32 output
      } else if (out_kind == 1) {
        StoreFromFloat<InDtype::kBF16>(out, o, v);
      } else {
        StoreFromFloat<InDtype::kF16>(out, o, v);
      }
    }
  }
}

}  // namespace jax_bq::cuda

#endif  // JAX_BQ_WEIGHT_ONLY_MMA_CUH_
