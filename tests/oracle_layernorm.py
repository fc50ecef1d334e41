"""numpy/ml_dtypes oracle of the fused residual + LayerNorm + FP8 quantize op.

``ln_pinned`` follows the pinned order of jax_bq.reference_layernorm in
numpy float32 (IEEE, one rounding per operation, no FMA): the kernels and the
twin must match it bit for bit. ``ln_float64`` is the textbook LayerNorm in
float64, for the accuracy check of the pinned order itself.
"""

from __future__ import annotations

import math

import numpy as np
from oracle import quantize_view

from jax_bq.formats import QuantFormat

V, WARP = 8, 32
NAN_CODE = {QuantFormat.FP8_E4M3: 0x7F, QuantFormat.FP8_E5M2: 0x7E}


def _layout(h: int) -> tuple[int, int]:
    w = min(8, max(1, math.ceil(h / 256)))
    return w, max(1, math.ceil(h / (WARP * w * V)))


def pinned_row_sum(a: np.ndarray) -> np.ndarray:
    """float32 [N, H] -> [N]: lanes sequentially, warp halving, warps in order."""
    n, h = a.shape
    w, c = _layout(h)
    lanes = WARP * w
    p = np.zeros((n, c * lanes * V), np.float32)
    p[:, :h] = a
    p = p.reshape(n, c, lanes, V)
    acc = p[:, 0, :, 0].copy()
    for ci in range(c):
        for v in range(V):
            if ci or v:
                acc = acc + p[:, ci, :, v]
    acc = acc.reshape(n, w, WARP)
    half = WARP // 2
    while half:
        acc = acc[..., :half] + acc[..., half : 2 * half]
        half //= 2
    total = acc[:, 0, 0].copy()
    for wi in range(1, w):
        total = total + acc[:, wi, 0]
    return total


def residual_sum(x: np.ndarray, residual) -> np.ndarray:
    """x + residual rounded to x's dtype (ml_dtypes adds in float32, then rounds)."""
    if residual is None:
        return x
    return (x.astype(np.float32) + residual.astype(np.float32)).astype(x.dtype)


def ln_pinned(x, residual, gamma, beta, eps) -> np.ndarray:
    """y32 [rows, H] in the pinned order."""
    h = x.shape[-1]
    s = residual_sum(x, residual).reshape(-1, h).astype(np.float32)
    inv_h = np.float32(1) / np.float32(h)
    g32, b32 = np.asarray(gamma, np.float32), np.asarray(beta, np.float32)
    with np.errstate(all="ignore"):
        mean = pinned_row_sum(s) * inv_h
        mean = np.where(mean == 0, np.float32(0), mean).astype(np.float32)
        d = s - mean[:, None]
        var = pinned_row_sum(d * d) * inv_h
        rstd = np.float32(1) / np.sqrt(var + np.float32(eps))
        return (d * rstd[:, None]) * g32 + b32


def ln_float64(x, residual, gamma, beta, eps) -> np.ndarray:
    h = x.shape[-1]
    s = residual_sum(x, residual).reshape(-1, h).astype(np.float64)
    mean = s.mean(axis=1, keepdims=True)
    var = ((s - mean) ** 2).mean(axis=1, keepdims=True)
    return (s - mean) / np.sqrt(var + eps) * np.asarray(gamma, np.float64) + np.asarray(
        beta, np.float64
    )


def quantize_y32(y32: np.ndarray, fmt: QuantFormat, mode: str, scale=None):
    """(codes uint8 [rows, H], scales) of y32 with the pinned FP8 numerics."""
    rows, h = y32.shape
    if mode == "static":
        inv = np.float32(1) / np.float32(scale)
        with np.errstate(invalid="ignore", over="ignore"):
            v = np.clip(y32 * inv, -fmt.max_value, fmt.max_value)
        codes = v.astype(fmt.element_dtype).view(np.uint8)
        ok = np.isfinite(y32) & ~np.isnan(inv)
        return np.where(ok, codes, np.uint8(NAN_CODE[fmt])).astype(np.uint8), np.float32(scale)
    if mode == "per_token":
        codes, stored, _ = quantize_view(y32.reshape(1, rows, h, 1), fmt, h, 1, False)
        return codes.reshape(rows, h), stored.reshape(rows)
    codes, stored, _ = quantize_view(y32.reshape(1, 1, rows * h, 1), fmt, rows * h, 1, False)
    return codes.reshape(rows, h), stored.reshape(())
