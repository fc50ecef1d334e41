"""jnp twin of the fused residual-add + LayerNorm + FP8 quantize kernel.

The CPU and CUDA kernels (``ffi/cpu/layernorm_quantize.h``,
``ffi/cuda/layernorm_quantize.cu``) and this twin agree bit for bit because
all three follow one pinned order of operations, written out here:

Row reduction order (``row_sum``). A row of ``H`` values is laid out as
``[C, L, V]`` with ``V = 8`` values per lane, ``L = 32 * W`` lanes,
``W = min(8, ceil(H / 256))`` warps and ``C = ceil(H / (L * V))`` chunks;
element ``i = (c * L + l) * V + v``, positions ``i >= H`` hold ``+0``. Lane
``l`` sums its values sequentially in ``(c, v)`` order starting from the first
one; within each warp of 32 lanes the partials are added by halving (lane
``l`` with ``l + 16``, then ``+ 8``, ``+ 4``, ``+ 2``, ``+ 1``: the xor
butterfly of a warp shuffle, the same values because float addition is
commutative); the ``W`` warp totals are added sequentially. That is exactly
what one CUDA thread block of ``32 * W`` threads computes with 16-byte loads.

Every operation is one IEEE float32 operation, rounded to nearest even, with
no fused multiply-add. XLA:CPU contracts ``a * b + c`` into an FMA (measured:
a quarter of the outputs changed), rewrites ``1 / sqrt(v)`` as an approximate
``rsqrt``, may skip a bf16 rounding between fused ops (excess precision), and
removes ``lax.optimization_barrier`` before fusion. So the twin passes each
product that feeds an addition, the square root, and the 16-bit residual sum
through :func:`_opaque`: an identity on every value that no compiler can see
through, after which each operation rounds exactly once, like the kernels
(compiled with ``-ffp-contract=off`` / ``--fmad=false``).

XLA:CPU flushes float32 subnormals; the kernels do not. Inputs whose
intermediate values are float32 subnormals (``|x| < 2^-126``) may therefore
differ in the sign or last bit of a zero-ish result; BERT activations never
come near that range.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_bq.formats import QuantFormat
from jax_bq.reference import _NAN_CODE, _div, block_scales
from jax_bq.static import pow2_reciprocal

__all__ = ["MODES", "layernorm_quantize_view", "reduction_layout", "row_sum"]

#: Scale modes of the fused op: static per-tensor, dynamic per-token (one
#: scale per row), dynamic per-tensor (one amax over each group).
MODES = ("static", "per_token", "per_tensor")

_V = 8  # values per lane per chunk (one 16-byte load of 16-bit values)
_WARP = 32
_MAX_WARPS = 8


def reduction_layout(h: int) -> tuple[int, int]:
    """``(W, C)``: warps and chunks of the pinned row-reduction order for ``H = h``."""
    w = min(_MAX_WARPS, max(1, math.ceil(h / (_WARP * _V))))
    c = max(1, math.ceil(h / (_WARP * w * _V)))
    return w, c


def row_sum(a: jax.Array) -> jax.Array:
    """Sum over the last axis of float32 ``a [N, H]`` in the pinned order -> ``[N]``."""
    n, h = a.shape
    w, c = reduction_layout(h)
    lanes = _WARP * w
    a = jnp.pad(a, ((0, 0), (0, c * lanes * _V - h))).reshape(n, c, lanes, _V)
    acc = a[:, 0, :, 0]
    for ci in range(c):
        for v in range(_V):
            if ci or v:
                acc = acc + a[:, ci, :, v]
    acc = acc.reshape(n, w, _WARP)
    half = _WARP // 2
    while half:
        acc = acc[..., :half] + acc[..., half : 2 * half]
        half //= 2
    total = acc[:, 0, 0]
    for wi in range(1, w):
        total = total + acc[:, wi, 0]
    return total


def _opaque(v: jax.Array) -> jax.Array:
    """``v`` unchanged, hidden from algebraic rewrites and FMA contraction.

    ORs ``isnan(v)`` into the lowest bit of the value's bits: zero for every
    number, and a NaN stays a NaN. The compiler cannot prove the term zero, so
    the rounding of ``v`` to its dtype has to happen here.
    """
    ut = {2: jnp.uint16, 4: jnp.uint32}[v.dtype.itemsize]
    bits = lax.bitcast_convert_type(v, ut) | jnp.isnan(v).astype(ut)
    return lax.bitcast_convert_type(bits, v.dtype)


def _encode_fp8(v: jax.Array, fmt: QuantFormat) -> jax.Array:
    """uint8 RNE codes of float32 values already clipped to ``[-MAX, MAX]``."""
    return lax.bitcast_convert_type(v.astype(fmt.element_dtype), jnp.uint8)


def layernorm_quantize_view(
    x: jax.Array,
    residual: jax.Array | None,
    gamma: jax.Array,
    beta: jax.Array,
    scale: jax.Array | None,
    *,
    fmt: QuantFormat,
    mode: str,
    eps: float,
    out_dtype,
):
    """The fused op on the ``[G, R, H]`` view; returns ``(y, codes, scales)``.

    ``scale``: the static power-of-two scale per group (``[G]`` float32, NaN
    for an invalid one) in ``"static"`` mode, else ``None``. ``scales`` is
    ``[G, R]`` for ``"per_token"`` and ``[G]`` otherwise.
    """
    g, r, h = x.shape
    n = g * r
    s = x if residual is None else _opaque(x + residual)
    s = s.reshape(n, h).astype(jnp.float32)
    inv_h = np.float32(1.0) / np.float32(h)
    mean = _opaque(row_sum(s) * inv_h)
    mean = jnp.where(mean == 0, np.float32(0.0), mean)  # one zero: +0
    d = s - mean[:, None]
    var = _opaque(row_sum(_opaque(d * d)) * inv_h)
    rstd = np.float32(1.0) / _opaque(jnp.sqrt(var + np.float32(eps)))
    gam = jnp.asarray(gamma, jnp.float32)
    bet = jnp.asarray(beta, jnp.float32)
    y32 = _opaque((d * rstd[:, None]) * gam) + bet
    y = y32.astype(out_dtype).reshape(g, r, h)
    finite_el = jnp.isfinite(y32)
    nan_code = jnp.uint8(_NAN_CODE[fmt])
    if mode == "static":
        sg = jnp.asarray(scale, jnp.float32).reshape(g)
        ok = ~jnp.isnan(sg)
        inv = jnp.where(ok, pow2_reciprocal(jnp.where(ok, sg, 1.0)), np.float32(np.nan))
        inv_rows = jnp.repeat(inv, r)[:, None]
        v = jnp.clip(y32 * inv_rows, -fmt.max_value, fmt.max_value)
        codes = jnp.where(finite_el & ~jnp.isnan(inv_rows), _encode_fp8(v, fmt), nan_code)
        scales = sg
    else:
        mag = jnp.where(finite_el, jnp.abs(y32), np.float32(0.0))
        if mode == "per_token":
            amax = jnp.max(mag, axis=1, initial=0.0)
            finite = jnp.all(finite_el, axis=1)
        else:  # one amax per group
            amax = jnp.max(mag.reshape(g, r * h), axis=1, initial=0.0)
            finite = jnp.all(finite_el.reshape(g, r * h), axis=1)
        stored, divisor = block_scales(amax, finite, fmt, None)
        scales = stored
        if mode == "per_tensor":
            stored, divisor, finite = (jnp.repeat(a, r) for a in (stored, divisor, finite))
        else:
            scales = stored.reshape(g, r)
        div_rows = jnp.where(finite, divisor, np.float32(1.0))[:, None]
        safe = jnp.where(finite_el, y32, np.float32(0.0))
        v = jnp.clip(_div(safe, div_rows), -fmt.max_value, fmt.max_value)
        codes = jnp.where(finite[:, None], _encode_fp8(v, fmt), nan_code)
    codes = lax.bitcast_convert_type(codes, fmt.data_dtype).reshape(g, r, h)
    return y, codes, scales
