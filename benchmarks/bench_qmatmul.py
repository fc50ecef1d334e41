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

``--encoder`` measures instead the E5-large GEMM shapes at 4096 tokens and
8192^3 on the device's clock (profiler trace, ``common.device_time_per_call``):
device time AND span (first kernel start to last kernel end of one call, so
host gaps inside a call count), one jitted call per measurement, weights
rotated beyond L2, against XLA bf16 and XLA's direct float8 ``dot_general``
(operands pre-quantized, and with the activation quantized in the same jit),
plus the epilogue-fused FFN1 (bias + GELU + FP8 out) against XLA's own.
Results: results/qmatmul_encoder.{json,md}.

Usage: jax-bq bench qmatmul [--quick] [--encoder]
"""

from __future__ import annotations

import argparse
import math
import sys

import jax
import jax.numpy as jnp

import jax_bq as bq  # noqa: E402
from benchmarks.common import device_time_per_call, machine, per_call, write  # noqa: E402
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


ENCODER_SHAPES = [
    (4096, 3072, 1024),  # fused QKV
    (4096, 1024, 1024),  # Q / K / V / O
    (4096, 4096, 1024),  # FFN1
    (4096, 1024, 4096),  # FFN2
    (8192, 8192, 8192),
]
F8 = jnp.float8_e4m3fn


def _xla_f8_quant(a):
    """Per-tensor dynamic FP8 in plain jnp: (codes, scale), as a JAX user would write it."""
    s = jnp.max(jnp.abs(a.astype(jnp.float32))) / 448.0
    return (a.astype(jnp.float32) / s).astype(F8), s


def _xla_f8_dot(a8, sa, w8, sw):
    y = jax.lax.dot_general(a8, w8, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return (y * (sa * sw)).astype(jnp.bfloat16)


def encoder_variants(m, n, k):
    """name -> (function of (x, weights), weights list, activation list)."""
    copies = max(2, min(16, math.ceil(L2_ROTATE_BYTES / (n * k))))
    wf = [_rand(100 + i, (n, k), jnp.float32) * 0.02 for i in range(copies)]
    xs = [_rand(1 + i, (m, k), jnp.bfloat16) for i in range(4)]
    bias = _rand(7, (n,), jnp.bfloat16) * 0.1
    w16 = [w.astype(jnp.bfloat16) for w in wf]
    w8 = [_xla_f8_quant(w) for w in wf]
    wt = [bq.quantize(w, "fp8_e4m3", granularity="per_tensor") for w in wf]
    wc = [bq.quantize(w, "fp8_e4m3") for w in wf]
    wtile = [bq.quantize(w, "fp8_e4m3", granularity="tile_2d") for w in wf]
    x8 = [_xla_f8_quant(x) for x in xs]
    dims = (((1,), (1,)), ((), ()))

    def static(x):
        return bq.quantize_static(x, 2.0**-4, exact_scale=True)

    v = {
        "XLA bf16": (lambda x, w: jax.lax.dot_general(x, w, dims), w16, xs),
        "XLA f8 dot (pre-quantized)": (
            lambda x, w: _xla_f8_dot(x[0], x[1], w[0], w[1]),
            w8,
            x8,
        ),
        "XLA f8 dot (x quantized in jit)": (
            lambda x, w: _xla_f8_dot(*_xla_f8_quant(x), w[0], w[1]),
            w8,
            xs,
        ),
        "jax_bq per-tensor, x in-call": (
            lambda x, w: bq.qmatmul(x, w, act_format="fp8_e4m3", act_granularity="per_tensor"),
            wt,
            xs,
        ),
        "jax_bq per-token x per-channel, x in-call": (
            lambda x, w: bq.qmatmul(x, w, act_format="fp8_e4m3", act_granularity="per_token"),
            wc,
            xs,
        ),
        "jax_bq 128x128 x 1x128, x in-call": (lambda x, w: bq.qmatmul(x, w), wtile, xs),
        "jax_bq static per-tensor (x quantized by XLA)": (
            lambda x, w: bq.qmatmul(static(x), w),
            wt,
            xs,
        ),
        "jax_bq pre-quantized per-tensor": (
            lambda x, w: bq.qmatmul(x, w),
            wt,
            [static(x) for x in xs],
        ),
    }
    if (m, n, k) == (4096, 4096, 1024):
        v["XLA bf16 + bias + GELU"] = (
            lambda x, w: jax.nn.gelu(jax.lax.dot_general(x, w, dims) + bias, approximate=False),
            w16,
            xs,
        )
        v["XLA f8 dot + bias + GELU + f8 out"] = (
            lambda x, w: (
                static(
                    jax.nn.gelu(_xla_f8_dot(x[0], x[1], w[0], w[1]) + bias, approximate=True)
                ).data
            ),
            w8,
            x8,
        )
        for act in ("gelu_tanh", "gelu"):
            v[f"jax_bq static + bias + {act} + f8 out"] = (
                lambda x, w, act=act: (
                    bq.qmatmul(
                        x, w, bias=bias, activation=act, out_format="fp8_e4m3", out_scale=0.0625
                    ).data
                ),
                wt,
                [static(x) for x in xs],
            )
    return v


def encoder_shapes(quick: bool, done=lambda rows: None) -> list[dict]:
    """Rows of every variant at every encoder shape; ``done(rows)`` after each shape."""
    rows = []
    for m, n, k in ENCODER_SHAPES[: 2 if quick else None]:
        base = None
        xla8 = None
        for name, (fn, ws, xs) in encoder_variants(m, n, k).items():
            args = [(xs[i % len(xs)], ws[i % len(ws)]) for i in range(max(len(ws), len(xs)))]
            try:
                t = device_time_per_call(jax.jit(fn), args, calls=20 if quick else 40)
            except Exception as e:  # record, keep going
                print(f"{m}x{n}x{k} {name}: FAILED {type(e).__name__}: {e}", flush=True)
                rows.append({"shape": f"{m}x{n}x{k}", "impl": name, "note": str(e)[:120]})
                continue
            if base is None:
                base = t
            if name == "XLA f8 dot (x quantized in jit)":
                xla8 = t
            row = {
                "shape": f"{m}x{n}x{k}",
                "impl": name,
                "device_us": t["us"],
                "span_us": t["span_us"],
                "gap_us": t["span_us"] - t["us"],
                "kernels": t["kernels"],
                "tflops_span": 2.0 * m * n * k / t["span_us"] / 1e6,
                "x_bf16_span": base["span_us"] / t["span_us"],
                "x_xla_f8_injit_span": (xla8["span_us"] / t["span_us"]) if xla8 else "",
            }
            rows.append(row)
            print(
                f"{m}x{n}x{k} {name:48s} dev {t['us']:8.1f} us span {t['span_us']:8.1f} us "
                f"x bf16 {row['x_bf16_span']:.2f}",
                flush=True,
            )
        done(rows)
    return rows


def main_encoder(quick: bool) -> int:
    meta = machine() | {
        "method": "profiler trace per call (device time = sum of kernel durations; span = first "
        "kernel start to last kernel end), median of 40 calls, weights rotated beyond L2",
        "cublaslt_version": _native.CUDA.module.cublaslt_version(),
        "xla_flags": __import__("os").environ.get("XLA_FLAGS", ""),
    }
    columns = [
        ("shape", "M x N x K"),
        ("impl", "implementation"),
        ("device_us", "device us"),
        ("span_us", "span us"),
        ("gap_us", "span - device"),
        ("kernels", "kernels"),
        ("tflops_span", "TFLOP/s (span)"),
        ("x_bf16_span", "x bf16 (span)"),
        ("x_xla_f8_injit_span", "x XLA f8 in-jit (span)"),
    ]

    def done(rows):  # the JSON after every shape: a run cut by a time limit keeps its rows
        meta["graph_cache"] = _native.CUDA.module.graph_cache_stats()
        return write("qmatmul_encoder", meta, rows, columns)

    print(done(encoder_shapes(quick, done)))
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--encoder", action="store_true", help="E5-large shapes, device time + span")
    args = ap.parse_args()
    if jax.devices()[0].platform != "gpu":
        print("bench_qmatmul needs a GPU")
        return 1
    if args.encoder:
        return main_encoder(args.quick)
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
