// CPU FFI handlers (targets "jax_bq_quantize", "jax_bq_dequantize",
// "jax_bq_calibrate", "jax_bq_layernorm_quantize") and the
// nanobind module that exports them as capsules.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include "cpu_kernels.h"
#include "hadamard.h"
#include "jax_bq/ffi_util.h"
#include "layernorm_quantize.h"
#include "nanobind/nanobind.h"
#include "xla/ffi/api/c_api.h"
#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace nb = nanobind;
namespace ffi = xla::ffi;

namespace jax_bq::cpu {
namespace {

// XLA:CPU runs computations with flush-to-zero / denormals-are-zero set. The
// pinned numerics are IEEE, so the kernels clear both and restore on exit.
class ScopedIeeeDenormals {
 public:
  ScopedIeeeDenormals() {
#if defined(__x86_64__) || defined(_M_X64)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ & ~(0x8000u | 0x0040u));  // FTZ, DAZ
#elif defined(__aarch64__)
    uint64_t fpcr;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(fpcr));
    saved_ = fpcr;
    fpcr &= ~(uint64_t{1} << 24);  // FZ
    __asm__ __volatile__("msr fpcr, %0" : : "r"(fpcr));
#endif
  }
  ~ScopedIeeeDenormals() {
#if defined(__x86_64__) || defined(_M_X64)
    _mm_setcsr(static_cast<unsigned>(saved_));
#elif defined(__aarch64__)
    uint64_t fpcr = saved_;
    __asm__ __volatile__("msr fpcr, %0" : : "r"(fpcr));
#endif
  }
  ScopedIeeeDenormals(const ScopedIeeeDenormals&) = delete;
  ScopedIeeeDenormals& operator=(const ScopedIeeeDenormals&) = delete;

 private:
  uint64_t saved_ = 0;
};

// XLA:CPU hands large outputs over as freshly mapped memory, so the first
// write to each 4 KiB page faults into the kernel (for a 64 MiB output that is
// 16384 faults, which cost more than the dequantize arithmetic). Asking for
// transparent huge pages on the 2 MiB-aligned interior of the output before
// the first write turns them into 32 faults. Advice only: where THP is off or
// the call fails, nothing changes but the speed. JAX_BQ_CPU_HUGEPAGES=0 turns
// it off (the benchmark measures both).
void AdviseHugePages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  static const bool enabled = [] {
    const char* env = std::getenv("JAX_BQ_CPU_HUGEPAGES");
    return env == nullptr || std::string(env) != "0";
  }();
  if (!enabled || bytes < static_cast<int64_t>(2 * kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end =
      (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// Runs fn(begin, end) over [0, n) on up to hardware_concurrency threads.
// Work items are independent blocks, so results do not depend on the split.
template <typename Fn>
ffi::Error ParallelFor(int64_t n, int64_t cost_per_item, Fn&& fn) {
  constexpr int64_t kMinWorkPerThread = int64_t{1} << 18;
  const int64_t hw = std::max<int64_t>(1, std::thread::hardware_concurrency());
  int64_t threads = std::min<int64_t>(
      {hw, int64_t{16}, std::max<int64_t>(1, n * cost_per_item / kMinWorkPerThread), n});
  if (threads <= 1) {
    fn(int64_t{0}, n);
    return ffi::Error::Success();
  }
  try {
    std::vector<std::thread> pool;
    pool.reserve(static_cast<size_t>(threads - 1));
    const int64_t chunk = (n + threads - 1) / threads;
    for (int64_t t = 1; t < threads; ++t) {
      const int64_t begin = std::min(n, t * chunk);
      const int64_t end = std::min(n, begin + chunk);
      pool.emplace_back([&fn, begin, end] {
        ScopedIeeeDenormals ieee;
        fn(begin, end);
      });
    }
    fn(int64_t{0}, std::min(n, chunk));
    for (auto& th : pool) th.join();
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("jax_bq: CPU worker threads failed: ") + e.what());
  }
  return ffi::Error::Success();
}

// NVFP4 tensor scale of group g: the finite amax over the group, in chunks
// across threads (max is exact and order-free, so the split cannot matter).
template <InDtype D>
ffi::Error GroupTensorScale(const void* xp, const Layout& l, int64_t g, float* st) {
  const int64_t n = l.p * l.a * l.b;
  constexpr int64_t kChunk = int64_t{1} << 16;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<float> partial(static_cast<size_t>(chunks), 0.0f);
  JAX_BQ_RETURN_IF_ERROR(ParallelFor(chunks, kChunk, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      partial[c] = FiniteAmax<D>(xp, g * n + c * kChunk, g * n + std::min(n, (c + 1) * kChunk));
    }
  }));
  float amax = 0.0f;
  for (float v : partial) amax = std::max(amax, v);
  *st = NVFP4TensorScale(amax);
  return ffi::Error::Success();
}

// For each group g: its tensor scale (NVFP4; 1 otherwise) is stored in
// tp[g], then fn(g, st, begin, end) runs over the group's P * BlocksA block
// rows in parallel, each doing `cost` units of work.
template <Format F, InDtype D, typename Fn>
ffi::Error ForEachGroupBlocks(const void* xp, const Layout& l, float* tp, int64_t cost, Fn&& fn) {
  for (int64_t g = 0; g < l.g; ++g) {
    float st = 1.0f;
    if constexpr (F == Format::kNVFP4) {
      JAX_BQ_RETURN_IF_ERROR(GroupTensorScale<D>(xp, l, g, &st));
    }
    tp[g] = st;
    JAX_BQ_RETURN_IF_ERROR(ParallelFor(l.p * l.BlocksA(), cost,
                                       [&](int64_t begin, int64_t end) { fn(g, st, begin, end); }));
  }
  return ffi::Error::Success();
}

ffi::Error QuantizeImpl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> data,
                        ffi::Result<ffi::AnyBuffer> scales,
                        ffi::Result<ffi::AnyBuffer> tensor_scale,
                        ffi::Result<ffi::AnyBuffer> /*workspace: CUDA only*/, int32_t format,
                        int64_t block_a, int64_t block_b, int32_t pack_b) {
  Layout l;
  JAX_BQ_RETURN_IF_ERROR(MakeLayout(x.dimensions(), format, block_a, block_b, pack_b, &l));
  const Format f = static_cast<Format>(format);
  JAX_BQ_RETURN_IF_ERROR(CheckQuantizeOperands(x, *data, *scales, *tensor_scale, f, l));
  ScopedIeeeDenormals ieee;
  const void* xp = x.untyped_data();
  auto* dp = static_cast<uint8_t*>(data->untyped_data());
  void* sp = scales->untyped_data();
  auto* tp = static_cast<float*>(tensor_scale->untyped_data());
  AdviseHugePages(dp, static_cast<int64_t>(data->size_bytes()));
  const int64_t block_rows = l.BlocksA();
  return DispatchInDtype(ToInDtype(x.element_type()), [&]<InDtype D>() {
    return DispatchFormat(f, [&]<Format F>() -> ffi::Error {
      return ForEachGroupBlocks<F, D>(
          xp, l, tp, l.ba * l.b, [&](int64_t g, float st, int64_t begin, int64_t end) {
            for (int64_t it = begin; it < end; ++it) {
              const int64_t row = g * l.p + it / block_rows;
              if (l.b == 1) {
                QuantizeContiguousBlock<F, D>(xp, dp, sp, l, row, it % block_rows, st);
              } else {
                QuantizeBlockRow<F, D>(xp, dp, sp, l, row, it % block_rows, st);
              }
            }
          });
    });
  });
}

ffi::Error DequantizeImpl(ffi::AnyBuffer data, ffi::AnyBuffer scales, ffi::AnyBuffer tensor_scale,
                          ffi::Result<ffi::AnyBuffer> out, int32_t format, int64_t block_a,
                          int64_t block_b, int32_t pack_b) {
  Layout l;
  JAX_BQ_RETURN_IF_ERROR(MakeLayout(out->dimensions(), format, block_a, block_b, pack_b, &l));
  const Format f = static_cast<Format>(format);
  JAX_BQ_RETURN_IF_ERROR(CheckDequantizeOut(*out));
  // The quantize check validates data/scales/tensor_scale against the layout.
  JAX_BQ_RETURN_IF_ERROR(CheckQuantizeOperands(*out, data, scales, tensor_scale, f, l));
  ScopedIeeeDenormals ieee;
  const auto* dp = static_cast<const uint8_t*>(data.untyped_data());
  const void* sp = scales.untyped_data();
  const auto* tp = static_cast<const float*>(tensor_scale.untyped_data());
  void* op = out->untyped_data();
  AdviseHugePages(op, static_cast<int64_t>(out->size_bytes()));
  const int64_t block_rows = l.BlocksA();
  return DispatchInDtype(ToInDtype(out->element_type()), [&]<InDtype D>() {
    return DispatchFormat(f, [&]<Format F>() -> ffi::Error {
      return ParallelFor(l.Rows() * block_rows, l.ba * l.b, [&](int64_t begin, int64_t end) {
        if (l.b == 1) {  // runs of blocks within one row at a time
          for (int64_t it = begin; it < end;) {
            const int64_t row = it / block_rows;
            const int64_t run_end = std::min(end, (row + 1) * block_rows);
            DequantizeContiguousBlocks<F, D>(dp, sp, tp[row / l.p], op, l, row,
                                             it - row * block_rows, run_end - row * block_rows);
            it = run_end;
          }
          return;
        }
        for (int64_t it = begin; it < end; ++it) {
          const int64_t row = it / block_rows;
          DequantizeBlockRow<F, D>(dp, sp, tp[row / l.p], op, l, row, it % block_rows);
        }
      });
    });
  });
}

ffi::Error CalibrateImpl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> data,
                         ffi::Result<ffi::AnyBuffer> scales,
                         ffi::Result<ffi::AnyBuffer> tensor_scale,
                         ffi::Result<ffi::AnyBuffer> mse_absmax,
                         ffi::Result<ffi::AnyBuffer> mse_best, ffi::Result<ffi::AnyBuffer> clipped,
                         ffi::Result<ffi::AnyBuffer> /*workspace: CUDA only*/, int32_t format,
                         int64_t block_a) {
  Layout l;
  JAX_BQ_RETURN_IF_ERROR(MakeLayout(x.dimensions(), format, block_a, 1, 0, &l));
  const Format f = static_cast<Format>(format);
  JAX_BQ_RETURN_IF_ERROR(CheckCalibrateOperands(x, *data, *scales, *tensor_scale, *mse_absmax,
                                                *mse_best, *clipped, f, l));
  ScopedIeeeDenormals ieee;
  const void* xp = x.untyped_data();
  auto* dp = static_cast<uint8_t*>(data->untyped_data());
  void* sp = scales->untyped_data();
  auto* tp = static_cast<float*>(tensor_scale->untyped_data());
  auto* m0 = static_cast<float*>(mse_absmax->untyped_data());
  auto* m1 = static_cast<float*>(mse_best->untyped_data());
  auto* cl = static_cast<int32_t*>(clipped->untyped_data());
  const int64_t block_rows = l.BlocksA();
  return DispatchInDtype(ToInDtype(x.element_type()), [&]<InDtype D>() {
    return DispatchFormat(f, [&]<Format F>() -> ffi::Error {
      const int64_t cost = l.ba * CalibCandidates<F>() * 8;
      return ForEachGroupBlocks<F, D>(
          xp, l, tp, cost, [&](int64_t g, float st, int64_t begin, int64_t end) {
            for (int64_t it = begin; it < end; ++it) {
              const int64_t row = g * l.p + it / block_rows;
              CalibrateRowBlock<F, D>(xp, l, row, it % block_rows, st, {dp, sp, m0, m1, cl});
            }
          });
    });
  });
}

// Runs a validated "jax_bq_layernorm_quantize" call (LayernormQuantizeHandler).
ffi::Error LayernormQuantizeRun(const LnqOperands& o, const LnqShape& s, float eps) {
  ScopedIeeeDenormals ieee;
  return LayernormQuantize(
      o.x, o.residual, o.gamma, o.beta, o.scale, o.y, o.codes, o.scales, s, eps,
      [](int64_t n, int64_t cost, auto&& fn) { return ParallelFor(n, cost, fn); });
}

}  // namespace
}  // namespace jax_bq::cpu

XLA_FFI_DEFINE_HANDLER_SYMBOL(BqLayernormQuantizeCpu,
                              jax_bq::LayernormQuantizeHandler<jax_bq::cpu::LayernormQuantizeRun>,
                              jax_bq::BindLayernormQuantize(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BqQuantizeCpu, jax_bq::cpu::QuantizeImpl,
                              jax_bq::BindQuantize(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BqDequantizeCpu, jax_bq::cpu::DequantizeImpl,
                              jax_bq::BindDequantize(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BqCalibrateCpu, jax_bq::cpu::CalibrateImpl,
                              jax_bq::BindCalibrate(ffi::Ffi::Bind()));

NB_MODULE(_jax_bq_cpu, m) {
  JAX_BQ_MODULE_BODY(
      m, BqQuantizeCpu, BqDequantizeCpu,
      d["jax_bq_calibrate"] = nanobind::capsule(reinterpret_cast<void*>(BqCalibrateCpu));
      d["jax_bq_layernorm_quantize"] =
          nanobind::capsule(reinterpret_cast<void*>(BqLayernormQuantizeCpu));
      d["jax_bq_hadamard"] = nanobind::capsule(reinterpret_cast<void*>(BqHadamardCpu)););
}
