"""QAT and frozen-quantized training of the Flax layers, and a tiny contrastive fine-tune."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jax_bq
from jax_bq.flax import QDense, quantize_model_weights
from jax_bq.flax.nnx import QLinear
from jax_bq.models import BertConfig
from jax_bq.models.finetune import contrastive_loss, encoder_for_mode, make_train_step
from jax_bq.qat import explain_step, qat_matmul


def _x(shape, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _rel(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("grads", ["bf16", "fp8"])
def test_qdense_qat_grads_match_dense(grads):
    x = _x((4, 8, 64))
    dense = nn.Dense(32)
    params = dense.init(jax.random.PRNGKey(1), x)["params"]
    qat = QDense(32, qat="fp8_e4m3", qat_grads=grads, act_format="fp8_e4m3")

    def loss(module, p, x):
        return jnp.sum(jnp.tanh(module.apply({"params": p}, x)))

    gp, gx = jax.jit(jax.grad(lambda p, x: loss(qat, p, x), argnums=(0, 1)))(params, x)
    rp, rx = jax.grad(lambda p, x: loss(dense, p, x), argnums=(0, 1))(params, x)
    assert _rel(gp["kernel"], rp["kernel"]) < 0.1
    assert _rel(gp["bias"], rp["bias"]) < 0.05
    assert _rel(gx, rx) < 0.1
    # Same param tree as nn.Dense: a checkpoint loads unchanged.
    assert jax.tree_util.tree_structure(gp) == jax.tree_util.tree_structure(rp)


def test_qdense_frozen_quantized_grads_to_input_and_bias():
    x = _x((8, 64))
    params = nn.Dense(32).init(jax.random.PRNGKey(1), x)["params"]
    qparams = quantize_model_weights(params, "fp8_e4m3")
    layer = QDense(32, act_format="bf16")

    def loss(p, x):
        return jnp.sum(layer.apply({"params": p}, x) ** 2)

    gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(qparams, x)
    y = layer.apply({"params": qparams}, x)
    np.testing.assert_allclose(np.asarray(gp["bias"]), np.asarray(jnp.sum(2 * y, 0)), rtol=1e-5)
    w = jax_bq.dequantize(qparams["kernel"], jnp.float32)  # [N, K]
    assert _rel(gx, (2 * y) @ w) < 1e-2
    # The frozen codes get a zero gradient (stop_gradient), never an error.
    assert not np.any(np.asarray(gp["kernel"].scales))


def test_nnx_qlinear_qat_grads_match_linear():
    x = _x((16, 64))
    lin = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
    q = QLinear.from_linear(lin, qat="fp8_e4m3", act_format="fp8_e4m3")

    def loss(m, x):
        return jnp.sum(jnp.tanh(m(x)))

    gq = nnx.grad(loss)(q, x)
    gl = nnx.grad(loss)(lin, x)
    assert _rel(gq.kernel[...], gl.kernel[...]) < 0.1
    assert _rel(gq.bias[...], gl.bias[...]) < 0.05


TINY = BertConfig(vocab_size=256, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=128)


def _pairs(rng, batch, seq):
    """Documents are their queries with a quarter of the tokens replaced: learnable pairs."""
    q = rng.integers(5, TINY.vocab_size, (batch, seq)).astype(np.int32)
    d = np.where(rng.random((batch, seq)) < 0.25, rng.integers(5, TINY.vocab_size), q)
    mask = np.ones((batch, seq), np.int32)
    return q, mask, d.astype(np.int32), mask


@pytest.mark.parametrize("mode", ["fp8_train"])
def test_tiny_finetune_lowers_the_loss(mode):
    module = encoder_for_mode(TINY, mode, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    q, m, _, _ = _pairs(rng, 8, 16)
    params = module.init(jax.random.PRNGKey(0), q, m)["params"]
    opt = optax.adam(3e-3)
    state = opt.init(params)
    step = make_train_step(module, opt)
    fixed = [_pairs(rng, 8, 16) for _ in range(4)]
    loss = jax.jit(lambda p, b: make_loss(module, p, b))
    first = float(np.mean([loss(params, b) for b in fixed]))
    for i in range(20):
        params, state, _ = step(params, state, *fixed[i % 4])
    last = float(np.mean([loss(params, b) for b in fixed]))
    assert last < 0.7 * first, (first, last)
    # The backward products of the FP8 training step run through qmatmul with E5M2.
    text = explain_step(step, params, state, *fixed[0])
    assert "fp8_e5m2" in text and "fp8_e4m3 per_tensor" in text


def make_loss(module, params, batch):
    q_ids, q_mask, d_ids, d_mask = batch
    q = module.apply({"params": params}, q_ids, q_mask)
    d = module.apply({"params": params}, d_ids, d_mask)
    return contrastive_loss(q, d)


def test_snap_weights_projects_kernels_onto_the_grid():
    from jax_bq.qat import snap_weights

    rng = np.random.default_rng(5)
    params = {
        "dense": {
            "kernel": jnp.asarray(rng.standard_normal((24, 16)), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal((16,)), jnp.float32),
        }
    }
    snapped = snap_weights(params, "fp8_e4m3")
    k = snapped["dense"]["kernel"]
    assert k.shape == (24, 16) and k.dtype == jnp.float32
    q = quantize_model_weights(params, "fp8_e4m3")["dense"]["kernel"]  # [N, K]
    np.testing.assert_array_equal(np.asarray(k), np.asarray(jax_bq.dequantize(q, jnp.float32)).T)
    assert not np.array_equal(np.asarray(k), np.asarray(params["dense"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(snapped["dense"]["bias"]), params["dense"]["bias"])
    # A fixed point: the quantized forward of the exported weights is the same model.
    again = snap_weights(snapped, "fp8_e4m3")
    np.testing.assert_array_equal(np.asarray(again["dense"]["kernel"]), np.asarray(k))
    x = jnp.asarray(rng.standard_normal((4, 24)), jnp.float32)
    wq = quantize_model_weights(snapped, "fp8_e4m3")["dense"]["kernel"]
    y_q = jax_bq.qmatmul(x, wq, out_dtype=jnp.float32, act_format="bf16")
    y_f = x.astype(jnp.bfloat16).astype(jnp.float32) @ k.astype(jnp.bfloat16).astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(y_q), np.asarray(y_f), rtol=1e-5, atol=1e-5)


def _count_eqns(jaxpr, name: str) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += _count_eqns(inner, name)
    return n


def test_fp8_grad_trace_is_lean(monkeypatch):
    """Tracing the FP8 training step: no tracer asked for its devices, one weight quantize.

    ``Tracer.devices()`` raises an error whose message walks the whole jaxpr
    traced so far: asked once per qmatmul plan, tracing the E5-large step took
    minutes (quadratic). The backward ``dx`` product reuses the forward's
    per-tensor E4M3 weight instead of quantizing the master again.
    """
    asked = []
    monkeypatch.setattr(jax.core.Tracer, "devices", lambda self: asked.append(1) or set())
    x, w = _x((16, 64)), _x((32, 64), seed=1)

    def loss(x, w):
        y = qat_matmul(
            x,
            w,
            w_format="fp8_e4m3",
            w_granularity="per_tensor",
            act_format="fp8_e4m3",
            act_granularity="per_tensor",
            grads="fp8",
        )
        return jnp.sum(y.astype(jnp.float32) ** 2)

    closed = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, w)
    assert not asked
    # Forward: the weight (its activations are quantized inside qmatmul); backward: the
    # activations for dw. Both backward products run through qmatmul with E5M2 gradients.
    assert _count_eqns(closed.jaxpr, "jax_bq_quantize") == 2
    assert _count_eqns(closed.jaxpr, "jax_bq_qmatmul") == 3
    from jax_bq.qat import explain_jaxpr

    text = explain_jaxpr(closed)
    assert text == explain_step(jax.grad(loss, argnums=(0, 1)), x, w)
    assert text.count("fp8_e5m2") == 2, text


def test_qmatmul_workspace_size_is_asked_once_per_config(monkeypatch):
    """The CUDA module's workspace formula runs once per config, not at every bind."""
    from types import SimpleNamespace

    from jax_bq import _native
    from jax_bq.formats import Granularity, QuantFormat
    from jax_bq.primitives import qmatmul as qp

    calls = []
    module = SimpleNamespace(qmatmul_workspace_bytes=lambda *a: calls.append(a) or 4096)
    monkeypatch.setattr(_native, "CUDA", SimpleNamespace(loaded=True, module=module))
    qp._workspace_bytes.cache_clear()
    cfg = qp.QmmConfig(
        qp.CUBLAS_FP8,
        4096,
        1024,
        1024,
        QuantFormat.FP8_E4M3,
        Granularity.PER_TENSOR,
        (),
        True,
        QuantFormat.FP8_E4M3,
        qp.ACT_TENSOR,
        (),
        None,
        np.dtype(jnp.bfloat16),
    )
    try:
        assert [cfg.workspace_bytes() for _ in range(3)] == [4096] * 3
        assert len(calls) == 1
        assert dataclasses.replace(cfg, m=8).workspace_bytes() == 4096
        assert len(calls) == 2  # another shape, another question
    finally:
        qp._workspace_bytes.cache_clear()
