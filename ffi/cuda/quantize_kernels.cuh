// CUDA quantize / dequantize kernels over the [G, P, A, B] layout.
//
// Quantize has two paths:
//  * Fused (Layout::FusedRowBlocks: blocks along a contiguous last axis, at
//    most 256 elements): a group of T lanes of one warp owns a block, loads it
//    once into registers (16-byte vectors where aligned), reduces amax with
//    shuffles, computes the scale and writes codes: one read, one write.
//  * Two-pass (tiles, per-channel, per-tensor, blocked axis not last): chunk
//    partial maxima -> one key per block -> encode. The reductions are max over
//    "keys" (float32 bits of |x|, 0xFFFFFFFF for a non-finite element), which is
//    exact and order-free: deterministic without float atomics.
// NVFP4 first reduces the finite amax of each group the same way. The
// per-block math (keys, scales, encoders) is quantize_device.cuh's.
#ifndef JAX_BQ_QUANTIZE_KERNELS_CUH_
#define JAX_BQ_QUANTIZE_KERNELS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "jax_bq/block_math.h"
#include "jax_bq/layout.h"
#include "quantize_device.cuh"

namespace jax_bq::cuda {

// ---- Fused one-pass kernel --------------------------------------------------
// kVec elements per lane per chunk (16 bytes of input when kAligned, else 2, or
// one FP6 unit of 4); T = min(32, ba / kVec) lanes per block; each lane handles
// `chunks` chunks. Only kAligned launches (the host checked the alignment of x,
// a and ba) use 16-byte vector loads: an unaligned chunk of 4 float32 is 16
// bytes too, but may start anywhere.
template <Format F, InDtype D, int kVec, bool kAligned>
__global__ void __launch_bounds__(kThreads)
    FusedQuantizeKernel(const typename InTraits<D>::Storage* __restrict__ x,
                        uint8_t* __restrict__ data, void* __restrict__ scales,
                        const float* __restrict__ tensor_scale, Layout l, int lanes_log2,
                        bool transposed_scales = false) {
  using In = typename InTraits<D>::Storage;
  // Blocks hold at most 256 elements and a group has at most 32 lanes.
  constexpr int kMaxChunks = 256 / (32 * kVec) > 1 ? 256 / (32 * kVec) : 1;
  const int lanes = 1 << lanes_log2;
  const int64_t blocks_per_row = l.BlocksA();
  const int64_t total_blocks = l.Rows() * blocks_per_row;
  const int64_t gtid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t block_id = gtid >> lanes_log2;
  const int lane = static_cast<int>(gtid & (lanes - 1));
  // Whole lane groups stay together inside a warp (lanes divides 32), so the
  // shuffles below are safe even for the padding threads of the last warp.
  const bool active = block_id < total_blocks;
  // Scales are [rows, blocks_per_row] row-major, so a block's scale index is
  // its id. When blocks tile the rows exactly (a % ba == 0) the block starts at
  // block_id * ba and no 64-bit division is needed (they cost ~70 instructions).
  const bool even = l.a % l.ba == 0;
  int64_t row = 0, start = 0, len = 0;
  if (active) {
    if (even) {
      start = block_id * l.ba;
      len = l.ba;
    } else {
      row = block_id / blocks_per_row;
      const int64_t bi = block_id - row * blocks_per_row;
      start = row * l.a + bi * l.ba;
      len = (bi + 1) * l.ba < l.a ? l.ba : l.a - bi * l.ba;
    }
  }
  const int chunks = static_cast<int>((l.ba + lanes * kVec - 1) / (lanes * kVec));

  float v[kMaxChunks][kVec];
  uint32_t key = 0;
#pragma unroll
  for (int c = 0; c < kMaxChunks; ++c) {
    const int64_t i = (static_cast<int64_t>(c) * lanes + lane) * kVec;  // offset in block
    if (kAligned && c < chunks && active && i + kVec <= len && kVec * sizeof(In) == 16) {
      // Aligned vector load (the host checked alignment of x, a and ba).
      const uint4 raw = *reinterpret_cast<const uint4*>(x + start + i);
      const In* e = reinterpret_cast<const In*>(&raw);
#pragma unroll
      for (int k = 0; k < kVec; ++k) v[c][k] = ToFloat<D>(e[k]);
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const bool ok = c < chunks && active && i + k < len;
        v[c][k] = ok ? ToFloat<D>(x[start + i + k]) : 0.0f;
      }
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const uint32_t kk = AmaxKey(v[c][k]);
      key = kk > key ? kk : key;
    }
  }
  key = WarpMax(key, lanes);
  if (!active) return;
  float st = 1.0f;
  if constexpr (F == Format::kNVFP4) {
    st = tensor_scale[l.g == 1 ? 0 : (even ? start / (l.p * l.a) : row / l.p)];
  }
  const BlockScale s = ScaleFromKey<F>(key, st);
  if (lane == 0) {
    // Transposed: [blocks_per_row, rows] (the "M-major" 1x128 activation
    // scales cuBLASLt takes); the division only runs on that path.
    int64_t si = block_id;
    if (transposed_scales) {
      const int64_t r = block_id / blocks_per_row;
      si = (block_id - r * blocks_per_row) * l.Rows() + r;
    }
    StoreScale<F>(scales, si, s.stored);
  }

#pragma unroll
  for (int c = 0; c < kMaxChunks; ++c) {
    if (c >= chunks) break;
    const int64_t i = (static_cast<int64_t>(c) * lanes + lane) * kVec;
    if (i >= len) continue;
    uint8_t q[kVec];
    if (s.finite && s.divisor != 0.0f) {  // block-uniform branch
#pragma unroll
      for (int k = 0; k < kVec; ++k) q[k] = QuantizeFinite<F>(v[c][k], s);
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) q[k] = QuantizeElement<F>(v[c][k], s);
    }
    if constexpr (IsPacked(F) && !Packing<F>::kNibbles) {
      // Whole units per lane (the launcher makes kVec a multiple of kElems);
      // units start at multiples of kElems in the row (blocks are whole units).
      using P = Packing<F>;
      static_assert(kVec % P::kElems == 0, "a lane holds whole units");
      const int64_t in_row = even ? (start + i) % l.a : start - row * l.a + i;
      const int64_t r = even ? (start + i) / l.a : row;
      uint8_t* out = data + r * l.PackedA<F>() + in_row / P::kElems * P::kBytes;
#pragma unroll
      for (int u = 0; u < kVec / P::kElems; ++u) {
        const int64_t n = len - i - u * P::kElems;
        if (n > 0) P::Store(P::Word(q + u * P::kElems, n), out + u * P::kBytes, 1);
      }
    } else if constexpr (IsPacked(F)) {
      // kVec and i are even, so pairs never straddle lanes. With even blocks
      // a is even and the byte of element start + i is (start + i) / 2.
      uint8_t* out =
          even ? data + (start + i) / 2 : data + row * l.PackedA<F>() + (start - row * l.a + i) / 2;
      if (i + kVec <= len && kVec == 8) {
        uint32_t word = 0;
#pragma unroll
        for (int k = 0; k < 4; ++k)
          word |= static_cast<uint32_t>((q[2 * k] & 0xf) | (q[2 * k + 1] << 4)) << (8 * k);
        *reinterpret_cast<uint32_t*>(out) = word;
      } else {
#pragma unroll
        for (int k = 0; k < kVec; k += 2) {
          if (i + k < len) {
            const uint8_t hi = i + k + 1 < len ? q[k + 1] : 0;
            out[k / 2] = static_cast<uint8_t>((q[k] & 0xf) | (hi << 4));
          }
        }
      }
    } else {
      uint8_t* out = data + start + i;
      if (i + kVec <= len && kVec == 8) {
        uint2 word;
        word.x = q[0] | (q[1] << 8) | (q[2] << 16) | (static_cast<uint32_t>(q[3]) << 24);
        word.y = q[4] | (q[5] << 8) | (q[6] << 16) | (static_cast<uint32_t>(q[7]) << 24);
        *reinterpret_cast<uint2*>(out) = word;
      } else if (i + kVec <= len && kVec == 4) {
        *reinterpret_cast<uint32_t*>(out) =
            q[0] | (q[1] << 8) | (q[2] << 16) | (static_cast<uint32_t>(q[3]) << 24);
      } else {
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          if (i + k < len) out[k] = q[k];
        }
      }
    }
  }
}

// ---- Wide one-pass kernel ------------------------------------------------------
// The common case of the fused path: whole blocks (a % ba == 0), 16-byte
// aligned rows. A group of `lanes` lanes owns one block and each lane holds kV
// 16-byte vectors of it as raw bits (4 registers each), all loads issued
// before any arithmetic: kV * 16 bytes in flight per thread instead of 16,
// without holding kV * kVec floats (the register blow-up of an earlier try).
// Vector u of lane t is vector u * lanes + t of the block, so each load
// instruction of a group covers lanes * 16 contiguous bytes.

// Encodes and stores the kV vectors a lane holds (vector u at element
// start + (u * lanes + lane) * kVec).
template <Format F, InDtype D, int kV, bool kUnguarded>
__device__ __forceinline__ void EncodeStoreVectors(const uint4 (&raw)[kV], const BlockScale& s,
                                                   uint8_t* __restrict__ data, int64_t start,
                                                   int lanes, int lane) {
  constexpr int kVec = 16 / sizeof(typename InTraits<D>::Storage);
#pragma unroll
  for (int u = 0; u < kV; ++u) {
    EncodeStoreVector<F, D, kUnguarded>(raw[u], s, data,
                                        start + static_cast<int64_t>(u * lanes + lane) * kVec);
  }
}

template <Format F, InDtype D, int kV>
__global__ void __launch_bounds__(kThreads)
    WideQuantizeKernel(const typename InTraits<D>::Storage* __restrict__ x,
                       uint8_t* __restrict__ data, void* __restrict__ scales,
                       const float* __restrict__ tensor_scale, Layout l, int lanes_log2,
                       bool transposed_scales, float* __restrict__ ones_out) {
  using In = typename InTraits<D>::Storage;
  const int lanes = 1 << lanes_log2;
  const int64_t gtid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // Formats without a tensor scale still return one (1 per group): written
  // here rather than by a second launch (a [16, 8192] quantize is ~4 us, and
  // a launch costs about as much). There are at least g threads.
  if (ones_out != nullptr && gtid < l.g) ones_out[gtid] = 1.0f;
  const int64_t block_id = gtid >> lanes_log2;
  const int lane = static_cast<int>(gtid & (lanes - 1));
  // Lane groups never straddle warps (lanes divides 32), so padding threads of
  // the last warp only shuffle among themselves.
  const bool active = block_id < l.Rows() * l.BlocksA();
  const int64_t start = block_id * l.ba;  // whole blocks: no division
  uint4 raw[kV];
#pragma unroll
  for (int u = 0; u < kV; ++u) {
    raw[u] = active ? __ldg(reinterpret_cast<const uint4*>(x + start) + u * lanes + lane)
                    : make_uint4(0, 0, 0, 0);
  }
  const uint32_t key = WarpMax(VectorsKey<D, kV>(raw), lanes);
  if (!active) return;
  float st = 1.0f;
  if constexpr (F == Format::kNVFP4) {
    st = tensor_scale[l.g == 1 ? 0 : start / (l.p * l.a)];
  }
  const BlockScale s = ScaleFromKey<F>(key, st);
  if (lane == 0) {
    int64_t si = block_id;
    if (transposed_scales) {  // [blocks_per_row, rows]; see FusedQuantizeKernel
      const int64_t r = block_id / l.BlocksA();
      si = (block_id - r * l.BlocksA()) * l.Rows() + r;
    }
    StoreScale<F>(scales, si, s.stored);
  }
  // Uniform over the block (so over the lane group): no divergence. The two
  // loops are spelled out separately so that the hot one has no branches.
  const bool unguarded = UsesUnguardedEncode(key, s);
  if (unguarded) {
    EncodeStoreVectors<F, D, kV, true>(raw, s, data, start, lanes, lane);
  } else {
    EncodeStoreVectors<F, D, kV, false>(raw, s, data, start, lanes, lane);
  }
}

// ---- Two-pass path ------------------------------------------------------------
// Partial max keys: CTA (block, chunk) reduces up to kReduceChunk elements of
// one scale block (or of one NVFP4 group when kGroup).
template <InDtype D, bool kFiniteOnly>
__global__ void __launch_bounds__(kThreads)
    PartialKeysKernel(const typename InTraits<D>::Storage* __restrict__ x, Layout l, int64_t chunks,
                      uint32_t* __restrict__ partial, bool whole_group) {
  const int64_t item = blockIdx.x;  // scale block (or group) * chunks + chunk
  const int64_t blk = item / chunks;
  const int64_t chunk = item - blk * chunks;
  int64_t row0, i0, j0, h, w;
  if (whole_group) {  // blk is a group: its elements are contiguous
    row0 = 0;
    i0 = blk * l.p * l.a * l.b;
    j0 = 0;
    h = 1;
    w = l.p * l.a * l.b;
  } else {
    const int64_t nb = l.BlocksB(), na = l.BlocksA();
    const int64_t bj = blk % nb;
    const int64_t bi = (blk / nb) % na;
    row0 = blk / (nb * na);
    i0 = bi * l.ba;
    j0 = bj * l.bb;
    h = (i0 + l.ba < l.a ? i0 + l.ba : l.a) - i0;
    w = (j0 + l.bb < l.b ? j0 + l.bb : l.b) - j0;
  }
  const int64_t n = h * w;
  const int64_t begin = chunk * kReduceChunk;
  const int64_t end = begin + kReduceChunk < n ? begin + kReduceChunk : n;
  using In = typename InTraits<D>::Storage;
  constexpr int kVec = 16 / sizeof(In);
  uint32_t key = 0;
  auto take = [&](float v) {
    const uint32_t k = kFiniteOnly ? FiniteAmaxKey(v) : AmaxKey(v);
    key = k > key ? k : key;
  };
  // A group, or a block of whole B-rows (per-tensor scaling seen as rows),
  // is one contiguous run of elements from `base`.
  const bool contiguous = whole_group || w == l.b;
  const int64_t base = whole_group ? i0 : l.Element(row0, i0, j0);
  const In* first = x + base + begin;
  if (contiguous && (reinterpret_cast<uintptr_t>(first) & 15u) == 0) {
    // Contiguous run: 16-byte loads, no index arithmetic.
    // Four vectors per thread per step, loads first (bytes in flight).
    const int64_t n_vec = (end - begin) / kVec;
    const uint4* vecs = reinterpret_cast<const uint4*>(first);
    int64_t t = threadIdx.x;
    for (; t + 3 * blockDim.x < n_vec; t += 4 * blockDim.x) {
      uint4 raw[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) raw[u] = __ldg(vecs + t + u * blockDim.x);
      // Packed maxima (two 16-bit elements per instruction); elements one by
      // one only when the vectors hold a NaN/Inf that the finite amax skips.
      const uint32_t k4 = VectorsKey<D, 4>(raw);
      if (!kFiniteOnly || k4 != kNonFiniteKey) {
        key = k4 > key ? k4 : key;
      } else {
#pragma unroll
        for (int u = 0; u < 4; ++u) {
#pragma unroll
          for (int k = 0; k < kVec; ++k) take(VectorElement<D>(raw[u], k));
        }
      }
    }
    for (; t < n_vec; t += blockDim.x) {
      const uint4 raw = vecs[t];
#pragma unroll
      for (int k = 0; k < kVec; ++k) take(VectorElement<D>(raw, k));
    }
    for (int64_t t = begin + n_vec * kVec + threadIdx.x; t < end; t += blockDim.x) {
      take(ToFloat<D>(x[base + t]));
    }
  } else if (contiguous) {
    for (int64_t t = begin + threadIdx.x; t < end; t += blockDim.x) take(ToFloat<D>(x[base + t]));
  } else {
    for (int64_t t = begin + threadIdx.x; t < end; t += blockDim.x) {
      const int64_t r = t / w, c = t - r * w;
      take(ToFloat<D>(x[l.Element(row0, i0 + r, j0 + c)]));
    }
  }
  key = CtaMax(key);
  if (threadIdx.x == 0) partial[item] = key;
}

// One warp per scale block: max of its chunk partials -> key, stored scale.
template <Format F>
__global__ void __launch_bounds__(kThreads)
    BlockKeysKernel(const uint32_t* __restrict__ partial, int64_t chunks, Layout l,
                    const float* __restrict__ tensor_scale, uint32_t* __restrict__ keys,
                    void* __restrict__ scales) {
  const int64_t blk = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t nblocks = l.NumScales();
  uint32_t key = 0;
  if (blk < nblocks) {
    for (int64_t c = lane; c < chunks; c += 32) {
      const uint32_t k = partial[blk * chunks + c];
      key = k > key ? k : key;
    }
  }
  key = WarpMax(key, 32);
  if (blk < nblocks && lane == 0) {
    keys[blk] = key;
    const int64_t row = blk / (l.BlocksA() * l.BlocksB());
    const float st = F == Format::kNVFP4 ? tensor_scale[row / l.p] : 1.0f;
    StoreScale<F>(scales, blk, ScaleFromKey<F>(key, st).stored);
  }
}

// One CTA per group: tensor scale from the finite-amax partials (NVFP4), or 1
// for every other format.
static __global__ void __launch_bounds__(kThreads)
    TensorScaleKernel(const uint32_t* __restrict__ partial, int64_t chunks, bool nvfp4,
                      float* __restrict__ tensor_scale) {
  const int64_t g = blockIdx.x;
  if (!nvfp4) {
    if (threadIdx.x == 0) tensor_scale[g] = 1.0f;
    return;
  }
  // Eight independent loads per step: one load per iteration waited out its
  // latency each time (8192 partials of a 8192^2 tensor took 14 us).
  const uint32_t* p = partial + g * chunks;
  uint32_t key = 0;
  int64_t c = threadIdx.x;
  for (; c + 7 * blockDim.x < chunks; c += 8 * blockDim.x) {
    uint32_t k[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) k[u] = p[c + u * blockDim.x];
#pragma unroll
    for (int u = 0; u < 8; ++u) key = max(key, k[u]);
  }
  for (; c < chunks; c += blockDim.x) key = max(key, p[c]);
  key = CtaMax(key);
  if (threadIdx.x == 0) tensor_scale[g] = NVFP4TensorScale(BitsFloat(key));
}

// Encode: one thread per element (per packed unit for the packed formats:
// layout.h's Packing), the block's scale recomputed from its key.
template <Format F, InDtype D>
__global__ void __launch_bounds__(kThreads)
    EncodeKernel(const typename InTraits<D>::Storage* __restrict__ x, Layout l,
                 const uint32_t* __restrict__ keys, const float* __restrict__ tensor_scale,
                 uint8_t* __restrict__ data, int64_t items) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= items) return;
  if constexpr (!IsPacked(F)) {
    if (l.b == 1 && l.ba >= l.a) {  // one block per row (per-tensor seen as rows): no block math
      const int64_t row = l.Rows() == 1 ? 0 : t / l.a;
      const float st = F == Format::kNVFP4 ? tensor_scale[row / l.p] : 1.0f;
      data[t] = QuantizeElement<F>(ToFloat<D>(x[t]), ScaleFromKey<F>(keys[row], st));
      return;
    }
  }
  // items enumerate packed units or elements (FP8) in [G*P, A', B'] order,
  // A' (or B' when pack_b) counting units.
  using P = Packing<F>;
  const int64_t pa = IsPacked(F) && !l.pack_b ? (l.a + P::kElems - 1) / P::kElems : l.a;
  const int64_t pb = IsPacked(F) && l.pack_b ? (l.b + P::kElems - 1) / P::kElems : l.b;
  const int64_t jb = t % pb;
  const int64_t ia = (t / pb) % pa;
  const int64_t row = t / (pa * pb);
  const float st = F == Format::kNVFP4 ? tensor_scale[row / l.p] : 1.0f;
  auto code_at = [&](int64_t i, int64_t j) -> uint8_t {
    const uint32_t key = keys[l.Scale(row, i / l.ba, j / l.bb)];
    return QuantizeElement<F>(ToFloat<D>(x[l.Element(row, i, j)]), ScaleFromKey<F>(key, st));
  };
  if constexpr (IsPacked(F)) {
    const int64_t i = l.pack_b ? ia : P::kElems * ia;
    const int64_t j = l.pack_b ? P::kElems * jb : jb;
    uint8_t codes[P::kElems];
    int64_t n = 0;
#pragma unroll
    for (int e = 0; e < P::kElems; ++e) {
      const int64_t ie = l.pack_b ? i : i + e;
      const int64_t je = l.pack_b ? j + e : j;
      if (ie < l.a && je < l.b) {
        codes[e] = code_at(ie, je);
        n = e + 1;
      }
    }
    P::Store(P::Word(codes, n), data + l.UnitByte<F>(row, i, j), l.UnitStride());
  } else {
    data[t] = code_at(ia, jb);
  }
}

// ---- Dequantize -----------------------------------------------------------------
constexpr int kDequantUnroll = 4;

// Stores kVec dequantized values (16 bytes) with canonical NaNs.
template <InDtype D, int kVec>
__device__ __forceinline__ void StoreVector(void* out, int64_t e0, const float (&v)[kVec]) {
  if constexpr (D == InDtype::kF32) {
    const float4 o = make_float4(CanonicalizeNaN(v[0]), CanonicalizeNaN(v[1]),
                                 CanonicalizeNaN(v[2]), CanonicalizeNaN(v[3]));
    *reinterpret_cast<float4*>(static_cast<float*>(out) + e0) = o;
  } else {
    // Hardware RNE conversion of pairs (cvt.rn.{bf16,f16}x2.f32); its NaN is
    // 0x7FFF, so NaNs are replaced by the canonical quiet NaN afterwards.
    constexpr uint32_t kNaN = D == InDtype::kBF16 ? 0x7fc0u : 0x7e00u;
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float a = v[2 * k], b = v[2 * k + 1];
      uint32_t lo, hi;
      if constexpr (D == InDtype::kBF16) {
        const __nv_bfloat162 p = __float22bfloat162_rn(make_float2(a, b));
        lo = __bfloat16_as_ushort(p.x);
        hi = __bfloat16_as_ushort(p.y);
      } else {
        const __half2 p = __float22half2_rn(make_float2(a, b));
        lo = __half_as_ushort(p.x);
        hi = __half_as_ushort(p.y);
      }
      lo = a != a ? kNaN : lo;
      hi = b != b ? kNaN : hi;
      w[k] = lo | (hi << 16);
    }
    *reinterpret_cast<uint4*>(static_cast<uint16_t*>(out) + e0) =
        make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// kVec output elements per thread along A when the fast layout applies
// (B == 1, aligned), else 1 element per thread anywhere.
template <Format F, InDtype D, int kVec>
__global__ void __launch_bounds__(kThreads)
    DequantizeKernel(const uint8_t* __restrict__ data, const void* __restrict__ scales,
                     const float* __restrict__ tensor_scale, void* __restrict__ out, Layout l,
                     int64_t items, int ba_shift) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= items) return;
  if constexpr (kVec > 1) {
    // Rows of A contiguous elements; a and ba are multiples of kVec. Each
    // thread handles kUnroll vectors t0 + u * nthreads (coalesced per u) and
    // issues all their loads before any arithmetic, for more bytes in flight.
    static_assert(!IsPacked(F) || Packing<F>::kNibbles, "vector dequantize reads nibbles");
    using Codes = std::conditional_t<IsPacked(F), std::conditional_t<kVec == 8, uint32_t, uint16_t>,
                                     std::conditional_t<kVec == 8, uint2, uint32_t>>;
    const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
    Codes raw[kDequantUnroll];
    uint32_t stored[kDequantUnroll];
#pragma unroll
    for (int u = 0; u < kDequantUnroll; ++u) {
      const int64_t tu = t + u * nthreads;
      if (tu >= items) continue;
      const int64_t e0 = tu * kVec;
      raw[u] = *reinterpret_cast<const Codes*>(data + (IsPacked(F) ? e0 / 2 : e0));
      int64_t blk;
      if (ba_shift >= 0) {
        blk = e0 >> ba_shift;
      } else {
        const int64_t row = e0 / l.a;
        blk = l.Scale(row, (e0 - row * l.a) / l.ba, 0);
      }
      stored[u] = LoadScale<F>(scales, blk);
    }
#pragma unroll
    for (int u = 0; u < kDequantUnroll; ++u) {
      const int64_t tu = t + u * nthreads;
      if (tu >= items) continue;
      const int64_t e0 = tu * kVec;
      const float ts = l.g == 1 ? tensor_scale[0] : tensor_scale[e0 / (l.p * l.a)];
      const float scale = EffectiveScale<F>(stored[u], ts);
      const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&raw[u]);
      float v[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        uint8_t c;
        if constexpr (IsPacked(F)) {
          c = (k & 1) ? (bytes[k / 2] >> 4) : (bytes[k / 2] & 0xf);
        } else {
          c = bytes[k];
        }
        v[k] = DequantizeElement<F>(c, scale);
      }
      StoreVector<D, kVec>(out, e0, v);
    }
  } else {
    const int64_t j = t % l.b;
    const int64_t i = (t / l.b) % l.a;
    const int64_t row = t / (l.a * l.b);
    const float scale = EffectiveScale<F>(LoadScale<F>(scales, l.Scale(row, i / l.ba, j / l.bb)),
                                          tensor_scale[row / l.p]);
    uint8_t code;
    if constexpr (IsPacked(F)) {
      code = l.PackedCode<F>(data, row, i, j);
    } else {
      code = data[t];
    }
    StoreFromFloat<D>(out, t, DequantizeElement<F>(code, scale));
  }
}

// ---- FP4 -> FP8 E4M3 1x128 in one pass (fp4_to_fp8) ---------------------------
// quantize(dequantize(w4, float32), FP8 E4M3, per block 128 along K) for an
// [n, k] FP4/NVFP4/MXFP4 tensor blocked along K (block bs >= 16), k % 16 == 0,
// without the float32 intermediate: 8 lanes per 128-block of a row, lane j
// holds elements 16 j .. 16 j + 15 (one FP4 scale block), widens them exactly
// as DequantizeKernel does (same EffectiveScale / DequantizeElement) and
// encodes them exactly as the quantize kernels do (same block key,
// ScaleFromKey, unguarded-or-guarded pair encoders).
// Each 8-lane group converts kFp4ToFp8Blocks consecutive blocks (of the
// flattened [n, ceil(k/128)] block grid) and issues all their loads first.
constexpr int kFp4ToFp8Blocks = 4;

// Nibble-wise max of two words of eight 3-bit values (bit 3 of every nibble
// clear): 8 + a - b per nibble never borrows, and its bit 3 says a >= b.
__device__ __forceinline__ uint32_t NibbleMax(uint32_t a, uint32_t b) {
  const uint32_t ge = ((a | 0x88888888u) - b) & 0x88888888u;
  const uint32_t mask = ge - (ge >> 3);  // 0x7 in the nibbles where a >= b
  return (a & mask) | (b & ~mask);
}

// The largest E2M1 magnitude (code & 7) among the 16 codes of x and y.
__device__ __forceinline__ uint32_t MaxE2M1Magnitude(uint32_t x, uint32_t y) {
  uint32_t r = NibbleMax(x & 0x77777777u, y & 0x77777777u);
  r = NibbleMax(r, r >> 16);
  r = NibbleMax(r, r >> 8);
  r = NibbleMax(r, r >> 4);
  return r & 7u;
}

// Eight E2M1 codes (code i in nibble i of w) -> eight E4M3 bytes (lo: codes
// 0-3, hi: 4-7), given lut_lo/lut_hi = the bytes of magnitudes 0-3 / 4-7. A
// byte permute indexed by the magnitudes picks four bytes at once; the signs
// (bit 3 of each nibble) are routed to bit 7 of their bytes by a second
// permute of w and w << 4 (where even codes' signs sit at bit 7 of byte i/2).
__device__ __forceinline__ void E2M1WordToCodes(uint32_t w, uint32_t lut_lo, uint32_t lut_hi,
                                                uint32_t* lo, uint32_t* hi) {
  const uint32_t mags = w & 0x77777777u;
  const uint32_t signs = w & 0x88888888u, shifted = signs << 4;
  *lo = __byte_perm(lut_lo, lut_hi, mags) ^ (__byte_perm(signs, shifted, 0x1504) & 0x80808080u);
  *hi =
      __byte_perm(lut_lo, lut_hi, mags >> 16) ^ (__byte_perm(signs, shifted, 0x3726) & 0x80808080u);
}

template <Format WF>
__global__ void __launch_bounds__(kThreads)
    Fp4ToFp8Kernel(const uint8_t* __restrict__ data, const void* __restrict__ scales,
                   const float* __restrict__ tensor_scale, uint32_t n, uint32_t k, int bs_shift,
                   uint8_t* __restrict__ out, uint32_t* __restrict__ out_scales) {
  static_assert(Packing<WF>::kNibbles, "4-bit weights");
  constexpr Format kOut = Format::kFP8E4M3;
  constexpr int kB = kFp4ToFp8Blocks;
  // 32-bit indices (the launcher checks n * ceil(k / 128) < 2^31): one
  // division per group, then the blocks are stepped through (they may cross
  // rows when k < 128 kB).
  const uint32_t blocks_per_row = (k + 127) / 128;
  const uint32_t scale_cols = ((k - 1) >> bs_shift) + 1;
  const uint32_t group = (blockIdx.x * blockDim.x + threadIdx.x) / 8;
  const int j = threadIdx.x & 7;
  const float ts = tensor_scale[0];
  uint32_t r = group * kB / blocks_per_row;
  uint32_t b = group * kB - r * blocks_per_row;
  uint32_t row[kB], e0[kB];
  bool mine[kB];
  uint2 raw[kB];
  uint32_t stored[kB];
#pragma unroll
  for (int u = 0; u < kB; ++u) {
    row[u] = r;
    e0[u] = b * 128 + j * 16;
    mine[u] = r < n && e0[u] < k;
    if (mine[u]) {
      raw[u] = *reinterpret_cast<const uint2*>(data + static_cast<size_t>(r) * (k / 2) + e0[u] / 2);
      stored[u] = LoadScale<WF>(scales, static_cast<size_t>(r) * scale_cols + (e0[u] >> bs_shift));
    }
    if (++b == blocks_per_row) {
      b = 0;
      ++r;
    }
  }
#pragma unroll
  for (int u = 0; u < kB; ++u) {
    uint32_t key = 0;
    float scale = 0.0f;
    if (mine[u]) {
      scale = EffectiveScale<WF>(stored[u], ts);
      // |code * scale| (one rounding) grows with the code's magnitude, so the
      // block amax is the value of the largest magnitude present. With a
      // finite scale no value is NaN (an overflow to Inf shows in amax); with
      // a non-finite one every value is +-Inf or NaN, and the block's codes
      // are all the NaN code.
      const uint32_t mag = MaxE2M1Magnitude(raw[u].x, raw[u].y);
      const float amax = fabsf(DequantizeElement<WF>(static_cast<uint8_t>(mag), scale));
      key = isfinite(scale) ? AmaxKey(amax) : kNonFiniteKey;
    }
    key = WarpMax(key, 8);  // every lane of the warp takes part
    if (!mine[u]) continue;
    const BlockScale s = ScaleFromKey<kOut>(key, 1.0f);
    const bool unguarded = UsesUnguardedEncode(key, s);
    uint32_t w[4];
    if (unguarded) {
      // Every element is +-v_m, v_m = DequantizeElement(m) for its magnitude
      // m: encode the eight v_m once, then look codes up four at a time. The
      // encoder is odd (RN steps and a saturating RNE conversion:
      // encode(-x) = encode(x) ^ 0x80, zeros included), so a negative code
      // takes its magnitude's byte with the sign bit flipped.
      float vm[8];
#pragma unroll
      for (int m = 0; m < 8; ++m) vm[m] = DequantizeElement<WF>(static_cast<uint8_t>(m), scale);
      const uint32_t lut_lo = EncodePairUnguarded<kOut>(vm[0], vm[1], s) |
                              (EncodePairUnguarded<kOut>(vm[2], vm[3], s) << 16);
      const uint32_t lut_hi = EncodePairUnguarded<kOut>(vm[4], vm[5], s) |
                              (EncodePairUnguarded<kOut>(vm[6], vm[7], s) << 16);
      E2M1WordToCodes(raw[u].x, lut_lo, lut_hi, &w[0], &w[1]);
      E2M1WordToCodes(raw[u].y, lut_lo, lut_hi, &w[2], &w[3]);
    } else {
      float v[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const uint32_t word = i < 8 ? raw[u].x : raw[u].y;
        v[i] = DequantizeElement<WF>(static_cast<uint8_t>((word >> (4 * (i % 8))) & 0xfu), scale);
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        w[q] = EncodePairGuarded<kOut>(v[4 * q], v[4 * q + 1], s) |
               (EncodePairGuarded<kOut>(v[4 * q + 2], v[4 * q + 3], s) << 16);
      }
    }
    *reinterpret_cast<uint4*>(out + static_cast<size_t>(row[u]) * k + e0[u]) =
        make_uint4(w[0], w[1], w[2], w[3]);
    if (j == 0) out_scales[static_cast<size_t>(row[u]) * blocks_per_row + e0[u] / 128] = s.stored;
  }
}

}  // namespace jax_bq::cuda

#endif  // JAX_BQ_QUANTIZE_KERNELS_CUH_
