"""Bad input raises a clear ValueError before tracing; handlers return errors."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_bq
from jax_bq import Granularity, QuantFormat, QuantizedTensor


@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.complex64, np.float64, np.bool_])
def test_bad_dtypes(dtype):
    x = np.ones((4, 32), dtype)
    with pytest.raises(ValueError, match=r"float32, bfloat16 and float16.*\(4, 32\)"):
        jax_bq.quantize(x, "fp8_e4m3")


def test_rank_zero_and_rank_five():
    with pytest.raises(ValueError, match="rank 1 to 4.*rank 0"):
        jax_bq.quantize(jnp.float32(1.0), "fp8_e4m3")
    with pytest.raises(ValueError, match="rank 1 to 4.*rank 5"):
        jax_bq.quantize(jnp.ones((1, 1, 1, 1, 16)), "fp8_e4m3")


def test_not_an_array():
    with pytest.raises(ValueError, match="expects an array"):
        jax_bq.quantize([1.0, 2.0], "fp8_e4m3")


@pytest.mark.parametrize("block", [0, 8, 24, 100, 512, -16, 1.5])
def test_bad_block_sizes(block):
    with pytest.raises(ValueError, match="power of two in 16..256"):
        jax_bq.quantize(jnp.ones((4, 64)), "fp8_e4m3", block_size=block)


@pytest.mark.parametrize("fmt,block", [("nvfp4", 32), ("mxfp8", 16), ("mxfp4", 64)])
def test_fixed_block_formats(fmt, block):
    with pytest.raises(ValueError, match="fixed block size"):
        jax_bq.quantize(jnp.ones((4, 64)), fmt, block_size=block)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8"])
def test_fixed_block_formats_reject_other_granularities(fmt):
    with pytest.raises(ValueError, match="only per_block"):
        jax_bq.quantize(jnp.ones((4, 64)), fmt, granularity="per_tensor")


def test_bad_axis_format_granularity():
    x = jnp.ones((4, 64))
    with pytest.raises(ValueError, match=r"axis 2 is out of range for shape \(4, 64\)"):
        jax_bq.quantize(x, "fp8_e4m3", axis=2)
    with pytest.raises(ValueError, match="unknown quantization format 'fp7'"):
        jax_bq.quantize(x, "fp7")
    with pytest.raises(ValueError, match="unknown granularity"):
        jax_bq.quantize(x, "fp8_e4m3", granularity="per_row")
    with pytest.raises(ValueError, match="unquantized baseline"):
        jax_bq.quantize(x, "bf16")
    with pytest.raises(ValueError, match="meaningless"):
        jax_bq.quantize(x, "fp8_e4m3", granularity=Granularity.PER_TENSOR, block_size=32)
    with pytest.raises(ValueError, match="tile_2d needs rank >= 2|tile_2d granularity needs"):
        jax_bq.quantize(jnp.ones((64,)), "fp8_e4m3", granularity="tile_2d")
    with pytest.raises(ValueError, match="two powers of two"):
        jax_bq.quantize(x, "fp8_e4m3", granularity="tile_2d", block_size=(128, 100))


def good_q():
    return jax_bq.quantize(jnp.ones((4, 64)), "nvfp4")


def test_inconsistent_quantized_tensor_parts():
    q = good_q()
    bad_data = QuantizedTensor(
        q.data[:, :-1],
        q.scales,
        q.tensor_scale,
        q.format,
        q.granularity,
        q.block,
        q.axis,
        q.axis_len,
        q.rank,
        q.dtype,
    )
    with pytest.raises(ValueError, match=r"data shape \(4, 31\)"):
        bad_data.validate()
    with pytest.raises(ValueError, match=r"data shape \(4, 31\)"):
        jax_bq.dequantize(bad_data)
    bad_scales = QuantizedTensor(
        q.data,
        q.scales[:, :2],
        q.tensor_scale,
        q.format,
        q.granularity,
        q.block,
        q.axis,
        q.axis_len,
        q.rank,
        q.dtype,
    )
    with pytest.raises(ValueError, match=r"scales shape \(4, 2\)"):
        jax_bq.dequantize(bad_scales)
    no_ts = QuantizedTensor(
        q.data,
        q.scales,
        None,
        q.format,
        q.granularity,
        q.block,
        q.axis,
        q.axis_len,
        q.rank,
        q.dtype,
    )
    with pytest.raises(ValueError, match="NVFP4 needs a float32 tensor_scale"):
        no_ts.validate()
    wrong_dtype = QuantizedTensor(
        q.data.astype(jnp.int8),
        q.scales,
        q.tensor_scale,
        q.format,
        q.granularity,
        q.block,
        q.axis,
        q.axis_len,
        q.rank,
        q.dtype,
    )
    with pytest.raises(ValueError, match="data must be uint8, got int8"):
        wrong_dtype.validate()
    wrong_scale = QuantizedTensor(
        q.data,
        q.scales.astype(jnp.float32),
        q.tensor_scale,
        q.format,
        q.granularity,
        q.block,
        q.axis,
        q.axis_len,
        q.rank,
        q.dtype,
    )
    with pytest.raises(ValueError, match="scales must be float8_e4m3fn"):
        wrong_scale.validate()
    with pytest.raises(ValueError, match="dtype must be float32, bfloat16 or float16"):
        jax_bq.dequantize(q, jnp.int32)
    with pytest.raises(ValueError, match="expects a QuantizedTensor"):
        jax_bq.dequantize(jnp.ones(3))


def test_handler_rejects_inconsistent_operands_with_an_error():
    """A direct bind with mismatched parts reaches the C++ handler only through XLA;
    the abstract eval rejects it first, and the handler's own checks return an
    ffi::Error (surfacing as an exception, not an abort) when called via ffi_call."""
    from jax_bq.primitives import dequantize_p

    data = jnp.zeros((1, 4, 32, 1), jnp.uint8)
    with pytest.raises(ValueError, match="dequantize_p operands disagree"):
        dequantize_p.bind(
            data,
            jnp.zeros((1, 4, 3, 1), ml_dtypes.float8_e4m3fn),
            jnp.ones((1,), jnp.float32),
            fmt=QuantFormat.NVFP4,
            ba=16,
            bb=1,
            pack_b=False,
            a=64,
            b=1,
            dtype=np.dtype(np.float32),
        )
    bad = jax.ffi.ffi_call("jax_bq_dequantize", jax.ShapeDtypeStruct((1, 4, 64, 1), jnp.float32))
    with pytest.raises(Exception, match="scales has dims"):
        jax.block_until_ready(
            bad(
                data,
                jnp.zeros((1, 4, 3, 1), ml_dtypes.float8_e4m3fn),
                jnp.ones((1,), jnp.float32),
                format=np.int32(5),
                block_a=np.int64(16),
                block_b=np.int64(1),
                pack_b=np.int32(0),
            )
        )
    bad_fmt = jax.ffi.ffi_call(
        "jax_bq_quantize",
        (
            jax.ShapeDtypeStruct((1, 1, 16, 1), jnp.uint8),
            jax.ShapeDtypeStruct((1, 1, 1, 1), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.float32),
            jax.ShapeDtypeStruct((0,), jnp.uint8),
        ),
    )
    with pytest.raises(Exception, match="unknown format id 42"):
        jax.block_until_ready(
            bad_fmt(
                jnp.ones((1, 1, 16, 1)),
                format=np.int32(42),
                block_a=np.int64(16),
                block_b=np.int64(1),
                pack_b=np.int32(0),
            )
        )
