"""The format registry (ffi/include/jax_bq/format_registry.h) and its uses.

Python builds its format specs from the table the CPU module exports; an id
outside the table is an error from every handler, never another format.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import sweep

import jax_bq
from jax_bq import _native, formats
from jax_bq.formats import QUANTIZED_FORMATS, QuantFormat

pytestmark = pytest.mark.skipif(not _native.CPU.loaded, reason="CPU module not built")
_NEXT_ID = max(f.ffi_id for f in QUANTIZED_FORMATS) + 1  # the first id past the table


def test_specs_come_from_the_native_table():
    assert formats.FORMAT_TABLE_SOURCE.startswith("the compiled CPU module")
    native = _native.CPU.module.format_table()
    assert [row["name"] for row in native] == [f.value for f in QUANTIZED_FORMATS]
    for row in native:
        f = QuantFormat(row["name"])
        assert f.ffi_id == row["id"]
        assert f.bits == row["bits"]
        assert f.max_value == row["max_value"]
        assert f.default_block_size == row["default_block"]
        assert f.is_packed == (row["elements_per_unit"] > 1)
        assert f.fixed_block == (row["default_block"] if row["fixed_block"] else None)


def test_fallback_copy_equals_the_native_table():
    # The copy is what formats.py uses when the CPU module cannot be imported.
    fallback = [
        dict(zip(formats._TABLE_KEYS, row, strict=True)) for row in formats.FALLBACK_FORMAT_TABLE
    ]
    assert fallback == _native.CPU.module.format_table()


@pytest.mark.parametrize("fmt", QUANTIZED_FORMATS, ids=lambda f: f.value)
@pytest.mark.parametrize("n", sweep([1, 2, 3, 31, 32, 33], core={1, 33}))
def test_packed_extent_matches_the_stored_codes(fmt, n):
    q = jax.jit(lambda x: jax_bq.quantize(x, fmt))(jnp.ones((n,), jnp.float32))
    assert q.data.shape == (fmt.packed_extent(n),)
    units = -(-n // fmt.elements_per_unit)
    assert fmt.packed_extent(n) == units * fmt.bytes_per_unit
    assert fmt.packed_extent(n) == {1: n, 2: -(-n // 2), 4: 3 * units}[fmt.elements_per_unit]


def _quantize_call(format_id: int):
    x = jnp.ones((1, 1, 32, 1), jnp.float32)
    out = (
        jax.ShapeDtypeStruct((1, 1, 32, 1), jnp.float8_e4m3fn),
        jax.ShapeDtypeStruct((1, 1, 1, 1), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.float32),
        jax.ShapeDtypeStruct((0,), jnp.uint8),
    )
    call = jax.ffi.ffi_call("jax_bq_quantize", out)
    return call(
        x,
        format=np.int32(format_id),
        block_a=np.int64(32),
        block_b=np.int64(1),
        pack_b=np.int32(0),
    )


def _dequantize_call(format_id: int):
    data = jnp.zeros((1, 1, 32, 1), jnp.float8_e4m3fn)
    scales = jnp.ones((1, 1, 1, 1), jnp.float32)
    ts = jnp.ones((1,), jnp.float32)
    call = jax.ffi.ffi_call("jax_bq_dequantize", jax.ShapeDtypeStruct((1, 1, 32, 1), jnp.float32))
    return call(
        data,
        scales,
        ts,
        format=np.int32(format_id),
        block_a=np.int64(32),
        block_b=np.int64(1),
        pack_b=np.int32(0),
    )


@pytest.mark.parametrize("format_id", [-1, 0, 1, _NEXT_ID, 99])
@pytest.mark.parametrize("call", [_quantize_call, _dequantize_call], ids=["quantize", "dequantize"])
def test_unknown_format_id_is_an_ffi_error(call, format_id):
    with pytest.raises(Exception, match=f"unknown format id {format_id}"):
        jax.block_until_ready(jax.jit(lambda: call(format_id))())


def test_known_id_through_the_same_call_runs():
    # The harness above is sound: id 2 (FP8 E4M3) quantizes 1.0 with scale 1/448.
    data, scales, _, _ = jax.jit(lambda: _quantize_call(QuantFormat.FP8_E4M3.ffi_id))()
    assert float(scales.reshape(())) == np.float32(1.0) / np.float32(448.0)
    assert np.all(np.asarray(data, np.float32) == 448.0)
