// Kernel launch sequences shared by the FFI handlers (cuda_module.cu) and the
// standalone compute-sanitizer driver (tests/cuda/sanitize_driver.cu). No XLA
// types here: failures come back as a Status with a message.
#ifndef JAX_BQ_LAUNCH_CUH_
#define JAX_BQ_LAUNCH_CUH_

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "jax_bq/calibrate_math.h"
#include "quantize_kernels.cuh"

namespace jax_bq::cuda {

struct Status {
  Status() = default;
  explicit Status(std::string m) : message(std::move(m)), failed(true) {}
  bool ok() const { return !failed; }
  std::string message;
  bool failed = false;
};

}  // namespace jax_bq::cuda

// DispatchFormat's result for an id outside the format registry.
template <>
struct jax_bq::UnknownFormat<jax_bq::cuda::Status> {
  static cuda::Status Make(int32_t id) {
    return cuda::Status("jax_bq: unknown format id " + std::to_string(id));
  }
};

namespace jax_bq::cuda {

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline Status LastCudaError(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return Status();
  return Status(std::string("jax_bq: CUDA error after ") + what + ": " + cudaGetErrorString(err));
}

inline bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline unsigned Grid(int64_t threads) { return static_cast<unsigned>(CeilDiv(threads, kThreads)); }

constexpr int64_t kMaxGrid = 0x7fffffff;

// NVFP4's first pass: the finite amax of each of the l.g groups, reduced into
// partial keys in `workspace` (l.g * chunks words, returned) and then into
// `tensor_scale[g]`; -1 when the grid would be too large.
template <InDtype D>
int64_t LaunchNvfp4TensorScale(cudaStream_t stream, const typename InTraits<D>::Storage* x,
                               const Layout& l, uint32_t* workspace, float* tensor_scale) {
  const int64_t chunks = CeilDiv(l.p * l.a * l.b, kReduceChunk);
  if (l.g * chunks > kMaxGrid) return -1;
  PartialKeysKernel<D, true>
      <<<static_cast<unsigned>(l.g * chunks), kThreads, 0, stream>>>(x, l, chunks, workspace, true);
  TensorScaleKernel<<<static_cast<unsigned>(l.g), kThreads, 0, stream>>>(workspace, chunks, true,
                                                                         tensor_scale);
  return l.g * chunks;
}

// The wide one-pass kernel (whole blocks of 16-byte vectors, kV of them per
// lane, `lanes` a power of two <= 32); bytes and nibbles only.
template <Format F, InDtype D>
Status LaunchWideQuantize(cudaStream_t stream, const typename InTraits<D>::Storage* x,
                          uint8_t* data, void* scales, float* tensor_scale, const Layout& l,
                          int wide_v, int64_t wide_lanes, bool transposed_scales, float* ones_out) {
  int log2 = 0;
  while ((int64_t{1} << log2) < wide_lanes) ++log2;
  const int64_t threads = l.Rows() * l.BlocksA() << log2;
  if (CeilDiv(threads, kThreads) > kMaxGrid) {
    return Status("jax_bq: tensor too large for one launch");
  }
  if (wide_v == 4) {
    WideQuantizeKernel<F, D, 4><<<Grid(threads), kThreads, 0, stream>>>(
        x, data, scales, tensor_scale, l, log2, transposed_scales, ones_out);
  } else {
    WideQuantizeKernel<F, D, 2><<<Grid(threads), kThreads, 0, stream>>>(
        x, data, scales, tensor_scale, l, log2, transposed_scales, ones_out);
  }
  return LastCudaError("WideQuantizeKernel");
}

// tensor_scale may be null for the non-NVFP4 formats (the qmatmul activation
// path has no use for the constant 1); transposed_scales stores fused-path
// scales as [blocks_per_row, rows] (only for FusedRowBlocks layouts).
template <Format F, InDtype D>
Status LaunchQuantize(cudaStream_t stream, const void* xv, uint8_t* data, void* scales,
                      float* tensor_scale, uint32_t* workspace, const Layout& view,
                      bool transposed_scales = false, bool allow_wide = true) {
  const Layout l = view.PlanesAsRows<F>();
  if (transposed_scales && !l.FusedRowBlocks()) {
    return Status("jax_bq: transposed scales need the fused row-block path");
  }
  if (F == Format::kNVFP4 && tensor_scale == nullptr) {
    return Status("jax_bq: NVFP4 quantize needs a tensor-scale buffer");
  }
  if (l.NumElements() == 0) {
    // Nothing to read: only the tensor scales (1) exist; scales are empty.
    if (l.g > 0 && tensor_scale != nullptr) {
      TensorScaleKernel<<<static_cast<unsigned>(l.g), 32, 0, stream>>>(nullptr, 0, false,
                                                                       tensor_scale);
    }
    return LastCudaError("TensorScaleKernel");
  }
  using In = typename InTraits<D>::Storage;
  const In* x = static_cast<const In*>(xv);
  uint32_t* ws = workspace;
  // Tensor scales: NVFP4 reduces the finite amax of each group first.
  if (F == Format::kNVFP4) {
    const int64_t used = LaunchNvfp4TensorScale<D>(stream, x, l, ws, tensor_scale);
    if (used < 0) return Status("jax_bq: tensor too large for one launch");
    ws += used;
  }
  constexpr int kVecAligned = 16 / sizeof(In);
  // The wide kernel and the pair-wise fused stores are written for bytes and
  // nibbles; other packings (FP6: 4 codes per 3 bytes) take the fused kernel
  // with whole units per lane, or the two-pass path.
  constexpr bool kBytesOrNibbles = !IsPacked(F) || Packing<F>::kNibbles;
  constexpr int kVecUnaligned = kBytesOrNibbles ? 2 : Packing<F>::kElems;
  const bool vec = l.FusedRowBlocks() && l.a % kVecAligned == 0 && l.ba % kVecAligned == 0 &&
                   Aligned16(x) && Aligned16(data);
  // Wide kernel: whole blocks of nv vectors, kV in {4, 2} vectors per lane,
  // a power-of-two number of lanes (at most 32) per block.
  const int64_t nv = l.ba / kVecAligned;
  const int wide_v = nv % 4 == 0 ? 4 : (nv % 2 == 0 ? 2 : 0);
  const int64_t wide_lanes = wide_v ? nv / wide_v : 0;
  const bool wide = kBytesOrNibbles && allow_wide && vec && l.a % l.ba == 0 && wide_lanes <= 32 &&
                    wide_lanes > 0 && (wide_lanes & (wide_lanes - 1)) == 0;
  float* ones_out = F != Format::kNVFP4 ? tensor_scale : nullptr;
  if (ones_out != nullptr && !wide) {
    TensorScaleKernel<<<static_cast<unsigned>(l.g), 32, 0, stream>>>(nullptr, 0, false, ones_out);
  }
  if (l.FusedRowBlocks()) {
    if constexpr (kBytesOrNibbles) {
      if (wide) {
        return LaunchWideQuantize<F, D>(stream, x, data, scales, tensor_scale, l, wide_v,
                                        wide_lanes, transposed_scales, ones_out);
      }
    }
    const int64_t vec_elems = vec ? kVecAligned : kVecUnaligned;
    int64_t lanes = l.ba / vec_elems;
    lanes = lanes < 1 ? 1 : (lanes > 32 ? 32 : lanes);
    int lanes_log2 = 0;
    while ((int64_t{1} << lanes_log2) < lanes) ++lanes_log2;
    const int64_t threads = l.Rows() * l.BlocksA() << lanes_log2;
    if (CeilDiv(threads, kThreads) > kMaxGrid) {
      return Status("jax_bq: tensor too large for one launch");
    }
    if (vec) {
      FusedQuantizeKernel<F, D, kVecAligned, true><<<Grid(threads), kThreads, 0, stream>>>(
          x, data, scales, tensor_scale, l, lanes_log2, transposed_scales);
    } else {
      FusedQuantizeKernel<F, D, kVecUnaligned, false><<<Grid(threads), kThreads, 0, stream>>>(
          x, data, scales, tensor_scale, l, lanes_log2, transposed_scales);
    }
    return LastCudaError("FusedQuantizeKernel");
  }
  const int64_t nblocks = l.NumScales();
  const int64_t chunks = CeilDiv(l.MaxBlockElements(), kReduceChunk);
  uint32_t* partial = ws;
  uint32_t* keys = ws + nblocks * chunks;
  if (nblocks * chunks > kMaxGrid) return Status("jax_bq: tensor too large for one launch");
  PartialKeysKernel<D, false><<<static_cast<unsigned>(nblocks * chunks), kThreads, 0, stream>>>(
      x, l, chunks, partial, false);
  BlockKeysKernel<F>
      <<<Grid(nblocks * 32), kThreads, 0, stream>>>(partial, chunks, l, tensor_scale, keys, scales);
  const int64_t items = IsPacked(F) ? l.PackedUnits<F>() : l.NumElements();
  EncodeKernel<F, D><<<Grid(items), kThreads, 0, stream>>>(x, l, keys, tensor_scale, data, items);
  return LastCudaError("EncodeKernel");
}

// Dequantize: 16-byte vector path when B == 1 (or whole-plane blocks, seen as
// rows: Layout::PlanesAsRows) and rows/blocks are multiples of the vector
// width, else one thread per element.
template <Format F, InDtype D>
Status LaunchDequantize(cudaStream_t stream, const uint8_t* data, const void* scales,
                        const float* tensor_scale, void* out, const Layout& view) {
  const Layout l = view.PlanesAsRows<F>();
  if (l.NumElements() == 0) return Status();
  constexpr int kVec = D == InDtype::kF32 ? 4 : 8;
  // The vector path reads bytes or nibbles; other packings go per element.
  constexpr bool kBytesOrNibbles = !IsPacked(F) || Packing<F>::kNibbles;
  const bool fast = kBytesOrNibbles && l.b == 1 && l.bb == 1 && l.a % kVec == 0 &&
                    l.ba % kVec == 0 && Aligned16(out) && Aligned16(data);
  const int64_t items = fast ? l.NumElements() / kVec : l.NumElements();
  if (CeilDiv(items, kThreads) > kMaxGrid) return Status("jax_bq: tensor too large for one launch");
  // Scale index by shift when power-of-two blocks tile the rows exactly.
  int ba_shift = -1;
  if (l.a % l.ba == 0 && (l.ba & (l.ba - 1)) == 0) {
    ba_shift = 0;
    while ((int64_t{1} << ba_shift) < l.ba) ++ba_shift;
  }
  if constexpr (kBytesOrNibbles) {
    if (fast) {
      DequantizeKernel<F, D, kVec><<<Grid(CeilDiv(items, kDequantUnroll)), kThreads, 0, stream>>>(
          data, scales, tensor_scale, out, l, items, ba_shift);
      return LastCudaError("DequantizeKernel");
    }
  }
  DequantizeKernel<F, D, 1>
      <<<Grid(items), kThreads, 0, stream>>>(data, scales, tensor_scale, out, l, items, ba_shift);
  return LastCudaError("DequantizeKernel");
}

// ---- Calibrate: one thread per block, every candidate scale in turn ----------------
// The block is loaded once (into per-thread local memory, an L1-resident
// array) and calibrate_math.h runs on it, as on the CPU.
constexpr int kCalibThreads = 128;

template <Format F, InDtype D>
__global__ void __launch_bounds__(kCalibThreads)
    CalibrateKernel(const typename InTraits<D>::Storage* __restrict__ x, Layout l,
                    const float* __restrict__ tensor_scale, uint8_t* __restrict__ data,
                    void* __restrict__ scales, float* __restrict__ mse_absmax,
                    float* __restrict__ mse_best, int32_t* __restrict__ clipped) {
  const int64_t blk = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (blk >= l.NumScales()) return;
  const int64_t row = blk / l.BlocksA();
  const float st = F == Format::kNVFP4 ? tensor_scale[row / l.p] : 1.0f;
  CalibrateRowBlock<F, D>(x, l, row, blk - row * l.BlocksA(), st,
                          {data, scales, mse_absmax, mse_best, clipped});
}

// fp4_to_fp8 in one launch: [n, k] 4-bit weights blocked along K by bs (a
// power of two >= 16; k % 16 == 0) -> FP8 E4M3 codes [n, k] and float32
// scales [n, ceil(k / 128)]. tensor_scale: one float (NVFP4's, else 1).
template <Format WF>
Status LaunchFp4ToFp8(cudaStream_t stream, const uint8_t* data, const void* scales,
                      const float* tensor_scale, int64_t n, int64_t k, int64_t bs, uint8_t* out,
                      uint32_t* out_scales) {
  if (k % 16 != 0 || bs < 16 || (bs & (bs - 1)) != 0) {
    return Status("jax_bq: fp4_to_fp8 needs K % 16 == 0 and a power-of-two block >= 16, got K=" +
                  std::to_string(k) + ", block " + std::to_string(bs));
  }
  const int64_t blocks = n * CeilDiv(k, 128);
  if (blocks == 0) return Status();
  if (blocks + kFp4ToFp8Blocks >= (int64_t{1} << 31) / 8 || k >= (int64_t{1} << 31)) {
    return Status("jax_bq: tensor too large for fp4_to_fp8's 32-bit indexing");
  }
  int bs_shift = 0;
  while ((int64_t{1} << bs_shift) < bs) ++bs_shift;
  const int64_t threads = CeilDiv(blocks, kFp4ToFp8Blocks) * 8;
  Fp4ToFp8Kernel<WF>
      <<<Grid(threads), kThreads, 0, stream>>>(data, scales, tensor_scale, static_cast<uint32_t>(n),
                                               static_cast<uint32_t>(k), bs_shift, out, out_scales);
  return LastCudaError("Fp4ToFp8Kernel");
}

template <Format F, InDtype D>
Status LaunchCalibrate(cudaStream_t stream, const void* xv, uint8_t* data, void* scales,
                       float* tensor_scale, float* mse_absmax, float* mse_best, int32_t* clipped,
                       uint32_t* workspace, const Layout& l) {
  using In = typename InTraits<D>::Storage;
  const In* x = static_cast<const In*>(xv);
  if (l.g > 0) {
    if (F == Format::kNVFP4 && l.NumElements() > 0) {
      if (LaunchNvfp4TensorScale<D>(stream, x, l, workspace, tensor_scale) < 0) {
        return Status("jax_bq: tensor too large for one launch");
      }
    } else {
      TensorScaleKernel<<<static_cast<unsigned>(l.g), 32, 0, stream>>>(nullptr, 0, false,
                                                                       tensor_scale);
    }
  }
  const int64_t blocks = l.NumScales();
  if (blocks == 0) return LastCudaError("TensorScaleKernel");
  if (CeilDiv(blocks, kCalibThreads) > kMaxGrid) {
    return Status("jax_bq: tensor too large for one launch");
  }
  CalibrateKernel<F, D>
      <<<static_cast<unsigned>(CeilDiv(blocks, kCalibThreads)), kCalibThreads, 0, stream>>>(
          x, l, tensor_scale, data, scales, mse_absmax, mse_best, clipped);
  return LastCudaError("CalibrateKernel");
}

}  // namespace jax_bq::cuda

#endif  // JAX_BQ_LAUNCH_CUH_
