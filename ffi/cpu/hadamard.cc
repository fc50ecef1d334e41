// CPU handler BqHadamardCpu (FFI target jax_bq_hadamard): y = scale * H_n x
// on every block of n consecutive elements of the [rows, d] input, with the
// butterfly order of jax_bq/hadamard_math.h. The handler leaves the floating
// point environment as XLA:CPU set it (flush-to-zero included), so it agrees
// bit for bit with the jnp twin compiled by XLA:CPU, subnormals included.
#include "hadamard.h"

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "jax_bq/ffi_util.h"
#include "jax_bq/formats.h"
#include "jax_bq/hadamard_ffi.h"
#include "jax_bq/hadamard_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_bq::cpu {
namespace {

float LoadF32(const void* p, ffi::DataType t, int64_t i) {
  if (t == ffi::DataType::F32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  return t == ffi::DataType::BF16 ? BF16BitsToFloat(h) : F16BitsToFloat(h);
}

void StoreF32(void* p, ffi::DataType t, int64_t i, float v) {
  if (t == ffi::DataType::F32) {
    static_cast<float*>(p)[i] = v;
  } else {
    static_cast<uint16_t*>(p)[i] =
        t == ffi::DataType::BF16 ? FloatToBF16Bits(v) : FloatToF16Bits(v);
  }
}

ffi::Error HadamardImpl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y, int64_t block,
                        float scale) {
  JAX_BQ_RETURN_IF_ERROR(CheckHadamardOperands(x, *y, block));
  auto dims = x.dimensions();
  const ffi::DataType t = x.element_type();
  const int64_t total = dims[0] * dims[1];
  std::vector<float> v(static_cast<size_t>(block));
  for (int64_t base = 0; base < total; base += block) {
    for (int64_t i = 0; i < block; ++i) v[i] = LoadF32(x.untyped_data(), t, base + i);
    for (int64_t h = 1; h < block; h <<= 1) {
      for (int64_t i = 0; i < block; i += 2 * h) {
        for (int64_t j = i; j < i + h; ++j) {
          const float a = v[j], b = v[j + h];
          v[j] = a + b;
          v[j + h] = a - b;
        }
      }
    }
    for (int64_t i = 0; i < block; ++i) StoreF32(y->untyped_data(), t, base + i, v[i] * scale);
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_bq::cpu

XLA_FFI_DEFINE_HANDLER_SYMBOL(BqHadamardCpu, jax_bq::cpu::HadamardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x [rows, d]
                                  .Ret<ffi::AnyBuffer>()  // y [rows, d], x's dtype
                                  .Attr<int64_t>("block")
                                  .Attr<float>("scale"));
