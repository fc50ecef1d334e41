"""The fidelity term of the QAT training step (``make_train_step(fidelity_weight=)``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_bq.models import BertConfig
from jax_bq.models.finetune import encoder_for_mode, make_train_step

TINY = BertConfig(vocab_size=256, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=128)


def test_fidelity_weight_needs_a_qat_module():
    module = encoder_for_mode(TINY, "bf16", dtype=jnp.float32)
    with pytest.raises(ValueError, match="fidelity_weight=1.0 needs a QAT module"):
        make_train_step(module, optax.adam(1e-3), fidelity_weight=1.0)
    qat = encoder_for_mode(TINY, "qat_fp8", dtype=jnp.float32)
    with pytest.raises(ValueError, match="fidelity_weight must be >= 0, got -1.0"):
        make_train_step(qat, optax.adam(1e-3), fidelity_weight=-1.0)


def _batch(rng, batch=8, seq=8):
    q = rng.integers(5, TINY.vocab_size, (batch, seq)).astype(np.int32)
    d = np.where(rng.random((batch, seq)) < 0.25, rng.integers(5, TINY.vocab_size), q)
    mask = np.ones((batch, seq), np.int32)
    return q, mask, d.astype(np.int32), mask


def _train(fidelity_weight, steps=10):
    """Trains the tiny QAT encoder: (first loss, mean of the last 4, strict cosine gap)."""
    module = encoder_for_mode(TINY, "qat_fp8", dtype=jnp.float32)
    rng = np.random.default_rng(0)
    batches = [_batch(rng) for _ in range(4)]
    params = module.init(jax.random.PRNGKey(0), *batches[0][:2])["params"]
    opt = optax.adam(1e-3)
    state = opt.init(params)
    step = make_train_step(module, opt, fidelity_weight=fidelity_weight)
    losses = []
    for i in range(steps):
        params, state, loss = step(params, state, *batches[i % 4])
        losses.append(float(loss))
    # Strict fidelity on unseen texts: the quantized forward vs the float forward of the
    # same master weights.
    ref = module.clone(qat=None, act_format=None)
    ids, mask = _batch(rng)[:2]

    @jax.jit
    def gap(params):
        a = module.apply({"params": params}, ids, mask)
        b = ref.apply({"params": params}, ids, mask)
        cos = jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1))
        return jnp.mean(1 - cos)

    return losses[0], np.mean(losses[-4:]), float(gap(params))


def test_fidelity_weight_closes_the_gap_between_quantized_and_float_forwards():
    first0, last0, plain = _train(0.0)
    first, last, gap = _train(50.0)
    assert first == first0  # same start, same batches
    assert last < 0.7 * first, (first, last)  # it still learns the task
    assert gap < 0.5 * plain, (gap, plain)


def test_step_parts_split_the_total_into_contrastive_and_fidelity():
    """``loss`` is the contrastive part only; ``with_parts`` also gives G and L + w G."""
    module = encoder_for_mode(TINY, "qat_fp8", dtype=jnp.float32)
    rng = np.random.default_rng(1)
    batch = _batch(rng)
    params = module.init(jax.random.PRNGKey(0), *batch[:2])["params"]
    opt = optax.adam(1e-3)
    state = opt.init(params)
    w = 30.0
    _, _, loss = make_train_step(module, opt, fidelity_weight=w)(params, state, *batch)
    new, _, parts = make_train_step(module, opt, fidelity_weight=w, with_parts=True)(
        params, state, *batch
    )
    assert set(parts) == {"contrastive", "fidelity", "total"}
    assert float(parts["contrastive"]) == float(loss)
    assert float(parts["fidelity"]) > 0
    np.testing.assert_allclose(
        float(parts["total"]), float(loss) + w * float(parts["fidelity"]), rtol=1e-6
    )
    _, _, plain = make_train_step(module, opt, with_parts=True)(params, state, *batch)
    assert float(plain["fidelity"]) == 0.0
    assert float(plain["total"]) == float(plain["contrastive"])
