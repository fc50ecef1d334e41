// CHECK_CUDA for the standalone host programs (benchmarks/probes, the
// compute-sanitizer driver): print the error with its location and exit.
// Not for FFI handlers, which return ffi::Error instead.
#ifndef JAX_BQ_CHECK_CUDA_H_
#define JAX_BQ_CHECK_CUDA_H_

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define CHECK_CUDA(x)                                                                              \
  do {                                                                                             \
    cudaError_t e = (x);                                                                           \
    if (e != cudaSuccess) {                                                                        \
      std::fprintf(stderr, "CUDA error %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__); \
      std::exit(1);                                                                                \
    }                                                                                              \
  } while (0)

#endif  // JAX_BQ_CHECK_CUDA_H_
