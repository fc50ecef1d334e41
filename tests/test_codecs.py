"""Every code of every element format, midpoints, saturation, -0, E8M0 scales."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import oracle
import pytest

import jax_bq
from jax_bq import Granularity, QuantFormat, QuantizedTensor

FP32_SCALE = [QuantFormat.FP8_E4M3, QuantFormat.FP8_E5M2, QuantFormat.FP4]


def all_finite_values(fmt):
    """Every finite code's float32 value, ascending, and the codes."""
    if fmt.is_packed:
        codes = np.arange(16, dtype=np.uint8)
    else:
        codes = np.arange(256, dtype=np.uint8)
    vals = oracle.decode_codes(codes, fmt)
    keep = np.isfinite(vals)
    return codes[keep], vals[keep]


def per_tensor_codes(x, fmt, backend):
    q = jax_bq.quantize(jnp.asarray(x), fmt, granularity=Granularity.PER_TENSOR)
    data = np.asarray(q.data).view(np.uint8).reshape(-1)
    if fmt.is_packed:
        data = np.stack([data & 0xF, data >> 4], -1).reshape(-1)[: x.size]
    return data, np.asarray(q.scales)


@pytest.mark.parametrize("fmt", FP32_SCALE, ids=lambda f: f.value)
def test_every_code_round_trips(fmt, backend):
    codes, vals = all_finite_values(fmt)
    # +MAX is in the tensor, so the scale is exactly 1 and x / s == x.
    got, scale = per_tensor_codes(vals.astype(np.float32), fmt, backend)
    assert scale.reshape(-1)[0] == 1.0
    # -0 encodes with its sign bit, +0 without.
    np.testing.assert_array_equal(got, codes)


@pytest.mark.parametrize("fmt", FP32_SCALE, ids=lambda f: f.value)
def test_midpoints_round_to_even(fmt, backend):
    _, vals = all_finite_values(fmt)
    pos = np.unique(vals[vals >= 0])
    mids = ((pos[:-1].astype(np.float64) + pos[1:]) / 2).astype(np.float32)
    assert np.all(mids.astype(np.float64) == (pos[:-1].astype(np.float64) + pos[1:]) / 2)
    x = np.concatenate([mids, -mids, [np.float32(fmt.max_value)]]).astype(np.float32)
    got, _ = per_tensor_codes(x, fmt, backend)
    want = oracle.element_codes(x, fmt)
    np.testing.assert_array_equal(got, want)
    # Ties go to the even code (lowest mantissa bit clear).
    assert np.all(got[: len(mids)] % 2 == 0)


@pytest.mark.parametrize("fmt", FP32_SCALE, ids=lambda f: f.value)
def test_saturates_instead_of_overflowing(fmt, backend):
    # +-MAX map to the largest finite code, never to Inf/NaN (E5M2 has an Inf code).
    x = np.array([fmt.max_value, -fmt.max_value, fmt.max_value * 0.999], np.float32)
    got, _ = per_tensor_codes(x, fmt, backend)
    max_code = oracle.element_codes(np.float32([fmt.max_value]), fmt)[0]
    assert got[0] == max_code and got[1] == max_code | (0x8 if fmt.is_packed else 0x80)


def test_minus_zero_and_subnormal_codes(backend):
    fmt = QuantFormat.FP8_E4M3
    sub = np.float32(2.0**-9)  # smallest E4M3 subnormal
    x = np.array([448.0, -0.0, 0.0, sub, -sub, 3 * sub, sub / 2, 3 * sub / 2], np.float32)
    got, _ = per_tensor_codes(x, fmt, backend)
    np.testing.assert_array_equal(got, [0x7E, 0x80, 0x00, 0x01, 0x81, 0x03, 0x00, 0x02])


@pytest.mark.parametrize("fmt", [QuantFormat.MXFP8, QuantFormat.MXFP4], ids=lambda f: f.value)
def test_e8m0_scales_every_reachable_exponent(fmt, backend):
    emax = 8 if fmt is QuantFormat.MXFP8 else 2
    elem_max = fmt.max_value
    # One block per exponent X: amax = elem_max * 2^X gives scale 2^X exactly.
    xs = np.arange(-126 - emax + 8, 128 - emax)  # floor(log2(amax)) stays in f32's range
    xs = xs[(xs + emax >= -126) & (xs + emax <= 127)]
    amax = (elem_max * np.exp2(xs.astype(np.float64))).astype(np.float32)
    x = np.zeros((len(xs), 32), np.float32)
    x[:, 0] = amax
    x[:, 1] = -amax / 4
    q = jax_bq.quantize(jnp.asarray(x), fmt)
    got = np.asarray(q.scales).view(np.uint8).reshape(-1)
    np.testing.assert_array_equal(got, (xs + 127).astype(np.uint8))
    ref_data, ref_scales, _ = oracle.oracle_quantize(x, fmt, Granularity.PER_BLOCK, (32,), -1)
    np.testing.assert_array_equal(oracle.as_bytes(q.data), oracle.as_bytes(ref_data))


@pytest.mark.parametrize("fmt", [QuantFormat.MXFP8, QuantFormat.MXFP4], ids=lambda f: f.value)
def test_every_e8m0_code_decodes(fmt, backend):
    codes = np.arange(255, dtype=np.uint8)  # 0xFF is NaN, tested elsewhere
    one = oracle.element_codes(np.float32([1.0]), fmt)[0]
    n = len(codes)
    if fmt.is_packed:
        data = np.full((n, 16), one | (one << 4), np.uint8)
    else:
        data = np.full((n, 32), one, np.uint8).view(ml_dtypes.float8_e4m3fn)
    q = QuantizedTensor(
        jnp.asarray(data),
        jnp.asarray(codes.view(ml_dtypes.float8_e8m0fnu).reshape(n, 1)),
        None,
        fmt,
        Granularity.PER_BLOCK,
        (32,),
        -1,
        32,
        2,
        np.dtype(np.float32),
    )
    out = np.asarray(jax_bq.dequantize(q))
    want = codes.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    np.testing.assert_array_equal(out[:, 0], want)
    np.testing.assert_array_equal(out[:, 31], want)


def test_e4m3_block_scales_of_nvfp4_cover_all_codes(backend):
    # Blocks whose amax walks every E4M3 scale code relative to a fixed tensor scale.
    fmt = QuantFormat.NVFP4
    codes, vals = all_finite_values(QuantFormat.FP8_E4M3)
    pos = vals[(vals > 0)]
    st = np.float32(448 * 6 / 2688)  # tensor amax 448*6 gives st = 1
    x = np.zeros((len(pos) + 1, 16), np.float32)
    x[0, 0] = 448 * 6
    x[1:, 0] = (pos * 6 * st).astype(np.float32)
    q = jax_bq.quantize(jnp.asarray(x), fmt)
    assert float(q.tensor_scale) == 1.0
    ref = oracle.oracle_quantize(x, fmt, Granularity.PER_BLOCK, (16,), -1)
    np.testing.assert_array_equal(oracle.as_bytes(q.scales), oracle.as_bytes(ref[1]))
    np.testing.assert_array_equal(
        oracle.as_bytes(q.scales)[1:], oracle.element_codes(pos, QuantFormat.FP8_E4M3)
    )


def _e2m1_sweep() -> np.ndarray:
    """|v| on and around the E2M1 grid: codes, midpoints, midpoints +- 1 ulp, tiny."""
    grid = np.float32([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    mids = (grid[:-1] + grid[1:]) / 2
    near = np.concatenate([np.nextafter(mids, 0), np.nextafter(mids, 7)])
    tiny = np.float32([2.0**-149, 2.0**-126, 1e-30, 0.1, 0.2499999, 5.999999])
    mags = np.concatenate([grid, mids, near, tiny]).astype(np.float32)
    return np.concatenate([mags, -mags]).astype(np.float32)  # -0.0 included


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "fmt, block",
    [
        (QuantFormat.FP4, 16),
        (QuantFormat.FP4, 32),
        (QuantFormat.NVFP4, 16),
        (QuantFormat.MXFP4, 32),
    ],
    ids=["fp4-b16", "fp4-b32", "nvfp4", "mxfp4"],
)
def test_e2m1_one_pass_path_codes_and_midpoints(fmt, block, dtype, backend):
    # Blocks along a contiguous last axis take the CUDA kernels' one-pass path
    # (its own E2M1 encoder). Each block holds 6 (or -6) first, so its scale is
    # exactly 1 (FP4: 6 / 6; MXFP4: 2^(2 - 2); NVFP4: block scale E4M3 1 under
    # the tensor scale 1 that the 2688 of the first row sets), and its other
    # elements walk the grid, the midpoints and one ulp either side of them.
    sweep = _e2m1_sweep()
    per_block = block - 1
    n = -(-len(sweep) // per_block)
    body = np.resize(sweep, n * per_block).reshape(n, per_block)
    lead = np.where(np.arange(n) % 2 == 0, 6.0, -6.0).astype(np.float32)[:, None]
    x = np.concatenate([lead, body], axis=1)
    if fmt is QuantFormat.NVFP4:
        first = np.zeros((1, block), np.float32)
        first[0, 0] = 2688.0
        x = np.concatenate([first, x])
    x = np.asarray(jnp.asarray(np.tile(x, (1, 4)), dtype))  # 4 blocks per row
    q = jax_bq.quantize(jnp.asarray(x), fmt, block_size=block)
    x32 = np.asarray(x, np.float32)
    want = oracle.oracle_quantize(x32, fmt, Granularity.PER_BLOCK, (block,), -1)
    if fmt is QuantFormat.NVFP4:
        assert float(q.tensor_scale) == 1.0
    np.testing.assert_array_equal(oracle.as_bytes(q.scales), oracle.as_bytes(want[1]))
    np.testing.assert_array_equal(oracle.as_bytes(q.data), oracle.as_bytes(want[0]))
