"""NaN/Inf containment, all-zero blocks, float32 subnormals, ragged tails, empty arrays."""

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest
from conftest import sweep

import jax_bq
from jax_bq import Granularity
from jax_bq.formats import QUANTIZED_FORMATS

FMT_IDS = lambda f: f.value  # noqa: E731


def block_of(fmt):
    return fmt.fixed_block or (32 if fmt.is_packed else 128)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("fmt", QUANTIZED_FORMATS, ids=FMT_IDS)
def test_non_finite_poisons_exactly_its_block(fmt, bad, backend):
    blk = block_of(fmt)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3 * blk)).astype(np.float32)
    x[1, blk + 5] = bad
    q = jax_bq.quantize(jnp.asarray(x), fmt)
    out = np.asarray(jax_bq.dequantize(q))
    nan_mask = np.isnan(out)
    expect = np.zeros_like(nan_mask)
    expect[1, blk : 2 * blk] = True
    np.testing.assert_array_equal(nan_mask, expect)
    assert not np.isinf(out).any()
    ref = oracle.oracle_quantize(x, fmt, Granularity.PER_BLOCK, (blk,), -1)
    np.testing.assert_array_equal(oracle.as_bytes(q.data), oracle.as_bytes(ref[0]))
    np.testing.assert_array_equal(oracle.as_bytes(q.scales), oracle.as_bytes(ref[1]))
    if fmt.has_tensor_scale:  # the tensor scale ignores the non-finite element
        assert np.isfinite(np.asarray(q.tensor_scale))


@pytest.mark.parametrize("fmt", QUANTIZED_FORMATS, ids=FMT_IDS)
def test_all_zero_blocks_give_zeros_not_nan(fmt, backend):
    blk = block_of(fmt)
    x = np.zeros((3, 2 * blk), np.float32)
    x[2, :blk] = np.linspace(-1, 1, blk)
    x[1, 3] = -0.0
    q = jax_bq.quantize(jnp.asarray(x), fmt)
    out = np.asarray(jax_bq.dequantize(q))
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out[:2], 0.0)
    assert np.signbit(out[1, 3])  # -0 survives
    if fmt.scale_dtype == np.float32:
        np.testing.assert_array_equal(np.asarray(q.scales)[:2], 1.0)


@pytest.mark.parametrize("fmt", QUANTIZED_FORMATS, ids=FMT_IDS)
def test_entirely_zero_tensor(fmt, backend):
    x = jnp.zeros((4, 64), jnp.bfloat16)
    out = jax_bq.dequantize(jax_bq.quantize(x, fmt))
    np.testing.assert_array_equal(np.asarray(out, np.float32), 0.0)


@pytest.mark.parametrize("fmt", QUANTIZED_FORMATS, ids=FMT_IDS)
def test_float32_subnormal_inputs_follow_ieee(fmt, backend):
    # Kernels keep IEEE semantics for float32 subnormals (XLA:CPU's jnp twin
    # flushes them; see jax_bq.reference).
    blk = block_of(fmt)
    tiny = np.finfo(np.float32).smallest_subnormal
    x = np.zeros((3, blk), np.float32)
    x[0] = np.arange(1, blk + 1) * tiny * 1000  # subnormal amax, subnormal scale
    x[1] = tiny * np.arange(blk)  # down to 2^-149
    x[2, 0], x[2, 1] = 1.0, 1e-39
    q = jax_bq.quantize(jnp.asarray(x), fmt)
    ref = oracle.oracle_quantize(x, fmt, Granularity.PER_BLOCK, (blk,), -1)
    np.testing.assert_array_equal(oracle.as_bytes(q.data), oracle.as_bytes(ref[0]))
    np.testing.assert_array_equal(oracle.as_bytes(q.scales), oracle.as_bytes(ref[1]))
    want = oracle.oracle_dequantize_like(q, ref, np.float32)
    np.testing.assert_array_equal(oracle.as_bytes(jax_bq.dequantize(q)), oracle.as_bytes(want))


@pytest.mark.parametrize("fmt", QUANTIZED_FORMATS, ids=FMT_IDS)
@pytest.mark.parametrize("n", sweep([1, 15, 17, 33, 129, 255], core={17, 129}))
def test_ragged_tail_amax_covers_only_real_elements(fmt, n, backend):
    blk = block_of(fmt)
    rng = np.random.default_rng(n)
    x = rng.standard_normal((5, n)).astype(np.float32)
    q = jax_bq.quantize(jnp.asarray(x), fmt)
    assert q.shape == (5, n)
    assert q.scales.shape == (5, -(-n // blk))
    ref = oracle.oracle_quantize(x, fmt, Granularity.PER_BLOCK, (blk,), -1)
    np.testing.assert_array_equal(oracle.as_bytes(q.data), oracle.as_bytes(ref[0]))
    np.testing.assert_array_equal(oracle.as_bytes(q.scales), oracle.as_bytes(ref[1]))
    # The tail block's scale comes from its own elements: its largest one hits MAX.
    out = np.asarray(jax_bq.dequantize(q))
    tail = slice((n - 1) // blk * blk, n)
    if fmt.scale_dtype == np.float32:
        np.testing.assert_allclose(
            np.abs(out[:, tail]).max(1), np.abs(x[:, tail]).max(1), rtol=1e-6
        )


EMPTY_CASES = [
    (f, g)
    for f in QUANTIZED_FORMATS
    for g in (Granularity.PER_BLOCK, Granularity.PER_CHANNEL, Granularity.PER_TENSOR)
    if g in f.allowed_granularities
]


@pytest.mark.parametrize(
    "fmt,gran", EMPTY_CASES, ids=[f"{f.value}-{g.value}" for f, g in EMPTY_CASES]
)
@pytest.mark.parametrize(
    "shape", sweep([(0,), (0, 64), (4, 0), (2, 0, 32)], core={(4, 0)}, ids=str)
)
def test_empty_arrays(fmt, gran, shape, backend):
    x = jnp.zeros(shape, jnp.float32)
    q = jax_bq.quantize(x, fmt, granularity=gran)
    q.validate()
    assert q.scales.size == 0
    out = jax_bq.dequantize(q)
    assert out.shape == shape
    jitted = jax.jit(lambda a: jax_bq.dequantize(jax_bq.quantize(a, fmt, granularity=gran)))(x)
    assert jitted.shape == shape
