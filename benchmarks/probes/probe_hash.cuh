// Per-element pseudo-random bits for the probes' input fills: a multiplicative
// hash of the element index mixed with a seed (cheap, stateless, reproducible).
#ifndef JAX_BQ_PROBE_HASH_CUH_
#define JAX_BQ_PROBE_HASH_CUH_

#include <cstddef>

__device__ __forceinline__ unsigned ProbeHash(size_t i, unsigned seed) {
  unsigned h = static_cast<unsigned>(i) * 2654435761u ^ seed;
  h ^= h >> 13;
  h *= 0x5bd1e995u;
  h ^= h >> 15;
  return h;
}

#endif  // JAX_BQ_PROBE_HASH_CUH_
