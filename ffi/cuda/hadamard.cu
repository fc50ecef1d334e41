// CUDA handler BqHadamardCuda (FFI target jax_bq_hadamard): y = scale * H_n x
// on every block of n consecutive elements of the [rows, d] input; the kernels
// (and the bitwise contract they keep) are in hadamard_kernels.cuh.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "hadamard.h"
#include "hadamard_kernels.cuh"
#include "jax_bq/element_io.h"
#include "jax_bq/ffi_util.h"
#include "jax_bq/formats.h"
#include "jax_bq/hadamard_ffi.h"
#include "jax_bq/hadamard_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_bq::cuda {
namespace {

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
  const void* in = x.untyped_data();
  void* out = y->untyped_data();
  cudaError_t err = cudaSuccess;
  switch (ToInDtype(x.element_type())) {
    case InDtype::kF32:
      err = LaunchHadamard<InDtype::kF32>(stream, in, out, blocks, n, scale);
      break;
    case InDtype::kBF16:
      err = LaunchHadamard<InDtype::kBF16>(stream, in, out, blocks, n, scale);
      break;
    case InDtype::kF16:
      err = LaunchHadamard<InDtype::kF16>(stream, in, out, blocks, n, scale);
      break;
  }
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
