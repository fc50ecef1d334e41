// Replays a custom call's GPU work from a CUDA graph cached by its arguments.
//
// cuBLASLt's FP8 GEMMs on Hopper spend ~20 us of host time per
// cublasLtMatmul (TMA descriptors are encoded per call), so in a call that
// first launches a small kernel (activation quantization) and then the GEMM,
// the GPU idles while the host prepares the GEMM; inside XLA command buffers
// the same cost returns whenever XLA re-traces the call because its buffers
// moved. A call whose enqueued work depends only on its arguments (shapes,
// attributes, buffer addresses) is captured into a graph on its second
// sight, keyed by exactly those, and from then on launched as one executable
// graph (~3 us of host time, the kernels back to back on the GPU). The
// capture runs on a private stream of the device (it does not run the work).
// On a stream that XLA is capturing (command-buffer tracing) the work is
// enqueued directly: XLA keeps its own traces, and a child graph node in
// place of the kernels would change the topology of XLA's graph between
// traces, which its graph update refuses. Anything the CUDA runtime refuses
// (capture, instantiation, launch) runs the work directly on the caller's
// stream instead, and is counted (GraphCacheStats): never silent.
//
// JAX_BQ_GRAPH_CACHE=0 turns the cache off (direct launches, as before);
// JAX_BQ_GRAPH_CACHE_SIZE sets the number of cached graphs (LRU, default 4096).
#ifndef JAX_BQ_GRAPH_CACHE_H_
#define JAX_BQ_GRAPH_CACHE_H_

#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "launch.cuh"

namespace jax_bq::cuda {

// Everything the enqueued work depends on, as 64-bit words.
using GraphKey = std::vector<uint64_t>;

struct GraphCacheStats {
  uint64_t launches = 0;   // executable-graph launches on an ordinary stream
  uint64_t traced = 0;     // enqueued directly into a stream XLA is capturing
  uint64_t captures = 0;   // misses: the work captured into a new graph
  uint64_t evictions = 0;  // graphs dropped by the LRU bound
  uint64_t direct = 0;     // cache off: the work enqueued directly
  uint64_t refused = 0;    // the runtime refused a graph step: enqueued directly
  // Host nanoseconds spent in each kind of call (diagnostics: what a traced
  // or direct call costs the host, e.g. cuBLASLt's per-call work).
  uint64_t traced_ns = 0, direct_ns = 0, launch_ns = 0, capture_ns = 0;
  std::string last_refusal;  // why, for the latest refusal
};

// Runs `enqueue` (which must put all its GPU work on the stream it is given,
// and depend on nothing but `key`) through the cache, ordered on `stream`.
Status LaunchCached(cudaStream_t stream, const GraphKey& key,
                    const std::function<Status(cudaStream_t)>& enqueue);

GraphCacheStats GetGraphCacheStats();
// Drops every cached graph (waits for nothing: in-flight graphs finish first).
void ClearGraphCache();

}  // namespace jax_bq::cuda

#endif  // JAX_BQ_GRAPH_CACHE_H_
