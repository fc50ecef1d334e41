// CUDA kernels of the fused residual-add + LayerNorm + FP8 quantize op and
// their launch sequence (no XLA types: the FFI handler in
// layernorm_quantize.cu and tests/cuda/sanitize_driver.cu both call
// LaunchLayernormQuantize).
//
// One thread block of 32 * W threads per row (W = LnqWarps(H)); thread l
// owns elements (c * 32W + l) * 8 + [0, 8) of chunk c, loaded with 16-byte
// vector loads when H % 8 == 0 and the pointers are 16-byte aligned (scalar
// loads otherwise, same order). Rows of up to 2 chunks (H <= 4096) stay in
// registers between the two reductions and the normalization; longer rows
// re-read x and the residual (a generic path, same arithmetic; the 4- and
// 8-chunk register variants cost 60% of this file's compile time and were
// dropped). A block of single-chunk rows (H <= 2048) may handle several
// consecutive rows when there are many: it loads gamma/beta once and
// prefetches the next row's x and residual while it reduces and writes the
// current one. Every row is computed exactly as alone. The reductions follow
// the pinned order of jax_bq/layernorm_math.h: each lane sequentially, xor
// butterfly in the warp, warps in order, so every platform gives the same
// bits. Dynamic per-tensor scales need the amax of the whole tensor before
// any code: pass 1 writes y, the per-row (mean, rstd) and an atomicMax of the
// row amax key (max is order-free, so still deterministic); pass 2 re-reads
// x/residual, rebuilds y32 bit for bit and writes the codes.
#ifndef JAX_BQ_LAYERNORM_QUANTIZE_CUH_
#define JAX_BQ_LAYERNORM_QUANTIZE_CUH_

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "jax_bq/element_io.h"
#include "jax_bq/layernorm_math.h"

namespace jax_bq::cuda::lnq {

struct LnqStatus {
  bool ok = true;
  std::string message;
};

// Eight values from p[i, i + 8), i a multiple of 8, p 16-byte aligned.
template <InDtype D>
__device__ __forceinline__ void Load8(const void* p, int64_t i, float (&v)[8]) {
  if constexpr (D == InDtype::kF32) {
    const float4* q = reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
    const float4 a = q[0], b = q[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  } else {
    const uint4 u = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p) + i);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint16_t lo = static_cast<uint16_t>(w[k] & 0xffffu);
      const uint16_t hi = static_cast<uint16_t>(w[k] >> 16);
      v[2 * k] = ElementToFloat<D>(lo), v[2 * k + 1] = ElementToFloat<D>(hi);
    }
  }
}

// Rounds a float32 to the dtype D and back (the residual sum in x's dtype).
template <InDtype D>
__device__ __forceinline__ float RoundTo(float v) {
  return ElementToFloat<D>(FloatToElement<D>(v));
}

__device__ __forceinline__ uint16_t ToBits16(float v, InDtype o) {
  v = CanonicalizeNaN(v);
  return o == InDtype::kBF16 ? FloatToBF16Bits(v) : FloatToF16Bits(v);
}

// Stores y (out dtype o, runtime: one uniform branch) for eight values.
__device__ __forceinline__ void Store8(void* p, int64_t i, const float (&v)[8], InDtype o,
                                       bool vec) {
  if (o == InDtype::kF32) {
    float* q = static_cast<float*>(p) + i;
    float c[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) c[k] = CanonicalizeNaN(v[k]);
    if (vec) {
      reinterpret_cast<float4*>(q)[0] = make_float4(c[0], c[1], c[2], c[3]);
      reinterpret_cast<float4*>(q)[1] = make_float4(c[4], c[5], c[6], c[7]);
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) q[k] = c[k];
    }
  } else {
    uint16_t* q = static_cast<uint16_t*>(p) + i;
    uint16_t b[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) b[k] = ToBits16(v[k], o);  // NaN -> canonical quiet NaN
    if (vec) {
      uint4 u;
      u.x = b[0] | (uint32_t{b[1]} << 16), u.y = b[2] | (uint32_t{b[3]} << 16);
      u.z = b[4] | (uint32_t{b[5]} << 16), u.w = b[6] | (uint32_t{b[7]} << 16);
      *reinterpret_cast<uint4*>(q) = u;
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) q[k] = b[k];
    }
  }
}

struct Params {
  const void* x;
  const void* residual;  // null: no residual
  const void* gamma;     // [H] in `param` (float32, bfloat16 or float16)
  const void* beta;
  const float* scale;  // static mode: [G]
  void* y;
  uint8_t* codes;
  float* scales;
  uint32_t* amax_key;  // per-tensor: [G] (zeroed before pass 1)
  float2* stats;       // per-tensor: [G * R] (mean, rstd)
  int64_t r, h;
  float inv_h, eps;
  InDtype out;
  InDtype param;  // gamma and beta
  Format format;
  LnqMode mode;
  bool vec;  // 16-byte vector access is legal (H % 8 == 0, aligned pointers)
};

// A non-finite row's amax key: above every finite float's bits.
constexpr uint32_t kNonFiniteKey = 0x7f800001u;

// s of eight elements starting at i (n valid), zeros beyond.
template <InDtype D>
__device__ __forceinline__ void LoadS(const Params& p, int64_t base, int64_t i, float (&s)[8]) {
  if (p.vec && i + 8 <= p.h) {
    Load8<D>(p.x, base + i, s);
    if (p.residual != nullptr) {
      float r[8];
      Load8<D>(p.residual, base + i, r);
#pragma unroll
      for (int k = 0; k < 8; ++k) s[k] = RoundTo<D>(__fadd_rn(s[k], r[k]));
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    float v = 0.0f;
    if (i + k < p.h) {
      v = LoadAsFloat<D>(p.x, base + i + k);
      if (p.residual != nullptr)
        v = RoundTo<D>(__fadd_rn(v, LoadAsFloat<D>(p.residual, base + i + k)));
    }
    s[k] = v;
  }
}

// Eight gamma or beta values from g[i, i + 8) (zeros beyond h) as float32
// (exact widening); `gd` is the parameters' dtype (one uniform branch).
__device__ __forceinline__ void LoadGB(const void* g, InDtype gd, int64_t i, int64_t h, bool vec,
                                       float (&v)[8]) {
  if (vec && i + 8 <= h) {
    if (gd == InDtype::kF32) {
      Load8<InDtype::kF32>(g, i, v);
    } else if (gd == InDtype::kBF16) {
      Load8<InDtype::kBF16>(g, i, v);
    } else {
      Load8<InDtype::kF16>(g, i, v);
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    float e = 0.0f;
    if (i + k < h) {
      e = gd == InDtype::kF32    ? LoadAsFloat<InDtype::kF32>(g, i + k)
          : gd == InDtype::kBF16 ? LoadAsFloat<InDtype::kBF16>(g, i + k)
                                 : LoadAsFloat<InDtype::kF16>(g, i + k);
    }
    v[k] = e;
  }
}

// Block-wide sum of the per-lane partials in the pinned order. `red` holds
// kLnqMaxWarps floats; every thread returns the total. No barrier after the
// read: a caller alternates two arrays (the mean's and the variance's), so
// the barrier of the next sum orders this sum's reads before any rewrite.
__device__ __forceinline__ float PinnedBlockSum(float acc, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) acc = __fadd_rn(acc, __shfl_xor_sync(0xffffffffu, acc, o));
  const int w = threadIdx.x / kLnqWarp, warps = blockDim.x / kLnqWarp;
  if ((threadIdx.x & (kLnqWarp - 1)) == 0) red[w] = acc;
  __syncthreads();
  float total = red[0];
  for (int k = 1; k < warps; ++k) total = __fadd_rn(total, red[k]);
  return total;
}

// Block-wide (max, all) of a row's finite amax / finiteness (order-free).
__device__ __forceinline__ void BlockAmax(float& amax, bool& finite, float* red, int* fin) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  finite = __all_sync(0xffffffffu, finite);
  const int w = threadIdx.x / kLnqWarp, warps = blockDim.x / kLnqWarp;
  if ((threadIdx.x & (kLnqWarp - 1)) == 0) red[w] = amax, fin[w] = finite ? 1 : 0;
  __syncthreads();
  amax = red[0];
  finite = fin[0] != 0;
  for (int k = 1; k < warps; ++k) amax = fmaxf(amax, red[k]), finite = finite && fin[k] != 0;
  __syncthreads();
}

template <Format F>
__device__ __forceinline__ void EncodeChunk(const float (&y)[8], LnqMode mode, float inv,
                                            const BlockScale& bs, uint8_t (&c)[8]) {
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    c[k] = mode == LnqMode::kStatic ? LnqEncodeStatic<F>(y[k], inv) : QuantizeElement<F>(y[k], bs);
  }
}

__device__ __forceinline__ void StoreCodes(uint8_t* p, int64_t i, int64_t h, bool vec,
                                           const uint8_t (&c)[8]) {
  if (vec && i + 8 <= h) {
    uint2 u;
    u.x = c[0] | (uint32_t{c[1]} << 8) | (uint32_t{c[2]} << 16) | (uint32_t{c[3]} << 24);
    u.y = c[4] | (uint32_t{c[5]} << 8) | (uint32_t{c[6]} << 16) | (uint32_t{c[7]} << 24);
    *reinterpret_cast<uint2*>(p + i) = u;
    return;
  }
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    if (i + k < h) p[i + k] = c[k];
  }
}

template <Format F>
__device__ __forceinline__ void EncodeStore(const Params& p, int64_t base, int64_t i,
                                            const float (&y)[8], float inv, const BlockScale& bs) {
  uint8_t c[8];
  EncodeChunk<F>(y, p.mode, inv, bs, c);
  StoreCodes(p.codes + base, i, p.h, p.vec, c);
}

// One row of pass 1. NC > 0: the row's C <= NC chunks stay in registers
// (`cache`); NC == 0: any C, x and residual are re-read for each pass over
// the row. kLoaded (NC == 1): the caller has put the row's s in cache[0] and
// gamma/beta in gm1/bt1.
template <InDtype D, int NC, bool kLoaded>
__device__ __forceinline__ void Pass1Row(const Params& p, int64_t row, int64_t chunks,
                                         float (&cache)[NC > 0 ? NC : 1][8], const float (&gm1)[8],
                                         const float (&bt1)[8], float* red, float* red2, int* fin) {
  const int lanes = blockDim.x;
  const int l = threadIdx.x;
  constexpr bool kCached = NC > 0;
  // With kCached the trip count is the constant NC (guarded by `chunks`), so
  // the loops unroll and `cache` stays in registers.
  const int64_t trip = kCached ? int64_t{NC} : chunks;
  const int64_t g = row / p.r;
  const int64_t base = row * p.h;

  float acc = 0.0f;
  if constexpr (kLoaded) {  // cache[0] holds the row (NC == 1)
#pragma unroll
    for (int k = 0; k < 8; ++k) acc = k == 0 ? cache[0][k] : __fadd_rn(acc, cache[0][k]);
  } else {
#pragma unroll
    for (int64_t c = 0; c < trip; ++c) {
      if (c >= chunks) break;
      float s[8];
      LoadS<D>(p, base, (c * lanes + l) * 8, s);
#pragma unroll
      for (int k = 0; k < 8; ++k) acc = (c == 0 && k == 0) ? s[k] : __fadd_rn(acc, s[k]);
      if constexpr (NC > 0) {
#pragma unroll
        for (int k = 0; k < 8; ++k) cache[kCached ? c : 0][k] = s[k];
      }
    }
  }
  const float mean = LnqMean(PinnedBlockSum(acc, red), p.inv_h);

  acc = 0.0f;
#pragma unroll
  for (int64_t c = 0; c < trip; ++c) {
    if (c >= chunks) break;
    float s[8];
    if constexpr (NC > 0) {
#pragma unroll
      for (int k = 0; k < 8; ++k) s[k] = cache[kCached ? c : 0][k];
    } else {
      LoadS<D>(p, base, (c * lanes + l) * 8, s);
    }
    const int64_t i = (c * lanes + l) * 8;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float d = __fsub_rn(s[k], mean);
      const float sq = i + k < p.h ? __fmul_rn(d, d) : 0.0f;
      acc = (c == 0 && k == 0) ? sq : __fadd_rn(acc, sq);
    }
  }
  const float var = __fmul_rn(PinnedBlockSum(acc, red2), p.inv_h);
  const float rstd = LnqRstd(var, p.eps);

  const float inv = p.mode == LnqMode::kStatic ? __fdiv_rn(1.0f, p.scale[g]) : 0.0f;
  float amax = 0.0f;
  bool finite = true;
  // Static mode encodes in this loop; the dynamic modes need the amax first.
#pragma unroll
  for (int64_t c = 0; c < trip; ++c) {
    const int64_t i = (c * lanes + l) * 8;
    if (c >= chunks || i >= p.h) break;
    float s[8], gm[8], bt[8], y[8];
    if constexpr (NC > 0) {
#pragma unroll
      for (int k = 0; k < 8; ++k) s[k] = cache[kCached ? c : 0][k];
    } else {
      LoadS<D>(p, base, i, s);
    }
    if constexpr (kLoaded) {
#pragma unroll
      for (int k = 0; k < 8; ++k) gm[k] = gm1[k], bt[k] = bt1[k];
    } else {
      LoadGB(p.gamma, p.param, i, p.h, p.vec, gm);
      LoadGB(p.beta, p.param, i, p.h, p.vec, bt);
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      y[k] = LnqNormalize(__fsub_rn(s[k], mean), rstd, gm[k], bt[k]);
      if (i + k < p.h) {
        finite = finite && IsFinite(y[k]);
        amax = fmaxf(amax, LnqFiniteMag(y[k]));
      }
    }
    if (p.vec && i + 8 <= p.h) {
      Store8(p.y, base + i, y, p.out, true);
    } else {
      float tail[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) tail[k] = y[k];
      // Scalar stores of the valid prefix only.
      for (int k = 0; k < 8 && i + k < p.h; ++k) {
        if (p.out == InDtype::kF32) {
          static_cast<float*>(p.y)[base + i + k] = CanonicalizeNaN(tail[k]);
        } else {
          static_cast<uint16_t*>(p.y)[base + i + k] = ToBits16(tail[k], p.out);
        }
      }
    }
    if (p.mode == LnqMode::kStatic) {
      const BlockScale unused{};
      if (p.format == Format::kFP8E4M3) {
        EncodeStore<Format::kFP8E4M3>(p, base, i, y, inv, unused);
      } else {
        EncodeStore<Format::kFP8E5M2>(p, base, i, y, inv, unused);
      }
    }
    if constexpr (NC > 0) {
#pragma unroll
      for (int k = 0; k < 8; ++k) cache[kCached ? c : 0][k] = y[k];  // keep y32 for the codes
    }
  }
  if (p.mode == LnqMode::kStatic) {
    if (row % p.r == 0 && l == 0) p.scales[g] = p.scale[g];
    return;
  }
  BlockAmax(amax, finite, red, fin);
  if (p.mode == LnqMode::kPerTensor) {
    if (l == 0) {
      atomicMax(p.amax_key + g, finite ? FloatBits(amax) : kNonFiniteKey);
      p.stats[row] = make_float2(mean, rstd);
    }
    return;
  }
  // Per token: the row's scale, then its codes.
  const BlockScale e4 = ComputeBlockScale<Format::kFP8E4M3>(amax, finite, 1.0f);
  const BlockScale e5 = ComputeBlockScale<Format::kFP8E5M2>(amax, finite, 1.0f);
  const BlockScale& bs = p.format == Format::kFP8E4M3 ? e4 : e5;
  if (l == 0) p.scales[row] = BitsFloat(bs.stored);
#pragma unroll
  for (int64_t c = 0; c < trip; ++c) {
    const int64_t i = (c * lanes + l) * 8;
    if (c >= chunks || i >= p.h) break;
    float y[8];
    if constexpr (NC > 0) {
#pragma unroll
      for (int k = 0; k < 8; ++k) y[k] = cache[kCached ? c : 0][k];
    } else {
      float s[8], gm[8], bt[8];
      LoadS<D>(p, base, i, s);
      LoadGB(p.gamma, p.param, i, p.h, p.vec, gm);
      LoadGB(p.beta, p.param, i, p.h, p.vec, bt);
#pragma unroll
      for (int k = 0; k < 8; ++k) y[k] = LnqNormalize(__fsub_rn(s[k], mean), rstd, gm[k], bt[k]);
    }
    if (p.format == Format::kFP8E4M3) {
      EncodeStore<Format::kFP8E4M3>(p, base, i, y, 0.0f, bs);
    } else {
      EncodeStore<Format::kFP8E5M2>(p, base, i, y, 0.0f, bs);
    }
  }
}

// Pass 1 (every mode): one row per block, except single-chunk rows (NC == 1),
// where a block handles rows [blockIdx.x * rows_per_block, + rows_per_block)
// of `rows`, loads gamma/beta once and prefetches the next row's x + residual
// while it reduces and writes the current one.
template <InDtype D, int NC>
__global__ void __launch_bounds__(kLnqWarp* kLnqMaxWarps)
    LayernormQuantizeKernel(Params p, int64_t chunks, int64_t rows, int rows_per_block) {
  __shared__ float red[kLnqMaxWarps], red2[kLnqMaxWarps];
  __shared__ int fin[kLnqMaxWarps];
  float cache[NC > 0 ? NC : 1][8];
  if constexpr (NC == 1) {
    const int64_t i = int64_t{threadIdx.x} * 8;
    const int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_block;
    const int64_t last = first + rows_per_block < rows ? first + rows_per_block : rows;
    float next[8], gm1[8], bt1[8];
    LoadS<D>(p, first * p.h, i, next);
    LoadGB(p.gamma, p.param, i, p.h, p.vec, gm1);
    LoadGB(p.beta, p.param, i, p.h, p.vec, bt1);
    for (int64_t row = first; row < last; ++row) {
#pragma unroll
      for (int k = 0; k < 8; ++k) cache[0][k] = next[k];
      if (row + 1 < last) LoadS<D>(p, (row + 1) * p.h, i, next);
      Pass1Row<D, 1, true>(p, row, chunks, cache, gm1, bt1, red, red2, fin);
    }
  } else {
    const float unused[8] = {};
    Pass1Row<D, NC, false>(p, blockIdx.x, chunks, cache, unused, unused, red, red2, fin);
  }
}

// Pass 2 of the dynamic per-tensor mode: codes from the group amax.
template <InDtype D>
__global__ void __launch_bounds__(kLnqWarp* kLnqMaxWarps)
    LayernormQuantizeTensorCodesKernel(Params p, int64_t chunks) {
  const int64_t row = blockIdx.x;
  const int64_t g = row / p.r;
  const int64_t base = row * p.h;
  const int lanes = blockDim.x;
  const int l = threadIdx.x;
  const uint32_t key = p.amax_key[g];
  const bool finite = key != kNonFiniteKey;
  const float amax = finite ? BitsFloat(key) : 0.0f;
  const BlockScale e4 = ComputeBlockScale<Format::kFP8E4M3>(amax, finite, 1.0f);
  const BlockScale e5 = ComputeBlockScale<Format::kFP8E5M2>(amax, finite, 1.0f);
  const BlockScale& bs = p.format == Format::kFP8E4M3 ? e4 : e5;
  if (row % p.r == 0 && l == 0) p.scales[g] = BitsFloat(bs.stored);
  const float2 st = p.stats[row];
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t i = (c * lanes + l) * 8;
    if (i >= p.h) break;
    float s[8], gm[8], bt[8], y[8];
    LoadS<D>(p, base, i, s);
    LoadGB(p.gamma, p.param, i, p.h, p.vec, gm);
    LoadGB(p.beta, p.param, i, p.h, p.vec, bt);
#pragma unroll
    for (int k = 0; k < 8; ++k) y[k] = LnqNormalize(__fsub_rn(s[k], st.x), st.y, gm[k], bt[k]);
    if (p.format == Format::kFP8E4M3) {
      EncodeStore<Format::kFP8E4M3>(p, base, i, y, 0.0f, bs);
    } else {
      EncodeStore<Format::kFP8E5M2>(p, base, i, y, 0.0f, bs);
    }
  }
}

inline bool Aligned16(const void* q) { return (reinterpret_cast<uintptr_t>(q) & 15u) == 0; }

// Rows per block of pass 1 for single-chunk rows (NC == 1): just enough that
// every block is resident at once (the kernel's occupancy on this device),
// up to 8, so that a block's prefetch hides the next row's load behind the
// current row's reductions. One row per block when anything fails.
// JAX_BQ_LNQ_ROWS_PER_BLOCK=N (1..8) fixes the count instead (a benchmark knob:
// 1 is the one-row-per-block kernel without prefetch).
template <InDtype D>
int RowsPerBlock(int64_t rows, int threads) {
  static const int forced = [] {
    const char* env = std::getenv("JAX_BQ_LNQ_ROWS_PER_BLOCK");
    const int n = env != nullptr ? std::atoi(env) : 0;
    return n >= 1 && n <= 8 ? n : 0;
  }();
  if (forced != 0) return forced;
  static int resident[64][kLnqMaxWarps + 1] = {};  // [device][warps], per instantiation
  int dev = 0;
  const int warps = threads / kLnqWarp;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 1;
  int& slots = resident[dev][warps];
  if (slots == 0) {
    int sms = 0, per_sm = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, LayernormQuantizeKernel<D, 1>,
                                                      threads, 0) != cudaSuccess ||
        sms * per_sm <= 0) {
      return 1;
    }
    slots = sms * per_sm;
  }
  const int64_t per = (rows + slots - 1) / slots;
  return static_cast<int>(per < 1 ? 1 : (per > 8 ? 8 : per));
}

template <InDtype D, int NC>
cudaError_t LaunchPass1(const Params& p, int64_t rows, int threads, int64_t chunks,
                        cudaStream_t stream) {
  int per = 1;
  if constexpr (NC == 1) per = RowsPerBlock<D>(rows, threads);
  const int64_t blocks = (rows + per - 1) / per;
  LayernormQuantizeKernel<D, NC>
      <<<static_cast<unsigned>(blocks), static_cast<unsigned>(threads), 0, stream>>>(p, chunks,
                                                                                     rows, per);
  return cudaGetLastError();
}

// Launches the op for rows = G * R rows (nothing for zero rows). `p.amax_key`
// and `p.stats` must point at the workspace in per-tensor mode. Never
// synchronizes or allocates; the memset of the G amax words is an async
// stream operation (graph-capturable).
template <InDtype D>
LnqStatus LaunchLayernormQuantize(Params p, int64_t g, cudaStream_t stream) {
  LnqStatus st;
  const int64_t rows = g * p.r;
  if (rows == 0) return st;
  if (rows > 0x7fffffff) {
    st.ok = false;
    st.message = "jax_bq: layernorm_quantize supports at most 2^31 - 1 rows";
    return st;
  }
  const int threads = kLnqWarp * LnqWarps(p.h);
  const int64_t chunks = LnqChunks(p.h);
  p.vec = p.h % 8 == 0 && Aligned16(p.x) && Aligned16(p.y) && Aligned16(p.codes) &&
          Aligned16(p.gamma) && Aligned16(p.beta) &&
          (p.residual == nullptr || Aligned16(p.residual));
  cudaError_t err = cudaSuccess;
  if (p.mode == LnqMode::kPerTensor) {
    err = cudaMemsetAsync(p.amax_key, 0, static_cast<size_t>(g) * sizeof(uint32_t), stream);
  }
  if (err == cudaSuccess) {
    if (chunks <= 1) {
      err = LaunchPass1<D, 1>(p, rows, threads, chunks, stream);
    } else if (chunks <= 2) {
      err = LaunchPass1<D, 2>(p, rows, threads, chunks, stream);
    } else {
      err = LaunchPass1<D, 0>(p, rows, threads, chunks, stream);
    }
  }
  if (err == cudaSuccess && p.mode == LnqMode::kPerTensor) {
    LayernormQuantizeTensorCodesKernel<D>
        <<<static_cast<unsigned>(rows), static_cast<unsigned>(threads), 0, stream>>>(p, chunks);
    err = cudaGetLastError();
  }
  if (err != cudaSuccess) {
    st.ok = false;
    st.message =
        std::string("jax_bq: layernorm_quantize launch failed: ") + cudaGetErrorString(err);
  }
  return st;
}

}  // namespace jax_bq::cuda::lnq

#endif  // JAX_BQ_LAYERNORM_QUANTIZE_CUH_
