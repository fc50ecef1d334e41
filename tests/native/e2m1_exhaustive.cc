// Exhaustive check of EncodeE2M1 against the generic minifloat encoder over
// every float32 bit pattern (clipped to +-6 first, as every caller does; NaN
// inputs compared unclipped). Host build, about 10 s:
//   c++ -std=c++20 -O2 -Iffi/include tests/native/e2m1_exhaustive.cc -o e2m1 && ./e2m1
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
    if (got != want || got_raw != want) {
      if (bad < 10) {
        std::printf("x=%a (0x%08x): want %u got %u raw %u\n", x, static_cast<uint32_t>(i), want,
                    got, got_raw);
      }
      ++bad;
    }
  }
  std::printf("E2M1 EXHAUSTIVE: %llu mismatches over 2^32 inputs\n",
              static_cast<unsigned long long>(bad));
  return bad != 0;
}
