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


def e2m1_codes(v: np.ndarray) -> np.ndarray:
    """4-bit codes of float32 values via ml_dtypes (4-bit types view as 1 byte)."""
    return v.astype(E2M1).view(np.uint8) & 0xF


def element_codes(v: np.ndarray, fmt: QuantFormat) -> np.ndarray:
    if fmt.is_packed:
        return e2m1_codes(v)
    return v.astype(fmt.element_dtype).view(np.uint8)


def decode_codes(codes: np.ndarray, fmt: QuantFormat) -> np.ndarray:
    if fmt.is_packed:
        return (codes & 0xF).astype(np.uint8).view(E2M1).astype(np.float32)
    return codes.view(fmt.element_dtype).astype(np.float32)


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
            emax = 8 if fmt is QuantFormat.MXFP8 else 2
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
        axis = 3 if pack_b else 2
        if codes.shape[axis] % 2:
            pad = [(0, 0)] * 4
            pad[axis] = (0, 1)
            codes = np.pad(codes, pad)
        lo = codes.take(np.arange(0, codes.shape[axis], 2), axis=axis)
        hi = codes.take(np.arange(1, codes.shape[axis], 2), axis=axis)
        codes = (lo | (hi << 4)).astype(np.uint8)
    return codes, stored, st


def dequantize_view(codes_bytes, stored, st, fmt, ba, bb, pack_b, a, b, dtype):
    g, p = codes_bytes.shape[:2]
    if fmt.is_packed:
        axis = 3 if pack_b else 2
        both = np.stack([codes_bytes & 0xF, codes_bytes >> 4], axis=axis + 1)
        shape = list(codes_bytes.shape)
        shape[axis] *= 2
        codes = both.reshape(shape)[:, :, :a, :b]
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
