// Operand checks of "jax_bq_hadamard", shared by the CPU and CUDA handlers
// (see jax_bq/primitives/hadamard.py): a [rows, d] f32/bf16/f16 input, an
// output of the same dims and dtype, and a power-of-two block dividing d.
#ifndef JAX_BQ_HADAMARD_FFI_H_
#define JAX_BQ_HADAMARD_FFI_H_

#include <cstdint>
#include <string>

#include "jax_bq/ffi_util.h"
#include "jax_bq/hadamard_math.h"
#include "xla/ffi/api/ffi.h"

namespace jax_bq {

inline ffi::Error CheckHadamardOperands(const ffi::AnyBuffer& x, const ffi::AnyBuffer& y,
                                        int64_t block) {
  auto dims = x.dimensions();
  if (dims.size() != 2) {
    return ffi::Error::InvalidArgument("jax_bq_hadamard: expected a [rows, d] input, got " +
                                       DimsToString(dims));
  }
  if (!IsSupportedFloat(x.element_type())) {
    return ffi::Error::InvalidArgument("jax_bq_hadamard: input must be f32, bf16 or f16");
  }
  JAX_BQ_RETURN_IF_ERROR(ExpectDtype("jax_bq_hadamard output", y.element_type(), x.element_type()));
  const int64_t want[2] = {dims[0], dims[1]};
  JAX_BQ_RETURN_IF_ERROR(ExpectDims("jax_bq_hadamard output", y.dimensions(), want));
  if (!ValidHadamardBlock(block) || dims[1] % block != 0) {
    return ffi::Error::InvalidArgument(
        "jax_bq_hadamard: block " + std::to_string(block) +
        " must be a power of two in [2, 8192] dividing d = " + std::to_string(dims[1]));
  }
  return ffi::Error::Success();
}

}  // namespace jax_bq

#endif  // JAX_BQ_HADAMARD_FFI_H_
