"""dequantize: the kernel of each backend against the numpy/ml_dtypes oracle.

The bitwise quantize -> dequantize matrix (every format, dtype, shape and
granularity) is in test_quantize.py; here: other output dtypes, and scales
that quantize never writes (hand-built tensors), for the formats of the
registry whose scales are float32.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import oracle
import pytest
from test_quantize import DTYPES, random_input

import jax_bq
from jax_bq.formats import QUANTIZED_FORMATS

FLOAT32_SCALED = [f for f in QUANTIZED_FORMATS if f.scale_dtype == np.float32]


@pytest.mark.parametrize("fmt", QUANTIZED_FORMATS, ids=lambda f: f.value)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_dequantize_to_other_dtypes(fmt, out_dtype, backend):
    x = random_input((12, 96), jnp.float32, seed=7)
    q = jax_bq.quantize(jnp.asarray(x), fmt)
    out = jax_bq.dequantize(q, out_dtype)
    f32 = np.asarray(jax_bq.dequantize(q, jnp.float32))
    np.testing.assert_array_equal(
        oracle.as_bytes(out), oracle.as_bytes(f32.astype(np.dtype(out_dtype)))
    )


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the oracle's 0 x Inf
@pytest.mark.parametrize("fmt", FLOAT32_SCALED, ids=lambda f: f.value)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_non_finite_scales_of_a_hand_built_tensor(fmt, dtype, backend):
    """Scales that quantize never writes (+Inf, -Inf, a NaN with a sign and a
    payload) still dequantize like the oracle: code 0 x Inf is NaN, and every
    NaN is the canonical quiet NaN."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    x[:, :8] = 0.0  # zero codes meet the infinite scales
    q = jax_bq.quantize(jnp.asarray(x), fmt, block_size=32)
    s = np.asarray(q.scales).copy()
    s[0, 0] = np.inf
    s[1, 0] = -np.inf
    s[2, 0] = np.uint32(0xFFC00123).view(np.float32)
    q = dataclasses.replace(q, scales=jnp.asarray(s))
    got = np.asarray(jax_bq.dequantize(q, dtype))
    want = oracle.oracle_dequantize_like(q, (q.data, s, q.tensor_scale), dtype)
    nan = np.isnan(want.astype(np.float32))
    assert nan[0, :8].all() and nan[2, :32].all() and not nan[3].any()
    np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), nan)
    np.testing.assert_array_equal(oracle.as_bytes(got[~nan]), oracle.as_bytes(want[~nan]))
    # numpy's 0 x Inf is x86's negative default NaN; the contract is canonical.
    bits = got.view(np.uint32 if dtype == jnp.float32 else np.uint16)
    assert (bits[nan] == (0x7FC00000 if dtype == jnp.float32 else 0x7FC0)).all()
