// MSE-optimal block scales: the pinned search shared by the CPU and CUDA
// calibrate kernels (and mirrored by jax_bq/reference_calibrate.py).
//
// For one block, candidate scales are tried in a fixed order, candidate 0
// being the absmax scale of block_math.h (so calibrated is never worse):
//   FP32-scale formats: s_j = RN(s_0 * f_j), f_0 = 1, then f = (160 - i)/128
//     for i = 0..127, i != 32: 1.25 down to 33/128 in steps of 1/128.
//   NVFP4: E4M3 codes c_0 (the absmax code), c_0-1 .. c_0-8, c_0+1, c_0+2,
//     those in [1, 0x7E]; none but c_0 when c_0 == 0 (the block is zeros).
//   MX: E8M0 exponents X_0, X_0+1, X_0-1, clamped to [-127, 127].
// For candidate scale s, with v_i = x_i / s (the quantizer's exact division)
// and q_i = encode(clip(v_i)), the block's cost is
//   S = sum_i sq(v_i - decode(q_i))
// in float32, summed as a pairwise tree over the block (padded with zeros to
// the block size, which adds exact zeros), so every implementation gets the
// same bits. sq(e) is e^2 evaluated so that no compiler can change it by
// fusing a multiply into an add (XLA:CPU contracts a*a + b*b into an FMA):
// e = h + l with h = e with its 12 low significand bits cleared, so that
// every product below is exact and an FMA rounds like the separate ops:
//   sq(e) = RN(RN(h*h + 2*h*l) + l*l)   (within 2 ulp of e^2). The squared error in input units is
//   s^2 * S; candidates are
// compared on w_j * S_j with w_j = f_j^2 (FP32 scales), decode(c_j)^2 (NVFP4)
// or 4^(X_j - X_0) (MX), products that are exact and free of the overflow
// that s^2 itself can hit. The first strictly smallest cost wins. A block
// holding NaN/Inf keeps the NaN scale of quantize.
#ifndef JAX_BQ_CALIBRATE_MATH_H_
#define JAX_BQ_CALIBRATE_MATH_H_

#include <cstdint>

#include "jax_bq/block_math.h"
#include "jax_bq/element_io.h"
#include "jax_bq/layout.h"

namespace jax_bq {

constexpr int kMaxCalibBlock = 256;

template <Format F>
JAX_BQ_HD_CONSTEXPR int CalibCandidates() {
  return HasF32Scale(F) ? 128 : (F == Format::kNVFP4 ? 11 : 3);
}

// Candidate j for a block whose absmax scale is s0; false if j does not apply.
// weight: the exact comparison multiplier described above.
template <Format F>
JAX_BQ_HD bool CandidateScale(int j, const BlockScale& s0, float amax, float tensor_scale,
                              BlockScale* out, float* weight) {
  *out = s0;
  *weight = 1.0f;
  if constexpr (HasF32Scale(F)) {
    if (j == 0) return true;
    if (amax == 0.0f) return false;  // all zeros: nothing to search
    const int i = j - 1 < 32 ? j - 1 : j;
    const float f = static_cast<float>(160 - i) / 128.0f;
    const float s = s0.divisor * f;
    if (s == 0.0f || !IsFinite(s)) return false;
    out->divisor = s;
    out->inverse = s >= kMinNormalF32 ? 1.0f / s : 0.0f;
    out->stored = FloatBits(s);
    *weight = static_cast<float>((160 - i) * (160 - i)) / 16384.0f;
    return true;
  } else if constexpr (F == Format::kNVFP4) {
    const int c0 = static_cast<int>(s0.stored);
    *weight = DecodeE4M3(static_cast<uint8_t>(c0)) * DecodeE4M3(static_cast<uint8_t>(c0));
    if (j == 0) return true;
    if (c0 == 0) return false;
    const int c = j <= 8 ? c0 - j : c0 + (j - 8);
    if (c < 1 || c > 0x7e) return false;
    const float d = DecodeE4M3(static_cast<uint8_t>(c));
    out->stored = static_cast<uint32_t>(c);
    out->divisor = d * tensor_scale;
    out->inverse = out->divisor >= kMinNormalF32 ? 1.0f / out->divisor : 0.0f;
    *weight = d * d;
    return true;
  } else {  // MX: stored is X + 127
    if (j == 0) return true;
    const int x = static_cast<int>(s0.stored) - 127 + (j == 1 ? 1 : -1);
    if (x < -127 || x > 127) return false;
    out->stored = static_cast<uint32_t>(x + 127);
    out->divisor = DecodeE8M0(static_cast<uint8_t>(out->stored));
    out->inverse =
        x == 127 ? BitsFloat(0x00400000u) : BitsFloat(static_cast<uint32_t>(127 - x) << 23);
    *weight = j == 1 ? 4.0f : 0.25f;
    return true;
  }
}

// Pairwise (binary-tree) float32 sum, fed one term at a time in index order;
// the block size is a power of two, so the tree is complete.
struct PairwiseSum {
  float level[9];
  int64_t count = 0;
  JAX_BQ_HD void Add(float v) {
    int k = 0;
    for (; (count >> k) & 1; ++k) v = level[k] + v;
    level[k] = v;
    ++count;
  }
  // Valid after a power-of-two number of terms.
  JAX_BQ_HD float Total() const {
    int k = 0;
    while ((int64_t{1} << k) < count) ++k;
    return level[k];
  }
};

struct CalibBlockResult {
  BlockScale best;   // the chosen scale (encode with QuantizeElement)
  float mse_absmax;  // squared error in input units, absmax scale
  float mse_best;    // the same for the chosen scale
  int32_t clipped;   // elements with |x / s| > MAX under the chosen scale
};

// e^2 in a form that FMA contraction cannot change (see the top of the file).
JAX_BQ_HD float ContractionFreeSquare(float e) {
  const float h = BitsFloat(FloatBits(e) & 0xfffff000u);
  const float l = e - h;
  const float hh = h * h;
  const float hl2 = (h * l) * 2.0f;
  const float head = hh + hl2;
  const float ll = l * l;
  return head + ll;
}

// Cost S of one candidate over x[0..len), padded to `block` with zeros.
template <Format F>
JAX_BQ_HD float CandidateCost(const float* x, int64_t len, int64_t block, const BlockScale& s,
                              int32_t* clipped) {
  using T = FormatTraits<F>;
  PairwiseSum sum;
  int32_t clip = 0;
  for (int64_t i = 0; i < block; ++i) {
    float e2 = 0.0f;
    if (i < len) {
      const float v = ScaledElement<F>(x[i], s);
      const float vc = v > T::kMax ? T::kMax : (v < -T::kMax ? -T::kMax : v);
      clip += (v > T::kMax || v < -T::kMax) ? 1 : 0;
      e2 = ContractionFreeSquare(v - T::Decode(T::Encode(vc)));
    }
    sum.Add(e2);
  }
  *clipped = clip;
  return sum.Total();
}

// Squared error in input units for scale s and cost S (float32; MX may
// saturate for extreme exponents).
template <Format F>
JAX_BQ_HD float BlockMse(const BlockScale& s, float cost) {
  return (s.divisor * s.divisor) * cost;
}

template <Format F>
JAX_BQ_HD CalibBlockResult CalibrateBlock(const float* x, int64_t len, int64_t block,
                                          float tensor_scale) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t i = 0; i < len; ++i) {
    const float a = x[i] < 0.0f ? -x[i] : x[i];
    finite = finite && IsFinite(x[i]);
    amax = a > amax ? a : amax;
  }
  CalibBlockResult r;
  const BlockScale s0 = ComputeBlockScale<F>(finite ? amax : 0.0f, finite, tensor_scale);
  r.best = s0;
  r.clipped = 0;
  if (!finite) {
    r.mse_absmax = r.mse_best = QuietNaN();
    return r;
  }
  if (s0.divisor == 0.0f) {  // NVFP4 block below the smallest E4M3 scale: zeros
    PairwiseSum sum;
    for (int64_t i = 0; i < block; ++i) sum.Add(i < len ? ContractionFreeSquare(x[i]) : 0.0f);
    r.mse_absmax = r.mse_best = sum.Total();
    return r;
  }
  float best_cost = 0.0f, best_weighted = 0.0f;
  for (int j = 0; j < CalibCandidates<F>(); ++j) {
    BlockScale s;
    float w;
    if (!CandidateScale<F>(j, s0, amax, tensor_scale, &s, &w)) continue;
    int32_t clipped;
    const float cost = CandidateCost<F>(x, len, block, s, &clipped);
    const float weighted = w * cost;
    if (j == 0) {
      r.mse_absmax = BlockMse<F>(s, cost);
    }
    if (j == 0 || weighted < best_weighted) {
      best_weighted = weighted;
      best_cost = cost;
      r.best = s;
      r.clipped = clipped;
    }
  }
  r.mse_best = BlockMse<F>(r.best, best_cost);
  return r;
}

// Writes the codes of x[0..n) under the chosen scale: packed in units
// (layout.h: Packing) for the packed formats, else one byte each.
template <Format F>
JAX_BQ_HD void StoreCalibratedCodes(const float* x, int64_t n, const BlockScale& s, uint8_t* out) {
  if constexpr (IsPacked(F)) {
    using P = Packing<F>;
    for (int64_t k = 0; k < n; k += P::kElems) {
      uint8_t codes[P::kElems];
      const int64_t m = n - k < P::kElems ? n - k : P::kElems;
      for (int64_t e = 0; e < m; ++e) codes[e] = QuantizeElement<F>(x[k + e], s);
      P::Store(P::Word(codes, m), out + k / P::kElems * P::kBytes, 1);
    }
  } else {
    for (int64_t k = 0; k < n; ++k) out[k] = QuantizeElement<F>(x[k], s);
  }
}

// Where calibrate writes: the codes and scales of quantize, and one value per
// block of each statistic.
struct CalibOutputs {
  uint8_t* data;
  void* scales;
  float* mse_absmax;
  float* mse_best;
  int32_t* clipped;
};

// Calibrates block block_i of `row` in a layout with B == 1 (one CPU task or
// one CUDA thread per block): loads it, picks its scale (CalibrateBlock), and
// writes the scale, the statistics and the codes.
template <Format F, InDtype D>
JAX_BQ_HD void CalibrateRowBlock(const void* x, const Layout& l, int64_t row, int64_t block_i,
                                 float tensor_scale, const CalibOutputs& out) {
  const int64_t i0 = block_i * l.ba;
  const int64_t n = (i0 + l.ba < l.a ? i0 + l.ba : l.a) - i0;
  const int64_t first = row * l.a + i0;
  float xb[kMaxCalibBlock];
  for (int64_t k = 0; k < n; ++k) xb[k] = LoadAsFloat<D>(x, first + k);
  const CalibBlockResult r = CalibrateBlock<F>(xb, n, l.ba, tensor_scale);
  const int64_t si = l.Scale(row, block_i, 0);
  StoreScale<F>(out.scales, si, r.best.stored);
  out.mse_absmax[si] = r.mse_absmax;
  out.mse_best[si] = r.mse_best;
  out.clipped[si] = r.clipped;
  StoreCalibratedCodes<F>(
      xb, n, r.best,
      out.data + (IsPacked(F) ? row * l.PackedA<F>() + i0 / Packing<F>::kElems * Packing<F>::kBytes
                              : first));
}

}  // namespace jax_bq

#endif  // JAX_BQ_CALIBRATE_MATH_H_
