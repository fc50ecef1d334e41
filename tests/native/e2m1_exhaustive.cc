// Exhaustive check of EncodeE2M1 against the generic minifloat encoder over
// every float32 bit pattern (clipped to +-6 first, as every caller does; NaN
// inputs compared unclipped), and of EncodeE2M1ByMinima (the CUDA quantize
// kernels' encoder) against the same on every non-NaN input, clipped and
// unclipped. Host build, about 1 min with -mfma (3-4 min without, where
// std::fma is a library call):
//   c++ -std=c++20 -O2 -mfma -Iffi/include tests/native/e2m1_exhaustive.cc -o e2m1 && ./e2m1
#include <cstdint>
#include <cstdio>

#include "jax_bq/formats.h"

int main() {
  uint64_t bad = 0;
  for (uint64_t i = 0; i <= 0xffffffffull; ++i) {
    const float x = jax_bq::BitsFloat(static_cast<uint32_t>(i));
    float c = x;
    if (x == x) c = x > 6.0f ? 6.0f : (x < -6.0f ? -6.0f : x);
    const uint8_t want = x == x ? jax_bq::EncodeMinifloat<2, 1, 1>(c)
                                : static_cast<uint8_t>((static_cast<uint32_t>(i) >> 28) & 8u);
    const uint8_t got = jax_bq::EncodeE2M1(c);
    // Unclipped finite and infinite inputs must saturate the same way.
    const uint8_t got_raw = jax_bq::EncodeE2M1(x);
    const bool minima_ok =
        x != x || (jax_bq::EncodeE2M1ByMinima(c) == want && jax_bq::EncodeE2M1ByMinima(x) == want);
    if (got != want || got_raw != want || !minima_ok) {
      if (bad < 10) {
        std::printf("x=%a (0x%08x): want %u got %u raw %u minima %u\n", x, static_cast<uint32_t>(i),
                    want, got, got_raw, x == x ? jax_bq::EncodeE2M1ByMinima(x) : 0u);
      }
      ++bad;
    }
  }
  std::printf("E2M1 EXHAUSTIVE: %llu mismatches over 2^32 inputs\n",
              static_cast<unsigned long long>(bad));
  return bad != 0;
}
