// How the CUDA FFI handlers are registered: XLA's stream first (the platform
// context), then the operands and attributes that `bind` adds (the op's Bind
// function, shared with the CPU handler where there is one), marked
// command-buffer (CUDA graph) compatible: the handlers launch on that stream
// and never synchronize, allocate or read host state beyond their attributes.
#ifndef JAX_BQ_CUDA_HANDLER_H_
#define JAX_BQ_CUDA_HANDLER_H_

#include <cuda_runtime.h>

#include "xla/ffi/api/ffi.h"

#define JAX_BQ_DEFINE_CUDA_HANDLER(symbol, impl, bind)                                             \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(                                                                   \
      symbol, impl, bind(::xla::ffi::Ffi::Bind().Ctx<::xla::ffi::PlatformStream<cudaStream_t>>()), \
      {::xla::ffi::Traits::kCmdBufferCompatible})

#endif  // JAX_BQ_CUDA_HANDLER_H_
