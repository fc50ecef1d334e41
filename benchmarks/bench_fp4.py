"""FP4 weights on the H200: W4A16 kernel vs FP4->FP8 conversion vs pre-converted FP8.

Per shape ``M x N x K`` (NVFP4 weights ``[N, K]``), in one process, per-call
slope timing with weights rotated beyond L2 (the qmatmul benchmark's method,
``benchmarks/common.per_call``):

* ``xla_bf16``: XLA's bf16 dot (the baseline of every ratio);
* ``w4a16``: the W4A16 kernel (``act_format="bf16"``, M <= 64);
* ``fp4_via_fp8``: NVFP4 weights converted to FP8 E4M3 1x128 inside the call
  (``jax_bq.fp4_to_fp8``: one dequantize + one quantize launch), then the
  cuBLASLt FP8 GEMM with activations quantized 1x128 in the call;
* ``fp8_preconverted``: the same GEMM on weights converted once, up front;
* ``auto``: ``qmatmul(x, w)`` with no options (what the plan picks).

Each call's weights pass through an optimization barrier with its
activations, so that XLA cannot merge the in-call conversions of calls that
share a weight copy (the conversion is paid per call, as in a model).
Effective TB/s counts weight codes + scales + activations + output. With plain
activations the plan converts from ``M >= FP4_CONVERT_MIN_M`` (256, where the
converted path overtook dequantize + bf16 dot). Results: ``results/fp4.{json,md}``.
``--device-time`` times each call's kernels from a profiler trace instead
(``common.device_time_per_call``): no host dispatch in the numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jax_bq as bq  # noqa: E402
from benchmarks.bench_qmatmul import _copies, _nbytes, _rand, _scale, distinct  # noqa: E402
from benchmarks.common import device_time_per_call, machine, per_call, write  # noqa: E402
from jax_bq.convert import fp4_to_fp8  # noqa: E402

SHAPES = [(n, k) for n, k in ((8192, 8192), (28672, 8192))]
MS = [1, 16, 32, 64, 128, 256, 1024, 4096]


def bench(m, n, k, rows, only="", device_time=False):
    x = _rand(1, (m, k), jnp.bfloat16)
    r4 = _copies(n * k // 2)
    w4 = [bq.quantize(_rand(100 + i, (n, k), jnp.float32), "nvfp4") for i in range(r4)]
    r8 = _copies(n * k)
    w8 = [fp4_to_fp8(w4[i % r4]) for i in range(r8)]
    wb = [bq.dequantize(w4[i % r4], jnp.bfloat16) for i in range(_copies(2 * n * k))]
    xs = distinct(x, 4 * max(r4, r8) * _scale(m))
    io = 2 * m * k + 2 * m * n
    dn = (((1,), (1,)), ((), ()))
    variants = [
        ("xla_bf16", lambda a, b: jax.lax.dot_general(a, b, dn), wb, 2 * n * k),
        ("auto", lambda a, b: bq.qmatmul(a, b), w4, _nbytes(w4[0])),
    ]
    if m <= 64:
        variants.append(
            ("w4a16", lambda a, b: bq.qmatmul(a, b, act_format="bf16"), w4, _nbytes(w4[0]))
        )
    if m >= 4:  # cuBLASLt refuses block scales at M = 1, 2 on Hopper
        variants += [
            (
                "fp4_via_fp8",
                lambda a, b: bq.qmatmul(a, b, act_format="fp8_e4m3"),
                w4,
                _nbytes(w4[0]),
            ),
            (
                "fp8_preconverted",
                lambda a, b: bq.qmatmul(a, b, act_format="fp8_e4m3", act_granularity="block_1x128"),
                w8,
                _nbytes(w8[0]),
            ),
        ]
    if only:
        variants = [v for v in variants if v[0] in ("xla_bf16", *only.split(","))]
    base = None
    for name, op0, ws, wbytes in variants:

        def op(a, b, op0=op0):
            # Tie each call's weights to its activations: XLA would otherwise CSE
            # the in-call conversion of a weight copy shared by several calls.
            b, a = jax.lax.optimization_barrier((b, a))
            return op0(a, b)

        try:
            if device_time:  # the call's kernels from a profiler trace (common.py)
                rot = max(len(xs), len(ws))
                args = [(xs[i % len(xs)], ws[i % len(ws)]) for i in range(rot)]
                t = device_time_per_call(jax.jit(op), args)["us"] * 1e-6
            else:
                t = per_call(op, xs, ws, iters=9, scale=_scale(m))
        except Exception as e:
            print(f"  {name}: failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
            continue
        base = base or t
        path = bq.plan(xs[0], ws[0]).path if name == "auto" else ""
        row = {
            "shape": f"{m}x{n}x{k}",
            "impl": name + (f" ({path})" if path else ""),
            "time_us": t * 1e6,
            "vs_xla_bf16": base / t,
            "eff_tb_s": (wbytes + io) / t / 1e12,
            "tflops": 2.0 * m * n * k / t / 1e12,
        }
        rows.append(row)
        print(
            f"{m:5d}x{n}x{k} {row['impl']:28s} {t * 1e6:9.1f} us {base / t:5.2f}x "
            f"{row['eff_tb_s']:5.2f} TB/s {row['tflops']:7.1f} TFLOP/s",
            flush=True,
        )


def main():
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma-separated variant names (+ xla_bf16)")
    ap.add_argument("--ms", default="", help="comma-separated M values")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument(
        "--device-time",
        action="store_true",
        help="time each call's kernels from a jax.profiler trace instead of the wall slope",
    )
    a = ap.parse_args()
    method = (
        "device time of each call's kernels (jax.profiler trace, median of 20 calls over "
        "rotated inputs)"
        if a.device_time
        else "per-call slope, weights rotated >= 240 MB, median of 9"
    )
    ms = [int(v) for v in a.ms.split(",")] if a.ms else MS
    rows = []
    for n, k in SHAPES:
        for m in ms:
            bench(m, n, k, rows, a.only, a.device_time)
            write(
                "fp4" + a.tag,
                machine() | {"method": method},
                rows,
                [
                    ("shape", "M x N x K"),
                    ("impl", "path"),
                    ("time_us", "us / call"),
                    ("vs_xla_bf16", "x XLA bf16"),
                    ("eff_tb_s", "effective TB/s"),
                    ("tflops", "TFLOP/s"),
                ],
            )


if __name__ == "__main__":
    main()
