"""Whole-tensor encode/decode on the quantize and dequantize primitives.

The layer under the public :func:`jax_bq.quantize` / :func:`jax_bq.dequantize`
(which validate their arguments, then call these): here the arguments are
trusted, so the primitives' own fallbacks and differentiation rules can
quantize without importing the public wrappers (which import the primitives).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_bq.formats import Granularity, QuantFormat
from jax_bq.layout import make_view, packed_shape, scale_shape
from jax_bq.primitives.dequantize import dequantize_p
from jax_bq.primitives.quantize import quantize_p
from jax_bq.qtensor import QuantizedTensor


def encode(
    x: jax.Array, fmt: QuantFormat, granularity: Granularity, axis: int, block: tuple[int, ...]
) -> QuantizedTensor:
    """``x`` quantized with a resolved block (``()`` per tensor/channel) along ``axis`` (< 0)."""
    shape = tuple(int(d) for d in x.shape)
    view = make_view(shape, granularity, axis, block)
    pack_b = view.pack_b and fmt.is_packed
    data, scales, tensor_scale, _ = quantize_p.bind(
        jnp.reshape(x, view.dims), fmt=fmt, ba=view.ba, bb=view.bb, pack_b=pack_b
    )
    return QuantizedTensor(
        data=data.reshape(packed_shape(shape, view.axis, fmt)),
        scales=scales.reshape(scale_shape(shape, granularity, view.axis, block)),
        tensor_scale=tensor_scale.reshape(()) if fmt.has_tensor_scale else None,
        format=fmt,
        granularity=granularity,
        block=block,
        axis=view.axis,
        axis_len=shape[view.axis],
        rank=len(shape),
        dtype=np.dtype(x.dtype),
    )


def encode_rows(x: jax.Array, fmt: QuantFormat, granularity: Granularity, block: int = 0):
    """``x`` quantized along its last axis: per tensor, per row, or per ``block``.

    ``block=0`` with ``PER_BLOCK`` takes the format's default block.
    """
    if granularity is not Granularity.PER_BLOCK:
        return encode(x, fmt, granularity, -1, ())
    return encode(x, fmt, granularity, -1, (block or fmt.default_block_size,))


def decode(q: QuantizedTensor, dtype) -> jax.Array:
    """``q`` dequantized to ``dtype`` (float32, bfloat16 or float16)."""
    v = q.view()
    fmt = q.format
    pack_b = v.pack_b and fmt.is_packed
    if fmt.has_tensor_scale:
        ts = jnp.reshape(q.tensor_scale, (v.g,))
    else:
        ts = jnp.ones((v.g,), jnp.float32)
    out = dequantize_p.bind(
        jnp.reshape(q.data, v.data_dims(fmt)),
        jnp.reshape(q.scales, v.scale_dims),
        ts,
        fmt=fmt,
        ba=v.ba,
        bb=v.bb,
        pack_b=pack_b,
        a=v.a,
        b=v.b,
        dtype=np.dtype(dtype),
    )
    return out.reshape(q.shape)
