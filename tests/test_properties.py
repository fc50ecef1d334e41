"""Hypothesis properties: idempotence, sign preservation, monotonicity, NaN containment."""

import jax.numpy as jnp
import numpy as np
import oracle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jax_bq
from jax_bq import Granularity, QuantFormat

FP32 = [QuantFormat.FP8_E4M3, QuantFormat.FP8_E5M2, QuantFormat.FP4]
POW2 = [QuantFormat.MXFP8, QuantFormat.MXFP4]
ALL = FP32 + POW2 + [QuantFormat.NVFP4]

finite_f32 = st.floats(
    -(2.0**100), 2.0**100, allow_nan=False, allow_infinity=False, width=32, allow_subnormal=False
)
arrays = hnp.arrays(
    np.float32, st.tuples(st.integers(1, 4), st.integers(1, 80)), elements=finite_f32
)
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def block(fmt):
    return fmt.fixed_block or 16


@SETTINGS
@given(x=arrays, fmt=st.sampled_from(FP32 + POW2))
def test_idempotent(x, fmt, backend):
    q1 = jax_bq.quantize(jnp.asarray(x), fmt, block_size=block(fmt))
    q2 = jax_bq.quantize(jax_bq.dequantize(q1), fmt, block_size=block(fmt))
    np.testing.assert_array_equal(oracle.as_bytes(q1.data), oracle.as_bytes(q2.data))
    s1 = np.asarray(q1.scales).astype(np.float32)
    s2 = np.asarray(q2.scales).astype(np.float32)
    if fmt in POW2:
        np.testing.assert_array_equal(s1, s2)
    else:
        ulps = np.abs(s1.view(np.int32).astype(np.int64) - s2.view(np.int32).astype(np.int64))
        assert ulps.max() <= 1
        pow2 = np.frexp(s1)[0] == 0.5
        np.testing.assert_array_equal(s1[pow2], s2[pow2])


@SETTINGS
@given(x=arrays, fmt=st.sampled_from(ALL))
def test_sign_preserved(x, fmt, backend):
    out = np.asarray(jax_bq.quantize_dequantize(jnp.asarray(x), fmt, block_size=block(fmt)))
    nz = out != 0
    np.testing.assert_array_equal(np.sign(out[nz]), np.sign(x[nz]))


@SETTINGS
@given(x=hnp.arrays(np.float32, st.integers(2, 300), elements=finite_f32), fmt=st.sampled_from(ALL))
def test_monotone_within_a_scale(x, fmt, backend):
    xs = np.sort(x)
    gran = Granularity.PER_BLOCK if fmt.fixed_block else Granularity.PER_TENSOR
    out = np.asarray(jax_bq.quantize_dequantize(jnp.asarray(xs), fmt, granularity=gran))
    if fmt.fixed_block:  # monotone inside each block
        n = fmt.fixed_block
        for i in range(0, len(out), n):
            assert np.all(np.diff(out[i : i + n]) >= 0)
    else:
        assert np.all(np.diff(out) >= 0)


@SETTINGS
@given(x=arrays, fmt=st.sampled_from(ALL), data=st.data())
def test_nan_containment(x, fmt, data, backend):
    r = data.draw(st.integers(0, x.shape[0] - 1))
    c = data.draw(st.integers(0, x.shape[1] - 1))
    x = x.copy()
    x[r, c] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    b = block(fmt)
    out = np.asarray(jax_bq.quantize_dequantize(jnp.asarray(x), fmt, block_size=b))
    expect = np.zeros(x.shape, bool)
    expect[r, (c // b) * b : (c // b + 1) * b] = True
    np.testing.assert_array_equal(np.isnan(out), expect)
