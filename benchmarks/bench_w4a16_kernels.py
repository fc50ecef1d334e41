"""Kernel-level NVFP4 W4A16 (FP4 weights x bf16 activations) timing, CUDA events.

Compiles and runs benchmarks/probes/w4a16_bw.cu on a CUDA machine and writes
results/gpu_w4a16_kernels.{json,md}:

    jax-bq bench w4a16_kernels [--arch 90a]

The probe times W4A16NvKernel (what qmatmul launches for NVFP4 weights) and
W4A16Kernel (the byte-permute-table kernel it replaced, still used for FP4
with float32 scales) on the same data: random codes and E4M3 scales, random
normal activations, weight copies rotated over >= 240 MB, median of 50 launches
after 5 warm-ups, each launch bracketed by its own events and queued behind a
short spin kernel (so the events time the device, not the host's launch
latency, worth 2-4 us per launch when the stream is idle), next to a
device-to-device copy measured in the same process. Bytes = codes + block
scales. Both kernels are checked against a float64 host reference first.
It also times Fp4ToFp8Kernel, fp4_to_fp8's one-pass conversion of the same
weights to FP8 E4M3 1x128 (bytes = 4-bit codes + scales read, FP8 codes +
float32 scales written), and the M = 1 / M = 16 configurations of the
28672-row case at N <= 8192 with the same weights every launch (resident in
L2: the kernel's time without HBM traffic) next to rotated weights.
`bench_fp4.py` measures the same shapes through JAX against XLA's bf16 dot.
"""

from __future__ import annotations

from benchmarks.common import machine, probe_output, write  # noqa: E402


def main() -> None:
    out = probe_output("w4a16_bw", __doc__.splitlines()[0])
    rows = out["rows"]
    old = {(r["m"], r["n"], r["k"]): r["us"] for r in rows if r["kernel"] == "W4A16Kernel"}
    for r in rows:
        if r["kernel"] == "Fp4ToFp8Kernel":  # no M: a conversion of the N x K weights
            r["shape"] = f"{r['n']}x{r['k']}"
        else:
            r["shape"] = f"{r['m']}x{r['n']}x{r['k']}"
            if r["kernel"] in ("W4A16NvKernel", "W4A16Kernel"):  # not the L2-resident rows
                r["speedup"] = old[(r["m"], r["n"], r["k"])] / r["us"]
    meta = machine() | {
        "device": out["device"],
        "copy_TBps": out["copy_TBps"],
        "reference_check_failures": out["check_failures"],
        "method": "CUDA events around each launch, queued behind a spin kernel (device "
        "time, no host launch latency); median of 50 after 5 warm-ups; weight "
        "copies rotated over >= 240 MB; bytes = FP4 codes + E4M3 block scales",
    }
    columns = [
        ("kernel", "kernel"),
        ("shape", "M x N x K"),
        ("us", "µs"),
        ("TBps", "TB/s"),
        ("pct_copy", "% of copy"),
        ("speedup", "x W4A16Kernel"),
    ]
    print(write("gpu_w4a16_kernels", meta, rows, columns))


if __name__ == "__main__":
    main()
