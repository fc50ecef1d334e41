"""Static (calibrated) per-tensor FP8 activations, written in jnp so XLA fuses them.

Dynamic W8A8 quantizes each activation inside every ``qmatmul`` call: one
extra pass that reads the 16-bit input and writes its codes, plus the amax
pass a per-tensor scale needs. On an encoder those passes cost about what the
FP8 GEMM saves (docs/experiments/NOTES.md, "Flax encoders end to end"). With a
scale fixed ahead of time (calibrated on sample inputs, the way inference
stacks run FP8 with "static activation scales"), quantizing is elementwise::

    q = RNE(clip(x / s, -MAX, MAX))          (NaN and +-Inf -> the NaN code)

and XLA fuses it into whatever produced ``x`` (the LayerNorm, the GELU): the
16-bit activation is never written and re-read for the GEMM.

Power-of-two scales. ``s`` is a power of two, so ``x / s == x * (1 / s)``
exactly (``1 / s`` is exact too), and the multiply can run in an XLA fusion
while the codes stay bit-identical to the correctly rounded division of the
pinned numerics (``jax_bq.reference``). Relative precision of FP8 is the same
in every binade, so rounding the scale up to a power of two costs nothing for
normal values; it only moves the saturation point from ``amax`` to at most
``2 * amax``, which the calibration margin wants anyway. A scale that is not a
power of two is rounded **up** to the next one (its mantissa bits are dropped
and its exponent incremented), never silently used as a divisor.

Unlike dynamic quantization, values beyond ``MAX * s`` saturate (to
``+-MAX``): that is the contract of a static scale, and why
:func:`static_scale` takes a margin above the calibrated amax.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_bq.formats import FLOAT_DTYPES, Granularity, QuantFormat
from jax_bq.layout import scale_shape
from jax_bq.qtensor import QuantizedTensor
from jax_bq.reference import _NAN_CODE  # the twin's NaN codes (0x7F E4M3, 0x7E E5M2)

__all__ = [
    "STATIC_FORMATS",
    "encode_scaled",
    "pow2_reciprocal",
    "pow2_scale",
    "quantize_static",
    "static_scale",
]

#: Element formats a static activation scale supports.
STATIC_FORMATS = (QuantFormat.FP8_E4M3, QuantFormat.FP8_E5M2)
# Scales are kept where 1 / s is a normal float32 power of two.
_MIN_EXP, _MAX_EXP = -126, 126


def _static_format(format) -> QuantFormat:  # noqa: A002 - mirrors jax_bq.quantize
    fmt = QuantFormat.parse(format)
    if fmt not in STATIC_FORMATS:
        names = ", ".join(f.value for f in STATIC_FORMATS)
        raise ValueError(f"static activation scales support {names}, got {fmt.value}")
    return fmt


def static_scale(amax: float, format="fp8_e4m3", *, margin: float = 1.0) -> float:  # noqa: A002
    r"""The power-of-two scale that maps ``margin * amax`` inside the format's range.

    .. math::
        s = 2^{\lceil \log_2(\mathrm{margin} \cdot \mathrm{amax} / \mathrm{MAX}) \rceil}

    clamped to ``[2^-126, 2^126]`` (``s = 1`` for ``amax == 0``), so that
    ``margin * amax / s <= MAX``: values up to ``margin * amax`` (at least)
    quantize without saturating.

    Args:
        amax: largest finite magnitude seen during calibration (>= 0).
        format: ``"fp8_e4m3"`` (default) or ``"fp8_e5m2"``.
        margin: headroom factor >= 1 over the calibrated amax.

    Returns:
        The scale as a Python float (an exact power of two).

    Raises:
        ValueError: negative or non-finite ``amax``, ``margin < 1``, or a
            format other than FP8.
    """
    fmt = _static_format(format)
    amax = float(amax)
    if not math.isfinite(amax) or amax < 0:
        raise ValueError(f"static_scale needs a finite amax >= 0, got {amax}")
    if not margin >= 1.0:
        raise ValueError(f"static_scale margin must be >= 1, got {margin}")
    if amax == 0:
        return 1.0
    e = math.ceil(math.log2(margin * amax / fmt.max_value))
    while math.ldexp(1.0, e) * fmt.max_value < margin * amax:  # log2 rounding at the edge
        e += 1
    return math.ldexp(1.0, min(max(e, _MIN_EXP), _MAX_EXP))


def pow2_scale(scale: jax.Array) -> jax.Array:
    """Rounds a positive float32 scale up to a power of two in ``[2^-126, 2^126]``.

    Bit arithmetic (exact on every backend): a scale with a nonzero mantissa
    gets the next exponent; powers of two are unchanged. Non-positive or
    non-finite scales come out as NaN (and so quantize every element to NaN).
    """
    s = jnp.asarray(scale, jnp.float32)
    bits = lax.bitcast_convert_type(s, jnp.uint32)
    up = (bits + jnp.uint32(0x7FFFFF)) & jnp.uint32(0x7F800000)  # ceil to 2^e
    lo, hi = (_MIN_EXP + 127) << 23, (_MAX_EXP + 127) << 23
    up = jnp.clip(up, jnp.uint32(lo), jnp.uint32(hi))
    out = lax.bitcast_convert_type(up, jnp.float32)
    # Positive and finite, tested on the bits (XLA:CPU flushes subnormals in compares).
    ok = (bits - jnp.uint32(1)) < jnp.uint32(0x7F7FFFFF)
    return jnp.where(ok, out, jnp.float32(jnp.nan))


def pow2_reciprocal(s: jax.Array) -> jax.Array:
    """``1 / s`` for a float32 power of two ``s`` in ``[2^-126, 2^126]``, exact (bit arithmetic)."""
    # 1 / 2^e as bits: biased exponent 254 - E (exact for E in [1, 253]).
    e_field = lax.bitcast_convert_type(jnp.asarray(s, jnp.float32), jnp.uint32) >> 23
    return lax.bitcast_convert_type((jnp.uint32(254) - e_field) << 23, jnp.float32)


def encode_scaled(x: jax.Array, inv_scale: jax.Array, fmt: QuantFormat) -> jax.Array:
    """FP8 codes ``RNE(clip(x * inv_scale, -MAX, MAX))`` (``fmt.data_dtype``), in float32.

    A NaN or ±Inf element, or a NaN ``inv_scale``, gives the format's NaN code.
    This is the static-scale encoder shared by :func:`quantize_static` and the
    FP8-output epilogue of :func:`jax_bq.qmatmul`.
    """
    xf = x.astype(jnp.float32)
    inv = jnp.asarray(inv_scale, jnp.float32)
    v = jnp.clip(xf * inv, -fmt.max_value, fmt.max_value)
    codes = lax.bitcast_convert_type(v.astype(fmt.element_dtype), jnp.uint8)
    codes = jnp.where(jnp.isfinite(xf) & ~jnp.isnan(inv), codes, jnp.uint8(_NAN_CODE[fmt]))
    return lax.bitcast_convert_type(codes, fmt.data_dtype)


def _check_concrete_pow2(scale) -> None:
    """ValueError for a concrete scale that is not a power of two in [2^-126, 2^126]."""
    if isinstance(scale, jax.core.Tracer):
        return
    v = np.asarray(scale, np.float32).reshape(())
    m, e = np.frexp(v)
    if not (np.isfinite(v) and m == 0.5 and _MIN_EXP <= e - 1 <= _MAX_EXP):
        raise ValueError(
            f"quantize_static(exact_scale=True) needs a power of two in [2^{_MIN_EXP}, "
            f"2^{_MAX_EXP}], got {float(v)!r} (use static_scale, or exact_scale=False to round up)"
        )


def _as_scales(s: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    # A reshape of the scalar is a bitcast in XLA (no kernel); a broadcast only
    # for the empty tensors whose scale shape has a zero.
    return jnp.reshape(s, shape) if math.prod(shape) == 1 else jnp.broadcast_to(s, shape)


def _check_static_operands(x, scale) -> None:
    dtype = getattr(x, "dtype", None)
    if dtype is None or np.dtype(dtype) not in FLOAT_DTYPES or not 1 <= len(x.shape) <= 4:
        raise ValueError(
            f"quantize_static expects a float32/bfloat16/float16 array of rank 1-4, got "
            f"{type(x).__name__} {getattr(x, 'shape', '')} {dtype}"
        )
    if np.ndim(scale) != 0 and tuple(np.shape(scale)) != (1,) * np.ndim(scale):
        raise ValueError(f"quantize_static scale must be a scalar, got shape {np.shape(scale)}")


def _scale_and_inverse(scale, exact_scale: bool) -> tuple[jax.Array, jax.Array]:
    """``(s, 1/s)`` as float32 scalars; ``1/s`` is NaN for an invalid scale."""
    given = jnp.reshape(jnp.asarray(scale, jnp.float32), ())
    if exact_scale:
        _check_concrete_pow2(scale)
        s = given
        # Sign 0, mantissa 0, biased exponent in [1, 253]. XLA:GPU still runs
        # this scalar check as one tiny fusion per call (~1.2 us on the H200);
        # pow2_scale plus the check were three.
        bits = lax.bitcast_convert_type(given, jnp.uint32)
        in_range = (bits >> 23) - jnp.uint32(_MIN_EXP + 127) <= jnp.uint32(_MAX_EXP - _MIN_EXP)
        ok = ((bits & jnp.uint32(0x807FFFFF)) == 0) & in_range
    else:
        s = pow2_scale(given)
        ok = ~jnp.isnan(s)
    return s, jnp.where(ok, pow2_reciprocal(s), jnp.float32(jnp.nan))


def quantize_static(
    x: jax.Array,
    scale,
    format="fp8_e4m3",  # noqa: A002 - mirrors jax_bq.quantize
    *,
    exact_scale: bool = False,
) -> QuantizedTensor:
    r"""Per-tensor FP8 codes of ``x`` with a fixed (calibrated) power-of-two scale.

    .. math::
        s = \mathrm{pow2\_scale}(\mathrm{scale}), \qquad
        q_i = \mathrm{RNE}\big(\mathrm{clip}(x_i \cdot s^{-1}, -\mathrm{MAX},
        \mathrm{MAX})\big)

    in float32 (bf16/f16 inputs upcast exactly); NaN and ±Inf become the
    format's NaN code (0x7F for E4M3, 0x7E for E5M2), ``dequantize`` gives
    ``decode(q) * s``. Because ``s`` is a power of two, ``x * s^-1`` equals the
    correctly rounded ``x / s`` of the pinned numerics, so the codes match the
    numpy/ml_dtypes oracle bit for bit on every backend; and because it is
    plain jnp, XLA fuses it into the producer of ``x``. The result is the
    per-tensor :class:`QuantizedTensor` that ``qmatmul`` takes as
    pre-quantized activations (cuBLASLt's FP8 GEMM with a scalar scale).

    Args:
        x: float32, bfloat16 or float16 array of rank 1 to 4.
        scale: positive scalar (Python float or float32 array, may be traced);
            see :func:`static_scale` for calibrating it.
        format: ``"fp8_e4m3"`` (default) or ``"fp8_e5m2"``.
        exact_scale: promise that ``scale`` already is a power of two in
            ``[2^-126, 2^126]`` (what :func:`static_scale` and the Flax
            calibration store). Then ``scale`` itself becomes the tensor's
            scale, with no rounding step in between: on the H200 that leaves
            one tiny scalar kernel per call (the check below) where rounding
            took three. A scale that breaks the promise raises a
            ``ValueError`` when it is concrete and turns every code into NaN
            when it is traced (never a silently wrong divisor).

    Returns:
        A per-tensor :class:`QuantizedTensor` (the layout ``quantize(x, format,
        granularity="per_tensor")`` gives) whose scale is ``s``.

    Raises:
        ValueError: unsupported dtype, rank, format, a non-scalar scale, or a
            concrete ``scale`` that is not an exact power of two with
            ``exact_scale``.
    """
    fmt = _static_format(format)
    _check_static_operands(x, scale)
    s, inv = _scale_and_inverse(scale, exact_scale)
    return QuantizedTensor(
        data=encode_scaled(x, inv, fmt),
        scales=_as_scales(s, scale_shape(tuple(x.shape), Granularity.PER_TENSOR, -1, ())),
        tensor_scale=None,
        format=fmt,
        granularity=Granularity.PER_TENSOR,
        block=(),
        axis=-1,
        axis_len=int(x.shape[-1]),
        rank=x.ndim,
        dtype=np.dtype(x.dtype),
    )
