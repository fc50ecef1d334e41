// CUDA handler BqHadamardCuda (FFI target jax_bq_hadamard): y = scale * H_n x
// on every block of n consecutive elements of the [rows, d] input. One CUDA
// block per transform block: the n values sit in shared memory as float32 and
// go through the butterfly stages of jax_bq/hadamard_math.h in that order
// (one __syncthreads per stage), so every output is the same tree of IEEE
// additions as in the CPU kernel and the jnp twin (built with --fmad=false:
// no contraction; the final product is a separate multiply).
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "hadamard.h"
#include "jax_bq/element_io.h"
#include "jax_bq/ffi_util.h"
#include "jax_bq/formats.h"
#include "jax_bq/hadamard_ffi.h"
#include "jax_bq/hadamard_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_bq::cuda {
namespace {

template <InDtype D>
__global__ void HadamardKernel(const void* __restrict__ x, void* __restrict__ y, int n,
                               float scale) {
  extern __shared__ float v[];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) v[i] = LoadAsFloat<D>(x, base + i);
  __syncthreads();
  const int half = n / 2;
  for (int h = 1; h < n; h <<= 1) {
    for (int p = threadIdx.x; p < half; p += blockDim.x) {
      const int i = (p / h) * 2 * h + (p % h);
      const float a = v[i], b = v[i + h];
      v[i] = __fadd_rn(a, b);
      v[i + h] = __fsub_rn(a, b);
    }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    // NaNs as the arithmetic makes them (no canonicalization).
    static_cast<typename InTraits<D>::Storage*>(y)[base + i] =
        FloatToElement<D>(__fmul_rn(v[i], scale));
  }
}

ffi::Error HadamardImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y,
                        int64_t block, float scale) {
  JAX_BQ_RETURN_IF_ERROR(CheckHadamardOperands(x, *y, block));
  auto dims = x.dimensions();
  const int64_t blocks = dims[0] * (dims[1] / block);
  if (blocks == 0) return ffi::Error::Success();
  if (blocks > 0x7FFFFFFF) {
    return ffi::Error::InvalidArgument("jax_bq_hadamard: too many transform blocks (" +
                                       std::to_string(blocks) + " > 2^31 - 1)");
  }
  const int n = static_cast<int>(block);
  const int threads = n / 2 < 512 ? n / 2 : 512;
  const size_t smem = static_cast<size_t>(n) * sizeof(float);
  const void* in = x.untyped_data();
  void* out = y->untyped_data();
  switch (ToInDtype(x.element_type())) {
    case InDtype::kF32:
      HadamardKernel<InDtype::kF32><<<blocks, threads, smem, stream>>>(in, out, n, scale);
      break;
    case InDtype::kBF16:
      HadamardKernel<InDtype::kBF16><<<blocks, threads, smem, stream>>>(in, out, n, scale);
      break;
    case InDtype::kF16:
      HadamardKernel<InDtype::kF16><<<blocks, threads, smem, stream>>>(in, out, n, scale);
      break;
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string("jax_bq_hadamard: launch failed: ") +
                                cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_bq::cuda

XLA_FFI_DEFINE_HANDLER_SYMBOL(BqHadamardCuda, jax_bq::cuda::HadamardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // x [rows, d]
                                  .Ret<ffi::AnyBuffer>()  // y [rows, d], x's dtype
                                  .Attr<int64_t>("block")
                                  .Attr<float>("scale"),
                              {ffi::Traits::kCmdBufferCompatible});
