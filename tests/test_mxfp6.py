"""MXFP6 (OCP MX v1.0 E2M3 / E3M2 elements, E8M0 scale per 32, 4 codes per 3
bytes): the kernel of each backend (CPU; CUDA where a GPU is visible) == the
jnp twin == the numpy/ml_dtypes oracle, bit for bit, on every code, the
midpoints between codes, saturation, NaN/Inf blocks, zeros and -0, float32
subnormal inputs, ragged tails and K not a multiple of 4.

Expected codes of the hand-built cases are also derived independently of
ml_dtypes (round half to even = the even code of the two neighbours)."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import oracle
import pytest

import jax_bq
from jax_bq import Granularity, QuantFormat, reference
from jax_bq.layout import make_view

FP6 = [QuantFormat.MXFP6_E2M3, QuantFormat.MXFP6_E3M2]
IDS = [f.value for f in FP6]
# (exponent bits, mantissa bits, max, OCP emax_elem, ml_dtypes element type)
SPEC = {
    QuantFormat.MXFP6_E2M3: (2, 3, 7.5, 2, ml_dtypes.float6_e2m3fn),
    QuantFormat.MXFP6_E3M2: (3, 2, 28.0, 4, ml_dtypes.float6_e3m2fn),
}


def code_values(fmt) -> np.ndarray:
    """float32 value of each of the 64 codes, from ml_dtypes."""
    return np.arange(64, dtype=np.uint8).view(SPEC[fmt][4]).astype(np.float32)


def unpack(data: np.ndarray, n: int) -> np.ndarray:
    """Codes along the last axis from 4-per-3-byte units (written out by hand)."""
    b = np.asarray(data, np.uint32).reshape(data.shape[:-1] + (-1, 3))
    w = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    c = np.stack([(w >> (6 * e)) & 63 for e in range(4)], axis=-1)
    return c.reshape(data.shape[:-1] + (-1,))[..., :n].astype(np.uint8)


def twin_quantize(x, fmt, axis):
    v = make_view(x.shape, Granularity.PER_BLOCK, axis if axis < 0 else axis - x.ndim, (32,))
    f = jax.jit(lambda a: reference.quantize_view(a, fmt, v.ba, v.bb, False))
    data, scales, _ = f(jnp.reshape(jnp.asarray(x), v.dims))
    return np.asarray(data), np.asarray(scales)


def check(x, fmt, axis=-1, out_dtype=np.float32, twin=True):
    """Kernel == twin == oracle for quantize and dequantize; returns (q, codes).

    ``twin=False`` for float32-subnormal inputs: XLA:CPU runs the twin with
    flush-to-zero (the documented exception in jax_bq/reference.py)."""
    x = np.asarray(x)
    q = jax_bq.quantize(jnp.asarray(x), fmt, axis=axis)
    q.validate()
    want_data, want_scales, _ = oracle.oracle_quantize(
        np.asarray(x, np.float32), fmt, Granularity.PER_BLOCK, (32,), axis
    )
    assert q.data.shape == want_data.shape and q.data.dtype == np.uint8
    np.testing.assert_array_equal(oracle.as_bytes(q.data), oracle.as_bytes(want_data))
    np.testing.assert_array_equal(oracle.as_bytes(q.scales), oracle.as_bytes(want_scales))
    t_data, t_scales = twin_quantize(x, fmt, axis) if twin else (want_data, want_scales)
    np.testing.assert_array_equal(oracle.as_bytes(t_data), oracle.as_bytes(want_data))
    np.testing.assert_array_equal(oracle.as_bytes(t_scales), oracle.as_bytes(want_scales))
    got = np.asarray(jax_bq.dequantize(q, out_dtype))
    want = oracle.oracle_dequantize_like(q, (want_data, want_scales, None), out_dtype)
    np.testing.assert_array_equal(oracle.as_bytes(got), oracle.as_bytes(want))
    moved = np.moveaxis(np.asarray(q.data), axis, -1)
    return q, unpack(moved, x.shape[axis])


def scale_codes(q) -> np.ndarray:
    return np.asarray(q.scales).view(np.uint8)


def test_registry_rows():
    for fmt, (exp, man, mx, emax, elem) in SPEC.items():
        assert (fmt.bits, fmt.exponent_bits, fmt.mantissa_bits) == (6, exp, man)
        assert fmt.max_value == mx == float(ml_dtypes.finfo(elem).max)
        assert fmt.element_emax == emax and fmt.is_mx and fmt.fixed_block == 32
        assert (fmt.elements_per_unit, fmt.bytes_per_unit) == (4, 3)
        assert [fmt.packed_extent(n) for n in (0, 1, 4, 5, 32, 33)] == [0, 3, 3, 6, 24, 27]
        assert fmt.data_dtype == np.uint8 and fmt.scale_dtype == ml_dtypes.float8_e8m0fnu
    assert (QuantFormat.MXFP6_E2M3.ffi_id, QuantFormat.MXFP6_E3M2.ffi_id) == (8, 9)


@pytest.mark.parametrize("fmt", FP6, ids=IDS)
def test_bit_order_is_little_endian_24_bit_words(fmt, backend):
    vals = code_values(fmt)
    codes = np.array([1, 34, 63, 31] + [0] * 27 + [31], np.uint8)  # 31 = max: scale 2^0
    q, got = check(vals[codes][None, :], fmt)
    assert scale_codes(q).tolist() == [[127]]
    d = np.asarray(q.data)[0]
    c0, c1, c2, c3 = (int(c) for c in codes[:4])
    assert d[0] == c0 | (c1 & 3) << 6
    assert d[1] == c1 >> 2 | (c2 & 15) << 4
    assert d[2] == c2 >> 4 | c3 << 2
    np.testing.assert_array_equal(got[0], codes)


@pytest.mark.parametrize("fmt", FP6, ids=IDS)
def test_every_code_round_trips_at_many_scales(fmt, backend):
    """Block 0: codes 0..31 (max 31 pins the scale), block 1: 32..63; row r times 2^(r-12)."""
    vals = code_values(fmt)
    k = np.arange(-12, 13)
    x = vals[None, :] * np.exp2(k)[:, None].astype(np.float32)
    q, got = check(x.astype(np.float32), fmt)
    np.testing.assert_array_equal(got, np.broadcast_to(np.arange(64, dtype=np.uint8), got.shape))
    np.testing.assert_array_equal(scale_codes(q), np.repeat((127 + k)[:, None], 2, axis=1))
    back = np.asarray(jax_bq.dequantize(q, jnp.float32))
    np.testing.assert_array_equal(back.view(np.uint32), x.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("fmt", FP6, ids=IDS)
def test_every_code_decodes_under_every_kind_of_scale(fmt, backend):
    """Stored codes 0..63 with E8M0 scales 2^-127 (subnormal products), 2^-20, 1,
    2^20 and NaN (0xFF): dequantize = decode(code) * 2^(s - 127), or NaN."""
    vals = code_values(fmt)
    s = np.array([0, 107, 127, 147, 255], np.uint8)
    x = np.zeros((len(s), 64), np.float32)
    q = jax_bq.quantize(jnp.asarray(x), fmt)
    data = oracle.pack_units(np.tile(np.arange(64, dtype=np.uint8), (len(s), 1)), fmt, 1)
    scales = np.repeat(s[:, None], 2, axis=1).view(ml_dtypes.float8_e8m0fnu)
    q = dataclasses.replace(q, data=jnp.asarray(data), scales=jnp.asarray(scales))
    q.validate()
    got = np.asarray(jax_bq.dequantize(q, jnp.float32))
    with np.errstate(invalid="ignore"):
        mult = np.where(s == 255, np.nan, np.ldexp(1.0, s.astype(int) - 127)).astype(np.float32)
    want = (vals[None, :] * mult[:, None]).astype(np.float32)
    np.testing.assert_array_equal(got[:4].view(np.uint32), want[:4].view(np.uint32))
    assert np.isnan(got[4]).all()
    for dt in (jnp.bfloat16, jnp.float16):
        g = np.asarray(jax_bq.dequantize(q, dt))
        with np.errstate(over="ignore"):  # 2^20 * 7.5 overflows float16 to Inf, as it should
            w = oracle.oracle_dequantize_like(q, (data, scales, None), dt)
        np.testing.assert_array_equal(oracle.as_bytes(g), oracle.as_bytes(w))


def _neighbours(fmt):
    vals = code_values(fmt)[:32]  # non-negative codes, ascending
    lo, hi = vals[:-1], vals[1:]
    return np.arange(31, dtype=np.uint8), lo, hi


@pytest.mark.parametrize("fmt", FP6, ids=IDS)
def test_midpoints_round_to_even_and_one_ulp_off_do_not(fmt, backend):
    c, lo, hi = _neighbours(fmt)
    mid = ((lo.astype(np.float64) + hi) / 2).astype(np.float32)
    assert np.all((lo < mid) & (mid < hi))  # exact midpoints in float32
    even = np.where(c % 2 == 0, c, c + 1).astype(np.uint8)
    up = np.nextafter(mid, np.float32(np.inf))
    down = np.nextafter(mid, np.float32(-np.inf))
    mx = np.float32(fmt.max_value)
    rows = [np.append(r, mx) for r in (mid, up, down)]  # max pins the scale at 2^0
    x = np.stack(rows + [-r for r in rows]).astype(np.float32)
    q, got = check(x, fmt)
    assert (scale_codes(q) == 127).all()
    sign = np.uint8(32)
    np.testing.assert_array_equal(got[0, :31], even)
    np.testing.assert_array_equal(got[1, :31], c + 1)
    np.testing.assert_array_equal(got[2, :31], c)
    np.testing.assert_array_equal(got[3, :31], even | sign)
    np.testing.assert_array_equal(got[4, :31], (c + 1) | sign)
    np.testing.assert_array_equal(got[5, :31], c | sign)


@pytest.mark.parametrize("fmt", FP6, ids=IDS)
def test_values_above_max_saturate(fmt, backend):
    """amax in [2^(emax+1), 2^(emax+2)) gives scale 2^1, so x / 2 lies in
    (MAX, 2^(emax+1)) for x above 2 MAX: those saturate to the max code 31."""
    emax = SPEC[fmt][3]
    mx = fmt.max_value
    top = np.float32(2.0 ** (emax + 2))
    over = np.linspace(2 * mx, float(top), 34, dtype=np.float32)[1:-1]  # 32 values
    over = np.minimum(over, np.nextafter(top, np.float32(0)))
    x = np.stack([over, -over]).astype(np.float32)
    q, got = check(x, fmt)
    assert (scale_codes(q) == 128).all()
    np.testing.assert_array_equal(got[0], np.full(32, 31, np.uint8))
    np.testing.assert_array_equal(got[1], np.full(32, 63, np.uint8))


@pytest.mark.parametrize("fmt", FP6, ids=IDS)
def test_non_finite_blocks_are_nan_and_only_those(fmt, backend):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 96)).astype(np.float32)
    x[0, 3] = np.nan
    x[1, 40] = np.inf
    x[2, 95] = -np.inf
    q, got = check(x, fmt)
    s = scale_codes(q)
    bad = np.zeros((4, 3), bool)
    bad[0, 0] = bad[1, 1] = bad[2, 2] = True
    assert (s[bad] == 0xFF).all() and (s[~bad] != 0xFF).all()
    blocks = got.reshape(4, 3, 32)
    assert (blocks[bad] == 0).all()  # FP6 has no NaN code: zeros under a NaN scale
    back = np.asarray(jax_bq.dequantize(q, jnp.float32)).reshape(4, 3, 32)
    assert np.isnan(back[bad]).all() and not np.isnan(back[~bad]).any()


@pytest.mark.parametrize("fmt", FP6, ids=IDS)
def test_zeros_negative_zero_and_float32_subnormals(fmt, backend):
    tiny = np.float32(np.finfo(np.float32).smallest_subnormal)
    x = np.zeros((3, 64), np.float32)
    x[0, 1::2] = -0.0  # all-zero blocks, half of them -0
    x[1, :32] = tiny * np.arange(1, 33, dtype=np.float32)  # float32 subnormal inputs
    x[1, 32:] = -x[1, :32]
    x[2, :32] = np.float32(2.0**-130)
    x[2, 5] = -0.0
    q, got = check(x, fmt, twin=False)
    check(x[:1], fmt)  # zeros and -0 through the twin too
    s = scale_codes(q)
    assert (s[0] == 127).all()  # amax == 0: X = 0
    np.testing.assert_array_equal(got[0], np.tile(np.array([0, 32], np.uint8), 32))
    assert (s[1] == 0).all()  # X clamps at -127
    assert got[2, 5] == 32
    back = np.asarray(jax_bq.dequantize(q, jnp.float32))
    assert np.signbit(back[0, 1::2]).all() and not np.signbit(back[0, ::2]).any()


@pytest.mark.parametrize("fmt", FP6, ids=IDS)
@pytest.mark.parametrize("k", [1, 3, 5, 31, 38, 70])  # k % 4 = 1, 3, 1, 3, 2, 2
def test_ragged_tails_and_k_not_a_multiple_of_4(fmt, k, backend):
    rng = np.random.default_rng(k)
    x = (rng.standard_normal((3, k)) * np.exp(rng.uniform(-3, 3, (3, k)))).astype(np.float32)
    q, got = check(x, fmt)
    assert q.data.shape == (3, 3 * -(-k // 4))
    # The zero padding of the last unit: bits past code k - 1 are all zero.
    d = np.asarray(q.data).astype(np.uint32)
    w = d[:, -3] | (d[:, -2] << 8) | (d[:, -1] << 16)
    used = 6 * (k - 4 * (-(-k // 4) - 1))
    assert (w >> used == 0).all()


@pytest.mark.parametrize("fmt", FP6, ids=IDS)
# float32 inputs run through every other test here.
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: np.dtype(d).name)
def test_random_inputs_every_dtype_and_blocked_axis(fmt, dtype, backend):
    rng = np.random.default_rng(3)
    for shape, axis in (((37, 6), 0), ((2, 45, 3), 1)):  # two-pass paths, ragged
        x = rng.standard_normal(shape) * np.exp(rng.uniform(-6, 6, shape))
        x = np.asarray(jnp.asarray(x.astype(np.float32), dtype))
        check(x, fmt, axis=axis, out_dtype=np.dtype(dtype))


@pytest.mark.parametrize("fmt", FP6, ids=IDS)
def test_ml_dtypes_agrees_with_the_even_code_rule_on_every_code(fmt):
    """The oracle itself: ml_dtypes decodes the 64 codes to the OCP grid and
    saturates (no Inf/NaN codes): a sanity check of the reference we trust."""
    exp, man, mx, _, elem = SPEC[fmt]
    bias = 2 ** (exp - 1) - 1
    c = np.arange(64)
    e, m = (c >> man) & (2**exp - 1), c & (2**man - 1)
    mag = np.where(e == 0, np.ldexp(m, 1 - bias - man), np.ldexp(2**man + m, e - bias - man))
    np.testing.assert_array_equal(code_values(fmt), np.where(c >= 32, -mag, mag))
    assert np.float32(1e30).astype(elem).astype(np.float32) == mx


def test_fp4_only_ops_refuse_mxfp6():
    q = jax_bq.quantize(jnp.ones((4, 64), jnp.float32), QuantFormat.MXFP6_E2M3)
    with pytest.raises(ValueError, match="FP4"):
        jax_bq.convert.fp4_to_fp8(q)


def test_qmatmul_falls_back_to_dequantize_dot_on_cpu():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 96)), jnp.bfloat16)
    for fmt in FP6:
        w = jax_bq.quantize(jnp.asarray(rng.standard_normal((16, 96)), jnp.float32), fmt)
        assert "dequant" in jax_bq.explain(x, w) or "fallback" in jax_bq.explain(x, w).lower()
        got = np.asarray(jax_bq.qmatmul(x, w, out_dtype=jnp.float32))
        wd = np.asarray(jax_bq.dequantize(w, jnp.float32).astype(jnp.bfloat16), np.float32)
        want = np.asarray(x, np.float32) @ wd.T
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
