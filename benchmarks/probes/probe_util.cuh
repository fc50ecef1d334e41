// Small helpers shared by the standalone probes in benchmarks/probes.
#ifndef JAX_BQ_PROBE_UTIL_CUH_
#define JAX_BQ_PROBE_UTIL_CUH_

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <vector>

#include "check_cuda.h"

// Per-element pseudo-random bits for input fills: a multiplicative hash of the
// element index mixed with a seed (cheap, stateless, reproducible).
__device__ __forceinline__ unsigned ProbeHash(size_t i, unsigned seed) {
  unsigned h = static_cast<unsigned>(i) * 2654435761u ^ seed;
  h ^= h >> 13;
  h *= 0x5bd1e995u;
  h ^= h >> 15;
  return h;
}

__global__ void ProbeSpinKernel(long long cycles) {
  const long long t0 = clock64();
  while (clock64() - t0 < cycles) {
  }
}

// Occupies the GPU for ~25 us (one thread spinning) so that the start event
// and the launch recorded next are queued behind it: the events then time the
// launch on the device, without the host's launch latency that an idle
// stream would put between them (several us, a few % of a 50 us kernel).
inline void QueueBehindSpin(cudaStream_t stream = 0) {
  ProbeSpinKernel<<<1, 1, 0, stream>>>(50000);
}

// Median device time in microseconds of launch(i) for i in [0, warmup + iters):
// the first `warmup` calls untimed, each timed one bracketed by its own events
// and queued behind QueueBehindSpin (callers rotate inputs by i).
template <typename Fn>
float ProbeMedianUs(Fn&& launch, int warmup, int iters) {
  cudaEvent_t e0, e1;
  CHECK_CUDA(cudaEventCreate(&e0));
  CHECK_CUDA(cudaEventCreate(&e1));
  std::vector<float> ms;
  for (int i = 0; i < warmup + iters; ++i) {
    QueueBehindSpin();
    CHECK_CUDA(cudaEventRecord(e0));
    launch(i);
    CHECK_CUDA(cudaEventRecord(e1));
    CHECK_CUDA(cudaEventSynchronize(e1));
    float t;
    CHECK_CUDA(cudaEventElapsedTime(&t, e0, e1));
    if (i >= warmup) ms.push_back(t);
  }
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaEventDestroy(e0));
  CHECK_CUDA(cudaEventDestroy(e1));
  std::nth_element(ms.begin(), ms.begin() + ms.size() / 2, ms.end());
  return 1e3f * ms[ms.size() / 2];
}

#endif  // JAX_BQ_PROBE_UTIL_CUH_
