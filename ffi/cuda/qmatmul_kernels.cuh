// Kernels around the qmatmul GEMM: per-token activation quantization in one
// launch, scale relayouts for cuBLASLt, and the weight-only W8A16 kernel.
#ifndef JAX_BQ_QMATMUL_KERNELS_CUH_
#define JAX_BQ_QMATMUL_KERNELS_CUH_

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "launch.cuh"
#include "quantize_kernels.cuh"

namespace jax_bq::cuda {

// Encodes one 16-byte vector of inputs with scale s and stores its kVec codes
// (8 or 4 bytes) at q[t * kVec]: the inner step of the row and tensor kernels.
// kUnguarded: the block qualifies for the branch-free quotient (see
// QuotientUnguarded; decided once per row or tensor by Unguarded()).
template <Format F, InDtype D, bool kUnguarded>
__device__ __forceinline__ void EncodeVector(const uint4& raw, const BlockScale& s, uint8_t* q,
                                             int64_t t) {
  constexpr int kVec = 16 / sizeof(typename InTraits<D>::Storage);
  uint32_t pairs[kVec / 2];
#pragma unroll
  for (int k = 0; k < kVec; k += 2) {
    const float a = VectorElement<D>(raw, k), b = VectorElement<D>(raw, k + 1);
    pairs[k / 2] = kUnguarded ? EncodePairUnguarded<F>(a, b, s) : EncodePairGuarded<F>(a, b, s);
  }
  if constexpr (kVec == 8) {
    reinterpret_cast<uint2*>(q)[t] =
        make_uint2(pairs[0] | (pairs[1] << 16), pairs[2] | (pairs[3] << 16));
  } else {
    reinterpret_cast<uint32_t*>(q)[t] = pairs[0] | (pairs[1] << 16);
  }
}

// Whether a row/tensor with amax key `key` and scale s takes the unguarded encode.
__device__ __forceinline__ bool Unguarded(uint32_t key, const BlockScale& s) {
  return s.finite && s.inverse != 0.0f && key >= FloatBits(kUnguardedMinAmax);
}

// ---- Per-token (per-row) dynamic quantization: one launch -----------------------
// One CTA per row of x[M, K]: pass 1 reduces the row's amax key, pass 2 encodes
// (the row is re-read from L1/L2, so HBM sees it once). Bit-identical to
// quantize(x, F, granularity=per_channel, axis=-1): same ComputeBlockScale and
// QuantizeElement. Scales: one float32 per row.
template <Format F, InDtype D>
__global__ void __launch_bounds__(kThreads)
    RowQuantizeKernel(const typename InTraits<D>::Storage* __restrict__ x, int64_t k,
                      uint8_t* __restrict__ q, float* __restrict__ scales) {
  static_assert(HasF32Scale(F) && !IsPacked(F), "per-token activations are FP8 with f32 scales");
  using In = typename InTraits<D>::Storage;
  constexpr int kVec = 16 / sizeof(In);
  const int64_t row = blockIdx.x;
  const In* xr = x + row * k;
  uint8_t* qr = q + row * k;
  const bool vec = k % kVec == 0 && (reinterpret_cast<uintptr_t>(x) & 15u) == 0;
  const int64_t nvec = vec ? k / kVec : 0;
  uint32_t key = 0;
  for (int64_t t = threadIdx.x; t < nvec; t += blockDim.x) {
    const uint4 raw[1] = {reinterpret_cast<const uint4*>(xr)[t]};
    key = max(key, VectorsKey<D, 1>(raw));
  }
  for (int64_t t = nvec * kVec + threadIdx.x; t < k; t += blockDim.x) {
    key = max(key, AmaxKey(ToFloat<D>(xr[t])));
  }
  __shared__ uint32_t row_key;
  key = CtaMax(key);
  if (threadIdx.x == 0) row_key = key;
  __syncthreads();
  const BlockScale s = ScaleFromKey<F>(row_key, 1.0f);
  if (threadIdx.x == 0) scales[row] = BitsFloat(s.stored);
  const uint4* xv = reinterpret_cast<const uint4*>(xr);
  if (Unguarded(row_key, s)) {
    for (int64_t t = threadIdx.x; t < nvec; t += blockDim.x)
      EncodeVector<F, D, true>(xv[t], s, qr, t);
  } else {
    for (int64_t t = threadIdx.x; t < nvec; t += blockDim.x)
      EncodeVector<F, D, false>(xv[t], s, qr, t);
  }
  for (int64_t t = nvec * kVec + threadIdx.x; t < k; t += blockDim.x) {
    qr[t] = QuantizeElement<F>(ToFloat<D>(xr[t]), s);
  }
}

// Rows of up to 32 * kMaxRowVecs 16-byte vectors (K <= 2048 bf16, 1024 f32):
// one warp per row, the row held in registers, so x is read once and no CTA
// barrier is needed; same codes and scales as RowQuantizeKernel.
constexpr int kMaxRowVecs = 8;
constexpr int kRowWarps = 4;  // rows per CTA

template <Format F, InDtype D, int kV>
__global__ void __launch_bounds__(32 * kRowWarps)
    RowQuantizeWarpKernel(const typename InTraits<D>::Storage* __restrict__ x, int64_t m, int64_t k,
                          uint8_t* __restrict__ q, float* __restrict__ scales) {
  using In = typename InTraits<D>::Storage;
  constexpr int kVec = 16 / sizeof(In);
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (row >= m) return;  // whole warps only
  const uint4* xr = reinterpret_cast<const uint4*>(x + row * k);
  const int64_t nvec = k / kVec;  // k % kVec == 0 and x 16-byte aligned (launcher checks)
  uint4 v[kV];
#pragma unroll
  for (int i = 0; i < kV; ++i) {
    const int64_t t = lane + 32 * i;
    v[i] = t < nvec ? xr[t] : make_uint4(0, 0, 0, 0);  // zeros leave the max alone
  }
  const uint32_t key = WarpMax(VectorsKey<D, kV>(v), 32);
  const BlockScale s = ScaleFromKey<F>(key, 1.0f);
  if (lane == 0) scales[row] = BitsFloat(s.stored);
  uint8_t* qr = q + row * k;
  auto encode = [&]<bool kUnguarded>() {
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const int64_t t = lane + 32 * i;
      if (t < nvec) EncodeVector<F, D, kUnguarded>(v[i], s, qr, t);
    }
  };
  if (Unguarded(key, s)) {
    encode.template operator()<true>();
  } else {
    encode.template operator()<false>();
  }
}

// Per-token quantization of x[M, K]: the warp-per-row kernel where the row fits
// in registers, else one CTA per row.
template <Format F, InDtype D>
Status LaunchRowQuantize(cudaStream_t stream, const typename InTraits<D>::Storage* x, int64_t m,
                         int64_t k, uint8_t* q, float* scales) {
  using In = typename InTraits<D>::Storage;
  constexpr int kVec = 16 / sizeof(In);
  const bool vec = k % kVec == 0 && (reinterpret_cast<uintptr_t>(x) & 15u) == 0;
  const int64_t nvec = k / kVec;
  if (m == 0) return Status();
  if (vec && nvec <= 32 * kMaxRowVecs) {
    const unsigned grid = static_cast<unsigned>((m + kRowWarps - 1) / kRowWarps);
    auto go = [&]<int kV>() {
      RowQuantizeWarpKernel<F, D, kV><<<grid, 32 * kRowWarps, 0, stream>>>(x, m, k, q, scales);
    };
    if (nvec <= 32 * 2) {
      go.template operator()<2>();
    } else if (nvec <= 32 * 4) {
      go.template operator()<4>();
    } else {
      go.template operator()<kMaxRowVecs>();
    }
    return LastCudaError("RowQuantizeWarpKernel");
  }
  RowQuantizeKernel<F, D><<<static_cast<unsigned>(m), kThreads, 0, stream>>>(x, k, q, scales);
  return LastCudaError("RowQuantizeKernel");
}

// ---- Per-tensor dynamic quantization: one cooperative launch --------------------------
// Phase 1 reduces each CTA's amax key (grid-stride over x) into cta_keys;
// after a grid-wide barrier every CTA reduces the same cta_keys (a max, so
// the result is exact and order-free) and encodes its grid-stride share.
// Bit-identical to quantize(x, F, granularity=per_tensor). Must be launched
// with cudaLaunchCooperativeKernel and at most kMaxTensorQuantCtas CTAs.
constexpr int kMaxTensorQuantCtas = 2048;

template <Format F, InDtype D>
__global__ void __launch_bounds__(kThreads)
    TensorQuantizeKernel(const typename InTraits<D>::Storage* __restrict__ x, int64_t n, bool vec,
                         uint8_t* __restrict__ q, float* __restrict__ scale,
                         uint32_t* __restrict__ cta_keys) {
  static_assert(HasF32Scale(F) && !IsPacked(F), "per-tensor activations are FP8");
  using In = typename InTraits<D>::Storage;
  constexpr int kVec = 16 / sizeof(In);
  namespace cg = cooperative_groups;
  cg::grid_group grid = cg::this_grid();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = vec ? n / kVec : 0;
  uint32_t key = 0;
  for (int64_t t = first; t < nvec; t += stride) {
    const uint4 raw[1] = {reinterpret_cast<const uint4*>(x)[t]};
    key = max(key, VectorsKey<D, 1>(raw));
  }
  for (int64_t t = nvec * kVec + first; t < n; t += stride) {
    key = max(key, AmaxKey(ToFloat<D>(x[t])));
  }
  key = CtaMax(key);
  if (threadIdx.x == 0) cta_keys[blockIdx.x] = key;
  grid.sync();
  key = 0;
  for (unsigned i = threadIdx.x; i < gridDim.x; i += blockDim.x) {
    const uint32_t kk = cta_keys[i];
    key = kk > key ? kk : key;
  }
  __syncthreads();  // CtaMax's shared scratch is reused
  key = CtaMax(key);
  __shared__ uint32_t tensor_key;
  if (threadIdx.x == 0) tensor_key = key;
  __syncthreads();
  const BlockScale s = ScaleFromKey<F>(tensor_key, 1.0f);
  if (blockIdx.x == 0 && threadIdx.x == 0) scale[0] = BitsFloat(s.stored);
  const uint4* xv = reinterpret_cast<const uint4*>(x);
  if (Unguarded(tensor_key, s)) {
    for (int64_t t = first; t < nvec; t += stride) EncodeVector<F, D, true>(xv[t], s, q, t);
  } else {
    for (int64_t t = first; t < nvec; t += stride) EncodeVector<F, D, false>(xv[t], s, q, t);
  }
  for (int64_t t = nvec * kVec + first; t < n; t += stride) {
    q[t] = QuantizeElement<F>(ToFloat<D>(x[t]), s);
  }
}

// Grid of the cooperative per-tensor quantize: every CTA resident at once.
template <Format F, InDtype D>
inline Status LaunchTensorQuantize(cudaStream_t stream, const typename InTraits<D>::Storage* x,
                                   int64_t n, uint8_t* q, float* scale, uint32_t* cta_keys) {
  // Resident CTAs per device, queried once per kernel instantiation and device.
  static std::atomic<int> resident[64];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) {
    return LastCudaError("cudaGetDevice");
  }
  int slots = resident[device].load(std::memory_order_relaxed);
  if (slots == 0) {
    int sms = 0, per_sm = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, TensorQuantizeKernel<F, D>, kThreads,
                                                      0) != cudaSuccess) {
      return LastCudaError("cooperative launch setup");
    }
    slots = sms * per_sm;
    resident[device].store(slots, std::memory_order_relaxed);
  }
  constexpr int kVec = 16 / sizeof(typename InTraits<D>::Storage);
  bool vec = n % kVec == 0 && Aligned16(x) && Aligned16(q);
  const int64_t want = CeilDiv(vec ? n / kVec : n, kThreads);
  int64_t grid = slots;
  grid = grid < want ? grid : want;
  grid = grid < kMaxTensorQuantCtas ? grid : kMaxTensorQuantCtas;
  grid = grid < 1 ? 1 : grid;
  void* args[] = {&x, &n, &vec, &q, &scale, &cta_keys};
  const cudaError_t e = cudaLaunchCooperativeKernel(
      reinterpret_cast<const void*>(TensorQuantizeKernel<F, D>), dim3(static_cast<unsigned>(grid)),
      dim3(kThreads), args, 0, stream);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return Status(std::string("jax_bq: cooperative launch failed: ") + cudaGetErrorString(e));
  }
  return LastCudaError("TensorQuantizeKernel");
}

// ---- Scale relayouts ----------------------------------------------------------------
// out[c * out_ld + r] = in[r * cols + c] for r < rows, c < cols (transpose),
// or out[r * out_ld + c] = in[r * cols + c] (row pitch change) when !transpose.
static __global__ void __launch_bounds__(kThreads)
    RelayoutScalesKernel(const float* __restrict__ in, int64_t rows, int64_t cols, bool transpose,
                         int64_t out_ld, float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * cols) return;
  const int64_t r = i / cols, c = i - r * cols;
  out[transpose ? c * out_ld + r : r * out_ld + c] = in[i];
}

// out[i] = *value for i < n (a per-tensor scale as an OUTER_VEC vector).
static __global__ void __launch_bounds__(kThreads)
    BroadcastScaleKernel(const float* __restrict__ value, int64_t n, float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = value[0];
}

// ---- Weight-only W8A16: out[M, N] = x[M, K] . dequant(w[N, K])^T -------------------------
// FP8 weights are widened to 16 bits in registers (E4M3 and E5M2 values are
// exact in bf16 and f16) and multiplied on the tensor cores with
// mma.sync.m16n8k16 (f32 accumulation); each weight byte is read once.
//
// Work split: a CTA owns 16 weight rows (n) and all M; its kWarps warps split
// K in units of 128 (warp w takes units w, w + kWarps, ...). For each unit the
// warp computes a 16 x 8*kMTiles partial product in f32, multiplies it by the
// weight scale of (row, unit) and adds it to its accumulator; the warps'
// accumulators are then summed in shared memory in warp order, so results
// are deterministic. A weight scale block must cover whole units along K
// (block_k a multiple of 128, or the whole row).
//
// K permutation: an MMA sums over its 16 k-slots in any order, so slot j of
// thread t (t = lane % 4) is mapped to physical k = 16 t + (j < 8 ? ...) such
// that each thread loads 16 contiguous weight bytes per row and 32 contiguous
// activation bytes per token for a 64-wide half unit; A and B use the same map.
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
        static_cast<float*>(out)[o] = v;
      } else if (out_kind == 1) {
        static_cast<uint16_t*>(out)[o] = FloatToBF16Bits(CanonicalizeNaN(v));
      } else {
        static_cast<uint16_t*>(out)[o] = FloatToF16Bits(CanonicalizeNaN(v));
      }
    }
  }
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

#endif  // JAX_BQ_QMATMUL_KERNELS_CUH_
