// The 4-D view [G, P, A, B] in which every kernel sees its operand.
//
// The Python layer reshapes (for free: row-major bitcasts) any input into
// this view: G independent groups (each has its own NVFP4 tensor scale; vmap
// folds batch dimensions into G), P rows before the blocked axis, the blocked
// axis A and the B elements after it. Blocks are ba x bb (bb == 1 except for
// 2-D tiles). Packed formats (format_registry.h: elements_per_unit > 1) store
// their codes in units along A, or along B for tiles (pack_b); see Packing
// below for the bit order. A partial last unit is zero-padded.
#ifndef JAX_BQ_LAYOUT_H_
#define JAX_BQ_LAYOUT_H_

#include <cstdint>

#include "jax_bq/formats.h"

namespace jax_bq {

// Element packing of format F, from its registry row: kElems codes of kBits
// bits share a unit of kBytes bytes. Bit order: the unit's bytes read as one
// little-endian integer (byte t holds bits 8t..8t+7), code e of the unit
// (e = index along the packing axis mod kElems) at bits kBits*e..kBits*e +
// kBits-1. FP4: 2 codes per byte, the first in the low nibble. FP6: 4 codes
// per 3 bytes, a 24-bit word w = b0 | b1 << 8 | b2 << 16, code e = (w >> 6e)
// & 63 (so b0 = c0 | c1 << 6, b1 = c1 >> 2 | c2 << 4, b2 = c2 >> 4 | c3 << 2).
// Unpacked formats: one code per byte (kElems = kBytes = 1).
template <Format F>
struct Packing {
  static constexpr int kBits = InfoOf(F).bits;
  static constexpr int kElems = InfoOf(F).elements_per_unit;
  static constexpr int kBytes = InfoOf(F).bytes_per_unit;
  static constexpr uint32_t kMask = (1u << kBits) - 1u;
  // Two 4-bit codes per byte: the layout the nibble-specialized fast paths
  // (the CUDA wide/vector kernels, the CPU nibble loops) are written for.
  static constexpr bool kNibbles = kElems == 2 && kBits == 4 && kBytes == 1;
  static_assert(kElems * kBits <= 8 * kBytes && kBytes <= 4, "a unit fits in 32 bits");

  // The unit word of codes[0, n), n <= kElems; missing codes are zero.
  JAX_BQ_HD static uint32_t Word(const uint8_t* codes, int64_t n) {
    uint32_t w = 0;
    for (int e = 0; e < kElems; ++e) {
      if (e < n) w |= (static_cast<uint32_t>(codes[e]) & kMask) << (kBits * e);
    }
    return w;
  }
  // Writes / reads a unit whose bytes are `stride` bytes apart.
  JAX_BQ_HD static void Store(uint32_t w, uint8_t* out, int64_t stride) {
    for (int t = 0; t < kBytes; ++t) out[t * stride] = static_cast<uint8_t>(w >> (8 * t));
  }
  JAX_BQ_HD static uint32_t Load(const uint8_t* in, int64_t stride) {
    uint32_t w = 0;
    for (int t = 0; t < kBytes; ++t) w |= static_cast<uint32_t>(in[t * stride]) << (8 * t);
    return w;
  }
  JAX_BQ_HD static uint8_t Code(uint32_t w, int64_t slot) {
    return static_cast<uint8_t>((w >> (kBits * slot)) & kMask);
  }
  // Packs codes[0, n) into consecutive units at out (n need not fill the last).
  JAX_BQ_HD static void StoreSpan(const uint8_t* codes, int64_t n, uint8_t* out) {
    for (int64_t k = 0; k < n; k += kElems) {
      Store(Word(codes + k, n - k), out + k / kElems * kBytes, 1);
    }
  }
};

struct Layout {
  int64_t g, p, a, b;  // logical extents
  int64_t ba, bb;      // block extents along A and B
  bool pack_b;         // packing axis of packed formats: B (tiles) or A

  JAX_BQ_HD int64_t BlocksA() const { return (a + ba - 1) / ba; }
  JAX_BQ_HD int64_t BlocksB() const { return (b + bb - 1) / bb; }
  JAX_BQ_HD int64_t Rows() const { return g * p; }
  JAX_BQ_HD int64_t NumElements() const { return g * p * a * b; }
  JAX_BQ_HD int64_t NumScales() const { return g * p * BlocksA() * BlocksB(); }
  // Stored extents of the codes of format F along A and B.
  template <Format F>
  JAX_BQ_HD int64_t PackedA() const {
    return pack_b ? a : PackedExtent(F, a);
  }
  template <Format F>
  JAX_BQ_HD int64_t PackedB() const {
    return pack_b ? PackedExtent(F, b) : b;
  }

  // Packed units of format F in the whole tensor.
  template <Format F>
  JAX_BQ_HD int64_t PackedUnits() const {
    constexpr int64_t kE = Packing<F>::kElems;
    return g * p * (pack_b ? a * ((b + kE - 1) / kE) : (a + kE - 1) / kE * b);
  }

  // Flat index of element (row, i, j), row = g_index * p + p_index.
  JAX_BQ_HD int64_t Element(int64_t row, int64_t i, int64_t j) const {
    return (row * a + i) * b + j;
  }
  // Packed formats: the first byte of the unit holding element (row, i, j),
  // the distance between the unit's bytes, and the element's slot in it.
  template <Format F>
  JAX_BQ_HD int64_t UnitByte(int64_t row, int64_t i, int64_t j) const {
    constexpr int64_t kE = Packing<F>::kElems, kB = Packing<F>::kBytes;
    return pack_b ? (row * a + i) * PackedB<F>() + j / kE * kB
                  : (row * PackedA<F>() + i / kE * kB) * b + j;
  }
  JAX_BQ_HD int64_t UnitStride() const { return pack_b ? 1 : b; }
  template <Format F>
  JAX_BQ_HD int64_t UnitSlot(int64_t i, int64_t j) const {
    return (pack_b ? j : i) % Packing<F>::kElems;
  }
  // The code of element (row, i, j) of a packed format.
  template <Format F>
  JAX_BQ_HD uint8_t PackedCode(const uint8_t* data, int64_t row, int64_t i, int64_t j) const {
    const uint32_t w = Packing<F>::Load(data + UnitByte<F>(row, i, j), UnitStride());
    return Packing<F>::Code(w, UnitSlot<F>(i, j));
  }
  JAX_BQ_HD int64_t Scale(int64_t row, int64_t block_i, int64_t block_j) const {
    return (row * BlocksA() + block_i) * BlocksB() + block_j;
  }

  // The same tensor seen as rows of a * b contiguous elements (b == 1) when
  // one block covers each whole [A, B] plane (per-tensor scaling): same
  // elements, same scale per row, same packed bytes, but the kernels' vector
  // paths apply. Packed formats qualify when packed along B in whole units
  // (the units of consecutive B-rows then follow each other); else *this.
  template <Format F>
  JAX_BQ_HD Layout PlanesAsRows() const {
    const bool whole_plane = b > 1 && ba >= a && bb >= b;
    const bool bytes_follow = !IsPacked(F) || (pack_b && b % Packing<F>::kElems == 0);
    if (!whole_plane || !bytes_follow) return *this;
    return Layout{g, p, a * b, 1, a * b, 1, false};
  }

  // Blocks along a contiguous last axis that one warp can quantize in a
  // single pass (the CUDA fused kernel); everything else takes two passes.
  JAX_BQ_HD bool FusedRowBlocks() const { return b == 1 && bb == 1 && ba <= 256; }
  // Elements of the largest block (tail blocks are smaller).
  JAX_BQ_HD int64_t MaxBlockElements() const { return (ba < a ? ba : a) * (bb < b ? bb : b); }
};

// Elements one CTA reduces in the two-pass path.
constexpr int64_t kReduceChunk = 8192;

// Workspace words (uint32) the CUDA quantize handler needs; the same formula
// lives in jax_bq/layout.py (quantize_workspace_bytes). The CPU handler gets
// the buffer too and ignores it.
JAX_BQ_HD int64_t QuantizeWorkspaceWords(const Layout& l, bool nvfp4) {
  int64_t words = 0;
  if (!l.FusedRowBlocks() && l.NumElements() > 0) {
    const int64_t chunks = (l.MaxBlockElements() + kReduceChunk - 1) / kReduceChunk;
    words += l.NumScales() * (chunks + 1);  // partials, then one key per block
  }
  if (nvfp4 && l.NumElements() > 0) {
    words += l.g * ((l.p * l.a * l.b + kReduceChunk - 1) / kReduceChunk);
  }
  return words;
}

}  // namespace jax_bq

#endif  // JAX_BQ_LAYOUT_H_
