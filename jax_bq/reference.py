"""Pure-jnp twin of every kernel: test oracle, fallback path and default lowering.

The functions here operate on the rank-4 ``[G, P, A, B]`` view of
:mod:`jax_bq.layout` and implement, operation for operation, the pinned math
of ``ffi/include/jax_bq/block_math.h``:

* FP32-scale formats (FP8_E4M3, FP8_E5M2, FP4), per block::

    amax = max|x|;  s = amax / MAX  (s = 1 if amax == 0, 2^-149 on underflow)
    q = RNE(clip(x / s, -MAX, MAX));   dequantize: decode(q) * s

* NVFP4: ``st = amax_tensor / 2688`` over finite elements,
  ``sb = e4m3(min((amax / 6) / st, 448))``, ``se = float(sb) * st``,
  ``q = RNE(clip(x / se, -6, 6))`` (a signed zero where ``se == 0``).
* MX: ``X = clamp(floor(log2(amax)) - emax_elem, -127, 127)``, scale ``2^X``
  stored as E8M0 (``emax_elem`` = 8 for E4M3, 2 for E2M1 and E2M3, 4 for E3M2).
* A block holding NaN/Inf gets a NaN scale and NaN codes (0 for E2M1 and the
  FP6 formats, which have no NaN).
* Packed formats store their codes in units (FP4: 2 per byte; FP6: 4 per 3
  bytes) in the bit order of ``QuantFormat.packed_extent``.

Every division is done by ``_div``, a correctly rounded long division in
integer arithmetic, because XLA gives none (approximate on GPU, reciprocal
rewrites and reassociation everywhere). One documented difference remains:
XLA:CPU executes with flush-to-zero, so where an *input* or a dequantized
product is a float32 subnormal (|v| < 2^-126) the twin on CPU can differ from
the IEEE kernels and the numpy oracle. The FFI kernels keep IEEE semantics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_bq._util import cdiv as _cdiv
from jax_bq.formats import NVFP4_TENSOR_DIVISOR, QuantFormat

_F32_MIN_POSITIVE = np.float32(np.finfo(np.float32).smallest_subnormal)
# Midpoints between E2M1 values, and whether a tie rounds up (the upper
# neighbour's code is even) or down.
_E2M1_MIDPOINTS = (
    (0.25, False),
    (0.75, True),
    (1.25, False),
    (1.75, True),
    (2.5, False),
    (3.5, True),
    (5.0, False),
)
_E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    np.float32,
)
_NAN_CODE = {
    QuantFormat.FP8_E4M3: 0x7F,
    QuantFormat.MXFP8: 0x7F,
    QuantFormat.FP8_E5M2: 0x7E,
}


def _normalize_mantissa(bits: jax.Array):
    """(24-bit mantissa with its leading 1 at bit 23, unbiased-by-127 exponent)."""
    e = ((bits >> 23) & 0xFF).astype(jnp.int32)
    m = bits & jnp.uint32(0x7FFFFF)
    m = jnp.where(e > 0, m | jnp.uint32(0x800000), m)
    e = jnp.where(e > 0, e, 1)
    shift = jnp.maximum(lax.clz(m).astype(jnp.int32) - 8, 0)  # subnormal inputs
    return m << shift.astype(jnp.uint32), e - shift


def _div(a: jax.Array, divisor) -> jax.Array:
    """Correctly rounded IEEE float32 ``a / divisor`` (round to nearest even).

    XLA does not give one: on GPU it emits an approximate division, and its
    algebraic simplifier turns ``A / broadcast(B)`` into ``A * broadcast(1/B)``
    and reassociates chained divisions. This restoring long division on the
    24-bit significands is exact by construction, runs on any backend, and
    ignores the flush-to-zero mode. ``divisor`` must be finite and > 0, ``a``
    finite (the only divisions the formats need); subnormal results are exact.
    """
    b = jnp.broadcast_to(jnp.asarray(divisor, jnp.float32), jnp.shape(a))
    ua = lax.bitcast_convert_type(jnp.asarray(a, jnp.float32), jnp.uint32)
    ub = lax.bitcast_convert_type(b, jnp.uint32)
    sign = ua & jnp.uint32(0x80000000)
    ma, ea = _normalize_mantissa(ua & jnp.uint32(0x7FFFFFFF))
    mb, eb = _normalize_mantissa(ub)
    smaller = ma < mb
    ma = jnp.where(smaller, ma << 1, ma)  # now mb <= ma < 2 mb
    e = ea - eb + 127 - smaller.astype(jnp.int32)  # biased exponent of the quotient

    def step(_, qr):  # one quotient bit; 25 steps: 24 significand bits + guard
        q, r = qr
        bit = r >= mb
        return (q << 1) | bit.astype(jnp.uint32), jnp.where(bit, r - mb, r) << 1

    q, r = lax.fori_loop(0, 25, step, (jnp.zeros_like(ma), ma))
    sticky = r != 0
    # Subnormal results: shift right by 1 - e more bits, folding them into sticky.
    extra = jnp.clip(1 - e, 0, 26).astype(jnp.uint32)
    lost = jnp.where(extra > 0, q & ((jnp.uint32(1) << extra) - 1), 0)
    q = jnp.where(extra >= 26, 0, q >> jnp.minimum(extra, 25))
    sticky = sticky | (lost != 0)
    guard = q & 1
    mant = q >> 1
    mant = mant + (guard & (sticky.astype(jnp.uint32) | (mant & 1)))
    e_field = jnp.where(extra > 0, 0, e).astype(jnp.uint32)
    # mant may carry into bit 23/24; adding it to the exponent field handles both.
    bits = (e_field << 23) + mant - jnp.where(extra > 0, 0, jnp.uint32(0x800000))
    bits = jnp.where(e >= 255, jnp.uint32(0x7F800000), bits)  # overflow to Inf
    bits = jnp.where((ua & jnp.uint32(0x7FFFFFFF)) == 0, 0, bits)
    return lax.bitcast_convert_type(sign | bits, jnp.float32)


def _minifloat_layout(fmt: QuantFormat) -> tuple[int, int, int]:
    """(exponent bits, mantissa bits, bias) of a sub-byte element format."""
    exp, man = fmt.exponent_bits, fmt.mantissa_bits
    return exp, man, (1 << (exp - 1)) - 1


def _rne_shift(m: jax.Array, s: jax.Array) -> jax.Array:
    """``round_half_even(m / 2^s)`` for uint32 ``m < 2^24`` and ``1 <= s``."""
    s = jnp.clip(s, 1, 31).astype(jnp.uint32)  # callers discard results for s < 1
    one = jnp.uint32(1)
    return (m + (one << (s - one)) - one + ((m >> s) & one)) >> s


def _encode_minifloat(v: jax.Array, fmt: QuantFormat) -> jax.Array:
    """RNE codes of a minifloat without Inf/NaN (FP6), integer arithmetic only.

    ``v`` is float32, not NaN, already clipped to ``[-MAX, MAX]``. Normal
    targets round the float32 mantissa to ``man`` bits (RNE on the bits, the
    carry moving into the exponent); subnormal targets (``|v| < 2^(1-bias)``)
    count quanta of ``2^(1-bias-man)``, the 24-bit significand shifted right
    with RNE. Mirrors ``EncodeMinifloat`` in ``ffi/include/jax_bq/formats.h``
    without float arithmetic, so XLA's flush-to-zero cannot touch it.
    """
    exp, man, bias = _minifloat_layout(fmt)
    bits = lax.bitcast_convert_type(v.astype(jnp.float32), jnp.uint32)
    a = bits & jnp.uint32(0x7FFFFFFF)
    shift = 23 - man
    rounded = a + jnp.uint32((1 << (shift - 1)) - 1) + ((a >> shift) & 1)
    normal = (rounded >> shift) - jnp.uint32((127 - bias) << man)
    e = (a >> 23).astype(jnp.int32)
    sig = jnp.where(e > 0, (a & jnp.uint32(0x7FFFFF)) | jnp.uint32(0x800000), a)
    # |v| = sig * 2^(max(e, 1) - 150); quanta = |v| / 2^(1 - bias - man).
    sub = _rne_shift(sig, 150 + 1 - bias - man - jnp.maximum(e, 1))
    is_sub = a < jnp.uint32((127 + 1 - bias) << 23)
    mag = jnp.where(is_sub, sub, normal)
    return (mag | ((bits >> 31) << (exp + man))).astype(jnp.uint8)


def _minifloat_values(fmt: QuantFormat) -> np.ndarray:
    """float32 value of every code of a minifloat without Inf/NaN (exact)."""
    exp, man, bias = _minifloat_layout(fmt)
    c = np.arange(1 << (1 + exp + man))
    e, m = (c >> man) & ((1 << exp) - 1), c & ((1 << man) - 1)
    mag = np.where(e == 0, np.ldexp(m, 1 - bias - man), np.ldexp((1 << man) + m, e - bias - man))
    return np.where(c >> (exp + man), -mag, mag).astype(np.float32)


def _encode_elements(v: jax.Array, fmt: QuantFormat) -> jax.Array:
    """RNE codes (uint8) of float32 values already clipped to ``[-MAX, MAX]``."""
    if fmt.is_packed and fmt.bits != 4:
        return _encode_minifloat(v, fmt)
    if fmt.is_packed:
        # Compares, not a convert round trip: XLA:GPU deletes
        # astype(float4_e2m1fn).astype(float32) as a no-op (seen on the H200).
        mag = jnp.abs(v)
        code = sum(((mag >= t) if up else (mag > t)).astype(jnp.uint8) for t, up in _E2M1_MIDPOINTS)
        return code | (jnp.signbit(v).astype(jnp.uint8) << 3)
    return lax.bitcast_convert_type(v.astype(fmt.element_dtype), jnp.uint8)


def decode_elements(codes: jax.Array, fmt: QuantFormat) -> jax.Array:
    """Exact float32 values of uint8 codes (sub-byte codes in the low bits)."""
    if fmt.is_packed and fmt.bits != 4:
        table = jnp.asarray(_minifloat_values(fmt))
        return table[(codes & ((1 << fmt.bits) - 1)).astype(jnp.int32)]
    if fmt.is_packed:
        return jnp.asarray(_E2M1_VALUES)[(codes & 0xF).astype(jnp.int32)]
    return lax.bitcast_convert_type(codes, fmt.element_dtype).astype(jnp.float32)


def _decode_e8m0(codes: jax.Array) -> jax.Array:
    c = codes.astype(jnp.uint32)
    bits = jnp.where(c == 0, jnp.uint32(0x00400000), c << 23)
    bits = jnp.where(c == 0xFF, jnp.uint32(0x7FC00000), bits)
    return lax.bitcast_convert_type(bits, jnp.float32)


def _floor_log2(a: jax.Array) -> jax.Array:
    """floor(log2(a)) for finite a > 0 from the float32 bits (subnormals too)."""
    bits = lax.bitcast_convert_type(a, jnp.uint32) & jnp.uint32(0x7FFFFFFF)
    biased = (bits >> 23).astype(jnp.int32)
    lead = 31 - lax.clz(bits).astype(jnp.int32)
    return jnp.where(biased != 0, biased - 127, lead - 149)


def _block_view(x, ba, bb):
    """Pads the [G, P, A, B] array to whole blocks: [G, P, nA, ba, nB, bb]."""
    g, p, a, b = x.shape
    na, nb = _cdiv(a, ba), _cdiv(b, bb)
    xp = jnp.pad(x, ((0, 0), (0, 0), (0, na * ba - a), (0, nb * bb - b)))
    return xp.reshape(g, p, na, ba, nb, bb)


def _unblock(xb, a, b):
    g, p, na, ba, nb, bb = xb.shape
    return xb.reshape(g, p, na * ba, nb * bb)[:, :, :a, :b]


def pack_codes(codes: jax.Array, fmt: QuantFormat, pack_b: bool) -> jax.Array:
    """Packs uint8 codes into units along A (or B); see ``QuantFormat.packed_extent``.

    ``elements_per_unit`` codes of ``bits`` bits form the little-endian word
    ``w = sum_e code_e << (bits * e)``, stored as ``bytes_per_unit`` bytes (FP4:
    two per byte, the first in the low nibble). A partial last unit is zero.
    """
    axis = 3 if pack_b else 2
    epu, bpu, bits = fmt.elements_per_unit, fmt.bytes_per_unit, fmt.bits
    n = codes.shape[axis]
    units = _cdiv(n, epu)
    pad = [(0, 0)] * 4
    pad[axis] = (0, units * epu - n)
    c = jnp.pad(codes, pad).astype(jnp.uint32)
    shape = list(c.shape)
    shape[axis : axis + 1] = [units, epu]
    c = c.reshape(shape)
    mask = jnp.uint32((1 << bits) - 1)
    w = sum((lax.index_in_dim(c, e, axis + 1, False) & mask) << (bits * e) for e in range(epu))
    out = jnp.stack([(w >> (8 * t)).astype(jnp.uint8) for t in range(bpu)], axis=axis + 1)
    shape = list(w.shape)
    shape[axis] *= bpu
    return out.reshape(shape)


def unpack_codes(data: jax.Array, fmt: QuantFormat, n: int, pack_b: bool) -> jax.Array:
    """Inverse of :func:`pack_codes`: codes with ``n`` elements along the packed axis."""
    axis = 3 if pack_b else 2
    epu, bpu, bits = fmt.elements_per_unit, fmt.bytes_per_unit, fmt.bits
    shape = list(data.shape)
    shape[axis : axis + 1] = [shape[axis] // bpu, bpu]
    b = data.reshape(shape).astype(jnp.uint32)
    w = sum(lax.index_in_dim(b, t, axis + 1, False) << (8 * t) for t in range(bpu))
    mask = jnp.uint32((1 << bits) - 1)
    codes = jnp.stack([((w >> (bits * e)) & mask).astype(jnp.uint8) for e in range(epu)], axis + 1)
    shape = list(w.shape)
    shape[axis] *= epu
    return lax.slice_in_dim(codes.reshape(shape), 0, n, 1, axis)


def block_scales(amax, finite, fmt: QuantFormat, tensor_scale):
    """(stored scale, float32 divisor) per block; see the module docstring."""
    if fmt.is_mx:
        emax = fmt.element_emax
        x = jnp.where(amax == 0, 0, _floor_log2(jnp.where(amax == 0, 1.0, amax)) - emax)
        code = (jnp.clip(x, -127, 127) + 127).astype(jnp.uint8)
        code = jnp.where(finite, code, jnp.uint8(0xFF))
        return code, _decode_e8m0(code)
    if fmt is QuantFormat.NVFP4:
        sb = jnp.minimum(_div(_div(amax, 6.0), tensor_scale), np.float32(448.0))
        code = lax.bitcast_convert_type(sb.astype(jnp.float8_e4m3fn), jnp.uint8)
        code = jnp.where(finite, code, jnp.uint8(0x7F))
        dec = lax.bitcast_convert_type(code, jnp.float8_e4m3fn).astype(jnp.float32)
        return code, dec * tensor_scale
    s = jnp.where(amax == 0, np.float32(1.0), _div(amax, fmt.max_value))
    s = jnp.where(s == 0, _F32_MIN_POSITIVE, s)
    s = jnp.where(finite, s, np.float32(np.nan))
    return s, s


def nvfp4_tensor_scale(x: jax.Array, cross_shard=None) -> jax.Array:
    """Per-group tensor scale of NVFP4: finite amax / 2688 (1 if zero). x: [G, ...].

    ``cross_shard`` (sharded callers, :mod:`jax_bq.sharding`): a max over the
    shards that hold parts of a group, applied to the finite amax.
    """
    a = jnp.abs(x.astype(jnp.float32))
    amax = jnp.max(jnp.where(jnp.isfinite(a), a, 0.0).reshape(x.shape[0], -1), axis=1, initial=0.0)
    if cross_shard is not None:
        amax = cross_shard(amax)
    st = jnp.where(amax == 0, np.float32(1.0), _div(amax, NVFP4_TENSOR_DIVISOR))
    return jnp.where(st == 0, _F32_MIN_POSITIVE, st)


def group_tensor_scales(xf: jax.Array, fmt: QuantFormat, cross_shard=None) -> jax.Array:
    """Tensor scale per group of a float32 [G, ...] view: NVFP4's, else ones."""
    if fmt is QuantFormat.NVFP4 and (xf.size or cross_shard is not None):
        return nvfp4_tensor_scale(xf, cross_shard)
    return jnp.ones((xf.shape[0],), jnp.float32)


def quantize_view(
    x: jax.Array,
    fmt: QuantFormat,
    ba: int,
    bb: int,
    pack_b: bool,
    *,
    block_cross_shard=None,
    tensor_cross_shard=None,
):
    """Quantizes the [G, P, A, B] view; returns (data, scales, tensor_scale[G]).

    The two optional hooks serve :mod:`jax_bq.sharding` (``x`` is then one
    shard): ``block_cross_shard`` is a max over the shards that share a block
    (applied to the block amax and to the non-finite flag) and
    ``tensor_cross_shard`` a max over the shards that share a group (NVFP4's
    tensor amax). Both are exact, so the result is bitwise the unsharded one.
    """
    g, p, a, b = x.shape
    xf = x.astype(jnp.float32)
    st = group_tensor_scales(xf, fmt, tensor_cross_shard)
    xb = _block_view(xf, ba, bb)
    finite = jnp.all(jnp.isfinite(xb), axis=(3, 5))
    amax = jnp.max(jnp.where(jnp.isfinite(xb), jnp.abs(xb), 0.0), axis=(3, 5), initial=0.0)
    if block_cross_shard is not None:
        amax = block_cross_shard(amax)
        finite = block_cross_shard((~finite).astype(jnp.int32)) == 0
    stored, divisor = block_scales(amax, finite, fmt, st[:, None, None, None])
    div_e = divisor[:, :, :, None, :, None]
    v = jnp.clip(_div(xb, jnp.where(div_e == 0, 1.0, div_e)), -fmt.max_value, fmt.max_value)
    codes = _encode_elements(v, fmt)
    nan_code = jnp.uint8(_NAN_CODE.get(fmt, 0))
    codes = jnp.where(finite[:, :, :, None, :, None], codes, nan_code)
    signed_zero = jnp.signbit(xb).astype(jnp.uint8) << 3
    codes = jnp.where(div_e == 0, signed_zero, codes)
    codes = _unblock(codes, a, b)
    if fmt.is_packed:
        codes = pack_codes(codes, fmt, pack_b)
    else:
        codes = lax.bitcast_convert_type(codes, fmt.data_dtype)
    if fmt.scale_dtype != np.float32:
        stored = lax.bitcast_convert_type(stored, fmt.scale_dtype)
    return codes, stored, st


def effective_scales(scales: jax.Array, tensor_scale: jax.Array, fmt: QuantFormat):
    """Float32 multiplier per block from stored scales ([G, P, nA, nB])."""
    if fmt.is_mx:
        return _decode_e8m0(lax.bitcast_convert_type(scales, jnp.uint8))
    if fmt is QuantFormat.NVFP4:
        return scales.astype(jnp.float32) * tensor_scale[:, None, None, None]
    return scales.astype(jnp.float32)


def dequantize_view(
    data,
    scales,
    tensor_scale,
    fmt: QuantFormat,
    ba: int,
    bb: int,
    pack_b: bool,
    a: int,
    b: int,
    dtype,
):
    """Dequantizes the [G, P, A', B'] codes back to [G, P, a, b] of ``dtype``."""
    if fmt.is_packed:
        codes = unpack_codes(data, fmt, b if pack_b else a, pack_b)
    else:
        codes = lax.bitcast_convert_type(data, jnp.uint8)
    vals = decode_elements(codes, fmt)
    eff = effective_scales(scales, tensor_scale, fmt)
    vb = _block_view(vals, ba, bb) * eff[:, :, :, None, :, None]
    return _unblock(vb, a, b).astype(dtype)
