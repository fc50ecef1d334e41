"""numpy/ml_dtypes oracle of the pinned numerics, independent of jnp and C++.

Works on the rank-4 [G, P, A, B] view; `oracle_quantize` maps a user array
through jax_bq.layout (whose shape arithmetic is tested separately).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from jax_bq.formats import QuantFormat
from jax_bq.layout import make_view, packed_shape, scale_shape

E2M1 = ml_dtypes.float4_e2m1fn
E4M3 = ml_dtypes.float8_e4m3fn
E8M0 = ml_dtypes.float8_e8m0fnu
TINY = np.float32(np.finfo(np.float32).smallest_subnormal)
# OCP MX v1.0 emax_elem by element (exponent bits, mantissa bits): E4M3 8,
# E5M2 15, E3M2 4, E2M3 2, E2M1 2.
OCP_MX_EMAX_ELEM = {(4, 3): 8, (5, 2): 15, (3, 2): 4, (2, 3): 2, (2, 1): 2}


def e2m1_codes(v: np.ndarray) -> np.ndarray:
    """4-bit codes of float32 values via ml_dtypes (4-bit types view as 1 byte)."""
    return v.astype(E2M1).view(np.uint8) & 0xF


def element_codes(v: np.ndarray, fmt: QuantFormat) -> np.ndarray:
    """RNE (saturating) codes via ml_dtypes; sub-byte types view as one byte."""
    mask = (1 << fmt.bits) - 1
    return v.astype(fmt.element_dtype).view(np.uint8) & np.uint8(mask)


def decode_codes(codes: np.ndarray, fmt: QuantFormat) -> np.ndarray:
    """Float32 values of element codes: uint8 codes, or FP8 data as stored (its bytes)."""
    mask = (1 << fmt.bits) - 1
    raw = codes if np.issubdtype(codes.dtype, np.integer) else codes.view(np.uint8)
    return (raw & mask).astype(np.uint8).view(fmt.element_dtype).astype(np.float32)


def pack_units(codes: np.ndarray, fmt: QuantFormat, axis: int) -> np.ndarray:
    """Packs codes along `axis`: a unit is a little-endian word, code e at bits*e."""
    epu, bpu, bits = fmt.elements_per_unit, fmt.bytes_per_unit, fmt.bits
    n = codes.shape[axis]
    units = -(-n // epu)
    pad = [(0, 0)] * codes.ndim
    pad[axis] = (0, units * epu - n)
    c = np.moveaxis(np.pad(codes, pad).astype(np.uint32), axis, -1)
    c = c.reshape(c.shape[:-1] + (units, epu))
    w = (c << (bits * np.arange(epu, dtype=np.uint32))).sum(axis=-1, dtype=np.uint32)
    b = (w[..., None] >> (8 * np.arange(bpu, dtype=np.uint32))) & 0xFF
    b = b.reshape(b.shape[:-2] + (units * bpu,)).astype(np.uint8)
    return np.moveaxis(b, -1, axis)


def unpack_units(data: np.ndarray, fmt: QuantFormat, axis: int, n: int) -> np.ndarray:
    """Inverse of pack_units: n codes along `axis`."""
    epu, bpu, bits = fmt.elements_per_unit, fmt.bytes_per_unit, fmt.bits
    b = np.moveaxis(data.astype(np.uint32), axis, -1)
    b = b.reshape(b.shape[:-1] + (b.shape[-1] // bpu, bpu))
    w = (b << (8 * np.arange(bpu, dtype=np.uint32))).sum(axis=-1, dtype=np.uint32)
    c = (w[..., None] >> (bits * np.arange(epu, dtype=np.uint32))) & ((1 << bits) - 1)
    c = c.reshape(c.shape[:-2] + (-1,))[..., :n].astype(np.uint8)
    return np.moveaxis(c, -1, axis)


def _blocks(x, ba, bb):
    g, p, a, b = x.shape
    na, nb = -(-a // ba), -(-b // bb)
    xp = np.zeros((g, p, na * ba, nb * bb), x.dtype)
    xp[:, :, :a, :b] = x
    return xp.reshape(g, p, na, ba, nb, bb)


def _floor_log2(a: np.ndarray) -> np.ndarray:
    m, e = np.frexp(a.astype(np.float64))  # exact for float32 subnormals too
    return (e - 1).astype(np.int64)


def quantize_view(x: np.ndarray, fmt: QuantFormat, ba: int, bb: int, pack_b: bool):
    """Returns (codes bytes [G,P,A',B'] uint8, stored scales, tensor_scale[G])."""
    g, p, a, b = x.shape
    xf = x.astype(np.float32)
    xb = _blocks(xf, ba, bb)
    fin = np.isfinite(xb)
    finite = fin.all(axis=(3, 5))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        amax = np.where(fin, np.abs(xb), 0).max(axis=(3, 5), initial=np.float32(0))
        amax = amax.astype(np.float32)
        st = np.ones((g,), np.float32)
        if fmt is QuantFormat.NVFP4:
            fx = np.abs(xf).reshape(g, -1)
            tamax = np.where(np.isfinite(fx), fx, 0).max(axis=1, initial=np.float32(0))
            st = np.where(tamax == 0, np.float32(1), tamax.astype(np.float32) / np.float32(2688))
            st = np.where(st == 0, TINY, st).astype(np.float32)
        if fmt.is_mx:
            emax = OCP_MX_EMAX_ELEM[(fmt.exponent_bits, fmt.mantissa_bits)]
            xexp = np.where(amax == 0, 0, _floor_log2(np.where(amax == 0, 1, amax)) - emax)
            code = (np.clip(xexp, -127, 127) + 127).astype(np.uint8)
            code = np.where(finite, code, np.uint8(0xFF))
            stored = code.view(E8M0)
            div = stored.astype(np.float32)
        elif fmt is QuantFormat.NVFP4:
            sb = np.minimum((amax / np.float32(6)) / st[:, None, None, None], np.float32(448))
            stored = np.where(finite, sb.astype(E4M3).view(np.uint8), np.uint8(0x7F)).view(E4M3)
            div = stored.astype(np.float32) * st[:, None, None, None]
        else:
            s = np.where(amax == 0, np.float32(1), amax / np.float32(fmt.max_value))
            s = np.where(s == 0, TINY, s).astype(np.float32)
            stored = np.where(finite, s, np.float32(np.nan)).astype(np.float32)
            div = stored
        d6 = div[:, :, :, None, :, None]
        mx = np.float32(fmt.max_value)
        v = np.clip(xb / np.where(d6 == 0, np.float32(1), d6), -mx, mx)
        codes = element_codes(np.where(np.isfinite(v), v, 0).astype(np.float32), fmt)
    nan_code = {QuantFormat.FP8_E5M2: 0x7E}.get(fmt, 0 if fmt.is_packed else 0x7F)
    codes = np.where(finite[:, :, :, None, :, None], codes, np.uint8(nan_code))
    codes = np.where(d6 == 0, np.signbit(xb).astype(np.uint8) << 3, codes).astype(np.uint8)
    na, nb = codes.shape[2], codes.shape[4]
    codes = codes.reshape(g, p, na * ba, nb * bb)[:, :, :a, :b]
    if fmt.is_packed:
        codes = pack_units(codes, fmt, 3 if pack_b else 2)
    return codes, stored, st


def dequantize_view(codes_bytes, stored, st, fmt, ba, bb, pack_b, a, b, dtype):
    g, p = codes_bytes.shape[:2]
    if fmt.is_packed:
        codes = unpack_units(codes_bytes, fmt, 3 if pack_b else 2, b if pack_b else a)
    else:
        codes = codes_bytes
    vals = decode_codes(np.ascontiguousarray(codes), fmt)
    eff = np.asarray(stored).astype(np.float32)
    if fmt is QuantFormat.NVFP4:
        eff = eff * st[:, None, None, None]
    vb = _blocks(vals, ba, bb) * eff[:, :, :, None, :, None]
    na, nb = vb.shape[2], vb.shape[4]
    return vb.reshape(g, p, na * ba, nb * bb)[:, :, :a, :b].astype(dtype)


def oracle_quantize(x, fmt, granularity, block, axis):
    """User-level oracle: returns (data bytes, scale bytes, tensor_scale or None)."""
    x = np.asarray(x)
    shape = tuple(x.shape)
    axis = axis - len(shape) if axis >= 0 else axis
    v = make_view(shape, granularity, axis, block)
    codes, stored, st = quantize_view(
        x.reshape(v.dims), fmt, v.ba, v.bb, v.pack_b and fmt.is_packed
    )
    data = codes.reshape(packed_shape(shape, v.axis, fmt))
    scales = np.asarray(stored).reshape(scale_shape(shape, granularity, v.axis, block))
    return data, scales, (st.reshape(()) if fmt.has_tensor_scale else None)


def oracle_dequantize_like(q, ref, dtype) -> np.ndarray:
    """Oracle dequantize of the oracle's (data, scales, tensor_scale) in q's layout."""
    data, scales, ts = ref
    fmt = q.format
    v = q.view()
    out = dequantize_view(
        np.asarray(data).reshape(v.data_dims(fmt)),
        np.asarray(scales).reshape(v.scale_dims),
        np.ones(1, np.float32) if ts is None else np.asarray(ts).reshape(1),
        fmt,
        v.ba,
        v.bb,
        v.pack_b and fmt.is_packed,
        v.a,
        v.b,
        np.dtype(dtype),
    )
    return out.reshape(q.shape)


def as_bytes(a) -> np.ndarray:
    """Raw bytes of any array (float8 / float32 / uint8) for bitwise comparison."""
    a = np.ascontiguousarray(np.asarray(a))
    return a.view(np.uint8).reshape(-1) if a.size else np.zeros((0,), np.uint8)
