// Checks the dispatch generated from the format registry: every row reaches
// its own template instantiation, and an id outside the table reaches
// UnknownFormat (never the last format, as a `default:` case once did).
// Build and run: c++ -std=c++20 -Iffi/include tests/native/format_registry_check.cc && ./a.out
#include <cstdio>
#include <initializer_list>

#include "jax_bq/block_math.h"
#include "jax_bq/format_registry.h"

namespace jax_bq {
template <>
struct UnknownFormat<int> {
  static int Make(int32_t id) { return -1000 - id; }
};
}  // namespace jax_bq

int main() {
  using jax_bq::Format;
  int failures = 0;
  auto expect = [&](const char* what, long got, long want) {
    if (got != want) {
      std::printf("FAIL %s: got %ld, want %ld\n", what, got, want);
      ++failures;
    }
  };
  for (const jax_bq::FormatInfo& row : jax_bq::kFormatTable) {
    const int got =
        jax_bq::DispatchFormat(row.format, []<Format F>() { return static_cast<int>(F); });
    expect(row.name, got, row.id);
    expect("ValidFormat", jax_bq::ValidFormat(row.id), 1);
    // The traits agree with the table.
    const bool packed = jax_bq::DispatchFormat(
        row.format, []<Format F>() { return static_cast<int>(jax_bq::FormatTraits<F>::kPacked); });
    expect("kPacked", packed, row.elements_per_unit > 1);
    const int max = jax_bq::DispatchFormat(
        row.format, []<Format F>() { return static_cast<int>(jax_bq::FormatTraits<F>::kMax); });
    expect("kMax", max, static_cast<long>(row.max_value));
  }
  for (int id : {-1, 0, 1, 10, 99}) {
    const int got = jax_bq::DispatchFormat(static_cast<Format>(id),
                                           []<Format F>() { return static_cast<int>(F); });
    expect("unknown id", got, -1000 - id);
    expect("ValidFormat(unknown)", jax_bq::ValidFormat(id), 0);
  }
  std::printf("%s: %d formats, %d failures\n", failures ? "FAIL" : "OK", jax_bq::kNumFormats,
              failures);
  return failures ? 1 : 0;
}
