"""GPU diagnostics: exactness of the twin's division and XLA's f32->E2M1 convert on
this device, and a single call of each kernel for ncu to time.

python docs/experiments/scripts/gpu_profile.py checks   # numerics on the GPU
python docs/experiments/scripts/gpu_profile.py kernels  # run under: ncu --clock-control none ...
"""

import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

import jax_bq
from jax_bq.reference import _div


def checks():
    rng = np.random.default_rng(1)
    n = 1_000_000
    a = rng.integers(0, 2**31, n, dtype=np.uint64).astype(np.uint32)
    a = a[(a & 0x7F800000) != 0x7F800000].view(np.float32)
    b = rng.integers(1, 0x7F800000, a.size, dtype=np.uint64).astype(np.uint32).view(np.float32)
    with np.errstate(all="ignore"):
        want = (a / b).view(np.uint32)
    got = np.asarray(jax.jit(_div)(a, b)).view(np.uint32)
    print("twin _div on", jax.devices()[0].platform, "mismatches:", int((got != want).sum()))
    x = np.concatenate(
        [
            rng.standard_normal(n).astype(np.float32) * 3,
            np.float32([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]),
        ]
    )
    x = np.clip(x, -6, 6)
    for dt, ml in (
        (jnp.float4_e2m1fn, ml_dtypes.float4_e2m1fn),
        (jnp.float8_e4m3fn, ml_dtypes.float8_e4m3fn),
    ):
        got = np.asarray(jax.jit(lambda v, d=dt: v.astype(d).astype(jnp.float32))(x))
        ref = x.astype(ml).astype(np.float32)
        bad = np.nonzero(got != ref)[0]
        print(
            f"XLA f32->{np.dtype(ml).name} convert mismatches: {bad.size}",
            [(float(x[i]), float(got[i]), float(ref[i])) for i in bad[:3]],
        )


def kernels():
    rng = np.random.default_rng(0)
    for dtype in (jnp.bfloat16, jnp.float32):
        x = jnp.asarray(rng.standard_normal((8192, 8192), np.float32), dtype)
        for fmt in ("fp8_e4m3", "nvfp4", "mxfp8"):
            q = jax.jit(lambda a, f=fmt: jax_bq.quantize(a, f))(x)
            y = jax.jit(lambda qq, d=dtype: jax_bq.dequantize(qq, d))(q)
            jax.block_until_ready(y)
    jax.block_until_ready(jax.jit(lambda a: a + 1)(x))


def one():
    """bf16 8192^2 -> FP8 block 128 and back: the case the detailed profile looks at."""
    x = jnp.asarray(
        np.random.default_rng(0).standard_normal((8192, 8192), np.float32), jnp.bfloat16
    )
    q = jax.jit(lambda a: jax_bq.quantize(a, "fp8_e4m3"))(x)
    jax.block_until_ready(jax.jit(lambda qq: jax_bq.dequantize(qq, jnp.bfloat16))(q))


if __name__ == "__main__":
    {"checks": checks, "kernels": kernels, "one": one}[sys.argv[1]]()
