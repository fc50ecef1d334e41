"""The fused inference block (``BertEncoder(fused=True)``) against the plain one.

Ragged batches throughout (sequences of 32, 20, 7 and 1 tokens, right-padded):
the fused block passes padding to attention as sequence lengths, so masked
keys must not leak into valid tokens, and padded positions must not move the
pooled embedding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_bq.flax import WeightQuant, calibrate_activation_scales, quantize_model_weights
from jax_bq.models import BertConfig, BertEncoder, random_bert_params
from jax_bq.models import fused as fused_block

CFG = BertConfig(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512)
_CACHE: dict = {}
LENGTHS = np.array([32, 20, 7, 1])


@pytest.fixture(scope="module")
def setup():
    p32 = random_bert_params(CFG, seed=0)
    # Nonzero biases and LayerNorm shifts, so every epilogue term matters.
    p32 = jax.tree_util.tree_map(lambda a: a + 0.02 if a.ndim == 1 else a, p32)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1000, 30000, (4, 32)), jnp.int32)
    mask = jnp.asarray((np.arange(32)[None] < LENGTHS[:, None]).astype(np.int32))
    pq = quantize_model_weights(p32, [("kernel$", WeightQuant("fp8_e4m3", "per_tensor"))])
    pqs, _ = calibrate_activation_scales(BertEncoder(CFG), pq, [(ids, mask)], margin=2.0)
    return p32, pqs, ids, mask


def _embed(params, ids, mask, key=None, **kw):
    """Embeddings (memoized by ``key``: each variant compiles once per test session)."""
    if key is not None and key in _CACHE:
        return _CACHE[key]
    model = BertEncoder(CFG, **kw)
    out = np.asarray(model.apply({"params": params}, ids, mask))
    if key is not None:
        _CACHE[key] = out
    return out


def test_fused_float_block_is_the_plain_block(setup):
    p32, _, ids, mask = setup
    ref = _embed(p32, ids, mask, "f32")
    np.testing.assert_allclose(_embed(p32, ids, mask, fused=True), ref, atol=2e-6)
    # tanh GELU differs from erf by < 1e-3 per activation.
    np.testing.assert_allclose(_embed(p32, ids, mask, fused=True, gelu="tanh"), ref, atol=1e-4)


@pytest.mark.parametrize("gelu", ["exact", "tanh"])
def test_fused_fp8_block_tracks_the_plain_fp8_block(setup, gelu):
    p32, pqs, ids, mask = setup
    plain = _embed(pqs, ids, mask, "fp8")
    fused = _embed(pqs, ids, mask, f"fused-{gelu}", fused=True, gelu=gelu)
    cos = np.sum(plain * fused, axis=1)
    assert cos.min() > 0.9999, cos
    ref = _embed(p32, ids, mask, "f32")
    assert np.sum(ref * fused, axis=1).min() > 0.999


def test_padding_does_not_leak(setup):
    _, pqs, ids, mask = setup
    noisy = jnp.where(mask.astype(bool), ids, 4242)  # other tokens in the padded slots
    a = _embed(pqs, ids, mask, "fused-tanh", fused=True, gelu="tanh")
    b = _embed(pqs, noisy, mask, fused=True, gelu="tanh")
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_fused_dynamic_per_token(setup):
    p32, _, ids, mask = setup
    pq = quantize_model_weights(p32, [("kernel$", WeightQuant("fp8_e4m3"))])
    out = _embed(pq, ids, mask, fused=True, act_granularity="per_token")
    ref = _embed(p32, ids, mask, "f32")
    assert np.sum(ref * out, axis=1).min() > 0.999


def test_bad_gelu_raises(setup):
    p32, _, ids, mask = setup
    with pytest.raises(ValueError, match="gelu must be one of"):
        BertEncoder(CFG, fused=True, gelu="relu").apply({"params": p32}, ids, mask)


def test_attention_falls_back_to_xla_visibly_off_gpu():
    if jax.default_backend() == "gpu":
        assert fused_block.attention_impl(jnp.bfloat16) == "cudnn"
    assert fused_block.attention_impl(jnp.float32) == "xla"


@pytest.mark.gpu  # the fused path's custom calls run on the GPU (CPU lowers the reference)
def test_gpu_hlo_has_the_custom_calls_and_no_gelu_or_layernorm_fusions(setup):
    _, pqs, ids, mask = setup
    from jax_bq.flax import cast_float_params

    params = cast_float_params(pqs, jnp.bfloat16)
    model = BertEncoder(CFG, jnp.bfloat16, fused=True, gelu="tanh")
    hlo = (
        jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))
        .lower(params, ids, mask)
        .compile()
        .as_text()
    )
    assert hlo.count('custom_call_target="jax_bq_qmatmul"') == 6 * CFG.num_layers
    assert hlo.count('custom_call_target="jax_bq_layernorm_quantize"') >= 2 * CFG.num_layers
    assert " tanh(" not in hlo and " erf(" not in hlo  # GELU ran in the GEMM epilogue
    assert "cudnn" in hlo.lower()  # the fused attention
