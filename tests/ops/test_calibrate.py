"""Calibration: kernels == jnp twin bit for bit, never worse than absmax,
block-size rule, model calibration, profiles on disk, semantic check."""

from __future__ import annotations

import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GPU_DEVICES, compile_cpu_twin, sweep
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_bq as bq
from jax_bq import profiles, reference_calibrate
from jax_bq.formats import QUANTIZED_FORMATS, QuantFormat
from jax_bq.layout import make_view
from jax_bq.primitives import calibrate_p

FORMATS = list(QUANTIZED_FORMATS)


def _blocks(fmt):
    return [fmt.fixed_block] if fmt.fixed_block else [16, 64, 256]


def _heavy(shape, seed, dtype=np.float32):
    x = np.random.default_rng(seed).standard_t(3, shape).astype(np.float32)
    return jnp.asarray(x).astype(dtype)


def _view(x, block):
    return jnp.reshape(x, make_view(tuple(x.shape), bq.Granularity.PER_BLOCK, -1, (block,)).dims)


def _bytes(a):
    return np.asarray(a).tobytes()


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
@pytest.mark.parametrize(
    "dtype",
    sweep(
        [np.float32, jnp.bfloat16, np.float16], core={np.float32}, ids=lambda d: np.dtype(d).name
    ),
)
def test_kernel_equals_twin(backend, fmt, dtype):
    """Every output of the FFI kernel on this backend equals the jnp twin on CPU."""
    cpu = jax.devices("cpu")[0]
    for shape in [(5, 200), (3, 2, 72)]:
        x = _heavy(shape, 1, dtype)
        x = x.at[(0,) * (x.ndim - 1) + (7,)].set(jnp.nan) if shape[0] == 5 else x
        for block in _blocks(fmt):
            v = _view(x, block)
            got = calibrate_p.bind(v, fmt=fmt, ba=block)[:6]
            v_cpu = jax.device_put(v, cpu)
            twin = compile_cpu_twin(
                lambda a, b=block: reference_calibrate.calibrate_view(a, fmt, b), v_cpu
            )
            want = twin(v_cpu)
            for g, w in zip(got, want, strict=True):
                assert _bytes(g) == _bytes(w), (fmt, shape, block)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_gpu_equals_cpu(fmt):
    x = _heavy((64, 1024), 2, jnp.bfloat16)
    for block in _blocks(fmt):
        cpu = calibrate_p.bind(
            jax.device_put(_view(x, block), jax.devices("cpu")[0]), fmt=fmt, ba=block
        )
        gpu = calibrate_p.bind(jax.device_put(_view(x, block), GPU_DEVICES[0]), fmt=fmt, ba=block)
        for a, b in zip(cpu[:6], gpu[:6], strict=True):
            assert _bytes(a) == _bytes(b)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
def test_never_worse_and_consistent(backend, fmt):
    x = _heavy((16, 512), 3)
    block = _blocks(fmt)[-1]
    q, s = bq.calibrate(x, fmt, block)
    m0, m1 = np.asarray(s.mse_absmax), np.asarray(s.mse_best)
    assert np.all(m1 <= m0)
    # The reported error is what dequantize gives (to float32 rounding).
    err = (np.asarray(x, np.float64) - np.asarray(bq.dequantize(q, jnp.float32), np.float64)) ** 2
    per_block = err.reshape(16, -1, block).sum(-1)
    np.testing.assert_allclose(per_block, m1.astype(np.float64), rtol=2e-5, atol=1e-30)
    # The absmax candidate is quantize(): same error.
    ref = bq.quantize(x, fmt, block_size=block)
    err0 = (
        np.asarray(x, np.float64) - np.asarray(bq.dequantize(ref, jnp.float32), np.float64)
    ) ** 2
    np.testing.assert_allclose(err0.reshape(16, -1, block).sum(-1), m0, rtol=2e-5, atol=1e-30)


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.sampled_from(FORMATS),
    st.floats(0.5, 4.0),
    st.integers(1, 300),
)
def test_property_calibrated_never_worse(seed, fmt, tail, n):
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(tail, (3, n)) * rng.uniform(1e-3, 1e3)).astype(np.float32)
    block = _blocks(fmt)[0]
    _, s = bq.calibrate(jnp.asarray(x), fmt, block)
    assert np.all(np.asarray(s.mse_best) <= np.asarray(s.mse_absmax))


@pytest.mark.parametrize("fmt", [QuantFormat.FP4, QuantFormat.NVFP4, QuantFormat.FP8_E4M3])
def test_strict_improvement_on_heavy_tails(fmt):
    x = _heavy((128, 1024), 4)
    _, s = bq.calibrate(x, fmt, _blocks(fmt)[0])
    m0, m1 = float(np.sum(s.mse_absmax)), float(np.sum(s.mse_best))
    assert m1 < 0.95 * m0, (m0, m1)


def test_special_blocks():
    x = np.zeros((4, 64), np.float32)
    x[1] = np.random.default_rng(5).standard_normal(64)
    x[2, 3] = np.inf
    x[3] = 1e-30  # tiny
    for fmt in FORMATS:
        b = fmt.fixed_block or 32
        q, s = bq.calibrate(jnp.asarray(x), fmt, b)
        mse = np.asarray(s.mse_best)
        assert np.all(mse[0] == 0)  # zero block
        assert np.isnan(mse[2, 0]) and not np.any(np.isnan(mse[2, 1:]))  # Inf: NaN scale
        back = np.asarray(bq.dequantize(q, jnp.float32))
        assert np.all(np.isnan(back[2, :b])) and not np.any(np.isnan(back[2, b:]))
        assert np.all(np.isfinite(back[3]))


def test_deterministic_across_runs():
    x = _heavy((64, 512), 6)
    (qa, sa), (qb, sb) = bq.calibrate(x, "nvfp4"), bq.calibrate(x, "nvfp4")
    for u, v in zip(jax.tree.leaves(qa), jax.tree.leaves(qb), strict=True):
        assert _bytes(u) == _bytes(v)
    for u, v in zip(
        (sa.mse_absmax, sa.mse_best, sa.clipped),
        (sb.mse_absmax, sb.mse_best, sb.clipped),
        strict=True,
    ):
        assert _bytes(u) == _bytes(v)


def test_bad_input():
    with pytest.raises(ValueError, match="fixed block"):
        bq.calibrate(_heavy((4, 64), 7), "nvfp4", 32)
    with pytest.raises(ValueError, match="block_size"):
        bq.calibrate(_heavy((4, 64), 7), "fp4", 48)
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        bq.calibrate(jnp.ones((4, 64), jnp.int32), "fp4")
    with pytest.raises(ValueError, match="not a quantized"):
        bq.calibrate(_heavy((4, 64), 7), "bf16")


def test_block_size_rule():
    x = _heavy((64, 1024), 8)
    cfg = bq.CalibrationConfig(
        format=QuantFormat.FP4, block_sizes=(32, 64, 128, 256), progress=False
    )
    r = bq.calibrate_tensor(x, cfg, "w")
    assert set(r.block_scores) == {32, 64, 128, 256}
    assert r.block_scores[r.block_size] == min(r.block_scores.values())
    for b, score in r.block_scores.items():
        _, s = bq.calibrate(x, QuantFormat.FP4, b)
        mse = float(np.sum(np.asarray(s.mse_best, np.float64))) / x.size
        assert score == pytest.approx(mse * 4.0 ** (32 / b))
    fixed = bq.calibrate_tensor(x, bq.CalibrationConfig(format=QuantFormat.NVFP4, progress=False))
    assert fixed.block_size == 16


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "embedding": jnp.asarray(rng.standard_normal((512, 64)), jnp.float32),
        "layer_0": {
            "kernel": jnp.asarray(rng.standard_t(4, (128, 256)), jnp.float32),
            "bias": jnp.zeros((256,), jnp.float32),
        },
        "layer_1": {"kernel": jnp.asarray(rng.standard_t(4, (256, 128)), jnp.bfloat16)},
    }


CFG = bq.CalibrationConfig(format=QuantFormat.NVFP4, progress=False, max_workers=2)


def test_calibrate_model_selects_and_reports():
    params = _params()
    prof = bq.calibrate_model(params, CFG, model_id="toy")
    assert list(prof.results) == ["['layer_0']['kernel']", "['layer_1']['kernel']"]
    assert prof.model_id == "toy" and prof.format is QuantFormat.NVFP4
    assert prof.created_utc.endswith("+00:00")
    assert prof.overall_mse_after < prof.overall_mse_before
    assert len(prof.checkpoint_hash) == 64
    qp, _ = bq.quantize_with_calibration(params, CFG)
    assert isinstance(qp["layer_0"]["kernel"], bq.QuantizedTensor)
    assert not isinstance(qp["embedding"], bq.QuantizedTensor)
    assert not isinstance(qp["layer_0"]["bias"], bq.QuantizedTensor)


def test_profile_round_trip_bitwise(tmp_path):
    params = _params()
    prof = bq.calibrate_model(params, CFG, model_id="toy")
    path = tmp_path / "p.safetensors"
    bq.save_profile(prof, path)
    back = bq.load_profile(path, params=params, config=CFG)
    assert back.checkpoint_hash == prof.checkpoint_hash and back.config == CFG
    for name, r in prof.results.items():
        b = back.results[name]
        for u, v in zip(jax.tree.leaves(r.quantized), jax.tree.leaves(b.quantized), strict=True):
            assert _bytes(u) == _bytes(v) and u.dtype == v.dtype
        assert (b.block_size, b.mse_before, b.mse_after, b.clipped) == (
            r.block_size,
            r.mse_before,
            r.mse_after,
            r.clipped,
        )


def _saved(tmp_path, params):
    path = tmp_path / "p.safetensors"
    bq.save_profile(bq.calibrate_model(params, CFG), path)
    return path


@pytest.mark.parametrize("where", ["header", "middle", "end"])
def test_flipped_byte_refused(tmp_path, where):
    params = _params()
    path = _saved(tmp_path, params)
    blob = bytearray(path.read_bytes())
    i = {"header": 40, "middle": len(blob) // 2, "end": len(blob) - 1}[where]
    blob[i] ^= 0x01
    path.write_bytes(bytes(blob))
    ok, why = bq.profile_valid(path, params=params)
    assert not ok and why
    with pytest.raises(profiles.ProfileError):
        bq.load_profile(path)


def test_truncated_refused(tmp_path):
    params = _params()
    path = _saved(tmp_path, params)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) - 100])
    ok, why = bq.profile_valid(path)
    assert not ok and "corrupt or truncated" in why


def test_schema_version_refused(tmp_path, monkeypatch):
    params = _params()
    path = tmp_path / "p.safetensors"
    prof = bq.calibrate_model(params, CFG)
    monkeypatch.setattr(prof, "schema_version", 99)
    bq.save_profile(prof, path)
    ok, why = bq.profile_valid(path)
    assert not ok and "schema version 99" in why


def test_changed_checkpoint_and_config_refused_then_recalibrated(tmp_path):
    params = _params()
    path = _saved(tmp_path, params)
    assert bq.profile_valid(path, params=params, config=CFG)[0]
    changed = jax.tree.map(lambda a: a, params)
    k = np.asarray(changed["layer_0"]["kernel"]).copy()
    k.reshape(-1).view(np.uint8)[12345] ^= 0x01  # one byte of one weight
    changed["layer_0"]["kernel"] = jnp.asarray(k)
    ok, why = bq.profile_valid(path, params=changed)
    assert not ok and "weights changed" in why
    other = bq.CalibrationConfig(format=QuantFormat.FP4, progress=False)
    assert not bq.profile_valid(path, params=params, config=other)[0]
    # The high-level API recalibrates and rewrites a valid profile.
    _, prof = bq.quantize_with_calibration(changed, CFG, profile_path=path)
    assert bq.profile_valid(path, params=changed, config=CFG)[0]
    assert prof.checkpoint_hash == bq.calibration.checkpoint_hash(changed)


def test_concurrent_writers_leave_a_valid_profile(tmp_path):
    path = tmp_path / "p.safetensors"
    profs = [bq.calibrate_model(_params(s), CFG, model_id=str(s)) for s in range(4)]
    errors = []

    def write(i):
        try:
            for _ in range(5):
                bq.save_profile(profs[i % 4], path)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    back = bq.load_profile(path)
    assert back.model_id in {"0", "1", "2", "3"}
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".jax_bq_profile.")]


def test_semantic_alignment():
    rng = np.random.default_rng(9)
    ref = rng.standard_normal((50, 384))
    rep = bq.validate_semantic_alignment(
        lambda q: ref, lambda q: ref + 1e-3 * rng.standard_normal(ref.shape), None
    )
    assert rep.pearson > 0.999 and rep.cosine > 0.999
    with pytest.raises(bq.SemanticDrift, match="Pearson"):
        bq.validate_semantic_alignment(
            lambda q: ref, lambda q: ref + rng.standard_normal(ref.shape), None
        )
