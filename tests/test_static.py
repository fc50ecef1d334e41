"""Static (calibrated) per-tensor FP8 activations: jax_bq.quantize_static vs the oracle.

The oracle is numpy + ml_dtypes with a true division by the scale (what the
pinned numerics demand); the jnp path multiplies by the exact reciprocal of a
power of two, so both must agree on every byte: every code, every midpoint
(ties to even), saturation, NaN/Inf/-0/subnormal inputs, on each backend.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GPU_DEVICES

import jax_bq as bq
from jax_bq.formats import QuantFormat
from jax_bq.primitives import qmatmul as qp

FORMATS = [QuantFormat.FP8_E4M3, QuantFormat.FP8_E5M2]
NAN_CODE = {QuantFormat.FP8_E4M3: 0x7F, QuantFormat.FP8_E5M2: 0x7E}


def oracle_codes(x, scale: float, fmt: QuantFormat) -> np.ndarray:
    """uint8 codes: RNE(clip(x / s, -MAX, MAX)) with a float64-exact division."""
    xf = np.asarray(x, np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        v = np.clip(xf / np.float32(scale), -fmt.max_value, fmt.max_value)
    codes = v.astype(fmt.element_dtype).view(np.uint8)
    return np.where(np.isfinite(xf), codes, np.uint8(NAN_CODE[fmt])).astype(np.uint8)


def codes_of(q) -> np.ndarray:
    return np.asarray(q.data).view(np.uint8)


def every_code_and_midpoint(fmt: QuantFormat) -> np.ndarray:
    """Every finite value of the format and every midpoint between neighbours (float32)."""
    vals = np.arange(256, dtype=np.uint8).view(fmt.element_dtype).astype(np.float32)
    vals = np.unique(vals[np.isfinite(vals)])
    mids = (vals[:-1].astype(np.float64) + vals[1:]) / 2
    return np.concatenate([vals, mids.astype(np.float32), [-0.0]]).astype(np.float32)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("scale", [1.0, 2.0**-7, 2.0**5])
def test_every_code_and_midpoint_matches_oracle(backend, fmt, scale):
    x = every_code_and_midpoint(fmt) * np.float32(scale)
    q = jax.jit(lambda v: bq.quantize_static(v, scale, fmt))(jnp.asarray(x))
    np.testing.assert_array_equal(codes_of(q), oracle_codes(x, scale, fmt))
    finite_codes = np.arange(256, dtype=np.uint8)
    finite_codes = finite_codes[np.isfinite(finite_codes.view(fmt.element_dtype).astype(float))]
    # each finite code's exact value comes back as that code
    exact = finite_codes.view(fmt.element_dtype).astype(np.float32) * np.float32(scale)
    q = bq.quantize_static(jnp.asarray(exact), scale, fmt)
    got = codes_of(q)
    zero = exact == 0  # +0 and -0 keep their sign
    np.testing.assert_array_equal(got[~zero], finite_codes[~zero])
    np.testing.assert_array_equal(got[zero], finite_codes[zero])


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # 1e6 -> f16 Inf, on purpose
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_special_values_and_saturation(backend, fmt, dtype):
    tiny = np.float32(np.finfo(np.float32).smallest_subnormal)
    special = np.array(
        [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, tiny, -tiny, 1e-30, 1e6, -1e6, 65504.0],
        np.float32,
    )
    rnd = np.random.default_rng(0).standard_normal(500).astype(np.float32) * 40
    x = jnp.asarray(np.concatenate([special, rnd]), dtype)
    scale = 2.0**-3
    q = jax.jit(lambda v: bq.quantize_static(v, scale, fmt))(x)
    np.testing.assert_array_equal(codes_of(q), oracle_codes(np.asarray(x, np.float32), scale, fmt))
    assert q.scales.shape == (1,) and float(q.scales[0]) == scale


def test_random_tensors_rank_1_to_4(backend):
    rng = np.random.default_rng(1)
    for shape in [(7,), (3, 129), (2, 5, 33), (2, 2, 3, 17), (0, 8)]:
        x = (rng.standard_normal(shape) * 3).astype(np.float32)
        q = bq.quantize_static(jnp.asarray(x, jnp.bfloat16), 2.0**-6)
        ref = oracle_codes(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), 2.0**-6, q.format)
        np.testing.assert_array_equal(codes_of(q), ref)
        assert q.shape == shape
        q.validate()


def test_equals_dynamic_per_tensor_when_amax_fits_a_power_of_two(backend):
    """Where amax / 448 is a power of two, the dynamic per-tensor quantize picks the
    same scale, so both paths give the same QuantizedTensor, byte for byte."""
    x = np.random.default_rng(2).uniform(-1, 1, (64, 256)).astype(np.float32)
    x[3, 7] = 448.0 * 2.0**-4
    dyn = bq.quantize(jnp.asarray(x), "fp8_e4m3", granularity="per_tensor")
    assert float(dyn.scales.reshape(())) == 2.0**-4
    st = bq.quantize_static(jnp.asarray(x), 2.0**-4)
    np.testing.assert_array_equal(codes_of(st), codes_of(dyn))
    assert jax.tree_util.tree_structure(st) == jax.tree_util.tree_structure(dyn)
    np.testing.assert_array_equal(np.asarray(st.scales), np.asarray(dyn.scales))


def test_scale_rounds_up_to_a_power_of_two(backend):
    x = jnp.asarray(np.linspace(-300, 300, 101, dtype=np.float32))
    q = bq.quantize_static(x, 0.3)  # -> 0.5
    assert float(q.scales.reshape(())) == 0.5
    np.testing.assert_array_equal(codes_of(q), oracle_codes(np.asarray(x), 0.5, q.format))
    got = np.asarray(bq.pow2_scale(jnp.asarray([1.0, 0.75, 2.0**-130, 2.0**127, 0.0, -1.0])))
    np.testing.assert_array_equal(got[:4], [1.0, 1.0, 2.0**-126, 2.0**126])
    assert np.isnan(got[4:]).all()
    # a traced scale works too (it is a parameter of a calibrated layer)
    q = jax.jit(bq.quantize_static)(x, jnp.float32(0.3))
    np.testing.assert_array_equal(codes_of(q), oracle_codes(np.asarray(x), 0.5, q.format))
    # an invalid scale makes every code NaN (never silently a wrong divisor)
    bad = bq.quantize_static(x, -1.0)
    assert (codes_of(bad) == 0x7F).all()


def test_exact_scale_uses_the_given_power_of_two(backend):
    x = jnp.asarray(np.linspace(-300, 300, 101, dtype=np.float32))
    q = jax.jit(lambda v, s: bq.quantize_static(v, s, exact_scale=True))(x, jnp.float32(0.5))
    np.testing.assert_array_equal(codes_of(q), oracle_codes(np.asarray(x), 0.5, q.format))
    assert float(q.scales.reshape(())) == 0.5
    # a traced scale that breaks the promise gives NaN codes, never a wrong divisor
    for bad in (0.3, 0.0, -0.5, float("nan"), 2.0**-130):
        q = jax.jit(lambda v, s: bq.quantize_static(v, s, exact_scale=True))(x, jnp.float32(bad))
        assert (codes_of(q) == 0x7F).all(), bad
    # a concrete one is refused up front
    with pytest.raises(ValueError, match=r"power of two in \[2\^-126, 2\^126\], got 0.3"):
        bq.quantize_static(x, 0.3, exact_scale=True)
    with pytest.raises(ValueError, match="power of two"):
        bq.quantize_static(x, 2.0**127, exact_scale=True)
    q = bq.quantize_static(x, 2.0**-126, exact_scale=True)
    assert float(q.scales.reshape(())) == 2.0**-126


def test_static_scale():
    assert bq.static_scale(448.0) == 1.0
    assert bq.static_scale(449.0) == 2.0
    assert bq.static_scale(100.0) == 0.25  # 100 / 0.25 = 400 <= 448
    assert bq.static_scale(100.0, margin=2.0) == 0.5
    assert bq.static_scale(0.0) == 1.0
    assert bq.static_scale(57344.0, "fp8_e5m2") == 1.0
    for amax in np.geomspace(1e-20, 1e20, 200):
        s = bq.static_scale(amax)
        assert amax / s <= 448.0 < 2 * amax / s or s == 2.0**-126
        assert math.log2(s) == int(math.log2(s))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: bq.static_scale(-1.0), "amax >= 0"),
        (lambda: bq.static_scale(float("inf")), "finite amax"),
        (lambda: bq.static_scale(1.0, margin=0.5), "margin must be >= 1"),
        (lambda: bq.static_scale(1.0, "nvfp4"), "support fp8_e4m3, fp8_e5m2"),
        (lambda: bq.quantize_static(jnp.zeros((4,), jnp.int32), 1.0), "int32"),
        (lambda: bq.quantize_static(jnp.zeros((4,)), jnp.ones((2,))), r"scalar, got shape \(2,\)"),
        (lambda: bq.quantize_static(jnp.zeros((4,)), 1.0, "mxfp8"), "got mxfp8"),
        (
            lambda: bq.quantize_static(jnp.zeros((1,) * 5), 1.0),
            r"rank 1-4, got .*\(1, 1, 1, 1, 1\)",
        ),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_qmatmul_takes_static_activations(backend):
    rng = np.random.default_rng(3)
    w = bq.quantize(
        jnp.asarray(rng.standard_normal((256, 512)), jnp.float32),
        "fp8_e4m3",
        granularity="per_tensor",
    )
    x = jnp.asarray(rng.standard_normal((48, 512)), jnp.bfloat16)
    s = bq.static_scale(float(jnp.max(jnp.abs(x.astype(jnp.float32)))))
    f = jax.jit(lambda x, w, s: bq.qmatmul(bq.quantize_static(x, s), w, out_dtype=jnp.float32))
    y = np.asarray(f(x, w, jnp.float32(s)), np.float64)
    xq = bq.quantize_static(x, s)
    p = bq.plan(xq, w)
    if backend == "gpu":
        assert p.path == qp.CUBLAS_FP8, p.reason
    xdq = np.asarray(bq.dequantize(xq, jnp.float32), np.float64)
    ref = xdq @ np.asarray(bq.dequantize(w, jnp.float32), np.float64).T
    # the GEMM's own summation (cuBLASLt FP8 accumulates in reduced precision between
    # promotions); the CPU fallback rounds dq(x), dq(w) to bf16 first: as test_qmatmul
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-2 * np.abs(ref).max())
    # the GEMM takes them as pre-quantized per-tensor activations (no in-call quantize)
    assert p.config.act_granularity == qp.ACT_TENSOR and not p.config.act_dynamic


@pytest.mark.gpu  # checks XLA:GPU fuses the jnp quantize
def test_static_quantize_fuses_into_its_producer():
    """LayerNorm-like producer + static quantize compile to one fusion, not a
    16-bit intermediate written and re-read."""
    w = bq.quantize(jnp.ones((256, 512), jnp.float32), "fp8_e4m3", granularity="per_tensor")

    def f(x, s):
        h = jax.nn.gelu(x * 1.5 + 0.25)
        return bq.qmatmul(bq.quantize_static(h, s), w)

    x = jax.device_put(jnp.ones((128, 512), jnp.bfloat16), GPU_DEVICES[0])
    hlo = jax.jit(f).lower(x, jnp.float32(0.5)).compile().as_text()
    assert "jax_bq_qmatmul" in hlo
    entry = hlo[hlo.index("ENTRY") :]
    assert entry.count("fusion(") + entry.count("fusion.") >= 1
    assert "f8e4m3fn[128,512]" in entry and "bf16[128,512]{1,0} fusion" not in entry
