"""Public ops: ``quantize`` and ``dequantize``.

The wrappers validate their arguments eagerly (a ``ValueError`` naming shapes
and dtypes, raised before anything is traced), map the array onto the
kernels' ``[G, P, A, B]`` view with free reshapes, and bind the primitives.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_bq.formats import (
    DEFAULT_TILE,
    FLOAT_DTYPES,
    MAX_BLOCK,
    MIN_BLOCK,
    Granularity,
    QuantFormat,
)
from jax_bq.primitives import quantize_dequantize_p
from jax_bq.primitives.codec import decode, encode
from jax_bq.qtensor import QuantizedTensor

_MAX_RANK = 4


def _dtype_name(d) -> str:
    return np.dtype(d).name


def _check_float_array(x, what: str) -> None:
    dtype = getattr(x, "dtype", None)
    shape = getattr(x, "shape", None)
    if dtype is None or shape is None:
        raise ValueError(f"{what} expects an array, got {type(x).__name__}")
    if np.dtype(dtype) not in FLOAT_DTYPES:
        raise ValueError(
            f"{what} supports float32, bfloat16 and float16 inputs; got dtype "
            f"{_dtype_name(dtype)} with shape {tuple(shape)}"
        )
    if not 1 <= len(shape) <= _MAX_RANK:
        raise ValueError(
            f"{what} supports arrays of rank 1 to {_MAX_RANK}; got shape "
            f"{tuple(shape)} (rank {len(shape)})"
        )


def _is_pow2(n) -> bool:
    return isinstance(n, (int, np.integer)) and n > 0 and (n & (n - 1)) == 0


def _resolve_block(fmt: QuantFormat, granularity: Granularity, block_size, shape):
    """Returns the block tuple for ``granularity`` or raises ValueError."""
    if granularity in (Granularity.PER_TENSOR, Granularity.PER_CHANNEL):
        if block_size is not None:
            raise ValueError(
                f"block_size={block_size!r} is meaningless for {granularity.value} granularity"
            )
        return ()
    if granularity is Granularity.TILE_2D:
        if len(shape) < 2:
            raise ValueError(f"tile_2d granularity needs rank >= 2, got shape {tuple(shape)}")
        tile = DEFAULT_TILE if block_size is None else block_size
        if isinstance(tile, (int, np.integer)):
            tile = (int(tile), int(tile))
        tile = tuple(tile)
        if len(tile) != 2 or not all(_is_pow2(t) and MIN_BLOCK <= t <= MAX_BLOCK for t in tile):
            raise ValueError(
                f"tile_2d block_size must be two powers of two in "
                f"[{MIN_BLOCK}, {MAX_BLOCK}], got {block_size!r}"
            )
        return tuple(int(t) for t in tile)
    block = fmt.default_block_size if block_size is None else block_size
    allowed = fmt.allowed_block_sizes
    if block not in allowed or not _is_pow2(block):
        if fmt.fixed_block is not None:
            raise ValueError(
                f"{fmt.value} uses a fixed block size of {fmt.fixed_block}, "
                f"got block_size={block_size!r}"
            )
        raise ValueError(
            f"block_size for {fmt.value} must be a power of two in "
            f"{allowed[0]}..{allowed[-1]}, got {block_size!r}"
        )
    return (int(block),)


def _parse_quantize_args(x, format, granularity, axis):  # noqa: A002
    """``(format, granularity, negative axis)`` of a quantize call, checked.

    Raises:
        ValueError: for a non-float ``x``, an unquantized format, an unknown or
            unsupported granularity, or an axis out of range.
    """
    fmt = QuantFormat.parse(format)
    _check_float_array(x, "jax_bq.quantize")
    if not fmt.is_quantized:
        raise ValueError(f"{fmt.value} is an unquantized baseline; use x.astype(...) instead")
    shape = tuple(int(d) for d in x.shape)
    if granularity is None:
        granularity = Granularity.PER_BLOCK
    try:
        granularity = Granularity(granularity)
    except ValueError as e:
        options = ", ".join(g.value for g in Granularity)
        raise ValueError(f"unknown granularity {granularity!r}; expected one of {options}") from e
    if granularity not in fmt.allowed_granularities:
        raise ValueError(
            f"{fmt.value} supports only per_block granularity "
            f"(block {fmt.fixed_block}), got {granularity.value}"
        )
    if not isinstance(axis, (int, np.integer)) or not -len(shape) <= axis < len(shape):
        raise ValueError(f"axis {axis!r} is out of range for shape {shape}")
    return fmt, granularity, int(axis) - len(shape) if axis >= 0 else int(axis)


def quantize(
    x: jax.Array,
    format: QuantFormat | str,  # noqa: A002 - the natural name for the public API
    *,
    block_size: int | tuple[int, int] | None = None,
    axis: int = -1,
    granularity: Granularity | str | None = None,
) -> QuantizedTensor:
    r"""Quantizes ``x`` into a block-scaled :class:`QuantizedTensor`.

    For the FP32-scale formats (``FP8_E4M3``, ``FP8_E5M2``, ``FP4``), each
    block :math:`\mathcal{B}` gets

    .. math::
        s_\mathcal{B} = \max_{i \in \mathcal{B}} |x_i| / \mathrm{MAX}, \qquad
        q_i = \mathrm{RNE}\big(\mathrm{clip}(x_i / s_\mathcal{B}, -\mathrm{MAX},
        \mathrm{MAX})\big)

    in float32 (``s = 1`` for an all-zero block), so that
    ``dequantize(q) = decode(q) * s``. NVFP4 adds a float32 tensor scale
    ``amax / 2688`` and stores E4M3 block scales per 16 elements; MX formats
    store an E8M0 power of two per 32 elements (OCP MX v1.0). A block holding
    NaN or Inf gets a NaN scale, so exactly that block dequantizes to NaN.
    bf16/f16 inputs are upcast exactly to float32 first (no double rounding).

    Args:
        x: float32, bfloat16 or float16 array of rank 1 to 4. A tail block
            shorter than ``block_size`` is allowed; its amax covers only real
            elements. Empty arrays are allowed.
        format: a :class:`QuantFormat` (or its name); not FP16/BF16.
        block_size: elements per block along ``axis`` for ``PER_BLOCK`` (a
            power of two in 16..256; default 128 for FP8, 32 for FP4; fixed 16
            for NVFP4 and 32 for MX), or ``(rows, cols)`` for ``TILE_2D``
            (default 128 x 128).
        axis: the blocked axis; FP4 codes are packed two per byte along it.
            Per-tensor and tile granularities block the last two axes and
            pack along the last.
        granularity: ``PER_BLOCK`` (default), ``PER_CHANNEL``, ``PER_TENSOR``
            or ``TILE_2D``.

    Returns:
        A validated :class:`QuantizedTensor`.

    Raises:
        ValueError: for unsupported dtypes, ranks, formats, block sizes,
            granularities or axes; the message names the offending values.
    """
    fmt, granularity, axis = _parse_quantize_args(x, format, granularity, axis)
    shape = tuple(int(d) for d in x.shape)
    block = _resolve_block(fmt, granularity, block_size, shape)
    return encode(x, fmt, granularity, axis, block)


def dequantize(q: QuantizedTensor, dtype=None) -> jax.Array:
    """Reconstructs an array from a :class:`QuantizedTensor`.

    ``out = decode(codes) * scale`` per element in float32 (``scale`` is the
    block scale, times the tensor scale for NVFP4), then rounded to ``dtype``
    with round-to-nearest-even.

    Args:
        q: the quantized tensor (validated first).
        dtype: float32, bfloat16 or float16; defaults to ``q.dtype``.

    Returns:
        An array of ``q.shape`` and ``dtype``.

    Raises:
        ValueError: if ``q`` breaks an invariant or ``dtype`` is unsupported.
    """
    if not isinstance(q, QuantizedTensor):
        raise ValueError(f"jax_bq.dequantize expects a QuantizedTensor, got {type(q).__name__}")
    q.validate()
    out_dtype = np.dtype(q.dtype if dtype is None else dtype)
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"dequantize dtype must be float32, bfloat16 or float16, got {out_dtype}")
    return decode(q, out_dtype)


def quantize_dequantize(x: jax.Array, format: QuantFormat | str, **kwargs) -> jax.Array:  # noqa: A002
    """``dequantize(quantize(x, format, **kwargs), x.dtype)``: the fake-quant round trip.

    The value is bit for bit that of the two calls (one primitive,
    ``quantize_dequantize_p``, that runs the same kernels). Unlike the two
    calls, it is differentiable with the straight-through estimator::

        d/dx quantize_dequantize(x) . t = t * [|x| <= (MAX + ulp(MAX)/2) * s]

    (``s`` the element's effective block scale): the tangent passes where the
    element is inside the representable range and is zero where it was
    clipped (never with amax-scaled FP8/FP4; see
    :mod:`jax_bq.primitives.autodiff`).

    Args:
        x: float array, as for :func:`quantize`.
        format: the quantized format, as for :func:`quantize`.
        **kwargs: ``block_size``, ``axis``, ``granularity`` as for :func:`quantize`.

    Returns:
        An array of ``x.shape`` and ``x.dtype``.
    """
    q = jax.eval_shape(lambda a: quantize(a, format, **kwargs), x)  # validates, no compute
    v = q.view()
    fmt = q.format
    y = quantize_dequantize_p.bind(
        jnp.reshape(x, v.dims),
        fmt=fmt,
        ba=v.ba,
        bb=v.bb,
        pack_b=v.pack_b and fmt.is_packed,
        dtype=np.dtype(x.dtype),
    )
    return jnp.reshape(y, x.shape)


def sqnr_db(x: jax.Array, y: jax.Array) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(|x|^2 / |x - y|^2)`` in dB."""
    xf = np.asarray(x, np.float64)
    err = np.sum((xf - np.asarray(y, np.float64)) ** 2)
    sig = np.sum(xf**2)
    if err == 0:
        return math.inf
    return float(10 * np.log10(sig / err))
