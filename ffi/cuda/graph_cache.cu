// See graph_cache.h.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <list>
#include <mutex>
#include <unordered_map>

#include "graph_cache.h"

namespace jax_bq::cuda {
namespace {

uint64_t NowNs() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
}

// Adds the host time of its scope to *total.
struct HostTimer {
  explicit HostTimer(uint64_t* total) : total(total), start(NowNs()) {}
  ~HostTimer() { *total += NowNs() - start; }
  uint64_t* total;
  uint64_t start;
};

struct KeyHash {
  size_t operator()(const GraphKey& key) const {
    uint64_t h = 0xcbf29ce484222325ull;
    for (const uint64_t w : key) h = (h ^ w) * 0x100000001b3ull + (h >> 29);
    return static_cast<size_t>(h);
  }
};

// A key is captured on its second sight: work whose buffers move on every
// call (eager use outside jit) then never pays for capture and instantiation.
struct Entry {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  bool refused = false;  // the runtime refused a graph step once: direct from then on
  std::list<GraphKey>::iterator lru;
};

struct Cache {
  std::mutex mu;
  std::unordered_map<GraphKey, Entry, KeyHash> map;
  std::list<GraphKey> lru;  // front: most recently used
  std::unordered_map<int, cudaStream_t> capture_streams;
  GraphCacheStats stats;
  size_t capacity = 4096;
  bool enabled = true;
};

Cache& TheCache() {
  // Never destroyed: graphs may outlive static destruction order at exit.
  static Cache* cache = [] {
    auto* c = new Cache;
    const char* on = std::getenv("JAX_BQ_GRAPH_CACHE");
    c->enabled = on == nullptr || std::string(on) != "0";
    const char* size = std::getenv("JAX_BQ_GRAPH_CACHE_SIZE");
    if (size != nullptr) c->capacity = static_cast<size_t>(std::max(1L, std::atol(size)));
    return c;
  }();
  return *cache;
}

void Drop(Entry& e) {
  if (e.exec != nullptr) cudaGraphExecDestroy(e.exec);
  if (e.graph != nullptr) cudaGraphDestroy(e.graph);
  e.exec = nullptr;
  e.graph = nullptr;
}

// The runtime refused a graph step: clear its error, say why, run directly.
Status Refuse(Cache& c, const char* what, cudaError_t err, cudaStream_t stream,
              const std::function<Status(cudaStream_t)>& enqueue) {
  cudaGetLastError();
  ++c.stats.refused;
  c.stats.last_refusal = std::string(what) + ": " + cudaGetErrorString(err);
  return enqueue(stream);
}

// Captures `enqueue` on the device's private stream into *graph.
cudaError_t Capture(Cache& c, const std::function<Status(cudaStream_t)>& enqueue,
                    cudaGraph_t* graph, const char** what) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  *what = "cudaGetDevice";
  if (err != cudaSuccess) return err;
  cudaStream_t& s = c.capture_streams[device];
  if (s == nullptr) {
    *what = "cudaStreamCreateWithFlags";
    err = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    if (err != cudaSuccess) {
      s = nullptr;
      return err;
    }
  }
  *what = "cudaStreamBeginCapture";
  err = cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed);
  if (err != cudaSuccess) return err;
  const Status st = enqueue(s);
  *what = "cudaStreamEndCapture";
  err = cudaStreamEndCapture(s, graph);
  if (err == cudaSuccess && !st.ok()) {
    *what = "the call's work under capture";
    err = cudaErrorStreamCaptureUnsupported;
  }
  if (err != cudaSuccess && *graph != nullptr) {
    cudaGraphDestroy(*graph);
    *graph = nullptr;
  }
  return err;
}

}  // namespace

Status LaunchCached(cudaStream_t stream, const GraphKey& key,
                    const std::function<Status(cudaStream_t)>& enqueue) {
  Cache& c = TheCache();
  std::lock_guard<std::mutex> lock(c.mu);
  if (!c.enabled) {
    ++c.stats.direct;
    HostTimer t(&c.stats.direct_ns);
    return enqueue(stream);
  }
  cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
  cudaError_t err = cudaStreamIsCapturing(stream, &cs);
  if (err != cudaSuccess) return Refuse(c, "cudaStreamIsCapturing", err, stream, enqueue);
  if (cs != cudaStreamCaptureStatusNone) {  // XLA is recording a command buffer: it caches
    ++c.stats.traced;
    HostTimer t(&c.stats.traced_ns);
    return enqueue(stream);
  }

  auto it = c.map.find(key);
  if (it == c.map.end()) {  // first sight: remember, run directly
    c.lru.push_front(key);
    Entry e;
    e.lru = c.lru.begin();
    c.map.emplace(key, e);
    while (c.map.size() > c.capacity) {
      auto last = c.map.find(c.lru.back());
      Drop(last->second);
      c.map.erase(last);
      c.lru.pop_back();
      ++c.stats.evictions;
    }
    ++c.stats.direct;
    HostTimer t(&c.stats.direct_ns);
    return enqueue(stream);
  }
  Entry& e = it->second;
  c.lru.splice(c.lru.begin(), c.lru, e.lru);
  const char* what = "";
  if (e.refused) {
    ++c.stats.direct;
    HostTimer t(&c.stats.direct_ns);
    return enqueue(stream);
  }
  if (e.graph == nullptr) {
    HostTimer t(&c.stats.capture_ns);
    err = Capture(c, enqueue, &e.graph, &what);
    if (err != cudaSuccess) {
      e.refused = true;
      return Refuse(c, what, err, stream, enqueue);
    }
    ++c.stats.captures;
  }
  if (e.exec == nullptr) {
    err = cudaGraphInstantiate(&e.exec, e.graph, 0);
    if (err != cudaSuccess) {
      e.exec = nullptr;
      e.refused = true;
      return Refuse(c, "cudaGraphInstantiate", err, stream, enqueue);
    }
  }
  {
    HostTimer t(&c.stats.launch_ns);
    err = cudaGraphLaunch(e.exec, stream);
  }
  if (err != cudaSuccess) return Refuse(c, "cudaGraphLaunch", err, stream, enqueue);
  ++c.stats.launches;
  return Status();
}

GraphCacheStats GetGraphCacheStats() {
  Cache& c = TheCache();
  std::lock_guard<std::mutex> lock(c.mu);
  return c.stats;
}

void ClearGraphCache() {
  Cache& c = TheCache();
  std::lock_guard<std::mutex> lock(c.mu);
  for (auto& [key, e] : c.map) Drop(e);
  c.map.clear();
  c.lru.clear();
}

}  // namespace jax_bq::cuda
