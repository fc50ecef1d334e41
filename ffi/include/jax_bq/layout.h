// The 4-D view [G, P, A, B] in which every kernel sees its operand.
//
// The Python layer reshapes (for free: row-major bitcasts) any input into
// this view: G independent groups (each has its own NVFP4 tensor scale; vmap
// folds batch dimensions into G), P rows before the blocked axis, the blocked
// axis A and the B elements after it. Blocks are ba x bb (bb == 1 except for
// 2-D tiles). FP4 codes are packed two per byte along A, or along B for tiles
// (pack_b), the first element in the low nibble; the last byte of an odd axis
// has a zero high nibble.
#ifndef JAX_BQ_LAYOUT_H_
#define JAX_BQ_LAYOUT_H_

#include <cstdint>

#include "jax_bq/formats.h"

namespace jax_bq {

struct Layout {
  int64_t g, p, a, b;  // logical extents
  int64_t ba, bb;      // block extents along A and B
  bool pack_b;         // FP4 packing axis: B (tiles) or A

  JAX_BQ_HD int64_t BlocksA() const { return (a + ba - 1) / ba; }
  JAX_BQ_HD int64_t BlocksB() const { return (b + bb - 1) / bb; }
  JAX_BQ_HD int64_t Rows() const { return g * p; }
  JAX_BQ_HD int64_t NumElements() const { return g * p * a * b; }
  JAX_BQ_HD int64_t NumScales() const { return g * p * BlocksA() * BlocksB(); }
  JAX_BQ_HD int64_t PackedA() const { return pack_b ? a : (a + 1) / 2; }
  JAX_BQ_HD int64_t PackedB() const { return pack_b ? (b + 1) / 2 : b; }

  // Flat index of element (row, i, j), row = g_index * p + p_index.
  JAX_BQ_HD int64_t Element(int64_t row, int64_t i, int64_t j) const {
    return (row * a + i) * b + j;
  }
  // Byte of a packed element and whether it sits in the high nibble.
  JAX_BQ_HD int64_t PackedByte(int64_t row, int64_t i, int64_t j) const {
    return pack_b ? (row * a + i) * PackedB() + j / 2 : (row * PackedA() + i / 2) * b + j;
  }
  JAX_BQ_HD bool HighNibble(int64_t i, int64_t j) const { return ((pack_b ? j : i) & 1) != 0; }
  JAX_BQ_HD int64_t Scale(int64_t row, int64_t block_i, int64_t block_j) const {
    return (row * BlocksA() + block_i) * BlocksB() + block_j;
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
