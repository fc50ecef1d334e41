"""Pure-jnp twin of the calibrate kernels (``ffi/include/jax_bq/calibrate_math.h``).

For every block of a ``[G, P, A, 1]`` view, candidate scales are tried in a
fixed order (candidate 0 is quantize's absmax scale):

* FP32-scale formats: ``s_j = RN(s_0 * f_j)``, ``f_0 = 1`` then
  ``f = (160 - i) / 128`` for ``i = 0..127, i != 32`` (1.25 down to 33/128).
* NVFP4: E4M3 codes ``c_0, c_0-1 .. c_0-8, c_0+1, c_0+2`` within ``[1, 0x7E]``.
* MX: E8M0 exponents ``X_0, X_0+1, X_0-1`` within ``[-127, 127]``.

The cost of a candidate is ``S = sum_i sq(v_i - decode(q_i))`` with
``v_i = x_i / s`` and ``q_i = encode(clip(v_i))``, a float32 pairwise-tree sum
over the zero-padded block, ``sq`` being the square in a form that FMA
contraction cannot change (XLA:CPU fuses ``a*a + b*b`` into an FMA, the C++
kernels do not): ``e = h + l`` with ``h`` the top 12 significand bits, every
product exact, ``sq(e) = RN(RN(h*h + 2*h*l) + l*l)``. Candidates compare on ``w_j * S_j`` (``w`` =
``f^2``, ``decode(c)^2`` or ``4^(X - X_0)``), the first strictly smallest
wins. Reported block errors are ``s^2 * S``. The twin matches the CPU and CUDA
kernels bit for bit, with the flush-to-zero caveat of :mod:`jax_bq.reference`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_bq.formats import QuantFormat
from jax_bq.reference import (
    _NAN_CODE,
    _block_view,
    _decode_e8m0,
    _div,
    _encode_elements,
    _unblock,
    block_scales,
    decode_elements,
    group_tensor_scales,
    pack_codes,
)


def candidate_count(fmt: QuantFormat) -> int:
    """Number of candidate scales per block (CalibCandidates in C++)."""
    if fmt.scale_dtype == np.float32:
        return 128
    return 11 if fmt is QuantFormat.NVFP4 else 3


def _square(e):
    """``e**2`` as ContractionFreeSquare in calibrate_math.h computes it."""
    h = lax.bitcast_convert_type(
        lax.bitcast_convert_type(e, jnp.uint32) & jnp.uint32(0xFFFFF000), jnp.float32
    )
    lo = e - h
    return (h * h + (h * lo) * np.float32(2.0)) + lo * lo


def _pairwise_sum(t):
    """Pairwise float32 tree over the last axis (a power of two)."""
    while t.shape[-1] > 1:
        t = t[..., 0::2] + t[..., 1::2]
    return t[..., 0]


def _decode_e4m3(code):
    return lax.bitcast_convert_type(code.astype(jnp.uint8), jnp.float8_e4m3fn).astype(jnp.float32)


def _candidate(j, fmt, stored0, divisor0, amax, st):
    """(valid, divisor, stored, weight) of candidate j for every block."""
    if fmt.scale_dtype == np.float32:
        i = jnp.where(j - 1 < 32, j - 1, j)
        f = (160 - i).astype(jnp.float32) / np.float32(128.0)
        s = divisor0 * f
        valid = (j == 0) | ((amax != 0) & (s != 0) & jnp.isfinite(s))
        w = ((160 - i) * (160 - i)).astype(jnp.float32) / np.float32(16384.0)
        s = jnp.where(j == 0, divisor0, s)
        return valid, s, s, jnp.where(j == 0, np.float32(1.0), w)
    if fmt is QuantFormat.NVFP4:
        c0 = stored0.astype(jnp.int32)
        c = jnp.where(j <= 8, c0 - j, c0 + j - 8)
        c = jnp.where(j == 0, c0, c)
        valid = (j == 0) | ((c0 >= 1) & (c >= 1) & (c <= 0x7E))
        cc = jnp.clip(c, 0, 0x7E)
        d = _decode_e4m3(cc)
        return valid, d * st, cc.astype(jnp.uint8), d * d
    x0 = stored0.astype(jnp.int32) - 127
    x = jnp.where(j == 1, x0 + 1, x0 - 1)
    x = jnp.where(j == 0, x0, x)
    valid = (j == 0) | ((x >= -127) & (x <= 127))
    code = (jnp.clip(x, -127, 127) + 127).astype(jnp.uint8)
    w = jnp.where(j == 0, np.float32(1.0), jnp.where(j == 1, np.float32(4.0), np.float32(0.25)))
    return valid, _decode_e8m0(code), code, w


def calibrate_view(x, fmt: QuantFormat, ba: int):
    """Calibrates the ``[G, P, A, 1]`` view.

    Returns:
        ``(data, scales, tensor_scale[G], mse_absmax, mse_best, clipped)``,
        the statistics shaped like the scales ``[G, P, nA, 1]``.
    """
    g, p, a, _ = x.shape
    xf = x.astype(jnp.float32)
    st = group_tensor_scales(xf, fmt)
    xb = _block_view(xf, ba, 1)[:, :, :, :, 0, 0]  # [G, P, nA, ba]
    finite = jnp.all(jnp.isfinite(xb), axis=-1)
    amax = jnp.max(jnp.where(jnp.isfinite(xb), jnp.abs(xb), 0.0), axis=-1, initial=0.0)
    st_b = st[:, None, None]
    stored0, divisor0 = block_scales(amax, finite, fmt, st_b)
    mx = np.float32(fmt.max_value)

    def cost_of(divisor):
        safe = jnp.where((divisor == 0) | ~jnp.isfinite(divisor), np.float32(1.0), divisor)
        v = _div(xb, safe[..., None])
        q = _encode_elements(jnp.clip(v, -mx, mx), fmt)
        e = v - decode_elements(q, fmt)
        clipped = jnp.sum((v > mx) | (v < -mx), axis=-1, dtype=jnp.int32)
        return _pairwise_sum(_square(e)), clipped

    def body(j, carry):
        best_w, best_div, best_stored, best_cost, best_clip, mse0 = carry
        valid, div, stored, w = _candidate(j, fmt, stored0, divisor0, amax, st_b)
        cost, clip = cost_of(div)
        weighted = w * cost
        take = valid & ((j == 0) | (weighted < best_w))
        mse0 = jnp.where(j == 0, (div * div) * cost, mse0)
        return (
            jnp.where(take, weighted, best_w),
            jnp.where(take, div, best_div),
            jnp.where(take, stored.astype(best_stored.dtype), best_stored),
            jnp.where(take, cost, best_cost),
            jnp.where(take, clip, best_clip),
            mse0,
        )

    zeros = jnp.zeros(amax.shape, jnp.float32)
    init = (zeros, divisor0, stored0, zeros, jnp.zeros(amax.shape, jnp.int32), zeros)
    _, div, stored, cost, clipped, mse0 = lax.fori_loop(0, candidate_count(fmt), body, init)
    mse1 = (div * div) * cost
    # NVFP4 blocks whose absmax E4M3 scale is 0 store zeros: error = sum x^2.
    zero_scale = finite & (divisor0 == 0)
    sumsq = _pairwise_sum(_square(xb))
    mse0 = jnp.where(zero_scale, sumsq, mse0)
    mse1 = jnp.where(zero_scale, sumsq, mse1)
    nan = np.float32(np.nan)
    mse0 = jnp.where(finite, mse0, nan)
    mse1 = jnp.where(finite, mse1, nan)
    clipped = jnp.where(finite & ~zero_scale, clipped, 0)
    stored = jnp.where(finite, stored, stored0)
    div = jnp.where(finite, div, divisor0)

    # Codes with the chosen scales, exactly as quantize encodes.
    div_e = div[..., None]
    v = jnp.clip(_div(xb, jnp.where(div_e == 0, 1.0, div_e)), -mx, mx)
    codes = _encode_elements(v, fmt)
    codes = jnp.where(finite[..., None], codes, jnp.uint8(_NAN_CODE.get(fmt, 0)))
    codes = jnp.where(div_e == 0, jnp.signbit(xb).astype(jnp.uint8) << 3, codes)
    codes = _unblock(codes[..., None, None], a, 1)
    if fmt.is_packed:
        codes = pack_codes(codes, fmt, False)
    else:
        codes = lax.bitcast_convert_type(codes, fmt.data_dtype)
    if fmt.scale_dtype != np.float32:
        stored = lax.bitcast_convert_type(stored.astype(jnp.uint8), fmt.scale_dtype)
    return (
        codes,
        stored[..., None],
        st,
        mse0[..., None],
        mse1[..., None],
        clipped[..., None],
    )
