"""``layernorm_quantize_p``: fused residual-add + LayerNorm + FP8 quantize.

Operands (the ``[G, R, H]`` view: G independent groups of R rows of H):
``x [G, R, H]``, ``residual [G, R, H]`` or an empty ``[0]`` of x's dtype,
``gamma [H]`` and ``beta [H]`` float32, bfloat16 or float16 (one dtype, widened
exactly in the kernels), ``scale [G]`` float32 (the static
power-of-two scale) or an empty ``[0]``. Results: ``y [G, R, H]`` in
``out_dtype``, FP8 ``codes [G, R, H]``, float32 ``scales`` (``[G, R]`` per
token, ``[G]`` otherwise) and ``workspace`` (uint8 scratch that the CUDA
dynamic per-tensor path takes from XLA instead of allocating; callers drop it).

FFI target ``jax_bq_layernorm_quantize``; C++ handlers
``BqLayernormQuantizeCpu`` / ``BqLayernormQuantizeCuda``. The math is pinned
in :mod:`jax_bq.reference_layernorm` (the default lowering). Shape rules live
in the abstract evaluation below and nowhere else.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import batching

from jax_bq.formats import FLOAT_DTYPES, QuantFormat
from jax_bq.primitives.common import def_jitted_impl, register_lowerings
from jax_bq.reference_layernorm import MODES, layernorm_quantize_view

layernorm_quantize_p = Primitive("jax_bq_layernorm_quantize")
layernorm_quantize_p.multiple_results = True
def_jitted_impl(layernorm_quantize_p)

_FP8 = (QuantFormat.FP8_E4M3, QuantFormat.FP8_E5M2)
_MODE_ID = {m: i for i, m in enumerate(MODES)}  # the C++ enum LnqMode


def workspace_bytes(mode: str, g: int, r: int) -> int:
    """CUDA scratch: per group an amax word (8-byte slot), per row (mean, rstd); per-tensor only."""
    return 8 * g + 8 * g * r if mode == "per_tensor" else 0


def _abstract_eval(x, residual, gamma, beta, scale, *, fmt, mode, eps, out_dtype):
    del eps
    if x.ndim != 3 or np.dtype(x.dtype) not in FLOAT_DTYPES:
        raise ValueError(
            f"layernorm_quantize_p expects a float [G, R, H] x, got {x.shape} {x.dtype}"
        )
    g, r, h = x.shape
    if residual.shape not in ((0,), x.shape) or residual.dtype != x.dtype:
        raise ValueError(
            f"layernorm_quantize_p residual must be {x.shape} {x.dtype} or empty, got "
            f"{residual.shape} {residual.dtype}"
        )
    for name, v in (("gamma", gamma), ("beta", beta)):
        if v.shape != (h,) or np.dtype(v.dtype) not in FLOAT_DTYPES or v.dtype != gamma.dtype:
            raise ValueError(
                f"layernorm_quantize_p {name} must be [{h}] float32/bfloat16/float16 (beta in "
                f"gamma's dtype), got {v.shape} {v.dtype}"
            )
    want_scale = (g,) if mode == "static" else (0,)
    if scale.shape != want_scale or scale.dtype != jnp.float32:
        raise ValueError(f"layernorm_quantize_p scale must be float32 {want_scale} in mode {mode}")
    if fmt not in _FP8 or mode not in MODES or np.dtype(out_dtype) not in FLOAT_DTYPES:
        raise ValueError(f"layernorm_quantize_p: bad fmt/mode/out_dtype {fmt} {mode} {out_dtype}")
    return (
        ShapedArray(x.shape, np.dtype(out_dtype)),
        ShapedArray(x.shape, fmt.data_dtype),
        ShapedArray((g, r) if mode == "per_token" else (g,), jnp.float32),
        ShapedArray((workspace_bytes(mode, g, r),), jnp.uint8),
    )


layernorm_quantize_p.def_abstract_eval(_abstract_eval)


def _reference(x, residual, gamma, beta, scale, *, fmt, mode, eps, out_dtype):
    ws = _abstract_eval(
        x, residual, gamma, beta, scale, fmt=fmt, mode=mode, eps=eps, out_dtype=out_dtype
    )[3]
    y, codes, scales = layernorm_quantize_view(
        x,
        residual if residual.shape == x.shape else None,
        gamma,
        beta,
        scale if mode == "static" else None,
        fmt=fmt,
        mode=mode,
        eps=eps,
        out_dtype=out_dtype,
    )
    return y, codes, scales, jnp.zeros(ws.shape, jnp.uint8)


def _ffi_attrs(params: dict) -> dict:
    return {
        "format": np.int32(params["fmt"].ffi_id),
        "mode": np.int32(_MODE_ID[params["mode"]]),
        "eps": np.float32(params["eps"]),
    }


register_lowerings(
    layernorm_quantize_p,
    "layernorm_quantize",
    "jax_bq_layernorm_quantize",
    _reference,
    _ffi_attrs,
    multiple_results=True,
)


def _fold(v, bdim, size):
    """Batch dim first, merged with the leading dim: [N * D0, ...]."""
    v = jnp.broadcast_to(v, (size, *v.shape)) if bdim is None else jnp.moveaxis(v, bdim, 0)
    return v.reshape((v.shape[0] * v.shape[1], *v.shape[2:]))


def _batch(args, dims, **params):
    x, residual, gamma, beta, scale = args
    dx, dr, dg, db, ds = dims
    size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
    if dg is not None or db is not None:
        # Per-member LayerNorm parameters: one call per member (rare; correct, not fast).
        moved = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims, strict=True)]

        def one(i):
            member = [a if d is None else a[i] for a, d in zip(moved, dims, strict=True)]
            return layernorm_quantize_p.bind(*member, **params)[:3]

        y, codes, scales = jax.lax.map(one, jnp.arange(size))
        g, r, _ = (s for i, s in enumerate(x.shape) if i != dx)
        ws = jnp.zeros((workspace_bytes(params["mode"], g, r),), jnp.uint8)
        return [y, codes, scales, ws], [0, 0, 0, None]
    x2 = _fold(x, dx, size)
    res2 = residual if residual.shape == (0,) else _fold(residual, dr, size)
    scale2 = scale if scale.shape == (0,) else _fold(scale, ds, size)
    y, codes, scales, ws = layernorm_quantize_p.bind(x2, res2, gamma, beta, scale2, **params)

    def split(o):
        return o.reshape((size, o.shape[0] // size, *o.shape[1:]))

    return [split(y), split(codes), split(scales), ws], [0, 0, 0, None]


batching.primitive_batchers[layernorm_quantize_p] = _batch
