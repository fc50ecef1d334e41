"""qmatmul on the GPU, side by side with what XLA offers, in one process.

Per shape (M x N x K): XLA bf16 ``dot``; XLA's FP8 convert-scale pattern
(per-tensor scales, which XLA rewrites to its FP8 GEMM); ``jax.nn.scaled_dot_general``
with the mxfp8 config (bf16 operands quantized per call); and each jax_bq path
(cuBLASLt W8A8 with activations quantized in the same custom call, per-tensor
/ per-token x per-channel / 1x128 x 128x128; pre-quantized per-tensor
activations (GEMM only); the W8A16 weight-only kernel for M <= 64).

Method (tool library METHOD.md): random data; weights rotated among copies
totalling >= 240 MB (4x the 60 MB L2); one executable makes L calls cycling
through the copies, and the per-call time is the slope between L = 2R and
L = 4R calls (launch and dispatch overheads cancel); medians of 15 timed runs
after warm-up. Results: results/qmatmul.{json,md}.

Usage: python benchmarks/bench_qmatmul.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, per_call, write  # noqa: E402

import jax_bq as bq  # noqa: E402
from jax_bq import _native  # noqa: E402
from jax_bq.primitives import qmatmul as qp  # noqa: E402

L2_ROTATE_BYTES = 240 << 20
SHAPES = [
    (8192, 8192, 8192),
    (4096, 4096, 4096),
    (2048, 4096, 1024),
    (1, 8192, 8192),
    (16, 8192, 8192),
    (1, 28672, 8192),
    (16, 28672, 8192),
]
CROSSOVER_M = [1, 2, 4, 8, 16, 32, 64]


def _copies(weight_bytes: int) -> int:
    return max(2, min(16, math.ceil(L2_ROTATE_BYTES / weight_bytes)))


def _scale(m: int) -> int:
    """Executable length multiplier: decode-sized calls take tens of microseconds."""
    return 8 if m <= 64 else 1


def distinct(x, count):
    """``count`` different activations derived from ``x`` (computed once, up front)."""
    return [jax.block_until_ready(x * (1.0 + i / 64)) for i in range(count)]


def _rand(key, shape, dtype):
    return jax.random.normal(jax.random.PRNGKey(key), shape, jnp.float32).astype(dtype)


def _nbytes(tree) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(tree))


def bench_shape(m, n, k, rows, quick):
    flops = 2.0 * m * n * k
    x = _rand(1, (m, k), jnp.bfloat16)
    base_w = [_rand(100 + i, (n, k), jnp.bfloat16) for i in range(_copies(2 * n * k))]
    xs = distinct(x, 4 * _copies(n * k // 2) * _scale(m))
    results = {}

    def record(name, op, x_in, weights, wbytes):
        try:
            t = per_call(op, x_in, weights, iters=7 if quick else 15, scale=_scale(m))
        except Exception as e:  # a baseline XLA cannot compile here: say so, go on
            print(f"  {name}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            rows.append({"shape": f"{m}x{n}x{k}", "impl": name, "note": f"failed: {e!s:.80}"})
            return
        results[name] = t
        ratio = results.get("xla_bf16", t) / t
        row = {
            "shape": f"{m}x{n}x{k}",
            "impl": name,
            "time_us": t * 1e6,
            "tflops": flops / t / 1e12,
            "weight_tb_s": wbytes / t / 1e12,
            "vs_xla_bf16": ratio,
        }
        rows.append(row)
        print(
            f"  {name:34s} {t * 1e6:9.1f} us {row['tflops']:8.1f} TFLOP/s "
            f"{row['weight_tb_s']:6.2f} TB/s  {ratio:5.2f}x bf16",
            flush=True,
        )

    dn = (((1,), (1,)), ((), ()))
    record(
        "xla_bf16",
        lambda a, b: jax.lax.dot_general(a, b, dn, preferred_element_type=jnp.bfloat16),
        xs,
        base_w,
        2 * n * k,
    )

    # FP8 copies of the weights, and per-format QuantizedTensors.
    r8 = _copies(n * k)
    w32 = [base_w[i % len(base_w)].astype(jnp.float32) for i in range(r8)]

    def quantized(fmt, **kw):
        return [jax.block_until_ready(bq.quantize(w, fmt, **kw)) for w in w32]

    wq_t = quantized("fp8_e4m3", granularity="per_tensor")
    # XLA FP8 pattern: dot(convert(x8) * sx, convert(w8) * sw), per-tensor scales.
    xla8 = [(q.data, q.scales.reshape(())) for q in wq_t]

    def xla_fp8(a, wpair):
        w8, sw = wpair
        sx = jnp.max(jnp.abs(a)).astype(jnp.float32) / 448.0
        a8 = (a.astype(jnp.float32) / sx).astype(jnp.float8_e4m3fn)
        return jax.lax.dot_general(
            a8.astype(jnp.bfloat16) * sx.astype(jnp.bfloat16),
            w8.astype(jnp.bfloat16) * sw.astype(jnp.bfloat16),
            dn,
            preferred_element_type=jnp.bfloat16,
        )

    record("xla_fp8_convert_scale", xla_fp8, xs, xla8, n * k)
    cfg = jax.nn.get_scaled_dot_general_config("mxfp8")
    record(
        "jax.nn.scaled_dot_general mxfp8",
        lambda a, b: jax.nn.scaled_dot_general(
            a, b, dn, preferred_element_type=jnp.bfloat16, configs=[cfg, cfg]
        ),
        xs,
        base_w,
        2 * n * k,
    )

    variants = [
        ("per_tensor", wq_t, {}),
        ("per_channel", quantized("fp8_e4m3", granularity="per_channel"), {}),
        ("tile_128x128", quantized("fp8_e4m3", granularity="tile_2d"), {}),
    ]
    for label, wq, _ in variants:
        p = bq.plan(x, wq[0], act_format="fp8_e4m3")
        name = f"jax_bq W8A8 {label} ({p.config.act_granularity})"
        if p.path != qp.CUBLAS_FP8:
            rows.append({"shape": f"{m}x{n}x{k}", "impl": name, "note": p.reason[:100]})
            print(f"  {name}: not run: {p.reason}", flush=True)
            continue
        record(name, lambda a, b: bq.qmatmul(a, b, act_format="fp8_e4m3"), xs, wq, _nbytes(wq[0]))
    # GEMM alone: activations already quantized (per tensor).
    xq = [bq.quantize(a, "fp8_e4m3", granularity="per_tensor") for a in xs]
    record("jax_bq W8A8 per_tensor, x pre-quantized", bq.qmatmul, xq, wq_t, _nbytes(wq_t[0]))
    if m >= 4096:
        # Diagnostic: the same GEMM on constant operands (every code 0x38 = 1.0).
        # FP8 tensor cores draw less power when few bits toggle, so a gap to the
        # random-data row shows the clock drop at the power limit.
        ones_w = [bq.quantize(jnp.ones((n, k), jnp.float32), "fp8_e4m3", granularity="per_tensor")]
        ones_w = ones_w * len(wq_t)
        ones_x = [bq.quantize(jnp.ones((m, k), jnp.bfloat16), "fp8_e4m3", granularity="per_tensor")]
        record(
            "jax_bq W8A8 per_tensor, x pre-quantized, constant data",
            bq.qmatmul,
            ones_x * len(xq),
            ones_w,
            _nbytes(wq_t[0]),
        )
    if m <= qp.WEIGHT_ONLY_MAX_M:
        for fmt, kw in (("nvfp4", {}), ("fp4", {"block_size": 32})):
            r4 = _copies(n * k // 2)
            w4 = [
                jax.block_until_ready(bq.quantize(w32[i % len(w32)], fmt, **kw)) for i in range(r4)
            ]
            record(f"jax_bq W4A16 {fmt}", bq.qmatmul, xs, w4, _nbytes(w4[0]))
        for label, wq, _ in variants:
            record(
                f"jax_bq W8A16 {label}",
                lambda a, b: bq.qmatmul(a, b, act_format="bf16"),
                xs,
                wq,
                _nbytes(wq[0]),
            )
    return results


def crossover(rows, quick):
    """Weight-only kernel vs W8A8 (dynamic activations) by M at 8192 x 8192."""
    n = k = 8192
    w32 = [_rand(200 + i, (n, k), jnp.float32) for i in range(_copies(n * k))]
    found = None
    for label, gran in (
        ("per_tensor", "per_tensor"),
        ("per_channel", "per_channel"),
        ("tile_128x128", "tile_2d"),
    ):
        wq = [jax.block_until_ready(bq.quantize(w, "fp8_e4m3", granularity=gran)) for w in w32]
        for m in CROSSOVER_M:
            x = _rand(m, (m, k), jnp.bfloat16)
            p = bq.plan(x, wq[0], act_format="fp8_e4m3")
            x = distinct(x, 4 * len(wq) * _scale(m))
            iters = 7 if quick else 15
            t_wo = per_call(
                lambda a, b: bq.qmatmul(a, b, act_format="bf16"), x, wq, iters, _scale(m)
            )
            t_88 = (
                per_call(
                    lambda a, b: bq.qmatmul(a, b, act_format="fp8_e4m3"), x, wq, iters, _scale(m)
                )
                if p.path == qp.CUBLAS_FP8
                else float("nan")
            )
            win = "w8a16" if not t_88 < t_wo else "w8a8"
            if win == "w8a8" and found is None and label == "per_channel":
                found = m
            rows.append(
                {
                    "weights": label,
                    "M": m,
                    "w8a16_us": t_wo * 1e6,
                    "w8a8_us": t_88 * 1e6,
                    "w8a8_path": p.path,
                    "faster": win,
                }
            )
            print(f"  {label} M={m:3d}: W8A16 {t_wo * 1e6:7.1f} us, W8A8 {t_88 * 1e6:7.1f} us")
    return found


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if jax.devices()[0].platform != "gpu":
        print("bench_qmatmul needs a GPU")
        return 1
    rows = []
    for m, n, k in SHAPES if not args.quick else SHAPES[1:5]:
        print(f"M={m} N={n} K={k}", flush=True)
        bench_shape(m, n, k, rows, args.quick)
    cross_rows = []
    first = crossover(cross_rows, args.quick)
    meta = machine() | {
        "method": "slope between 2sR and 4sR rotated calls per executable (s = 8 for M <= 64), "
        "median of 15 runs; "
        "weight copies >= 240 MB",
        "cublaslt_version": _native.CUDA.module.cublaslt_version(),
        "first_M_where_w8a8_beats_w8a16_per_channel": first,
    }
    md = write(
        "qmatmul",
        meta,
        rows,
        [
            ("shape", "M x N x K"),
            ("impl", "implementation"),
            ("time_us", "time (us)"),
            ("tflops", "TFLOP/s"),
            ("weight_tb_s", "weight TB/s"),
            ("vs_xla_bf16", "vs XLA bf16"),
            ("note", "note"),
        ],
    )
    print(md)
    md2 = write(
        "qmatmul_crossover",
        meta,
        cross_rows,
        [
            ("weights", "weights"),
            ("M", "M"),
            ("w8a16_us", "W8A16 (us)"),
            ("w8a8_us", "W8A8 dynamic (us)"),
            ("w8a8_path", "W8A8 path"),
            ("faster", "faster"),
        ],
    )
    print(md2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
