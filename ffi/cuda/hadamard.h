// CUDA handler of the jax_bq_hadamard FFI target (blocked fast Walsh-Hadamard transform).
#ifndef JAX_BQ_CUDA_HADAMARD_H_
#define JAX_BQ_CUDA_HADAMARD_H_

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(BqHadamardCuda);

#endif  // JAX_BQ_CUDA_HADAMARD_H_
