"""Dynamic activation quantization (jax_bq.dynamic): modes under jit/vmap/scan, fallback, EMA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_bq as bq
from jax_bq.dynamic import (
    CALIBRATION_MODES,
    GRANULARITIES,
    DynamicQuantConfig,
    EmaState,
    abs_percentile,
    activation_stats,
    decode_precision,
    outlier_ratio,
    quantize_dynamic,
)

RNG = np.random.default_rng(3)
X = jnp.asarray(RNG.standard_normal((2, 8, 64)), jnp.float32)
W = bq.quantize(jnp.asarray(RNG.standard_normal((32, 64)), jnp.float32), "fp8_e4m3")
MODES = [(g, m) for g in GRANULARITIES for m in CALIBRATION_MODES]
IDS = [f"{g}-{m}" for g, m in MODES]


def _with_outliers(x, gain=1000.0):
    return x.at[..., 5].multiply(gain)


@pytest.mark.parametrize("gran,mode", MODES, ids=IDS)
def test_modes_jit_vmap_scan(gran, mode):
    cfg = DynamicQuantConfig(granularity=gran, calibration_mode=mode)
    eager, meta = quantize_dynamic(X, config=cfg)
    err = float(jnp.sqrt(jnp.mean((eager - X) ** 2)))
    assert 0 < err < 0.05  # FP8: ~2-3 % relative error of unit-variance data
    jitted, jmeta = jax.jit(lambda x: quantize_dynamic(x, config=cfg))(X)
    # absmax is the quantize kernel (bitwise); the others multiply by 1 / s, which
    # XLA may fuse differently under jit (last-bit differences of a scale).
    tol = 0 if mode == "absmax" and gran != "per_channel" else 1e-6
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=tol, atol=0)
    np.testing.assert_allclose(np.asarray(jmeta.scale), np.asarray(meta.scale), rtol=tol)
    # vmap over the leading dim = each member quantized alone.
    vm, vmeta = jax.vmap(lambda x: quantize_dynamic(x, config=cfg))(X)
    for i in range(X.shape[0]):
        one, ometa = quantize_dynamic(X[i], config=cfg)
        np.testing.assert_allclose(np.asarray(vm[i]), np.asarray(one), rtol=1e-6, atol=0)
        assert int(vmeta.precision[i]) == int(ometa.precision)

    def step(c, x):
        y, m = quantize_dynamic(x, W, config=cfg)
        return c + jnp.sum(y), m.precision

    tot, codes = jax.lax.scan(step, 0.0, X)
    assert np.isfinite(float(tot)) and codes.shape == (2,)
    assert all(decode_precision(c) == "fp8_e4m3" for c in codes)


@pytest.mark.parametrize("gran", ["per_token", "per_tensor"])
def test_absmax_is_the_pinned_quantize(gran):
    cfg = DynamicQuantConfig(granularity=gran)
    y, meta = quantize_dynamic(X, config=cfg)
    q = bq.quantize(X, "fp8_e4m3", granularity="per_channel" if gran == "per_token" else gran)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(bq.dequantize(q, jnp.float32)))
    np.testing.assert_array_equal(np.asarray(meta.scale).ravel(), np.asarray(q.scales).ravel())


@pytest.mark.parametrize("p", [50.0, 99.0, 99.9, 100.0, 0.5])
def test_percentile_exact(p):
    a = RNG.standard_normal((5, 333)).astype(np.float32)
    got = np.asarray(abs_percentile(jnp.asarray(a), p))
    np.testing.assert_allclose(got, np.percentile(np.abs(a), p, axis=1), rtol=2e-7)


def test_mse_optimal_never_worse_than_absmax():
    x = jnp.asarray(RNG.standard_t(2, (64, 128)), jnp.float32)  # heavy tails: clipping helps
    errs = {}
    for mode in ("absmax", "mse_optimal"):
        y, _ = quantize_dynamic(
            x, config=DynamicQuantConfig(granularity="per_token", calibration_mode=mode)
        )
        errs[mode] = np.sum((np.asarray(y) - np.asarray(x)) ** 2, axis=1)
    # ratio 1.0 is in the grid (x * (1 / s) vs the kernel's division: last-bit slack)
    assert np.all(errs["mse_optimal"] <= errs["absmax"] * (1 + 1e-4))
    assert np.sum(errs["mse_optimal"]) < np.sum(errs["absmax"])


def test_mse_optimal_with_weight_minimizes_output_error():
    x = jnp.asarray(RNG.standard_t(2, (64, 128)), jnp.float32)
    w = jnp.asarray(RNG.standard_normal((32, 128)), jnp.float32)
    ref = np.asarray(x @ w.T)
    errs = {}
    for mode in ("absmax", "mse_optimal"):
        cfg = DynamicQuantConfig(calibration_mode=mode, fallback_to_fp16=False)
        y, _ = jax.jit(lambda x, cfg=cfg: quantize_dynamic(x, w, config=cfg))(x)
        errs[mode] = np.sum((np.asarray(y) - ref) ** 2, axis=1)
    assert np.all(errs["mse_optimal"] <= errs["absmax"] * (1 + 1e-4))
    assert np.sum(errs["mse_optimal"]) < np.sum(errs["absmax"])


@pytest.mark.parametrize("with_weight", [False, True], ids=["act", "matmul"])
def test_fallback_taken_and_not_under_jit(with_weight):
    # K = 64 is one block: the channel measure (the block one cannot see it, next test).
    cfg = DynamicQuantConfig(granularity="per_token", outlier_measure="channel")
    w = W if with_weight else None
    f = jax.jit(lambda x: quantize_dynamic(x, w, config=cfg))
    y0, m0 = f(X)
    y1, m1 = f(_with_outliers(X))
    assert decode_precision(m0.precision) == "fp8_e4m3" and not bool(m0.fell_back)
    assert decode_precision(m1.precision) == "fp16" and bool(m1.fell_back)
    assert float(m1.outlier_ratio) > 10**cfg.outlier_threshold > float(m0.outlier_ratio)
    xo = _with_outliers(X)
    if not with_weight:  # the FP16 branch: x rounded to float16, nothing else
        np.testing.assert_array_equal(
            np.asarray(y1), np.asarray(xo.astype(jnp.float16), np.float32)
        )
    else:
        ref = bq.qmatmul(xo.astype(jnp.float16), W, out_dtype=jnp.float32, act_format="fp16")
        np.testing.assert_array_equal(np.asarray(y1), np.asarray(ref))
    # One compiled executable serves both branches.
    assert f._cache_size() == 1
    # The select form: same results, no control flow.
    sel = DynamicQuantConfig(
        granularity="per_token", fallback_mode="select", outlier_measure="channel"
    )
    for x, y in ((X, y0), (xo, y1)):
        ys, _ = jax.jit(lambda x: quantize_dynamic(x, w, config=sel))(x)
        np.testing.assert_array_equal(np.asarray(ys), np.asarray(y))
    # Fallback off: FP8 even with outliers.
    _, m2 = quantize_dynamic(xo, w, config=DynamicQuantConfig(fallback_to_fp16=False))
    assert decode_precision(m2.precision) == "fp8_e4m3"


def test_fallback_under_vmap_selects_per_member():
    xs = jnp.stack([X[0], _with_outliers(X[1])])
    _, meta = jax.vmap(
        lambda x: quantize_dynamic(x, config=DynamicQuantConfig(outlier_measure="channel"))
    )(xs)
    assert [decode_precision(c) for c in meta.precision] == ["fp8_e4m3", "fp16"]


@pytest.mark.parametrize("gran", GRANULARITIES)
def test_ema_updates_across_steps(gran):
    cfg = DynamicQuantConfig(granularity=gran, calibration_mode="absmax", ema_decay=0.5)
    step = jax.jit(lambda x, e: quantize_dynamic(x, config=cfg, ema=e))
    x1, x2 = X, X * 3.0
    _, m1 = step(x1, EmaState.zeros((64,) if gran == "per_channel" else ()))
    _, m2 = step(x2, m1.ema)
    assert int(m2.ema.count) == 2
    if gran == "per_token":  # absmax: the clip ratio is 1 every step
        np.testing.assert_allclose(np.asarray(m2.ema.value), 1.0, rtol=1e-6)
    else:  # e2 = 0.5 c1 + 0.5 c2 = 2 c1 (c2 = 3 c1)
        np.testing.assert_allclose(
            np.asarray(m2.ema.value), 2 * np.asarray(m1.clip).ravel(), rtol=1e-6
        )
        np.testing.assert_allclose(
            np.asarray(m2.scale).ravel(), 2 * np.asarray(m1.clip).ravel() / 448.0, rtol=1e-6
        )


def test_stats_and_outlier_ratio():
    s = jax.jit(activation_stats)(X)
    a = np.abs(np.asarray(X))
    np.testing.assert_allclose(float(s.absmax), a.max())
    np.testing.assert_allclose(float(s.std), np.asarray(X).std(), rtol=1e-5)
    np.testing.assert_allclose(float(s.p999), np.percentile(a, 99.9), rtol=1e-6)
    ch = a.reshape(-1, 64).max(0)
    np.testing.assert_allclose(float(s.outlier_ratio), ch.max() / np.median(ch), rtol=1e-6)
    np.testing.assert_allclose(float(outlier_ratio(X)), ch.max() / np.median(ch), rtol=1e-6)
    assert "outlier_ratio" in s.summary()


def _np_block_ratio(x):
    """numpy reference of the block outlier measure (1x128 blocks, zero-padded)."""
    a = np.abs(np.asarray(x, np.float64)).reshape(-1, x.shape[-1])
    a = np.where(np.isfinite(a), a, 0.0)
    nb = -(-a.shape[1] // 128)
    a = np.pad(a, [(0, 0), (0, nb * 128 - a.shape[1])]).reshape(-1, nb, 128).max(-1)
    live = a[a > 0]
    return a.max() / np.exp(np.mean(np.log(live))) if live.size else 0.0


def test_block_outlier_ratio_matches_numpy_and_the_scales():
    from jax_bq.dynamic import block_amax, block_amax_of_scales, block_outlier_ratio, block_weight

    global WB_BLK
    WB_BLK = block_weight(W_CH)

    x = jnp.asarray(RNG.standard_normal((2, 5, 320)), jnp.float32)
    x = x.at[1, 2, 130:258].set(0.0)  # an all-zero block (scale 1) is left out
    for xx in (x, _with_outliers(x, 100.0)):
        ref = _np_block_ratio(np.asarray(xx))
        np.testing.assert_allclose(float(block_outlier_ratio(block_amax(xx))), ref, rtol=1e-5)
        q = bq.quantize(xx, "fp8_e4m3", block_size=128)
        a = block_amax_of_scales(q.scales, bq.QuantFormat.FP8_E4M3)
        np.testing.assert_allclose(np.asarray(a), np.asarray(block_amax(xx)), rtol=2.0**-22)
        # quantize_dynamic on the block path reads the scales (no pass over x): same value
        _, m = jax.jit(
            lambda v: quantize_dynamic(
                v, WB_BLK, config=DynamicQuantConfig(outlier_measure="block"), out_dtype=jnp.float32
            )
        )(xx)
        np.testing.assert_allclose(float(m.outlier_ratio), ref, rtol=1e-5)
        # and off the block path (no weight), from one reduction of x
        _, m = quantize_dynamic(
            xx, config=DynamicQuantConfig(fallback_to_fp16=False, outlier_measure="block")
        )
        np.testing.assert_allclose(float(m.outlier_ratio), ref, rtol=1e-5)
    # outliers in one of three blocks fire the fallback; the clean tensor does not
    thr = 10 ** DynamicQuantConfig().outlier_threshold
    assert _np_block_ratio(np.asarray(_with_outliers(x, 1000.0))) > thr > _np_block_ratio(x)
    assert float(block_outlier_ratio(jnp.zeros((4, 3)))) == 0.0
    with pytest.raises(ValueError, match="outlier_measure"):
        DynamicQuantConfig(outlier_measure="median")


def test_nan_gives_nan_group_only():
    x = X.at[0, 0, 3].set(jnp.nan)
    for mode in CALIBRATION_MODES:
        y, _ = quantize_dynamic(
            x, config=DynamicQuantConfig(calibration_mode=mode, fallback_to_fp16=False)
        )
        y = np.asarray(y)
        assert np.all(np.isnan(y[0, 0])) and np.all(np.isfinite(y[0, 1:])), mode


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"percentile": 0.0}, "percentile"),
        ({"percentile": 100.5}, "percentile"),
        ({"granularity": "per_row"}, "granularity"),
        ({"calibration_mode": "kl"}, "calibration_mode"),
        ({"precision": "nvfp4"}, "precision"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"mse_grid": (0.9, 0.8)}, "mse_grid"),
        ({"fallback_mode": "switch"}, "fallback_mode"),
        ({"outlier_threshold": -1.0}, "outlier_threshold"),
        ({"fallback_weight": "bf16"}, "fallback_weight"),
    ],
)
def test_bad_configs(kw, msg):
    with pytest.raises(ValueError, match=msg):
        DynamicQuantConfig(**kw)


def test_bad_operands():
    with pytest.raises(ValueError, match="rank >= 2"):
        quantize_dynamic(jnp.ones((8,)))
    with pytest.raises(ValueError, match=r"\[N, K=64\]"):
        quantize_dynamic(X, jnp.ones((32, 63)), operator_name="layer_0/query")


def test_fallback_on_fp16_weight_copy():
    """fallback_weight="fp16": the FP16 branch multiplies by the float16 copy, not dq(W)."""
    w32 = jnp.asarray(RNG.standard_normal((32, 64)), jnp.float32)
    wq = bq.quantize(w32, "fp8_e4m3", granularity="per_channel")
    cfg = DynamicQuantConfig(fallback_weight="fp16", outlier_measure="channel")  # K = 64
    f = jax.jit(lambda x, w16: quantize_dynamic(x, wq, config=cfg, fallback_weight=w16))
    w16 = w32.astype(jnp.float16)
    xo = _with_outliers(X)
    y1, m1 = f(xo, w16)
    assert bool(m1.fell_back)
    ref = np.einsum(
        "...k,nk->...n",
        np.asarray(xo.astype(jnp.float16), np.float32),
        np.asarray(w16, np.float32),
    )
    np.testing.assert_allclose(np.asarray(y1), ref, rtol=1e-5, atol=1e-3)
    # Closer to the float product than the weight-only rung on dq(W): the weight's error is gone.
    exact = np.einsum("...k,nk->...n", np.asarray(xo), np.asarray(w32))
    y_wo, _ = quantize_dynamic(xo, wq, config=DynamicQuantConfig(outlier_measure="channel"))
    assert np.abs(np.asarray(y1) - exact).max() < 0.1 * np.abs(np.asarray(y_wo) - exact).max()
    # No outliers: the FP8 branch, identical to the default config's.
    y0, m0 = f(X, w16)
    assert not bool(m0.fell_back)
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(quantize_dynamic(X, wq)[0]))
    assert f._cache_size() == 1


def test_fallback_copy_errors():
    cfg = DynamicQuantConfig(fallback_weight="fp16")
    with pytest.raises(ValueError, match="fallback_weight"):
        quantize_dynamic(X, W, config=cfg, operator_name="layer_0/query")  # no copy
    with pytest.raises(ValueError, match="fallback_weight"):
        quantize_dynamic(X, W, config=cfg, fallback_weight=jnp.ones((16, 64)))
    with pytest.raises(ValueError, match="needs a weight"):
        quantize_dynamic(X, config=cfg, fallback_weight=jnp.ones((32, 64)))


# ------------------------------------------------- the block-scaled GEMM path

# K = 320: blocks of 128, 128 and a ragged 64. Token 0 has an all-zero block,
# token 1 a NaN in its second block, token 2 a loud first block.
_XB = RNG.standard_normal((3, 6, 320)).astype(np.float32)
_XB[0, 0, 128:256] = 0.0
_XB[0, 1, 200] = np.nan
_XB[0, 2, :128] *= 50.0
XB = jnp.asarray(_XB)
WB_SRC = jnp.asarray(RNG.standard_normal((40, 320)), jnp.float32)
W_CH = bq.quantize(WB_SRC, "fp8_e4m3", granularity="per_channel")


def _oracle_blocks(x: np.ndarray):
    """Numpy/ml_dtypes oracle of 1x128 FP8 E4M3 blocks: (codes, scales), DESIGN §2."""
    import ml_dtypes

    x = np.asarray(x, np.float32)
    k = x.shape[-1]
    nb = -(-k // 128)
    codes = np.empty(x.shape, ml_dtypes.float8_e4m3fn)
    scales = np.empty((*x.shape[:-1], nb), np.float32)
    for b in range(nb):
        blk = x[..., b * 128 : (b + 1) * 128]
        amax = np.max(np.abs(blk), axis=-1)  # NaN propagates; Inf stays Inf
        s = np.where(amax > 0, amax / np.float32(448.0), np.float32(1.0)).astype(np.float32)
        s = np.where(np.isfinite(amax), s, np.float32(np.nan))
        scales[..., b] = s
        with np.errstate(invalid="ignore"):
            codes[..., b * 128 : (b + 1) * 128] = np.clip(blk / s[..., None], -448, 448).astype(
                ml_dtypes.float8_e4m3fn
            )
    return codes, scales


def test_block_weight_is_exact():
    from jax_bq.dynamic import block_weight, is_block_weight

    for gran, want in (("per_channel", "per_block"), ("per_tensor", "tile_2d")):
        w = bq.quantize(WB_SRC, "fp8_e4m3", granularity=gran)
        wb = block_weight(w)
        assert is_block_weight(wb) and not is_block_weight(w)
        assert wb.granularity.value == want and wb.data is w.data
        wb.validate()
        np.testing.assert_array_equal(
            np.asarray(bq.dequantize(wb, jnp.float32)), np.asarray(bq.dequantize(w, jnp.float32))
        )
        assert block_weight(wb) is wb
    tile = bq.quantize(WB_SRC, "fp8_e4m3", granularity="tile_2d", block_size=(128, 128))
    assert is_block_weight(tile) and not is_block_weight(
        bq.quantize(WB_SRC, "fp8_e4m3", block_size=64)
    )
    for bad in (WB_SRC, bq.quantize(WB_SRC, "fp4", block_size=32)):
        with pytest.raises(ValueError, match="block_weight needs an FP8"):
            block_weight(bad)


def test_block_path_per_token_absmax_is_1x128_blocks():
    from jax_bq.dynamic import block_weight

    wb = block_weight(W_CH)
    cfg = DynamicQuantConfig(fallback_to_fp16=False)
    y, meta = quantize_dynamic(XB, wb, config=cfg, out_dtype=jnp.float32)
    codes, scales = _oracle_blocks(_XB)
    # The scales that ran are the oracle's 1x128 block scales (NaN block, zero block = 1).
    np.testing.assert_array_equal(np.asarray(meta.block_scale), scales)
    assert np.isnan(scales[0, 1, 1]) and np.isfinite(scales[0, 1, [0, 2]]).all()
    assert scales[0, 0, 1] == 1.0
    # The path that runs is quantize(block_size=128) -> qmatmul, whose codes are the oracle's.
    qx = bq.quantize(XB, "fp8_e4m3", block_size=128)
    np.testing.assert_array_equal(np.asarray(qx.data).view(np.uint8), codes.view(np.uint8))
    ref = bq.qmatmul(qx, wb, out_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))
    # An independent float64 product of the oracle's operands (fallback: bf16 operands).
    import ml_dtypes

    bf16 = ml_dtypes.bfloat16
    xd = codes.astype(np.float32) * np.repeat(scales, 128, axis=-1)[..., :320]
    xd = xd.astype(bf16).astype(np.float64)
    wd = np.asarray(bq.dequantize(W_CH, jnp.float32)).astype(bf16).astype(np.float64)
    fin = np.isfinite(xd).all(-1)
    np.testing.assert_allclose(np.asarray(y)[fin], (xd @ wd.T)[fin], rtol=1e-5, atol=1e-4)
    assert np.isnan(np.asarray(y)[0, 1]).all()
    # meta.scale keeps the per-token definition: quantize(per_channel)'s scales.
    q_tok = bq.quantize(XB, "fp8_e4m3", granularity="per_channel")
    np.testing.assert_array_equal(np.asarray(meta.scale), np.asarray(q_tok.scales))
    # Blocks are never coarser than the token: the loud token's quiet blocks gain
    # (FP8 is floating point: the gain is in the values a coarse scale makes subnormal).
    xt = np.asarray(bq.dequantize(q_tok, jnp.float32))[0, 2]
    xb = (codes.astype(np.float32) * np.repeat(scales, 128, -1)[..., :320])[0, 2]
    err_t, err_b = np.abs(xt - _XB[0, 2])[128:], np.abs(xb - _XB[0, 2])[128:]
    assert err_b.sum() < err_t.sum()
    # jit (bitwise), scan (vmap: the next test).
    yj, mj = jax.jit(lambda x, w: quantize_dynamic(x, w, config=cfg, out_dtype=jnp.float32))(XB, wb)
    np.testing.assert_array_equal(np.asarray(yj), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(mj.block_scale), scales)
    _, bs = jax.lax.scan(
        lambda c, x: (c, quantize_dynamic(x, wb, config=cfg)[1].block_scale), 0, XB
    )
    np.testing.assert_array_equal(np.asarray(bs), scales)


@pytest.mark.parametrize("blocked", [True, False], ids=["block", "outer"])
def test_block_path_under_vmap(blocked):
    from jax_bq.dynamic import block_weight

    w = block_weight(W_CH) if blocked else W_CH
    x = jnp.asarray(np.nan_to_num(_XB), jnp.float32)
    cfg = DynamicQuantConfig(fallback_to_fp16=False)
    f = lambda x: quantize_dynamic(x, w, config=cfg, out_dtype=jnp.float32)[0]  # noqa: E731
    yv = jax.vmap(f)(x)
    for i in range(x.shape[0]):
        np.testing.assert_array_equal(np.asarray(yv[i]), np.asarray(f(x[i])))


@pytest.mark.parametrize(
    "kw",
    [
        {"granularity": "per_tensor"},
        {"calibration_mode": "percentile", "percentile": 99.0},
        {"ema_decay": 0.5},
    ],
    ids=["per_tensor-absmax", "per_token-percentile", "per_token-ema"],
)
def test_block_path_replicated_scales_equal_the_outer_vector_path(kw):
    """Modes whose statistic is per token/tensor: the group scale replicated, same product."""
    from jax_bq.dynamic import block_weight

    x = jnp.asarray(np.nan_to_num(_XB), jnp.float32)
    cfg = DynamicQuantConfig(fallback_to_fp16=False, **kw)
    w = (
        W_CH
        if cfg.granularity == "per_token"
        else bq.quantize(WB_SRC, "fp8_e4m3", granularity="per_tensor")
    )
    f = jax.jit(lambda x, w: quantize_dynamic(x, w, config=cfg, out_dtype=jnp.float32))
    y_old, m_old = f(x, w)
    y_new, m_new = f(x, block_weight(w))
    assert m_old.block_scale is None
    np.testing.assert_array_equal(np.asarray(m_new.scale), np.asarray(m_old.scale))
    want = np.broadcast_to(
        np.asarray(m_new.scale).reshape(-1, 1) if m_new.scale.ndim else m_new.scale, (18, 3)
    )
    np.testing.assert_array_equal(np.asarray(m_new.block_scale).reshape(18, 3), want)
    np.testing.assert_array_equal(np.asarray(y_new), np.asarray(y_old))


def test_block_path_fallback_taken_and_not():
    from jax_bq.dynamic import block_weight

    wb = block_weight(W_CH)
    x = jnp.asarray(np.nan_to_num(_XB[:, :, :]), jnp.float32)
    xo = _with_outliers(x)
    for mode in ("cond", "select"):
        cfg = DynamicQuantConfig(fallback_mode=mode)
        f = jax.jit(lambda x, cfg=cfg: quantize_dynamic(x, wb, config=cfg, out_dtype=jnp.float32))
        y0, m0 = f(x[1:])
        y1, m1 = f(xo[1:])
        assert decode_precision(m0.precision) == "fp8_e4m3"
        assert decode_precision(m1.precision) == "fp16"
        np.testing.assert_array_equal(
            np.asarray(y0),
            np.asarray(
                bq.qmatmul(
                    bq.quantize(x[1:], "fp8_e4m3", block_size=128), wb, out_dtype=jnp.float32
                )
            ),
        )
        ref = bq.qmatmul(xo[1:].astype(jnp.float16), wb, out_dtype=jnp.float32, act_format="fp16")
        np.testing.assert_array_equal(np.asarray(y1), np.asarray(ref))
        assert f._cache_size() == 1


def test_explain_dynamic_names_the_path():
    from jax_bq.dynamic import block_weight, explain_dynamic

    x = jax.ShapeDtypeStruct((4096, 320), jnp.bfloat16)
    blk = explain_dynamic(x, block_weight(W_CH))
    assert "1x128 blocks (absmax per block)" in blk and "block_1x128" in blk
    assert "lax.cond" in blk and "fp16 fallback" in blk
    old = explain_dynamic(x, W_CH, config=DynamicQuantConfig(fallback_to_fp16=False))
    assert "per_token scales" in old and "block_weight makes it blocked" in old
    assert "fallback" not in old.split("\n", 1)[1]
    rep = explain_dynamic(x, block_weight(W_CH), config=DynamicQuantConfig(ema_decay=0.9))
    assert "replicated over 1x128 blocks" in rep
    sim = explain_dynamic(x, W_CH, config=DynamicQuantConfig(granularity="per_channel"))
    assert "simulated" in sim
    with pytest.raises(ValueError, match="explain_dynamic"):
        explain_dynamic(jax.ShapeDtypeStruct((4, 64), jnp.float32), W_CH)


@pytest.mark.gpu
def test_block_path_runs_the_block_scaled_gemm_on_gpu():
    """On a GPU with FP8 tensor cores: cuBLASLt's 128-blocked x 1x128 GEMM runs, results match."""
    from jax_bq.capabilities import native_matmul
    from jax_bq.dynamic import block_weight, explain_dynamic
    from jax_bq.matmul import plan

    dev = jax.devices("gpu")[0]
    if not native_matmul("fp8_e4m3", dev).ok:
        pytest.skip("no FP8 tensor cores on this GPU")
    xr = jnp.asarray(RNG.standard_normal((512, 1024)), jnp.bfloat16)
    w_src = jnp.asarray(RNG.standard_normal((768, 1024)), jnp.float32)
    want_modes = {
        "per_channel": ("VEC128_32F", "VEC128_32F"),
        "tile": ("BLK128x128_32F", "VEC128_32F"),
    }
    weights = {
        "per_channel": block_weight(bq.quantize(w_src, "fp8_e4m3", granularity="per_channel")),
        "tile": bq.quantize(w_src, "fp8_e4m3", granularity="tile_2d", block_size=(128, 128)),
    }
    for wname, wb in weights.items():
        for act in ("per_token", "per_tensor"):
            cfg = DynamicQuantConfig(granularity=act, fallback_to_fp16=False)
            qx = (
                bq.quantize(xr, "fp8_e4m3", block_size=128)
                if act == "per_token"
                else bq.quantize(xr, "fp8_e4m3", granularity="per_tensor")
            )
            xq = qx if act == "per_token" else _per_tensor_as_blocks(qx)
            p = plan(xq, wb, out_dtype=jnp.bfloat16)  # the encoder's dtype
            assert p.path == "cublaslt_fp8" and tuple(p.scale_modes) == want_modes[wname], str(p)
            assert "cublaslt_fp8" in explain_dynamic(xr, wb, config=cfg)
            y, meta = jax.jit(lambda x, w, cfg=cfg: quantize_dynamic(x, w, config=cfg))(xr, wb)
            ref = jnp.einsum(
                "mk,nk->mn",
                bq.dequantize(qx, jnp.float32),
                bq.dequantize(wb, jnp.float32),
                precision="highest",
            )
            assert meta.block_scale.shape == (512, 8)
            np.testing.assert_allclose(
                np.asarray(y, np.float32), np.asarray(ref), rtol=1e-2, atol=5e-2
            )


def _per_tensor_as_blocks(q):
    """A per-tensor QuantizedTensor as 1x128 blocks with the scale replicated."""
    from jax_bq.dynamic import _block_activation

    return _block_activation(q, jnp.reshape(q.scales, ()), q.data, q.format)
