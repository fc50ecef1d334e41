"""Fused residual-add + LayerNorm + FP8 quantize: the post-LN step of a BERT block.

One kernel reads ``x`` and the residual once and writes the normalized
activations twice: in 16 bits (the next sub-layer's residual stream) and as
FP8 codes ready for :func:`jax_bq.qmatmul` (no re-layout, no second pass over
the activations, no separate quantize kernel).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_bq.formats import FLOAT_DTYPES, Granularity, QuantFormat
from jax_bq.primitives.layernorm_quantize import layernorm_quantize_p
from jax_bq.qtensor import QuantizedTensor
from jax_bq.static import _check_concrete_pow2, pow2_scale

__all__ = ["layernorm_quantize"]

_FP8 = (QuantFormat.FP8_E4M3, QuantFormat.FP8_E5M2)
_GRANULARITIES = ("per_tensor", "per_token")


def _desc(v) -> str:
    return f"{tuple(getattr(v, 'shape', ()))} {getattr(v, 'dtype', type(v).__name__)}"


def _validate(x, residual, gamma, beta, eps, fmt_name, scale, granularity, out_dtype):
    dtype = getattr(x, "dtype", None)
    if dtype is None or np.dtype(dtype) not in FLOAT_DTYPES or not 1 <= len(x.shape) <= 4:
        raise ValueError(
            f"layernorm_quantize expects x: a float32/bfloat16/float16 array [..., H] of rank "
            f"1-4, got {type(x).__name__} {_desc(x)}"
        )
    h = x.shape[-1]
    if h == 0:
        raise ValueError(f"layernorm_quantize needs H >= 1, got x {_desc(x)}")
    if residual is not None and (
        tuple(getattr(residual, "shape", ())) != tuple(x.shape)
        or np.dtype(getattr(residual, "dtype", np.float64)) != np.dtype(dtype)
    ):
        raise ValueError(
            f"layernorm_quantize residual must match x {_desc(x)}, got residual {_desc(residual)}"
        )
    for name, v in (("gamma", gamma), ("beta", beta)):
        vd = getattr(v, "dtype", None)
        if (
            tuple(getattr(v, "shape", ())) != (h,)
            or vd is None
            or not jnp.issubdtype(vd, jnp.floating)
        ):
            raise ValueError(
                f"layernorm_quantize {name} must be a float array of shape ({h},) for x "
                f"{_desc(x)}, got {_desc(v)}"
            )
    if not (isinstance(eps, int | float) and np.isfinite(eps) and eps >= 0):
        raise ValueError(f"layernorm_quantize eps must be a finite Python float >= 0, got {eps!r}")
    fmt = QuantFormat.parse(fmt_name)
    if fmt not in _FP8:
        raise ValueError(
            f"layernorm_quantize writes FP8 codes (fp8_e4m3, fp8_e5m2), got format {fmt.value}"
        )
    if granularity not in _GRANULARITIES:
        raise ValueError(
            f"layernorm_quantize granularity must be one of {_GRANULARITIES}, got {granularity!r}"
        )
    if scale is not None:
        if granularity != "per_tensor":
            raise ValueError(
                f"a static scale is per tensor; granularity={granularity!r} takes scale=None"
            )
        if np.ndim(scale) != 0 and tuple(np.shape(scale)) != (1,) * np.ndim(scale):
            raise ValueError(
                f"layernorm_quantize scale must be a scalar, got shape {np.shape(scale)}"
            )
    if out_dtype is not None and np.dtype(out_dtype) not in FLOAT_DTYPES:
        raise ValueError(
            f"layernorm_quantize out_dtype must be float32/bfloat16/float16, got {out_dtype}"
        )
    return fmt


def _static_scale(scale, exact_scale: bool) -> jax.Array:
    given = jnp.reshape(jnp.asarray(scale, jnp.float32), ())
    if not exact_scale:
        return pow2_scale(given)
    _check_concrete_pow2(scale)
    bits = lax.bitcast_convert_type(given, jnp.uint32)
    in_range = (bits >> 23) - jnp.uint32(1) <= jnp.uint32(252)  # exponents -126..126
    ok = ((bits & jnp.uint32(0x807FFFFF)) == 0) & in_range
    return jnp.where(ok, given, jnp.float32(jnp.nan))


def layernorm_quantize(
    x: jax.Array,
    gamma: jax.Array,
    beta: jax.Array,
    *,
    residual: jax.Array | None = None,
    eps: float = 1e-12,
    format="fp8_e4m3",  # noqa: A002 - mirrors jax_bq.quantize
    scale=None,
    granularity: str = "per_tensor",
    out_dtype=None,
    exact_scale: bool = False,
) -> tuple[QuantizedTensor, jax.Array]:
    r"""Residual add, LayerNorm over the last axis, and FP8 quantize, in one kernel.

    Per row of ``H`` values (``s`` in the input dtype, everything after it in
    float32, each operation rounded once, no FMA)::

        s    = round_to_x_dtype(x + residual)            (or s = x)
        mean = sum(s) * RN(1/H)                           (+0 if zero)
        var  = sum((s - mean)^2) * RN(1/H)                (two passes)
        y32  = ((s - mean) * (1 / sqrt(var + eps))) * gamma + beta
        y    = y32.astype(out_dtype or x.dtype)
        q    = FP8 codes of y32                           (never of y: one rounding)

    The residual is added in the activation dtype, as the unfused Flax block
    does (``x + residual`` in bf16, then LayerNorm). The sums follow one
    pinned order (:mod:`jax_bq.reference_layernorm`) so that the CPU kernel,
    the CUDA kernel and the jnp twin agree bit for bit.

    Scales:

    * ``scale`` given: static per-tensor, with the semantics of
      :func:`jax_bq.quantize_static`: ``s = pow2_scale(scale)``,
      ``q = RNE(clip(y32 / s, -MAX, MAX))`` (saturating), NaN/±Inf elements
      give the NaN code, an invalid scale makes every code NaN.
    * ``scale=None, granularity="per_token"``: ``s_row = amax(|y32_row|) / MAX``
      with the numerics of ``quantize(..., granularity="per_channel",
      axis=-1)``: an all-zero row has scale 1, a row holding NaN/Inf has scale
      NaN and NaN codes (other rows are untouched).
    * ``scale=None, granularity="per_tensor"``: the same with one amax over
      the whole tensor (on CUDA a second, cheap pass that re-reads the inputs).

    Args:
        x: ``[..., H]`` float32/bfloat16/float16, rank 1-4.
        gamma: ``[H]`` LayerNorm scale, any float dtype (widened to float32
            exactly; float32/bfloat16/float16 gamma and beta of one dtype are
            read by the kernels as they are, with no conversion op).
        beta: ``[H]`` LayerNorm bias, any float dtype (as ``gamma``).
        residual: optional, same shape and dtype as ``x``.
        eps: variance epsilon (>= 0); BERT uses 1e-12.
        format: ``"fp8_e4m3"`` (default) or ``"fp8_e5m2"``.
        scale: static per-tensor scale (positive scalar, may be traced), or
            ``None`` for dynamic scales.
        granularity: ``"per_tensor"`` (default) or ``"per_token"``.
        out_dtype: dtype of ``y``; default ``x.dtype``.
        exact_scale: promise that ``scale`` is already a power of two in
            ``[2^-126, 2^126]`` (skips the rounding, as in ``quantize_static``).

    Returns:
        ``(q, y)``: ``q`` a :class:`QuantizedTensor` (per tensor, or
        per channel along ``axis=-1`` for per token) of ``x``'s shape, the
        layout :func:`jax_bq.qmatmul` takes as pre-quantized activations;
        ``y`` the normalized activations in ``out_dtype``.

    Raises:
        ValueError: bad shapes or dtypes of ``x``, ``residual``, ``gamma``,
            ``beta``; a non-FP8 format; an unknown granularity; a non-scalar
            scale or a static scale with per-token granularity; a bad ``eps``
            or ``out_dtype``.
    """
    fmt = _validate(x, residual, gamma, beta, eps, format, scale, granularity, out_dtype)
    out = np.dtype(x.dtype if out_dtype is None else out_dtype)
    mode = "static" if scale is not None else granularity
    s_op = _static_scale(scale, exact_scale) if mode == "static" else None
    y, codes, scales = _bind(x, residual, gamma, beta, s_op, fmt, mode, eps, out)
    q = _quantized(codes, scales, tuple(x.shape), fmt, mode, out)
    return q, jnp.reshape(y, x.shape)


def _bind(x, residual, gamma, beta, static_scale, fmt, mode: str, eps, out: np.dtype):
    """Binds ``layernorm_quantize_p`` on ``x`` as ``[1, rows, H]``: ``(y, codes, scales)``."""
    shape = tuple(x.shape)
    h = shape[-1]
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    x3 = jnp.reshape(x, (1, rows, h))
    res3 = jnp.zeros((0,), x.dtype) if residual is None else jnp.reshape(residual, (1, rows, h))
    s_op = (
        jnp.reshape(static_scale, (1,))
        if static_scale is not None
        else jnp.zeros((0,), jnp.float32)
    )
    gamma, beta = jnp.asarray(gamma), jnp.asarray(beta)
    if gamma.dtype != beta.dtype or np.dtype(gamma.dtype) not in FLOAT_DTYPES:
        # The kernels read float32/bfloat16/float16 parameters of one dtype as
        # they are (no convert kernel per call); anything else is widened here.
        gamma, beta = gamma.astype(jnp.float32), beta.astype(jnp.float32)
    y, codes, scales, _ = layernorm_quantize_p.bind(
        x3,
        res3,
        gamma,
        beta,
        s_op,
        fmt=fmt,
        mode=mode,
        eps=float(eps),
        out_dtype=out,
    )
    return y, codes, scales


def _quantized(codes, scales, shape: tuple[int, ...], fmt, mode: str, out: np.dtype):
    """The codes and scales of the primitive as a per-tensor / per-token QuantizedTensor."""
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    if mode == "per_token":
        gran, scale_shape = Granularity.PER_CHANNEL, (*shape[:-1], 1)
    else:
        gran, scale_shape = Granularity.PER_TENSOR, (1,) * len(shape)
        if rows == 0:
            scale_shape = (*scale_shape[:-1], 0)
            scales = jnp.zeros((0,), jnp.float32)
    return QuantizedTensor(
        data=jnp.reshape(codes, shape),
        scales=jnp.reshape(scales, scale_shape),
        tensor_scale=None,
        format=fmt,
        granularity=gran,
        block=(),
        axis=-1,
        axis_len=shape[-1],
        rank=len(shape),
        dtype=out,
    )
