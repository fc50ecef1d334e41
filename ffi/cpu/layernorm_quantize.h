// CPU kernel of the fused residual-add + LayerNorm + FP8 quantize op
// ("jax_bq_layernorm_quantize"): rows in parallel, each in the pinned order of
// jax_bq/layernorm_math.h, so that it matches the jnp twin bit for bit.
#ifndef JAX_BQ_CPU_LAYERNORM_QUANTIZE_H_
#define JAX_BQ_CPU_LAYERNORM_QUANTIZE_H_

#include <cstdint>
#include <vector>

#include "cpu_kernels.h"
#include "jax_bq/layernorm_ffi.h"
#include "jax_bq/layernorm_math.h"

namespace jax_bq::cpu {

// Sum of v[0, h) in the pinned order (lane partials, warp halving, warps in order).
inline float LnqPinnedSum(const float* v, int64_t h, float* lanes_scratch) {
  const int w = LnqWarps(h);
  const int64_t c = LnqChunks(h);
  const int lanes = kLnqWarp * w;
  for (int l = 0; l < lanes; ++l) {
    float acc = 0.0f;
    for (int64_t ci = 0; ci < c; ++ci) {
      for (int k = 0; k < kLnqVec; ++k) {
        const int64_t i = (ci * lanes + l) * kLnqVec + k;
        const float val = i < h ? v[i] : 0.0f;
        acc = (ci == 0 && k == 0) ? val : acc + val;
      }
    }
    lanes_scratch[l] = acc;
  }
  float total = 0.0f;
  for (int wi = 0; wi < w; ++wi) {
    float* p = lanes_scratch + wi * kLnqWarp;
    for (int half = kLnqWarp / 2; half > 0; half /= 2) {
      for (int j = 0; j < half; ++j) p[j] = p[j] + p[j + half];
    }
    total = wi == 0 ? p[0] : total + p[0];
  }
  return total;
}

// Per-thread row buffers.
struct LnqRowScratch {
  explicit LnqRowScratch(int64_t h)
      : d(static_cast<size_t>(h)), y(static_cast<size_t>(h)), lanes(kLnqWarp * kLnqMaxWarps) {}
  std::vector<float> d, y, lanes;
};

// Row `row` (flat over G * R): d = s - mean into t.d, y32 into t.y; returns
// (mean, rstd) through the pointers.
template <InDtype D>
void LnqRow(const void* x, const void* residual, const float* gamma, const float* beta, int64_t h,
            float eps, int64_t row, LnqRowScratch& t, float* mean_out, float* rstd_out) {
  const int64_t base = row * h;
  float* d = t.d.data();
  for (int64_t i = 0; i < h; ++i) {
    float s = LoadAsFloat<D>(x, base + i);
    if (residual != nullptr) {
      // The sum rounded to the activation dtype (what the unfused model computes).
      const float sum = s + LoadAsFloat<D>(residual, base + i);
      if constexpr (D == InDtype::kF32) {
        s = sum;
      } else {
        uint16_t rounded;
        StoreFromFloat<D>(&rounded, 0, sum);
        s = LoadAsFloat<D>(&rounded, 0);
      }
    }
    d[i] = s;
  }
  const float inv_h = 1.0f / static_cast<float>(h);
  const float mean = LnqMean(LnqPinnedSum(d, h, t.lanes.data()), inv_h);
  for (int64_t i = 0; i < h; ++i) d[i] = d[i] - mean;
  float* sq = t.y.data();
  for (int64_t i = 0; i < h; ++i) sq[i] = d[i] * d[i];
  const float var = LnqPinnedSum(sq, h, t.lanes.data()) * inv_h;
  const float rstd = LnqRstd(var, eps);
  float* y = t.y.data();
  for (int64_t i = 0; i < h; ++i) y[i] = LnqNormalize(d[i], rstd, gamma[i], beta[i]);
  *mean_out = mean;
  *rstd_out = rstd;
}

// Runs the op. parallel_for(n, cost_per_item, fn(begin, end)) -> ffi::Error.
template <typename ParallelForFn>
ffi::Error LayernormQuantize(const ffi::AnyBuffer& x, const ffi::AnyBuffer& residual,
                             const ffi::AnyBuffer& gamma, const ffi::AnyBuffer& beta,
                             const ffi::AnyBuffer& scale, ffi::AnyBuffer& y, ffi::AnyBuffer& codes,
                             ffi::AnyBuffer& scales, const LnqShape& s, float eps,
                             ParallelForFn&& parallel_for) {
  const void* xp = x.untyped_data();
  const void* rp = s.has_residual ? residual.untyped_data() : nullptr;
  // gamma and beta widened to float32 once (exact from any supported dtype).
  std::vector<float> g32(static_cast<size_t>(s.h)), b32(static_cast<size_t>(s.h));
  JAX_BQ_RETURN_IF_ERROR(DispatchInDtype(ToInDtype(gamma.element_type()), [&]<InDtype G>() {
    for (int64_t i = 0; i < s.h; ++i) {
      g32[i] = LoadAsFloat<G>(gamma.untyped_data(), i);
      b32[i] = LoadAsFloat<G>(beta.untyped_data(), i);
    }
    return ffi::Error::Success();
  }));
  const float* gp = g32.data();
  const float* bp = b32.data();
  void* yp = y.untyped_data();
  auto* cp = static_cast<uint8_t*>(codes.untyped_data());
  auto* sp = static_cast<float*>(scales.untyped_data());
  const int64_t rows = s.g * s.r, h = s.h;
  if (rows == 0) return ffi::Error::Success();
  // Per-tensor: the group amax needs every row first; rows keep (amax, finite).
  std::vector<float> row_amax(s.mode == LnqMode::kPerTensor ? rows : 0);
  std::vector<uint8_t> row_finite(s.mode == LnqMode::kPerTensor ? rows : 0);
  std::vector<float> inv(s.mode == LnqMode::kStatic ? s.g : 0);
  if (s.mode == LnqMode::kStatic) {
    const auto* scale_in = static_cast<const float*>(scale.untyped_data());
    for (int64_t g = 0; g < s.g; ++g) {
      sp[g] = scale_in[g];
      inv[g] = 1.0f / scale_in[g];  // exact for a power of two; NaN stays NaN
    }
  }
  const InDtype din = ToInDtype(x.element_type());
  const InDtype dout = ToInDtype(y.element_type());
  return DispatchInDtype(din, [&]<InDtype D>() {
    return DispatchInDtype(dout, [&]<InDtype O>() {
      return DispatchFormat(s.format, [&]<Format F>() -> ffi::Error {
        if constexpr (F != Format::kFP8E4M3 && F != Format::kFP8E5M2) {
          return ffi::Error::InvalidArgument("jax_bq: layernorm_quantize writes FP8 only");
        } else {
          JAX_BQ_RETURN_IF_ERROR(parallel_for(rows, 8 * h, [&](int64_t begin, int64_t end) {
            LnqRowScratch t(h);
            for (int64_t row = begin; row < end; ++row) {
              float mean, rstd;
              LnqRow<D>(xp, rp, gp, bp, h, eps, row, t, &mean, &rstd);
              const float* yv = t.y.data();
              const int64_t base = row * h;
              for (int64_t i = 0; i < h; ++i) StoreFromFloat<O>(yp, base + i, yv[i]);
              float amax = 0.0f;
              bool finite = true;
              if (s.mode != LnqMode::kStatic) {
                for (int64_t i = 0; i < h; ++i) {
                  finite = finite && IsFinite(yv[i]);
                  const float m = LnqFiniteMag(yv[i]);
                  amax = m > amax ? m : amax;
                }
              }
              if (s.mode == LnqMode::kStatic) {
                const float iv = inv[row / s.r];
                for (int64_t i = 0; i < h; ++i) cp[base + i] = LnqEncodeStatic<F>(yv[i], iv);
              } else if (s.mode == LnqMode::kPerToken) {
                const BlockScale bs = ComputeBlockScale<F>(amax, finite, 1.0f);
                std::memcpy(sp + row, &bs.stored, sizeof(float));
                for (int64_t i = 0; i < h; ++i) cp[base + i] = QuantizeElement<F>(yv[i], bs);
              } else {
                row_amax[row] = amax;
                row_finite[row] = finite ? 1 : 0;
              }
            }
          }));
          if (s.mode != LnqMode::kPerTensor) return ffi::Error::Success();
          std::vector<BlockScale> group(static_cast<size_t>(s.g));
          for (int64_t g = 0; g < s.g; ++g) {
            float amax = 0.0f;
            bool finite = true;
            for (int64_t r = g * s.r; r < (g + 1) * s.r; ++r) {
              amax = row_amax[r] > amax ? row_amax[r] : amax;
              finite = finite && row_finite[r];
            }
            group[g] = ComputeBlockScale<F>(amax, finite, 1.0f);
            std::memcpy(sp + g, &group[g].stored, sizeof(float));
          }
          // Second pass: the same rows again (same arithmetic, same y32).
          return parallel_for(rows, 8 * h, [&](int64_t begin, int64_t end) {
            LnqRowScratch t(h);
            for (int64_t row = begin; row < end; ++row) {
              float mean, rstd;
              LnqRow<D>(xp, rp, gp, bp, h, eps, row, t, &mean, &rstd);
              const BlockScale& bs = group[row / s.r];
              for (int64_t i = 0; i < h; ++i) cp[row * h + i] = QuantizeElement<F>(t.y[i], bs);
            }
          });
        }
      });
    });
  });
}

}  // namespace jax_bq::cpu

#endif  // JAX_BQ_CPU_LAYERNORM_QUANTIZE_H_
