"""CPU quantize/dequantize throughput: FFI kernels vs the jitted jnp twin.

GB/s counts bytes read plus bytes written (input + codes + scales). Run:
    jax-bq bench cpu_quantize [--tag _NAME]
The FFI handlers ask for transparent huge pages on their outputs (see
AdviseHugePages in ffi/cpu/cpu_module.cc); JAX_BQ_CPU_HUGEPAGES=0 measures
them without.
The last rows time XLA's own cheapest elementwise ops on the same shape (the
floor every op with a fresh output pays on this machine) in the twin column.
"""

from __future__ import annotations

import argparse
import os

import jax

jax.config.update("jax_platforms", "cpu")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_bq  # noqa: E402
from benchmarks.common import machine, time_fn, write  # noqa: E402
from jax_bq import QuantFormat, reference  # noqa: E402

SHAPE = (4096, 4096)


def floor_rows(x32, rng):
    """XLA's own cheapest elementwise ops over the same shape: the floor that any
    op producing a fresh 4096x4096 output pays here (allocation, first touch)."""
    rows = []
    codes = jnp.asarray(rng.integers(0, 256, SHAPE, dtype=np.uint8))
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jnp.asarray(x32, dtype)
        for name, fn, arg in (
            ("XLA x + 1 (floor)", jax.jit(lambda a: a + 1), x),
            ("XLA uint8 -> dtype * 2 (floor)", jax.jit(lambda c, d=dtype: c.astype(d) * 2), codes),
        ):
            t = time_fn(fn, arg)["median_s"]
            rows.append(
                {
                    "op": name,
                    "input": np.dtype(dtype).name,
                    "shape": "x".join(map(str, SHAPE)),
                    "twin_ms": t * 1e3,
                }
            )
            print(rows[-1], flush=True)
    return rows


def thp_mode():
    """The kernel's transparent-huge-page mode ("always", "madvise", "never")."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return "unknown"
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else text.strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x32 = rng.standard_normal(SHAPE).astype(np.float32)
    rows = []
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jax.device_put(jnp.asarray(x32, dtype))
        for fmt in (QuantFormat.FP8_E4M3, QuantFormat.NVFP4):
            q = jax_bq.quantize(x, fmt)
            v = q.view()
            pack_b = v.pack_b and fmt.is_packed
            io_q = x.nbytes + q.nbytes
            ffi_q = jax.jit(lambda a, f=fmt: jax_bq.quantize(a, f))
            twin_q = jax.jit(
                lambda a, f=fmt, v=v, p=pack_b: reference.quantize_view(
                    a.reshape(v.dims), f, v.ba, v.bb, p
                )
            )
            ffi_d = jax.jit(lambda qq, d=dtype: jax_bq.dequantize(qq, d))
            twin_d = jax.jit(
                lambda qq, f=fmt, v=v, p=pack_b, d=dtype: reference.dequantize_view(
                    qq.data.reshape(v.data_dims(f)),
                    qq.scales.reshape(v.scale_dims),
                    jnp.ones((1,), jnp.float32)
                    if qq.tensor_scale is None
                    else qq.tensor_scale.reshape(1),
                    f,
                    v.ba,
                    v.bb,
                    p,
                    v.a,
                    v.b,
                    d,
                )
            )
            for op, fast, slow in (("quantize", ffi_q, twin_q), ("dequantize", ffi_d, twin_d)):
                arg = x if op == "quantize" else q
                tf = time_fn(fast, arg)
                tt = time_fn(slow, arg)
                rows.append(
                    {
                        "op": op,
                        "input": np.dtype(dtype).name,
                        "format": fmt.value,
                        "shape": "x".join(map(str, SHAPE)),
                        "ffi_ms": tf["median_s"] * 1e3,
                        "twin_ms": tt["median_s"] * 1e3,
                        "ffi_GBps": io_q / tf["median_s"] / 1e9,
                        "twin_GBps": io_q / tt["median_s"] / 1e9,
                        "speedup": tt["median_s"] / tf["median_s"],
                    }
                )
                print(rows[-1], flush=True)
    rows += floor_rows(x32, rng)
    meta = machine() | {
        "cores": os.cpu_count(),
        "JAX_BQ_CPU_HUGEPAGES": os.environ.get("JAX_BQ_CPU_HUGEPAGES", "1 (default)"),
        "transparent_hugepage": thp_mode(),
        "what": "median of 20 after 3 warm-ups",
        "bytes": "input + codes + scales",
    }
    md = write(
        "cpu_quantize" + args.tag,
        meta,
        rows,
        [
            ("op", "op"),
            ("input", "input"),
            ("format", "format"),
            ("shape", "shape"),
            ("ffi_ms", "FFI ms"),
            ("twin_ms", "jnp twin ms"),
            ("ffi_GBps", "FFI GB/s"),
            ("twin_GBps", "twin GB/s"),
            ("speedup", "FFI / twin"),
        ],
    )
    print(md)


if __name__ == "__main__":
    main()
