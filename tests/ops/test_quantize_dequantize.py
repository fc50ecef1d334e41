"""quantize_dequantize (fake quant): bit for bit the two calls it stands for.

``quantize_dequantize(x, fmt, **kw) == dequantize(quantize(x, fmt, **kw), x.dtype)``
for every format of the registry and every granularity it allows, eager and
under jit, on each backend; ragged last blocks and a NaN block included. Its
derivative (the straight-through estimator) is checked in tests/test_autodiff.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest

import jax_bq
from jax_bq import Granularity
from jax_bq.formats import QUANTIZED_FORMATS

CASES = [
    (f, g)
    for f in QUANTIZED_FORMATS
    for g in (Granularity.PER_BLOCK, Granularity.PER_CHANNEL, Granularity.TILE_2D)
    if g in f.allowed_granularities
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("fmt,gran", CASES, ids=[f"{f.value}-{g.value}" for f, g in CASES])
def test_equals_dequantize_of_quantize(fmt, gran, dtype, backend):
    rng = np.random.default_rng(fmt.ffi_id)
    x = rng.standard_normal((6, 100)) * np.exp(rng.uniform(-3, 3, (6, 100)))
    x[4, 40] = np.nan
    x = jnp.asarray(x.astype(np.float32), dtype)
    kw = {"granularity": gran}
    if gran is Granularity.TILE_2D:
        kw["block_size"] = (16, 32)
    want = jax_bq.dequantize(jax_bq.quantize(x, fmt, **kw), dtype)
    got = jax_bq.quantize_dequantize(x, fmt, **kw)
    got_jit = jax.jit(lambda a: jax_bq.quantize_dequantize(a, fmt, **kw))(x)
    assert got.dtype == x.dtype and got.shape == x.shape
    assert np.isnan(np.asarray(got, np.float32)[4]).any()  # the NaN block stays NaN
    np.testing.assert_array_equal(oracle.as_bytes(got), oracle.as_bytes(want))
    np.testing.assert_array_equal(oracle.as_bytes(got_jit), oracle.as_bytes(want))
