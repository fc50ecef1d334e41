"""Fused residual-add + LayerNorm + FP8 quantize: oracle, twin, CPU and CUDA kernels.

Bitwise everywhere: the twin against the numpy pinned-order oracle, the CPU
handler against the twin, the CUDA handler against the CPU handler (which
equals the twin). The pinned order itself is checked against a float64
LayerNorm. The GPU tests skip (with the reason) where JAX sees no GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GPU_DEVICES
from oracle_layernorm import NAN_CODE, ln_float64, ln_pinned, quantize_y32

import jax_bq
from jax_bq import _native
from jax_bq.config import ENV_FORCE_FALLBACK
from jax_bq.formats import Granularity, QuantFormat

BF16 = np.dtype(jnp.bfloat16)
E4M3 = QuantFormat.FP8_E4M3
MODES = ("static", "per_token", "per_tensor")
SCALE = 2.0**-5  # static scale: 448 * 2^-5 = 14 covers LayerNorm outputs of N(0, 1) gammas
CPU = jax.devices("cpu")[0]
TARGET = "jax_bq_layernorm_quantize"


def _inputs(rows, h, dtype, residual, seed=0):
    rng = np.random.default_rng(seed + h)
    x = (rng.standard_normal((rows, h)) * 3 + 0.5).astype(dtype)
    r = rng.standard_normal((rows, h)).astype(dtype) if residual else None
    gamma = rng.standard_normal(h).astype(np.float32)
    beta = (rng.standard_normal(h) * 0.5).astype(np.float32)
    return x, r, gamma, beta


def _kwargs(mode, fmt=E4M3):
    if mode == "static":
        return {"scale": SCALE, "format": fmt}
    return {"granularity": mode, "format": fmt}


@functools.cache
def _jitted(mode, fmt, out_dtype, has_residual, eps, twin):
    del has_residual, twin  # cache keys: the twin's executables are lowered separately

    def f(x, gamma, beta, r=None):
        return jax_bq.layernorm_quantize(
            x, gamma, beta, residual=r, eps=eps, out_dtype=out_dtype, **_kwargs(mode, fmt)
        )

    return jax.jit(f)


def _run(x, r, gamma, beta, mode, *, fmt=E4M3, out_dtype=None, eps=1e-12, device=CPU, twin=False):
    args = [jax.device_put(a, device) for a in (x, gamma, beta)]
    if r is not None:
        args.append(jax.device_put(r, device))
    q, y = _jitted(mode, fmt, out_dtype, r is not None, eps, twin)(*args)
    return (
        np.asarray(q.data).view(np.uint8).reshape(-1, x.shape[-1]),
        np.asarray(q.scales, np.float32),
        np.asarray(y),
    )


def _twin(monkeypatch, *args, **kwargs):
    """The jnp twin (the lowering consults the switch when it lowers)."""
    monkeypatch.setenv(ENV_FORCE_FALLBACK, "layernorm_quantize")
    try:
        return _run(*args, twin=True, **kwargs)
    finally:
        monkeypatch.delenv(ENV_FORCE_FALLBACK)


def _bits(a) -> np.ndarray:
    """Bit patterns with every NaN made the canonical quiet NaN."""
    a = np.asarray(a)
    f = a.astype(np.float32)
    u = f.view(np.uint32).copy()
    u[np.isnan(f)] = 0x7FC00000
    return u


def _assert_same(got, want, what):
    codes_g, scales_g, y_g = got
    codes_w, scales_w, y_w = want
    np.testing.assert_array_equal(codes_g, codes_w, err_msg=f"{what}: codes")
    np.testing.assert_array_equal(
        _bits(scales_g).ravel(), _bits(scales_w).ravel(), err_msg=f"{what}: scales"
    )
    assert y_g.dtype == y_w.dtype, what
    np.testing.assert_array_equal(_bits(y_g), _bits(y_w), err_msg=f"{what}: y")


def _oracle(x, r, gamma, beta, mode, fmt=E4M3, out_dtype=None, eps=1e-12):
    y32 = ln_pinned(x, r, gamma, beta, eps)
    codes, scales = quantize_y32(y32, fmt, mode, SCALE if mode == "static" else None)
    out = np.dtype(x.dtype if out_dtype is None else out_dtype)
    return codes, np.asarray(scales, np.float32), y32.astype(out).reshape(x.shape)


# (dtype, H, residual): bf16 and f32; the BERT widths, a ragged H and a wide one.
CASES = [
    (BF16, 384, True),
    (BF16, 1024, False),
    (BF16, 4096, True),
    (BF16, 100, True),
    (np.dtype(np.float32), 384, False),
    (np.dtype(np.float32), 1024, True),
    (np.dtype(np.float32), 4096, False),
    (np.dtype(np.float32), 100, False),
    (BF16, 16392, True),  # 9 chunks: beyond the CUDA register path
]
CASE_IDS = [f"{np.dtype(d).name}-H{h}-{'res' if r else 'nores'}" for d, h, r in CASES]


@pytest.mark.parametrize(("dtype", "h", "residual"), CASES, ids=CASE_IDS)
def test_cpu_kernel_equals_oracle_bitwise(dtype, h, residual):
    x, r, gamma, beta = _inputs(12, h, dtype, residual)
    for mode in MODES:
        _assert_same(_run(x, r, gamma, beta, mode), _oracle(x, r, gamma, beta, mode), mode)


# The twin compiles slowly on XLA:CPU (its exact division is a 25-step loop):
# fewer cases, chosen to cover both dtypes, ragged H, the widest layout (8 warps
# x 2 chunks) and residual given / not given.
TWIN_CASES = [(BF16, 4096, True), (np.dtype(np.float32), 100, False)]


@pytest.mark.parametrize(("dtype", "h", "residual"), TWIN_CASES, ids=["bf16-H4096-res", "f32-H100"])
def test_twin_equals_oracle_bitwise(monkeypatch, dtype, h, residual):
    x, r, gamma, beta = _inputs(12, h, dtype, residual)
    for mode in MODES:
        want = _oracle(x, r, gamma, beta, mode)
        _assert_same(_twin(monkeypatch, x, r, gamma, beta, mode), want, f"twin {mode}")


def test_pinned_order_is_an_accurate_layernorm():
    x, r, gamma, beta = _inputs(64, 1024, np.float32, True)
    y32 = ln_pinned(x, r, gamma, beta, 1e-12)
    y64 = ln_float64(x, r, gamma, beta, 1e-12)
    err = np.abs(y32 - y64) / (np.abs(y64) + 1.0)
    assert err.max() < 1e-5, err.max()
    # The FP8 codes of the float32 result and of the exact one differ only at
    # rounding midpoints: at most one code step, and rarely.
    c32, _ = quantize_y32(y32, E4M3, "static", SCALE)
    c64, _ = quantize_y32(y64.astype(np.float32), E4M3, "static", SCALE)
    step = np.abs(c32.view(np.int8).astype(int) - c64.view(np.int8).astype(int))
    assert step.max() <= 1 and (step > 0).mean() < 1e-3, (step.max(), (step > 0).mean())


def test_float16_input_and_float32_output(monkeypatch):
    x, r, gamma, beta = _inputs(8, 768, np.float16, True)
    want = _oracle(x, r, gamma, beta, "per_token")
    _assert_same(_run(x, r, gamma, beta, "per_token"), want, "f16")
    xb, rb, _, _ = _inputs(8, 768, BF16, True)
    got = _run(xb, rb, gamma, beta, "static", out_dtype=np.float32)
    _assert_same(got, _oracle(xb, rb, gamma, beta, "static", out_dtype=np.float32), "bf16->f32")
    e5 = _run(xb, rb, gamma, beta, "per_token", fmt=QuantFormat.FP8_E5M2)
    _assert_same(e5, _oracle(xb, rb, gamma, beta, "per_token", QuantFormat.FP8_E5M2), "e5m2")


def _special_rows(h, dtype):
    """Rows: 0 normal, 1 NaN, 2 +Inf, 3 all zero, 4 huge (saturates the static scale), 5 -0."""
    x, _, gamma, _ = _inputs(6, h, np.float32, False, seed=7)
    x[1, 5] = np.nan
    x[2, 3] = np.inf
    x[3] = 0.0
    x[4] *= 1e4
    x[5] = -0.0
    beta = np.zeros(h, np.float32)  # an all-zero row then normalizes to zeros
    gamma = gamma * 40  # |y| beyond 448 * SCALE = 14 on many elements
    return x.astype(dtype), gamma, beta


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float32)], ids=["bf16", "f32"])
@pytest.mark.parametrize("h", [384, 100])
def test_special_rows(monkeypatch, dtype, h):
    x, gamma, beta = _special_rows(h, dtype)
    for mode in MODES:
        want = _oracle(x, None, gamma, beta, mode)
        if h == 100 and dtype == BF16:  # the twin on one case (slow to compile)
            _assert_same(_twin(monkeypatch, x, None, gamma, beta, mode), want, f"twin {mode}")
        got = _run(x, None, gamma, beta, mode)
        _assert_same(got, want, f"CPU kernel {mode}")
        codes, scales, y = got
        nan = NAN_CODE[E4M3]
        assert np.isnan(y[1:3].astype(np.float32)).all()
        if mode == "per_token":
            assert np.isnan(scales[1:3]).all() and np.isfinite(scales[[0, 3, 4, 5]]).all()
            assert (codes[1:3] == nan).all() and not (codes[[0, 3, 4, 5]] == nan).any()
            assert scales[3] == 1.0 and scales[5] == 1.0  # all-zero rows
        elif mode == "per_tensor":
            assert np.isnan(scales).all() and (codes == nan).all()
        else:
            assert (codes[1:3] == nan).all() and not (codes[[0, 3, 4, 5]] == nan).any()
            sat = np.abs(y[4].astype(np.float32)) >= 448 * SCALE
            assert sat.any() and (codes[4][sat] & 0x7F == 0x7E).all()  # saturated to +-448


def test_qtensor_is_what_qmatmul_takes():
    x, r, gamma, beta = _inputs(16, 256, BF16, True)
    w = jax_bq.quantize(
        jnp.asarray(np.random.default_rng(1).standard_normal((64, 256)), BF16), E4M3
    )
    for mode, gran in (("static", Granularity.PER_TENSOR), ("per_token", Granularity.PER_CHANNEL)):
        q, y = jax_bq.layernorm_quantize(x, gamma, beta, residual=r, **_kwargs(mode))
        q.validate()
        assert q.granularity is gran and q.shape == x.shape and q.axis == -1
        deq = np.asarray(jax_bq.dequantize(q, jnp.float32))
        np.testing.assert_allclose(deq, np.asarray(y, np.float32), rtol=0.07, atol=1e-2)
        out = np.asarray(jax_bq.qmatmul(q, w), np.float32)
        ref = deq @ np.asarray(jax_bq.dequantize(w, jnp.float32)).T
        np.testing.assert_allclose(out, ref, rtol=2e-2, atol=0.5)


def test_eager_jit_and_hlo_custom_call():
    x, r, gamma, beta = _inputs(4, 384, BF16, True)
    eager = jax_bq.layernorm_quantize(x, gamma, beta, residual=r, granularity="per_token")
    jitted = jax.jit(
        lambda *a: jax_bq.layernorm_quantize(*a[:3], residual=a[3], granularity="per_token")
    )
    got = jitted(x, gamma, beta, r)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    hlo = jitted.lower(x, gamma, beta, r).as_text()
    if _native.CPU.loaded:
        assert TARGET in hlo
    else:
        pytest.fail(f"CPU module not loaded: {_native.CPU.reason}")


@pytest.mark.parametrize("mode", MODES)
def test_vmap_equals_members(mode):
    xs = np.stack([_inputs(6, 384, BF16, False, seed=s)[0] * (s + 1) for s in range(3)])
    rs = np.stack([_inputs(6, 384, BF16, True, seed=10 + s)[1] for s in range(3)])
    _, _, gamma, beta = _inputs(6, 384, BF16, False)

    def f(x, r, g, b):
        return jax_bq.layernorm_quantize(x, g, b, residual=r, **_kwargs(mode))

    batched = jax.jit(jax.vmap(f, in_axes=(0, 0, None, None)))(xs, rs, gamma, beta)
    for i in range(3):
        one = f(xs[i], rs[i], gamma, beta)
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(batched), strict=True):
            np.testing.assert_array_equal(_bits(np.asarray(a)), _bits(np.asarray(b)[i]))
    # Per-member LayerNorm parameters (the lax.map path).
    gs = np.stack([gamma, gamma * 2, -gamma])
    per = jax.jit(jax.vmap(f, in_axes=(0, None, 0, None)))(xs, rs[0], gs, beta)
    for i in range(3):
        one = f(xs[i], rs[0], gs[i], beta)
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(per), strict=True):
            np.testing.assert_array_equal(_bits(np.asarray(a)), _bits(np.asarray(b)[i]))


X = np.zeros((4, 64), BF16)
G = np.ones(64, np.float32)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gamma": np.ones(63, np.float32)}, r"gamma must be .*\(64,\).*\(63,\)"),
        ({"beta": np.ones((1, 64), np.float32)}, r"beta must be .*\(64,\)"),
        ({"residual": np.zeros((4, 64), np.float32)}, r"residual must match x \(4, 64\) bfloat16"),
        ({"residual": np.zeros((4, 32), BF16)}, r"residual must match .*\(4, 32\)"),
        ({"format": "fp4"}, "FP8"),
        ({"format": "nvfp4"}, "FP8"),
        ({"granularity": "per_block"}, "granularity must be one of"),
        ({"scale": np.ones(2, np.float32)}, r"scale must be a scalar, got shape \(2,\)"),
        ({"scale": 1.0, "granularity": "per_token"}, "static scale is per tensor"),
        ({"eps": -1.0}, "eps"),
        ({"out_dtype": np.int32}, "out_dtype"),
        ({"x": np.zeros((4, 64), np.int32)}, "float32/bfloat16/float16"),
        ({"scale": 0.3, "exact_scale": True}, "power of two"),
    ],
)
def test_bad_input(kwargs, match):
    args = {"x": X, "gamma": G, "beta": G, **kwargs}
    x, gamma, beta = args.pop("x"), args.pop("gamma"), args.pop("beta")
    with pytest.raises(ValueError, match=match):
        jax_bq.layernorm_quantize(x, gamma, beta, **args)


# ---------------------------------------------------------------- GPU (H200)

needs_gpu = pytest.mark.gpu  # skipped without a GPU; fails if the CUDA module is missing
# Adds the generic (re-read) path: H > 16384 and an H that is not a multiple of 8;
# and the warp-per-row kernel (H <= 2048) at 3, 6 (ragged) and 8 virtual warps.
GPU_CASES = [
    *CASES,
    (np.dtype(np.float32), 16390, False),
    (BF16, 768, True),
    (np.dtype(np.float32), 1500, True),
    (BF16, 2048, True),
]


@needs_gpu
@pytest.mark.parametrize(("dtype", "h", "residual"), GPU_CASES)
def test_cuda_kernel_equals_cpu_kernel_bitwise(dtype, h, residual):
    x, r, gamma, beta = _inputs(41, h, dtype, residual)  # 41: a partly filled 4-row block
    gpu = GPU_DEVICES[0]
    for mode in MODES:
        for fmt in (E4M3, QuantFormat.FP8_E5M2):
            want = _run(x, r, gamma, beta, mode, fmt=fmt)
            _assert_same(_run(x, r, gamma, beta, mode, fmt=fmt, device=gpu), want, f"{mode} {fmt}")


@pytest.mark.parametrize("pdtype", [BF16, np.dtype(np.float16)], ids=["bf16", "f16"])
def test_16bit_gamma_beta_are_read_as_they_are(monkeypatch, pdtype):
    # bf16/f16 LayerNorm parameters reach the kernel without a convert op, and
    # give the bits of the same parameters widened to float32 first (exact).
    x, r, gamma, beta = _inputs(9, 1024, BF16, True, seed=5)
    g16, b16 = gamma.astype(pdtype), beta.astype(pdtype)
    g32, b32 = g16.astype(np.float32), b16.astype(np.float32)
    for mode in MODES:
        want = _run(x, r, g32, b32, mode)
        _assert_same(_run(x, r, g16, b16, mode), want, f"CPU {pdtype} params {mode}")
        if not GPU_DEVICES:
            # On the H200 host (jaxlib 0.11.2) this CPU twin compile aborted
            # the process inside XLA (no message); CPU-only machines run it.
            _assert_same(_twin(monkeypatch, x, r, g16, b16, mode), want, f"twin {pdtype} {mode}")
        else:
            got = _run(x, r, g16, b16, mode, device=GPU_DEVICES[0])
            _assert_same(got, want, f"CUDA {pdtype} params {mode}")
    hlo = (
        jax.jit(lambda x, g, b: jax_bq.layernorm_quantize(x, g, b, scale=SCALE))
        .lower(x, g16, b16)
        .as_text()
    )
    assert "stablehlo.convert" not in hlo.split(TARGET)[0].split("func.func public @main")[-1]
    mixed = _run(x, r, g16, b32, "static")  # differing dtypes: both widened in the wrapper
    _assert_same(mixed, _run(x, r, g32, b32, "static"), "mixed-dtype params")


@needs_gpu
@pytest.mark.parametrize(
    ("rows", "h", "dtype", "residual"),
    [(2003, 1024, BF16, True), (9001, 128, np.dtype(np.float32), False)],
)
def test_cuda_many_rows_per_block_equal_cpu_bitwise(rows, h, dtype, residual):
    # Enough rows that a block of the single-chunk kernel handles several
    # consecutive rows with the next one prefetched (a ragged last block).
    x, r, gamma, beta = _inputs(rows, h, dtype, residual, seed=3)
    gpu = GPU_DEVICES[0]
    for mode in MODES:
        want = _run(x, r, gamma, beta, mode)
        _assert_same(_run(x, r, gamma, beta, mode, device=gpu), want, f"{rows}x{h} {mode}")


@needs_gpu
@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float32)], ids=["bf16", "f32"])
@pytest.mark.parametrize("h", [1024, 100])
def test_cuda_special_rows(dtype, h):
    x, gamma, beta = _special_rows(h, dtype)
    for mode in MODES:
        want = _run(x, None, gamma, beta, mode)
        got = _run(x, None, gamma, beta, mode, device=GPU_DEVICES[0])
        _assert_same(got, want, f"CUDA {mode}")
        _assert_same(got, _oracle(x, None, gamma, beta, mode), f"CUDA vs oracle {mode}")


@needs_gpu
def test_cuda_hlo_has_custom_call_and_vmap():
    x, r, gamma, beta = _inputs(8, 1024, BF16, True)
    gpu = GPU_DEVICES[0]
    f = jax.jit(
        lambda *a: jax_bq.layernorm_quantize(*a[:3], residual=a[3], granularity="per_tensor")
    )
    args = [jax.device_put(a, gpu) for a in (x, gamma, beta, r)]
    assert TARGET in f.lower(*args).as_text()
    xs = np.stack([x, x * 3])
    g = jax.jit(
        jax.vmap(lambda x: jax_bq.layernorm_quantize(x, gamma, beta, granularity="per_tensor"))
    )
    on_gpu = g(jax.device_put(xs, gpu))
    on_cpu = g(jax.device_put(xs, CPU))
    for a, b in zip(jax.tree.leaves(on_gpu), jax.tree.leaves(on_cpu), strict=True):
        np.testing.assert_array_equal(_bits(np.asarray(a)), _bits(np.asarray(b)))
