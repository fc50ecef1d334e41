// The fast Walsh-Hadamard transform shared by the CPU and CUDA handlers of
// jax_bq_hadamard, with the summation order pinned (the jnp twin
// jax_bq.primitives.hadamard.fwht_reference performs the same operations):
//
//   for h = 1, 2, 4, ..., n/2:              (stages, in this order)
//     for every pair (i, i + h) with (i / h) even:
//       (v[i], v[i + h]) <- (v[i] + v[i + h], v[i] - v[i + h])
//   y[i] = v[i] * scale
//
// in float32 (bf16/f16 inputs are widened exactly first; the result is
// rounded once to the output dtype). Each output is a fixed tree of IEEE
// additions and subtractions followed by one multiplication, so any correct
// implementation that keeps this order (no FMA, no reassociation) gives the
// same bits.
#ifndef JAX_BQ_HADAMARD_MATH_H_
#define JAX_BQ_HADAMARD_MATH_H_

#include <cstdint>

namespace jax_bq {

// Largest transform: 8192 float32 values (32 KiB) fit one CUDA block's shared memory.
inline constexpr int64_t kMaxHadamardBlock = 8192;

// True if n is a power of two in [2, kMaxHadamardBlock].
inline bool ValidHadamardBlock(int64_t n) {
  return n >= 2 && n <= kMaxHadamardBlock && (n & (n - 1)) == 0;
}

}  // namespace jax_bq

#endif  // JAX_BQ_HADAMARD_MATH_H_
