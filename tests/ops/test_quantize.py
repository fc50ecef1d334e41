"""Kernel == jnp twin == numpy/ml_dtypes oracle, bit for bit, over the matrix of
formats x input dtypes x shapes x block sizes x granularities."""

import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest
from conftest import compile_cpu_twin

import jax_bq
from jax_bq import Granularity, reference
from jax_bq.formats import QUANTIZED_FORMATS

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
SHAPES = [(256,), (7, 100), (3, 5, 64), (2, 3, 4, 48), (33, 130)]


def cases():
    for fmt, shape in itertools.product(QUANTIZED_FORMATS, SHAPES):
        if fmt.fixed_block:
            yield fmt, shape, Granularity.PER_BLOCK, (fmt.fixed_block,), -1
            if len(shape) >= 2:
                yield fmt, shape, Granularity.PER_BLOCK, (fmt.fixed_block,), 0
            continue
        for block in (16, 32, 128, 256):
            yield fmt, shape, Granularity.PER_BLOCK, (block,), -1
        if len(shape) >= 3:
            yield fmt, shape, Granularity.PER_BLOCK, (16,), 1
        yield fmt, shape, Granularity.PER_CHANNEL, (), -1
        yield fmt, shape, Granularity.PER_CHANNEL, (), 0
        yield fmt, shape, Granularity.PER_TENSOR, (), -1
        if len(shape) >= 2:
            yield fmt, shape, Granularity.TILE_2D, (128, 128), -1
            yield fmt, shape, Granularity.TILE_2D, (16, 32), -1


def case_id(c):
    fmt, shape, gran, block, axis = c
    return (
        f"{fmt.value}-{'x'.join(map(str, shape))}-{gran.value}{'x'.join(map(str, block))}-ax{axis}"
    )


CASES = list(cases())


def is_core(case, dtype) -> bool:
    """The cases of the quick run (``-m "not exhaustive"``); CI runs the rest in its
    ``-m exhaustive`` step. The core covers every format x granularity x axis kind
    once, on a ragged 2-D shape in float32 (plus a blocked middle axis, a rank-1
    shape, and the 16-bit input dtypes on each format's first case)."""
    fmt, shape, gran, block, axis = case
    first = next(c for c in CASES if c[0] is fmt and c[1] == shape)
    if dtype is not jnp.float32:
        return shape == (7, 100) and case == first
    return (
        shape == (7, 100)
        or (shape == (3, 5, 64) and axis == 1)
        or (shape == (256,) and case == first)
    )


PARAMS = [
    pytest.param(
        case,
        dtype,
        id=f"{case_id(case)}-{np.dtype(dtype).name}",
        marks=() if is_core(case, dtype) else pytest.mark.exhaustive,
    )
    for case in CASES
    for dtype in DTYPES
]


def random_input(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.exp(rng.uniform(-4, 4, size=shape))
    return np.asarray(jnp.asarray(x.astype(np.float32), dtype))


def twin(x, fmt, gran, block, axis):
    from jax_bq.layout import make_view

    v = make_view(x.shape, gran, axis if axis < 0 else axis - x.ndim, block)
    xv = jnp.reshape(x, v.dims)
    pack = v.pack_b and fmt.is_packed
    return compile_cpu_twin(lambda a: reference.quantize_view(a, fmt, v.ba, v.bb, pack), xv)(xv)


@pytest.mark.parametrize("case,dtype", PARAMS)
def test_kernel_twin_oracle_bitwise(case, dtype, backend):
    fmt, shape, gran, block, axis = case
    x = random_input(shape, dtype, seed=zlib.crc32(case_id(case).encode()))
    kw = {"granularity": gran, "axis": axis}
    if gran in (Granularity.PER_BLOCK, Granularity.TILE_2D):
        kw["block_size"] = block[0] if gran is Granularity.PER_BLOCK else block
    q = jax_bq.quantize(jnp.asarray(x), fmt, **kw)
    q.validate()
    want_data, want_scales, want_ts = oracle.oracle_quantize(
        np.asarray(x, np.float32), fmt, gran, block, axis
    )
    assert q.data.shape == want_data.shape and q.scales.shape == want_scales.shape
    np.testing.assert_array_equal(oracle.as_bytes(q.data), oracle.as_bytes(want_data))
    np.testing.assert_array_equal(oracle.as_bytes(q.scales), oracle.as_bytes(want_scales))
    if want_ts is not None:
        np.testing.assert_array_equal(oracle.as_bytes(q.tensor_scale), oracle.as_bytes(want_ts))
    td, ts, tt = twin(jnp.asarray(x), fmt, gran, block, axis)
    np.testing.assert_array_equal(oracle.as_bytes(td), oracle.as_bytes(want_data))
    np.testing.assert_array_equal(oracle.as_bytes(ts), oracle.as_bytes(want_scales))

    # Dequantize: kernel == oracle (decode * scale in f32, RNE to dtype), jitted too.
    out = jax_bq.dequantize(q)
    out_jit = jax.jit(jax_bq.dequantize)(q)
    want = oracle.oracle_dequantize_like(q, (want_data, want_scales, want_ts), dtype)
    assert out.dtype == np.dtype(dtype) and out.shape == shape
    np.testing.assert_array_equal(oracle.as_bytes(out), oracle.as_bytes(want))
    np.testing.assert_array_equal(oracle.as_bytes(out_jit), oracle.as_bytes(want))
