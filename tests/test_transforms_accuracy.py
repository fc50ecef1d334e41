"""Accuracy transforms: Hadamard matrices, exact folds, GPTQ vs RTN, recipes.

The FWHT op itself (kernels vs twin) is tested in tests/ops/test_hadamard.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jax_bq.flax.rules import WeightQuant, quantize_model_weights
from jax_bq.models import BertConfig, BertEncoder, SentenceEncoder, random_bert_params
from jax_bq.transforms import (
    block_rotation,
    collect_layer_stats,
    fold_value_rotation,
    gptq_quantize,
    hadamard_matrix,
    layer_error,
    rotate_ffn_output,
)
from jax_bq.transforms.smoothquant import smooth_value_output

TINY = BertConfig(
    vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
    max_position_embeddings=32, max_seq_length=16,
)  # fmt: skip


@pytest.mark.parametrize("n", [2, 4, 16, 128, 1024])
def test_hadamard_matrices_are_orthogonal_and_symmetric(n):
    h = hadamard_matrix(n)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
    np.testing.assert_array_equal(h, h.T)
    np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n))
    r = block_rotation(n * 3, n, np.where(np.arange(n * 3) % 3, 1.0, -1.0))
    np.testing.assert_allclose(r @ r.T, np.eye(3 * n), atol=1e-12)


@pytest.fixture(scope="module")
def tiny():
    params = random_bert_params(TINY, seed=1)
    rng = np.random.default_rng(0)
    # Larger weights than BERT's init so the blocks do something non-trivial.
    params = jax.tree_util.tree_map(lambda a: a * 10 if a.ndim == 2 else a, params)
    ids = jnp.asarray(rng.integers(0, TINY.vocab_size, (4, 16)), jnp.int32)
    mask = jnp.asarray(np.arange(16)[None, :] < np.array([16, 11, 7, 3])[:, None], jnp.int32)
    return params, ids, mask


def _run(cfg, params, ids, mask):
    return np.asarray(BertEncoder(cfg).apply({"params": params}, ids, mask, pool=False))


def test_folds_are_exact_in_float32(tiny):
    params, ids, mask = tiny
    ref = _run(TINY, params, ids, mask)
    p = fold_value_rotation(params, TINY.num_heads, seed=3)
    np.testing.assert_allclose(_run(TINY, p, ids, mask), ref, atol=1e-5)
    p = rotate_ffn_output(p, 64, seed=3)
    cfg = dataclasses.replace(TINY, ffn_hadamard_block=64)
    np.testing.assert_allclose(_run(cfg, p, ids, mask), ref, atol=1e-5)
    stats = collect_layer_stats(BertEncoder(cfg), p, [(ids, mask)])
    p2, chosen = smooth_value_output(p, stats, "fp8_e4m3", alphas=(0.5,))
    # Force a fold even where smoothing did not win, so the test always checks one.
    if all(c is None for c in chosen.values()):
        p2, chosen = smooth_value_output(p, stats, "fp8_e4m3", alphas=(0.5,), act_format="bf16")
    np.testing.assert_allclose(_run(cfg, p2, ids, mask), ref, atol=1e-5)


def test_layer_stats_hessian_is_xtx_of_unmasked_rows(tiny):
    params, ids, mask = tiny
    stats = collect_layer_stats(BertEncoder(TINY), params, [(ids, mask)], sample_stride=1)
    s = stats["layer_0/query"]
    assert s.tokens == int(np.sum(mask)) == len(s.samples)
    want = s.samples.T.astype(np.float64) @ s.samples
    np.testing.assert_allclose(s.hessian, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert set(stats) == {
        f"layer_{i}/{d}"
        for i in range(2)
        for d in ("query", "key", "value", "attention_output", "intermediate", "output")
    }


SPECS = [
    WeightQuant("nvfp4", calibrate=True),
    WeightQuant("fp8_e4m3"),
    WeightQuant("fp4", block_size=32),
    WeightQuant("mxfp4"),
]


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    spec=st.sampled_from(SPECS),
    k=st.sampled_from([32, 64, 96]),
    corr=st.floats(0.0, 0.95),
)
def test_gptq_never_worse_than_rtn(seed, spec, k, corr):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((256, k))
    x = x + corr * x[:, :1]  # correlated inputs
    w = rng.standard_normal((16, k)).astype(np.float32)
    h = x.T @ x
    r = gptq_quantize(w, h, spec)
    rtn = quantize_model_weights({"d": {"kernel": jnp.asarray(w.T)}}, [("kernel$", spec)])
    e_rtn = layer_error(w, np.asarray(jax_bq_dequantize(rtn["d"]["kernel"])), h)
    e_got = layer_error(w, np.asarray(jax_bq_dequantize(r.quantized)), h)
    assert e_got <= e_rtn * (1 + 1e-9)
    np.testing.assert_allclose(r.error_rtn, e_rtn, rtol=1e-9)
    # Same scales as RTN: GPTQ only chooses codes.
    np.testing.assert_array_equal(
        np.asarray(r.quantized.scales), np.asarray(rtn["d"]["kernel"].scales)
    )


def jax_bq_dequantize(q):
    from jax_bq import dequantize

    return dequantize(q, jnp.float32)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.format)
def test_gptq_beats_rtn_on_correlated_inputs(spec):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((512, 128)) @ rng.standard_normal((128, 128))
    w = rng.standard_normal((32, 128)).astype(np.float32)
    r = gptq_quantize(w, x.T @ x, spec)
    assert r.used_gptq and r.error_gptq < 0.8 * r.error_rtn


def test_gptq_rejects_bad_shapes():
    with pytest.raises(ValueError, match="W \\[N, K\\] and H \\[K, K\\]"):
        gptq_quantize(np.zeros((4, 8), np.float32), np.eye(4), "nvfp4")


def test_recipes_reject_models_they_cannot_transform(tiny):
    from jax_bq.recipes import quantize_with_recipe

    params, _, _ = tiny
    enc = SentenceEncoder(TINY, params, None)
    with pytest.raises(ValueError, match="unknown recipe"):
        quantize_with_recipe(enc, "int3_magic", ["x"])
    with pytest.raises(ValueError, match="SentenceEncoder"):
        quantize_with_recipe(object(), "fp8_gptq", ["x"])
    q = SentenceEncoder(TINY, quantize_model_weights(params, "fp8_e4m3"), None)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_with_recipe(q, "fp8_gptq", ["x"])
    odd = dataclasses.replace(TINY, intermediate_size=200)
    with pytest.raises(ValueError, match="power-of-two block"):
        quantize_with_recipe(
            SentenceEncoder(odd, random_bert_params(odd), None), "fp8_rotate", ["x"]
        )
    with pytest.raises(ValueError, match="fused block"):
        quantize_with_recipe(SentenceEncoder(TINY, params, None, fused=True), "fp8_rotate", ["x"])
    with pytest.raises(ValueError, match="layer_1/output/kernel is missing"):
        broken = dict(params, layer_1={k: v for k, v in params["layer_1"].items() if k != "output"})
        quantize_with_recipe(SentenceEncoder(TINY, broken, None), "nvfp4_gptq", ["x"])
    rotated = rotate_ffn_output(params, 64)
    with pytest.raises(ValueError, match="already rotated"):
        quantize_with_recipe(SentenceEncoder(TINY, rotated, None), "fp8_gptq", ["x"])


class _CharTokenizer:
    """Stand-in tokenizer for TINY: one id per character, padded to 16."""

    def encode_batch(self, texts):
        from types import SimpleNamespace

        out = []
        for t in texts:
            ids = [1 + ord(c) % (TINY.vocab_size - 1) for c in t][:16]
            pad = 16 - len(ids)
            out.append(
                SimpleNamespace(ids=ids + [0] * pad, attention_mask=[1] * len(ids) + [0] * pad)
            )
        return out


def test_recipe_end_to_end_on_tiny_model(tiny):
    from jax_bq.qtensor import QuantizedTensor
    from jax_bq.recipes import RECIPES, fidelity_report, quantize_with_recipe

    params, _, _ = tiny
    enc = SentenceEncoder(TINY, params, _CharTokenizer())
    rng = np.random.default_rng(3)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "sigma", "omega", "theta"]
    texts = [" ".join(rng.choice(words, 3)) for _ in range(24)]
    r = quantize_with_recipe(
        enc, "nvfp4_full", texts[:16], eval_corpus=texts[16:22], eval_queries=texts[22:]
    )
    assert r.recipe is RECIPES["nvfp4_full"] and r.steps["rotate_ffn_block"] == 256
    assert r.encoder.config.ffn_hadamard_block == 256
    assert isinstance(r.encoder.params["layer_1"]["output"]["kernel"], QuantizedTensor)
    assert r.calibration_seconds > 0 and r.calibration_cpu_seconds > 0
    f = r.fidelity
    assert 0.9 < f.cosine <= 1.0 + 1e-6 and f.kernel_bytes < f.kernel_bytes_fp32 / 4
    ref = enc.embed(texts[16:])
    again = fidelity_report(enc, r.encoder, texts[16:22], texts[22:], ref_embeddings=ref)
    assert again.cosine == f.cosine and again.top10 == f.top10
    rtn = quantize_with_recipe(enc, "fp8_tok_rtn", texts[:16])  # no statistics needed
    assert "collect_seconds" not in rtn.steps and r.steps["collect_seconds"] > 0
    assert rtn.encoder.act_granularity == "per_token"
    with pytest.raises(ValueError, match="ref_embeddings has shape"):
        fidelity_report(enc, r.encoder, texts[16:22], texts[22:], ref_embeddings=ref[:3])
