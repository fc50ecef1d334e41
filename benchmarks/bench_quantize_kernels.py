"""Kernel-level CUDA quantize/dequantize bandwidth (CUDA events, no JAX).

Compiles and runs benchmarks/probes/quantize_bw.cu on a CUDA machine and writes
results/gpu_quantize_kernels.{json,md}:

    jax-bq bench quantize_kernels [--arch 90a]

The probe times each launch sequence on its own with CUDA events, queued behind
a short spin kernel so that the events bracket device time and not the host's
launch latency (median of 40 after 5 warm-ups, 4 rotated input sets of >= 128
MB each, random normal data),
next to a device-to-device copy of 1 GiB measured in the same process. It also
checks that the wide kernel writes the same bytes as the fused kernel it
replaces. `bench_gpu_quantize.py` measures the same ops through JAX (one
executable, per-op slope), which adds XLA's per-call cost.
"""

from __future__ import annotations

from benchmarks.common import BANDWIDTH_COLUMNS, machine, probe_output, write  # noqa: E402


def main() -> None:
    out = probe_output("quantize_bw", __doc__.splitlines()[0])
    meta = machine() | {
        "device": out["device"],
        "copy_TBps": out["copy_TBps"],
        "method": "CUDA events around each launch sequence, queued behind a spin kernel "
        "(device time, no host launch latency); median of 40 after 5 warm-ups; "
        "4 rotated inputs of >= 128 MB; bytes = input + codes + scales (NVFP4's tensor-amax "
        "pass re-reads the input and is not counted)",
    }
    md = write(
        "gpu_quantize_kernels",
        meta,
        out["rows"],
        BANDWIDTH_COLUMNS + [("wide_equals_fused", "same bytes as fused")],
    )
    print(md)


if __name__ == "__main__":
    main()
