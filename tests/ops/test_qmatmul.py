"""qmatmul against the oracle (dequantize, then a float64 dot) on every backend.

The oracle uses the activation numerics of the path that ran (the plan says
which): FP8 activation codes from ``quantize`` for W8A8, the 16-bit ``x`` for
weight-only. GPU kernels sum in their own order and the fallback rounds its
dequantized operands to bf16, so agreement is to a tolerance, not bitwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GPU_DEVICES

import jax_bq as bq
from jax_bq.convert import fp4_to_fp8
from jax_bq.matmul import FP4_CONVERT_MIN_M, FP4_VIA_FP8
from jax_bq.primitives import qmatmul as qp

W_GRANULARITIES = [
    ("per_tensor", None),
    ("per_channel", None),
    ("per_block", 128),
    ("tile_2d", 128),
]


def _rand(shape, seed, dtype=jnp.bfloat16, heavy=False):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    if heavy:  # outliers: a few columns 30x larger, as in real activations
        x[..., ::37] *= 30.0
    return jnp.asarray(x, dtype)


def _oracle(x, w, p: bq.MatmulPlan):
    """float64 reference for the numerics of plan ``p``."""
    c = p.config
    if p.convert_fp4:
        w = fp4_to_fp8(w)
    wdq = np.asarray(bq.dequantize(w, jnp.float32), np.float64)
    if isinstance(x, bq.QuantizedTensor):
        xdq = np.asarray(bq.dequantize(x, jnp.float32), np.float64)
    elif c.act_format is None:
        xdq = np.asarray(jnp.asarray(x).astype(c.compute_dtype), np.float64)
    else:
        q = bq.quantize(x, c.act_format, **qp._act_quant_kwargs(c.act_granularity))
        xdq = np.asarray(bq.dequantize(q, jnp.float32), np.float64)
    return xdq.reshape(-1, c.k) @ wdq.T


def _check(y, ref, tol=1.5e-2):
    y = np.asarray(y, np.float64).reshape(ref.shape)
    scale = np.abs(ref).max() + 1e-30
    err = np.abs(y - ref).max() / scale
    rel = np.linalg.norm(y - ref) / (np.linalg.norm(ref) + 1e-30)
    assert err < tol and rel < tol / 2, f"max err {err:.3g}, rel {rel:.3g}"


@pytest.mark.parametrize("gran,block", W_GRANULARITIES)
@pytest.mark.parametrize("m", [1, 16, 64, 200])
def test_matches_oracle(backend, gran, block, m):
    n, k = 256, 512
    w = bq.quantize(_rand((n, k), 1, jnp.float32), "fp8_e4m3", granularity=gran, block_size=block)
    x = _rand((m, k), 2, heavy=True)
    p = bq.plan(x, w)
    if backend == "cpu":
        assert p.path == qp.FALLBACK
    elif "measured profile" in p.reason:  # ranked by jax_bq.perf (tests/test_perf.py)
        assert p.path in (qp.WEIGHT_ONLY, qp.CUBLAS_FP8) and "predicted" in p.reason, p.reason
    elif m <= bq.matmul.WEIGHT_ONLY_CROSSOVER_M[w.granularity]:
        assert p.path == qp.WEIGHT_ONLY, p.reason
    elif p.path == qp.WEIGHT_ONLY:  # allowed only where cuBLASLt refuses the scale mode
        assert "refuses" in p.reason, p.reason
    else:
        assert p.path == qp.CUBLAS_FP8, p.reason
    y = jax.jit(bq.qmatmul)(x, w)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    _check(y, _oracle(x, w, p))


@pytest.mark.parametrize("act", ["fp8_e4m3", "fp8_e5m2", "bf16"])
@pytest.mark.parametrize("gran,block", W_GRANULARITIES)
def test_explicit_activation_format(backend, act, gran, block):
    m, n, k = 32, 128, 384  # K = 3 blocks of 128: catches scale-layout padding errors
    w = bq.quantize(_rand((n, k), 3, jnp.float32), "fp8_e4m3", granularity=gran, block_size=block)
    x = _rand((m, k), 4)
    p = bq.plan(x, w, act_format=act)
    if backend == "gpu":
        assert p.path == (qp.WEIGHT_ONLY if act == "bf16" else qp.CUBLAS_FP8), p.reason
    y = bq.qmatmul(x, w, act_format=act)
    _check(y, _oracle(x, w, p), tol=3e-2 if act == "fp8_e5m2" else 1.5e-2)


@pytest.mark.parametrize("act_gran", ["per_tensor", "per_token"])
def test_activation_granularity_override(backend, act_gran):
    w = bq.quantize(_rand((128, 256), 5, jnp.float32), "fp8_e4m3", granularity="per_channel")
    x = _rand((40, 256), 6, jnp.float32)
    p = bq.plan(x, w, act_granularity=act_gran)
    assert p.config.act_granularity == act_gran
    _check(bq.qmatmul(x, w, act_granularity=act_gran), _oracle(x, w, p))


@pytest.mark.parametrize(
    "xgran,xblock", [("per_tensor", None), ("per_channel", None), ("per_block", 128)]
)
def test_prequantized_activations(backend, xgran, xblock):
    wgran = {"per_tensor": "per_tensor", "per_channel": "per_channel", "per_block": "tile_2d"}
    w = bq.quantize(_rand((256, 512), 7, jnp.float32), "fp8_e4m3", granularity=wgran[xgran])
    xq = bq.quantize(_rand((3, 24, 512), 8), "fp8_e4m3", granularity=xgran, block_size=xblock)
    p = bq.plan(xq, w)
    if backend == "gpu":
        assert p.path == qp.CUBLAS_FP8, p.reason
    y = bq.qmatmul(xq, w, out_dtype=jnp.float32)
    assert y.shape == (3, 24, 256) and y.dtype == jnp.float32
    _check(y, _oracle(xq, w, p), tol=1e-2)


@pytest.mark.parametrize("m", [1, 16])
def test_large_k(backend, m):
    n, k = 128, 16384
    w = bq.quantize(_rand((n, k), 9, jnp.float32), "fp8_e4m3", granularity="tile_2d")
    x = _rand((m, k), 10)
    for act in (None, "fp8_e4m3"):
        p = bq.plan(x, w, act_format=act)
        _check(bq.qmatmul(x, w, act_format=act), _oracle(x, w, p))


def test_ragged_dims_fall_back(backend):
    w = bq.quantize(_rand((250, 520), 11, jnp.float32), "fp8_e4m3", granularity="per_channel")
    x = _rand((7, 520), 12)
    p = bq.plan(x, w)
    assert p.path == qp.FALLBACK
    if backend == "gpu":
        assert "multiples of 16" in p.reason
    _check(bq.qmatmul(x, w), _oracle(x, w, p))


def test_vmap_and_stacked_weights(backend):
    w = bq.quantize(_rand((128, 256), 13, jnp.float32), "fp8_e4m3", granularity="per_channel")
    xs = _rand((4, 8, 256), 14)
    y = jax.jit(jax.vmap(lambda a: bq.qmatmul(a, w)))(xs)
    p = bq.plan(xs[0], w)
    for i in range(4):
        _check(y[i], _oracle(xs[i], w, p))
    # Stacked weights under vmap (per-member quantization) map over members.
    ws = jnp.stack([_rand((128, 256), 20 + i, jnp.float32) for i in range(3)])
    wq = jax.vmap(lambda a: bq.quantize(a, "fp8_e4m3", granularity="per_channel"))(ws)
    x = _rand((8, 256), 15)

    def one(wi):
        member = bq.QuantizedTensor(
            wi.data, wi.scales, None, wq.format, wq.granularity, wq.block, -1, 256, 2, wq.dtype
        )
        return bq.qmatmul(x, member)

    y = jax.vmap(one)(wq)
    for i in range(3):
        wi = bq.quantize(ws[i], "fp8_e4m3", granularity="per_channel")
        _check(y[i], _oracle(x, wi, bq.plan(x, wi)))


def test_per_tensor_activations_under_vmap_are_per_member(backend):
    w = bq.quantize(_rand((128, 256), 16, jnp.float32), "fp8_e4m3", granularity="per_tensor")
    xs = _rand((3, 32, 256), 17) * jnp.asarray([1.0, 100.0, 0.01], jnp.bfloat16)[:, None, None]
    y = jax.vmap(lambda a: bq.qmatmul(a, w, act_format="fp8_e4m3"))(xs)
    for i in range(3):
        _check(y[i], _oracle(xs[i], w, bq.plan(xs[i], w, act_format="fp8_e4m3")))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp8", "fp4", "mxfp4"])
def test_blockfp_and_fp4_weights(backend, fmt):
    w = bq.quantize(_rand((128, 256), 18, jnp.float32), fmt)
    x = _rand((16, 256), 19)
    p = bq.plan(x, w)
    dev = jax.devices("cpu")[0] if backend == "cpu" else GPU_DEVICES[0]
    cc = bq.capabilities.compute_capability(dev)
    if cc is None:
        assert p.path == qp.FALLBACK, p
    elif cc[0] not in (10, 12):
        want = qp.W4A16 if fmt in ("fp4", "nvfp4") else qp.FALLBACK
        assert p.path == want, p
    assert p.reason
    _check(bq.qmatmul(x, w), _oracle(x, w, p), tol=3e-2)


def test_output_dtypes(backend):
    w = bq.quantize(_rand((128, 256), 21, jnp.float32), "fp8_e4m3", granularity="per_channel")
    x = _rand((32, 256), 22, jnp.float16)
    for dt in (jnp.float32, jnp.bfloat16, jnp.float16):
        y = bq.qmatmul(x, w, out_dtype=dt)
        assert y.dtype == dt
        _check(y, _oracle(x, w, bq.plan(x, w, out_dtype=dt)))


def test_deterministic(backend):
    w = bq.quantize(_rand((256, 1024), 23, jnp.float32), "fp8_e4m3", granularity="tile_2d")
    for m in (4, 128):
        x = _rand((m, 1024), 24)
        f = jax.jit(bq.qmatmul)
        a, b = np.asarray(f(x, w)), np.asarray(f(x, w))
        assert a.tobytes() == b.tobytes()


def test_bad_input():
    w = bq.quantize(_rand((64, 128), 25, jnp.float32), "fp8_e4m3")
    with pytest.raises(ValueError, match="K mismatch"):
        bq.qmatmul(_rand((4, 96), 26), w)
    with pytest.raises(ValueError, match="QuantizedTensor"):
        bq.qmatmul(_rand((4, 128), 26), _rand((64, 128), 25))
    w0 = bq.quantize(_rand((64, 128), 25, jnp.float32), "fp8_e4m3", axis=0)
    with pytest.raises(ValueError, match="axis=-1"):
        bq.qmatmul(_rand((4, 128), 26), w0)
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        bq.qmatmul(jnp.ones((4, 128), jnp.int32), w)
    with pytest.raises(ValueError, match="out_dtype"):
        bq.qmatmul(_rand((4, 128), 26), w, out_dtype=jnp.int8)
    with pytest.raises(ValueError, match="act_granularity"):
        bq.qmatmul(_rand((4, 128), 26), w, act_granularity="rows")
    w3 = bq.quantize(_rand((2, 64, 128), 25, jnp.float32), "fp8_e4m3")
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        bq.qmatmul(_rand((4, 128), 26), w3)


def test_forced_fallback_plan(monkeypatch):
    monkeypatch.setenv("JAX_BQ_FORCE_FALLBACK", "qmatmul")
    w = bq.quantize(_rand((64, 128), 27, jnp.float32), "fp8_e4m3")
    p = bq.plan(_rand((4, 128), 28), w)
    assert p.path == qp.FALLBACK and "JAX_BQ_FORCE_FALLBACK" in p.reason
    assert "dequant_dot" in bq.explain(_rand((4, 128), 28), w)


# ---- GPU-only: the fast paths really run, and agree with the forced fallback ----------
gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("m", [1, 256])
def test_hlo_has_custom_call(m):
    w = bq.quantize(_rand((256, 512), 29, jnp.float32), "fp8_e4m3", granularity="tile_2d")
    x = jax.device_put(_rand((m, 512), 30), GPU_DEVICES[0])
    txt = jax.jit(bq.qmatmul).lower(x, w).as_text()
    assert "jax_bq_qmatmul" in txt


@gpu
@pytest.mark.parametrize("gran,block", W_GRANULARITIES)
@pytest.mark.parametrize("m", [2, 96])
def test_fast_path_matches_forced_fallback(monkeypatch, gran, block, m):
    dev = GPU_DEVICES[0]
    w = bq.quantize(
        jax.device_put(_rand((256, 512), 31, jnp.float32), dev),
        "fp8_e4m3",
        granularity=gran,
        block_size=block,
    )
    x = jax.device_put(_rand((m, 512), 32), dev)
    fast = np.asarray(bq.qmatmul(x, w, act_format="fp8_e4m3"), np.float64)
    monkeypatch.setenv("JAX_BQ_FORCE_FALLBACK", "qmatmul")
    jax.clear_caches()
    slow = np.asarray(bq.qmatmul(x, w, act_format="fp8_e4m3"), np.float64)
    monkeypatch.delenv("JAX_BQ_FORCE_FALLBACK")
    jax.clear_caches()
    assert np.abs(fast - slow).max() <= 1.5e-2 * np.abs(slow).max()


@gpu
def test_block_scaled_m1_refused_by_cublaslt_on_hopper():
    dev = GPU_DEVICES[0]
    if bq.capabilities.compute_capability(dev) != (9, 0):
        pytest.skip("the refusal is a Hopper property")
    w = bq.quantize(_rand((256, 512), 33, jnp.float32), "fp8_e4m3", granularity="tile_2d")
    x = jax.device_put(_rand((1, 512), 34), dev)
    auto = bq.plan(x, w)
    assert auto.path == qp.WEIGHT_ONLY
    forced = bq.plan(x, w, act_format="fp8_e4m3")
    assert forced.path == qp.FALLBACK and "cuBLASLt refuses" in forced.reason, forced
    _check(bq.qmatmul(x, w, act_format="fp8_e4m3"), _oracle(x, w, forced))


@gpu
def test_blackwell_modes_fall_back_on_hopper_with_reason():
    dev = GPU_DEVICES[0]
    if bq.capabilities.compute_capability(dev)[0] in (10, 12):
        pytest.skip("Blackwell runs these natively")
    for fmt in ("nvfp4", "mxfp8"):
        w = bq.quantize(jax.device_put(_rand((256, 512), 35, jnp.float32), dev), fmt)
        x = jax.device_put(_rand((64, 512), 36), dev)
        p = bq.plan(x, w)
        assert p.path in (qp.FALLBACK, qp.W4A16) and fmt in p.reason, p
        _check(bq.qmatmul(x, w), _oracle(x, w, p), tol=3e-2)
        forced = bq.plan(x, w, act_format=fmt)  # FP4 activations: only Blackwell has them
        assert forced.path == qp.FALLBACK and "tensor cores" in forced.reason, forced
        _check(bq.qmatmul(x, w, act_format=fmt), _oracle(x, w, forced), tol=3e-2)


@gpu
def test_concurrent_threads_identical():
    import concurrent.futures

    dev = GPU_DEVICES[0]
    w = bq.quantize(jax.device_put(_rand((512, 1024), 37, jnp.float32), dev), "fp8_e4m3")
    xs = [jax.device_put(_rand((m, 1024), 38), dev) for m in (4, 128)]
    f = jax.jit(lambda a, b: [bq.qmatmul(a, b), bq.qmatmul(a, b, act_format="fp8_e4m3")])
    want = [[np.asarray(o).tobytes() for o in f(x, w)] for x in xs]

    def work(i):
        return [np.asarray(o).tobytes() for o in f(xs[i % 2], w)]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(work, range(32)))
    for i, g in enumerate(got):
        assert g == want[i % 2]


FP4_WEIGHTS = [
    ("nvfp4", "per_block", None),
    ("fp4", "per_block", 16),
    ("fp4", "per_block", 32),
    ("fp4", "per_block", 128),
    ("fp4", "per_channel", None),
    ("fp4", "tile_2d", 128),
]


@pytest.mark.parametrize("fmt,gran,block", FP4_WEIGHTS)
@pytest.mark.parametrize("m", [1, 2, 7, 16, 64, 512])
def test_fp4_weights(backend, fmt, gran, block, m):
    # K = 544 and 160: the last 128-wide unit is partly past K (rows past N, which
    # the plan never sends to the kernel, are covered by tests/cuda/sanitize_driver.cu);
    # K = 528: not a multiple of 32, falls back.
    for n, k in ((48, 544), (48, 160), (32, 528)):
        w = bq.quantize(_rand((n, k), 40, jnp.float32), fmt, granularity=gran, block_size=block)
        x = _rand((m, k), 41, heavy=True)
        p = bq.plan(x, w)
        if backend == "gpu" and m <= 64:
            assert p.path == (qp.W4A16 if k % 32 == 0 else qp.FALLBACK), p
        _check(jax.jit(bq.qmatmul)(x, w), _oracle(x, w, p), tol=2e-2)


@pytest.mark.parametrize("m", [1, 5, 8, 16])
@pytest.mark.parametrize("n", [12288 + 48, 16384 + 16])
def test_nvfp4_weights_many_rows(backend, m, n):
    # Large N switches the W4A16 kernel's configuration (4 warps per CTA from
    # N = 12288 at M <= 4-8, two row tiles per CTA from N = 16384); rows past
    # the last full tile are clamped.
    w = bq.quantize(_rand((n, 96), 48, jnp.float32), "nvfp4")
    x = _rand((m, 96), 49, heavy=True)
    p = bq.plan(x, w)
    if backend == "gpu":
        assert p.path == qp.W4A16, p
    _check(jax.jit(bq.qmatmul)(x, w), _oracle(x, w, p), tol=2e-2)


@pytest.mark.parametrize("m", [1, 16])
def test_nvfp4_weights_nan_block_stays_in_its_column(backend, m):
    """A NaN weight gives its block a NaN scale: that output column is NaN, the rest exact."""
    wf = np.asarray(_rand((48, 256), 46, jnp.float32)).copy()
    wf[5, 37] = np.nan
    w = bq.quantize(jnp.asarray(wf), "nvfp4")
    x = _rand((m, 256), 47)
    y = jax.jit(lambda a, b: bq.qmatmul(a, b, out_dtype=jnp.float32))(x, w)
    y = np.asarray(y, np.float64)
    assert np.isnan(y[:, 5]).all()
    keep = np.arange(48) != 5
    assert np.isfinite(y[:, keep]).all()
    ref = _oracle(x, w, bq.plan(x, w))
    _check(y[:, keep], ref[:, keep], tol=2e-2)


def test_fp4_weights_vmap_and_f32_input(backend):
    w = bq.quantize(_rand((64, 256), 42, jnp.float32), "nvfp4")
    xs = _rand((3, 5, 256), 43, jnp.float32)
    y = jax.vmap(lambda a: bq.qmatmul(a, w, out_dtype=jnp.float32))(xs)
    for i in range(3):
        _check(y[i], _oracle(xs[i].astype(jnp.bfloat16), w, bq.plan(xs[i], w)), tol=2e-2)


@gpu
def test_fp4_hlo_has_custom_call():
    w = bq.quantize(_rand((256, 512), 44, jnp.float32), "nvfp4")
    x = jax.device_put(_rand((4, 512), 45), GPU_DEVICES[0])
    assert "jax_bq_qmatmul" in jax.jit(bq.qmatmul).lower(x, w).as_text()


@pytest.mark.parametrize("fmt", ["fp4", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("gran", ["per_block", "tile_2d"])
def test_fp4_to_fp8_conversion(fmt, gran):
    w = bq.quantize(_rand((200, 384), 50, jnp.float32, heavy=True), fmt)
    w8 = fp4_to_fp8(w, granularity=gran)
    block = 128 if gran == "per_block" else (128, 128)
    ref = bq.quantize(bq.dequantize(w, jnp.float32), "fp8_e4m3", granularity=gran, block_size=block)
    np.testing.assert_array_equal(
        np.asarray(w8.data).view(np.uint8), np.asarray(ref.data).view(np.uint8)
    )
    np.testing.assert_array_equal(w8.scales, ref.scales)
    d4 = np.asarray(bq.dequantize(w, jnp.float32))
    d8 = np.asarray(bq.dequantize(w8, jnp.float32))
    s = np.repeat(np.asarray(w8.scales), 128, axis=-1)[:, :384]
    if gran == "tile_2d":
        s = np.repeat(s, 128, axis=0)[:200]
    # E4M3 re-rounding: half an ulp relative, or half the subnormal step 2^-10 * S
    assert np.all(np.abs(d8 - d4) <= 2.0**-4 * np.abs(d4) + 2.0**-10 * np.abs(s) + 1e-12)


def test_fp4_to_fp8_bad_input():
    with pytest.raises(ValueError, match="FP4/NVFP4/MXFP4"):
        fp4_to_fp8(bq.quantize(_rand((16, 128), 1, jnp.float32), "fp8_e4m3"))
    with pytest.raises(ValueError, match="per_block or tile_2d"):
        fp4_to_fp8(bq.quantize(_rand((16, 128), 1, jnp.float32), "nvfp4"), granularity="per_tensor")
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        fp4_to_fp8(bq.quantize(_rand((16, 128), 1, jnp.float32), "fp4", axis=0))


@pytest.mark.parametrize("fmt", ["fp4", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("m", [1, 16, 512])
def test_fp4_weights_with_fp8_activations(backend, fmt, m):
    """Explicit FP8 activations: converted weights on every platform (pinned numerics)."""
    w = bq.quantize(_rand((256, 512), 51, jnp.float32), fmt)
    x = _rand((m, 512), 52, heavy=True)
    p = bq.plan(x, w, act_format="fp8_e4m3")
    assert p.convert_fp4 and p.config.w_format is bq.QuantFormat.FP8_E4M3, p
    if backend == "gpu" and m > 2:  # cuBLASLt refuses block scales at M = 1, 2 on Hopper
        assert p.path == FP4_VIA_FP8, p
        hlo = jax.jit(lambda a, b: bq.qmatmul(a, b, act_format="fp8_e4m3")).lower(x, w).as_text()
        assert all(t in hlo for t in ("jax_bq_fp4_to_fp8", "jax_bq_qmatmul"))
    auto = bq.plan(x, w)  # plain activations: converted on its own only from the crossover
    if backend == "gpu" and m >= FP4_CONVERT_MIN_M:
        assert auto.convert_fp4 and auto.path == FP4_VIA_FP8 and "crossover" in auto.reason, auto
        assert not bq.plan(x, w, act_format="bf16").convert_fp4
    elif m > 64:
        assert not auto.convert_fp4, auto
    y = jax.jit(lambda a, b: bq.qmatmul(a, b, act_format="fp8_e4m3"))(x, w)
    _check(y, _oracle(x, w, p))
    y8 = bq.qmatmul(x, fp4_to_fp8(w), act_format="fp8_e4m3", act_granularity="block_1x128")
    if backend == "cpu":
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y8, np.float32))
