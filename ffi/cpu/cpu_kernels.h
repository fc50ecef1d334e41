// CPU quantize / dequantize kernels over the [G, P, A, B] layout.
#ifndef JAX_BQ_CPU_KERNELS_H_
#define JAX_BQ_CPU_KERNELS_H_

#include <cstdint>
#include <cstring>

#include "jax_bq/block_math.h"
#include "jax_bq/calibrate_math.h"
#include "jax_bq/element_io.h"
#include "jax_bq/layout.h"

namespace jax_bq::cpu {

inline void StoreScale(void* scales, int64_t i, Format f, uint32_t stored) {
  if (HasF32Scale(f)) {
    std::memcpy(static_cast<float*>(scales) + i, &stored, sizeof(float));
  } else {
    static_cast<uint8_t*>(scales)[i] = static_cast<uint8_t>(stored);
  }
}

inline uint32_t LoadScale(const void* scales, int64_t i, Format f) {
  if (HasF32Scale(f)) {
    uint32_t u;
    std::memcpy(&u, static_cast<const float*>(scales) + i, sizeof(u));
    return u;
  }
  return static_cast<const uint8_t*>(scales)[i];
}

// amax over the finite elements x[begin, end) (pieces of the NVFP4 tensor amax).
template <InDtype D>
float FiniteAmax(const void* x, int64_t begin, int64_t end) {
  float amax = 0.0f;
  for (int64_t i = begin; i < end; ++i) {
    const uint32_t bits = FloatBits(LoadAsFloat<D>(x, i)) & 0x7fffffffu;
    const float m = bits < 0x7f800000u ? BitsFloat(bits) : 0.0f;
    amax = m > amax ? m : amax;
  }
  return amax;
}

// Quantizes the blocks of block-row (row, block_i): all blocks along B.
template <Format F, InDtype D>
void QuantizeBlockRow(const void* x, uint8_t* data, void* scales, const Layout& l, int64_t row,
                      int64_t block_i, float tensor_scale) {
  const int64_t i0 = block_i * l.ba;
  const int64_t i1 = i0 + l.ba < l.a ? i0 + l.ba : l.a;
  for (int64_t block_j = 0; block_j < l.BlocksB(); ++block_j) {
    const int64_t j0 = block_j * l.bb;
    const int64_t j1 = j0 + l.bb < l.b ? j0 + l.bb : l.b;
    float amax = 0.0f;
    bool finite = true;
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t j = j0; j < j1; ++j) {
        const float v = LoadAsFloat<D>(x, l.Element(row, i, j));
        const float m = v < 0.0f ? -v : v;
        finite &= IsFinite(v);
        amax = m > amax ? m : amax;
      }
    }
    const BlockScale s = ComputeBlockScale<F>(amax, finite, tensor_scale);
    StoreScale(scales, l.Scale(row, block_i, block_j), F, s.stored);
    if constexpr (IsPacked(F)) {
      // One unit at a time along the packing axis (blocks are whole units).
      using P = Packing<F>;
      const int64_t di = l.pack_b ? 1 : P::kElems;
      const int64_t dj = l.pack_b ? P::kElems : 1;
      for (int64_t i = i0; i < i1; i += di) {
        for (int64_t j = j0; j < j1; j += dj) {
          const int64_t n = l.pack_b ? (j1 - j < dj ? j1 - j : dj) : (i1 - i < di ? i1 - i : di);
          uint8_t codes[P::kElems];
          for (int64_t e = 0; e < n; ++e) {
            const int64_t ie = l.pack_b ? i : i + e;
            const int64_t je = l.pack_b ? j + e : j;
            codes[e] = QuantizeElement<F>(LoadAsFloat<D>(x, l.Element(row, ie, je)), s);
          }
          P::Store(P::Word(codes, n), data + l.UnitByte<F>(row, i, j), l.UnitStride());
        }
      }
    } else {
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t e = l.Element(row, i, j);
          data[e] = QuantizeElement<F>(LoadAsFloat<D>(x, e), s);
        }
      }
    }
  }
}

template <Format F, InDtype D>
void DequantizeBlockRow(const uint8_t* data, const void* scales, float tensor_scale, void* out,
                        const Layout& l, int64_t row, int64_t block_i) {
  const int64_t i0 = block_i * l.ba;
  const int64_t i1 = i0 + l.ba < l.a ? i0 + l.ba : l.a;
  for (int64_t block_j = 0; block_j < l.BlocksB(); ++block_j) {
    const int64_t j0 = block_j * l.bb;
    const int64_t j1 = j0 + l.bb < l.b ? j0 + l.bb : l.b;
    const float scale =
        EffectiveScale<F>(LoadScale(scales, l.Scale(row, block_i, block_j), F), tensor_scale);
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t j = j0; j < j1; ++j) {
        uint8_t code;
        if constexpr (IsPacked(F)) {
          code = l.PackedCode<F>(data, row, i, j);
        } else {
          code = data[l.Element(row, i, j)];
        }
        StoreFromFloat<D>(out, l.Element(row, i, j), DequantizeElement<F>(code, scale));
      }
    }
  }
}

// ---- Contiguous fast path: B == 1, so every block is a contiguous span. ----

// Encodes n elements of one block whose scale is finite and non-zero.
template <Format F, InDtype D>
inline void EncodeSpan(const void* x, int64_t first, int64_t n, float divisor, uint8_t* codes) {
  using T = FormatTraits<F>;
  for (int64_t k = 0; k < n; ++k) {
    float v = LoadAsFloat<D>(x, first + k) / divisor;
    v = v > T::kMax ? T::kMax : (v < -T::kMax ? -T::kMax : v);
    codes[k] = T::Encode(v);
  }
}

template <Format F, InDtype D>
void QuantizeContiguousBlock(const void* x, uint8_t* data, void* scales, const Layout& l,
                             int64_t row, int64_t block_i, float tensor_scale) {
  const int64_t i0 = block_i * l.ba;
  const int64_t n = (i0 + l.ba < l.a ? i0 + l.ba : l.a) - i0;
  const int64_t first = row * l.a + i0;
  float amax = 0.0f;
  uint32_t exp_and = 0x7f800000u;
  uint32_t any_nonfinite = 0;
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t bits = FloatBits(LoadAsFloat<D>(x, first + k)) & 0x7fffffffu;
    any_nonfinite |= static_cast<uint32_t>((bits & exp_and) == exp_and);
    const float m = BitsFloat(bits);
    amax = m > amax ? m : amax;
  }
  const BlockScale s = ComputeBlockScale<F>(amax, any_nonfinite == 0, tensor_scale);
  StoreScale(scales, l.Scale(row, block_i, 0), F, s.stored);
  constexpr int64_t kMaxBlock = 1024;
  uint8_t local[kMaxBlock];
  for (int64_t base = 0; base < n; base += kMaxBlock) {
    const int64_t m = n - base < kMaxBlock ? n - base : kMaxBlock;
    if (!s.finite) {
      for (int64_t k = 0; k < m; ++k) local[k] = FormatTraits<F>::kNaNCode;
    } else if (s.divisor == 0.0f) {
      for (int64_t k = 0; k < m; ++k)
        local[k] = QuantizeElement<F>(LoadAsFloat<D>(x, first + base + k), s);
    } else {
      EncodeSpan<F, D>(x, first + base, m, s.divisor, local);
    }
    if constexpr (IsPacked(F)) {
      // i0 + base is a whole number of units (blocks and kMaxBlock are).
      using P = Packing<F>;
      uint8_t* out = data + (row * l.PackedA<F>() + (i0 + base) / P::kElems * P::kBytes);
      if constexpr (P::kNibbles) {
        for (int64_t k = 0; k + 1 < m; k += 2)
          out[k / 2] = static_cast<uint8_t>((local[k] & 0xf) | (local[k + 1] << 4));
        if (m % 2) out[m / 2] = local[m - 1] & 0xf;
      } else {
        P::StoreSpan(local, m, out);
      }
    } else {
      uint8_t* out = data + first + base;
      for (int64_t k = 0; k < m; ++k) out[k] = local[k];
    }
  }
}

// Branch-free decode of one code (the loops below vectorize: no table
// gather). A normal code's exponent and mantissa bits move to where float32
// keeps them and the exponent is rebased by an integer add; a subnormal code
// is its mantissa as an integer (exact: 2^23 + m - 2^23) times its quantum.
// No float32 subnormal is ever formed: on x86 each costs a microcode assist,
// which made a multiply-by-2^k decode 2x slower than this. NaN codes give a
// NaN. Bit for bit equal to FormatTraits<F>::Decode (tests check every code).
template <int kMan, int kRebase, int kQuantumExp>
inline float DecodeMagnitude(uint32_t em) {
  const float normal = BitsFloat((em << (23 - kMan)) + (static_cast<uint32_t>(kRebase) << 23));
  const float mant = BitsFloat(0x4b000000u | em) - 8388608.0f;  // em as a float
  const float sub = mant * BitsFloat(static_cast<uint32_t>(127 + kQuantumExp) << 23);
  return em < (1u << kMan) ? sub : normal;
}

template <Format F>
inline float DecodeBranchFree(uint32_t c) {
  if constexpr (F == Format::kFP8E4M3 || F == Format::kMXFP8) {
    const uint32_t em = c & 0x7fu;  // bias 7: rebase by 120, quantum 2^-9
    const float v = DecodeMagnitude<3, 120, -9>(em);
    return em == 0x7fu ? QuietNaN() : BitsFloat(FloatBits(v) | ((c & 0x80u) << 24));
  } else if constexpr (F == Format::kFP8E5M2) {
    const uint32_t em = c & 0x7fu;  // bias 15: rebase by 112, quantum 2^-16
    const float v = DecodeMagnitude<2, 112, -16>(em);
    const float special = em == 0x7cu ? BitsFloat(0x7f800000u | ((c & 0x80u) << 24)) : QuietNaN();
    return em >= 0x7cu ? special : BitsFloat(FloatBits(v) | ((c & 0x80u) << 24));
  } else {  // E2M1, FP6: no Inf/NaN codes; sign at bit exp + man
    // E2M1 (bias 1): rebase by 126, quantum 2^-1; E2M3: 126, 2^-3; E3M2
    // (bias 3): 124, 2^-4.
    constexpr int kExp = InfoOf(F).exponent_bits, kMan = InfoOf(F).mantissa_bits;
    constexpr int kBias = (1 << (kExp - 1)) - 1;
    constexpr uint32_t kSignBit = kExp + kMan;
    const float v =
        DecodeMagnitude<kMan, 127 - kBias, 1 - kBias - kMan>(c & ((1u << kSignBit) - 1u));
    return BitsFloat(FloatBits(v) | (((c >> kSignBit) & 1u) << 31));
  }
}

// Stores v (RNE for bf16) without looking for NaNs: the caller guarantees
// that the only NaN reaching here is the canonical quiet NaN of a NaN code
// times a finite scale, which every IEEE multiply returns unchanged (the one
// NaN operand, already quiet), and whose bf16 rounding is the canonical 0x7FC0.
template <InDtype D>
inline void StoreNoNaNCheck(void* base, int64_t i, float v) {
  const uint32_t bits = FloatBits(v);
  if constexpr (D == InDtype::kF32) {
    static_cast<uint32_t*>(base)[i] = bits;
  } else if constexpr (D == InDtype::kBF16) {
    static_cast<uint16_t*>(base)[i] =
        static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  } else {
    StoreFromFloat<D>(base, i, v);
  }
}

// x86-64 with GCC/Clang: an AVX2 clone of the hot loop, picked at load time
// when the CPU has AVX2 (the baseline build only assumes SSE2: 4 lanes).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define JAX_BQ_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define JAX_BQ_CPU_CLONES
#endif

// Dequantizes blocks [bi_begin, bi_end) of one row of a B == 1 layout. The
// block scales are first spread over a chunk of elements, so the decode loop
// runs over the whole chunk (blocks of 16 gave the vectorizer 16-element loops
// whose set-up cost more than the work). A chunk holding a non-finite scale
// takes the per-element path, which canonicalizes every NaN; otherwise the
// only NaN is a NaN code's canonical one times a finite scale, which stays
// canonical (see StoreNoNaNCheck).
template <Format F, InDtype D>
JAX_BQ_CPU_CLONES void DequantizeContiguousBlocks(const uint8_t* data, const void* scales,
                                                  float tensor_scale, void* out, const Layout& l,
                                                  int64_t row, int64_t bi_begin, int64_t bi_end) {
  constexpr int64_t kChunk = 4096;
  float spread[kChunk];
  const int64_t stop = bi_end * l.ba < l.a ? bi_end * l.ba : l.a;
  using P = Packing<F>;
  const uint8_t* packed_row = data + row * l.PackedA<F>();
  for (int64_t e0 = bi_begin * l.ba; e0 < stop; e0 += kChunk) {
    const int64_t e1 = e0 + kChunk < stop ? e0 + kChunk : stop;
    bool finite = true;
    for (int64_t b = e0 / l.ba; b * l.ba < e1; ++b) {
      const float s = EffectiveScale<F>(LoadScale(scales, l.Scale(row, b, 0), F), tensor_scale);
      finite &= IsFinite(s);
      const int64_t lo = b * l.ba > e0 ? b * l.ba : e0;
      const int64_t hi = (b + 1) * l.ba < e1 ? (b + 1) * l.ba : e1;
      for (int64_t k = lo; k < hi; ++k) spread[k - e0] = s;
    }
    const int64_t first = row * l.a;
    if (!finite) {
      for (int64_t k = e0; k < e1; ++k) {
        uint8_t code;
        if constexpr (IsPacked(F)) {
          code = P::Code(P::Load(packed_row + k / P::kElems * P::kBytes, 1), k % P::kElems);
        } else {
          code = data[first + k];
        }
        StoreFromFloat<D>(out, first + k, FormatTraits<F>::Decode(code) * spread[k - e0]);
      }
    } else if constexpr (IsPacked(F) && !P::kNibbles) {
      // e0 is a whole number of units (blocks and chunks are, or the row is
      // one block): one unit word at a time.
      const uint8_t* __restrict in = packed_row + e0 / P::kElems * P::kBytes;
      const float* __restrict sc = spread;
      const int64_t n = e1 - e0;
      for (int64_t u = 0; u * P::kElems < n; ++u) {
        const uint32_t w = P::Load(in + u * P::kBytes, 1);
        for (int64_t e = 0; e < P::kElems && u * P::kElems + e < n; ++e) {
          const int64_t k = u * P::kElems + e;
          StoreNoNaNCheck<D>(out, first + e0 + k, DecodeBranchFree<F>(P::Code(w, e)) * sc[k]);
        }
      }
    } else if constexpr (IsPacked(F)) {
      // e0 is even (blocks and chunks have even lengths, or the row is one block).
      const uint8_t* __restrict in = packed_row + e0 / 2;
      const float* __restrict sc = spread;
      const int64_t n = e1 - e0;
      for (int64_t k = 0; k < n / 2; ++k) {
        const uint32_t byte = in[k];
        StoreNoNaNCheck<D>(out, first + e0 + 2 * k, DecodeBranchFree<F>(byte & 0xfu) * sc[2 * k]);
        StoreNoNaNCheck<D>(out, first + e0 + 2 * k + 1,
                           DecodeBranchFree<F>(byte >> 4) * sc[2 * k + 1]);
      }
      if (n % 2) {
        StoreNoNaNCheck<D>(out, first + e1 - 1, DecodeBranchFree<F>(in[n / 2]) * sc[n - 1]);
      }
    } else {
      const uint8_t* __restrict in = data + first + e0;
      const float* __restrict sc = spread;
      for (int64_t k = 0; k < e1 - e0; ++k) {
        StoreNoNaNCheck<D>(out, first + e0 + k, DecodeBranchFree<F>(in[k]) * sc[k]);
      }
    }
  }
}

}  // namespace jax_bq::cpu

#endif  // JAX_BQ_CPU_KERNELS_H_
