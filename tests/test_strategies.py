"""Per-operator strategies (jax_bq.strategies) on a tiny BERT encoder, Linen and NNX."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flax", reason="flax not installed (pip install -e '.[flax]')")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from jax_bq.dynamic import DynamicQuantConfig, WeightOnly, decode_precision  # noqa: E402
from jax_bq.flax import QLinear, WeightQuant  # noqa: E402
from jax_bq.flax.dynamic_dense import QuantState  # noqa: E402
from jax_bq.flax.nnx import _value  # noqa: E402
from jax_bq.models.bert import BertConfig, BertEncoder  # noqa: E402
from jax_bq.models.loading import random_bert_params  # noqa: E402
from jax_bq.qtensor import QuantizedTensor  # noqa: E402
from jax_bq.strategies import (  # noqa: E402
    PRESETS,
    AdaptivePrecisionSelector,
    MixedPrecisionConfig,
    OperatorPrecision,
    OperatorType,
    SelectorContext,
    apply_strategy,
    apply_strategy_nnx,
    explain_strategy,
    preset,
)

CFG = BertConfig(
    vocab_size=64, hidden_size=32, num_layers=4, num_heads=2, intermediate_size=64,
    max_position_embeddings=32,
)  # fmt: skip
PARAMS = random_bert_params(CFG, seed=1)
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)
MASK = jnp.ones_like(IDS)
MODEL = BertEncoder(CFG)
# fp8_balanced: dynamic W8A8 everywhere; layerwise_gradient: fp16 casts, FP8 and W4A16 mixed.
RUN_PRESETS = ("fp8_balanced", "layerwise_gradient")


def _leaf(params, path):
    node = params
    for k in path.split("/"):
        node = node[k]
    return node


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_through_rules(name):
    cfg = preset(name, CFG.num_layers)
    params = apply_strategy(PARAMS, cfg)
    for layer in range(CFG.num_layers):
        for op, dense in (
            (OperatorType.Q_PROJ, "query"),
            (OperatorType.FFN_UP, "intermediate"),
            (OperatorType.FFN_DOWN, "output"),
        ):
            prec = cfg.precision_for(op, layer)
            node = params[f"layer_{layer}"][dense]
            k = node["kernel"]
            if prec.weight in ("fp16", "bf16"):
                assert k.dtype == jnp.dtype(
                    prec.weight.replace("fp", "float").replace("bf", "bfloat")
                )
            elif prec.weight is None:
                assert k.dtype == jnp.float32
            else:
                fmt = prec.weight.format if isinstance(prec.weight, WeightQuant) else prec.weight
                assert isinstance(k, QuantizedTensor) and k.format.value == str(
                    getattr(fmt, "value", fmt)
                )
            assert node.get("act_quant") == prec.act
    if name in RUN_PRESETS:  # running the encoder costs a compile; two presets cover the paths
        y = jax.jit(lambda p: MODEL.apply({"params": p}, IDS, MASK))(params)
        ref = MODEL.apply({"params": PARAMS}, IDS, MASK)
        cos = np.sum(np.asarray(y) * np.asarray(ref), axis=1)
        assert np.all(cos > 0.9), (name, cos)
    text = explain_strategy(cfg, params)
    assert "layer_0/query/kernel" in text


def test_explain_says_fallback_per_operator():
    cfg = preset("nvfp4_blackwell")
    text = explain_strategy(cfg, apply_strategy(PARAMS, cfg))
    lines = [ln for ln in text.splitlines() if "/kernel" in ln]
    assert len(lines) == 6 * CFG.num_layers
    # CPU: no tensor cores; every operator says so and which rung runs.
    assert all("NOT native on this device" in ln and "dequant_dot" in ln for ln in lines)
    hybrid = explain_strategy(
        preset("hybrid_long_context"), apply_strategy(PARAMS, preset("hybrid_long_context"))
    )
    assert "kv_cache: set but not applied: an encoder has no KV cache" in hybrid


def test_from_plan_rules_take_precedence():
    base = preset("fp8_balanced")
    path = "layer_2/output/kernel"

    class Plan:  # the fields from_plan reads, as plan_mixed_precision returns them
        rules = [(f"^{path}$", None)]
        kept = [path]
        metric, target = "cosine", 0.999

    cfg = MixedPrecisionConfig.from_plan(Plan, base)
    p = apply_strategy(PARAMS, cfg)
    assert _leaf(p, path).dtype == jnp.float32
    assert isinstance(_leaf(p, "layer_1/output/kernel"), QuantizedTensor)


def test_linen_fallback_and_ema_state():
    act = DynamicQuantConfig(granularity="per_tensor", ema_decay=0.5)
    cfg = MixedPrecisionConfig(
        "t", {op: OperatorPrecision("fp8_e4m3", act) for op in ("q_proj", "ffn_up")}
    )
    params = apply_strategy(PARAMS, cfg)

    @jax.jit
    def step(p, state):
        return MODEL.apply(
            {"params": p, **state}, IDS, MASK, mutable=["quant_state", "intermediates"]
        )

    _, s1 = step(params, {})
    _, s2 = step(params, {"quant_state": s1["quant_state"]})
    e1 = s1["quant_state"]["layer_0"]["query"]["ema"]
    e2 = s2["quant_state"]["layer_0"]["query"]["ema"]
    assert int(e1.count) == 1 and int(e2.count) == 2
    np.testing.assert_allclose(float(e2.value), float(e1.value), rtol=1e-6)  # same input
    codes = s1["intermediates"]["layer_0"]["query"]["dyn_precision"][0]
    assert decode_precision(codes) == "fp8_e4m3"
    # Read-only state: used, not updated.
    y = MODEL.apply({"params": params, "quant_state": s2["quant_state"]}, IDS, MASK)
    assert np.all(np.isfinite(np.asarray(y)))


def test_linen_fallback_on_stored_fp16_copy():
    act = DynamicQuantConfig(fallback_weight="fp16")
    cfg = MixedPrecisionConfig("t", {"q_proj": OperatorPrecision("fp8_e4m3", act)})
    params = apply_strategy(PARAMS, cfg)
    copy = params["layer_0"]["query"]["fallback_kernel"]
    assert copy.dtype == jnp.float16 and copy.shape == PARAMS["layer_0"]["query"]["kernel"].shape
    np.testing.assert_array_equal(
        np.asarray(copy), np.asarray(PARAMS["layer_0"]["query"]["kernel"].astype(jnp.float16))
    )
    assert (
        "fallback_kernel" not in apply_strategy(PARAMS, preset("fp8_balanced"))["layer_0"]["query"]
    )
    # A query input with an outlier channel: the layer's fallback fires and uses the copy.
    from jax_bq.flax import QDense

    h = jnp.asarray(np.random.default_rng(2).standard_normal((2, 16, 32)), jnp.float32)
    h = h.at[..., 3].multiply(1000.0)
    layer = params["layer_0"]["query"]
    y, st = jax.jit(
        lambda p, h: QDense(32, dtype=jnp.float32).apply(
            {"params": p}, h, mutable=["intermediates"]
        )
    )(layer, h)
    assert decode_precision(st["intermediates"]["dyn_precision"][0]) == "fp16"
    h16 = h.astype(jnp.float16).astype(jnp.float32)
    ref = jnp.einsum("...k,kn->...n", h16, copy.astype(jnp.float32)) + layer["bias"]
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-2)


class _Tiny(nnx.Module):
    def __init__(self, rngs):
        self.query = nnx.Linear(32, 32, rngs=rngs)
        self.intermediate = nnx.Linear(32, 64, rngs=rngs)

    def __call__(self, x):
        return self.intermediate(self.query(x))


def test_nnx_strategy_ema_and_fallback():
    act = DynamicQuantConfig(granularity="per_tensor", ema_decay=0.5)
    cfg = MixedPrecisionConfig(
        "t",
        {
            "q_proj": OperatorPrecision("fp8_e4m3", act),
            "ffn_up": OperatorPrecision("fp8_e4m3", "bf16"),
        },
    )
    model = apply_strategy_nnx(_Tiny(nnx.Rngs(0)), cfg)
    assert isinstance(model.query, QLinear) and isinstance(model.query.quant_state, QuantState)
    assert model.intermediate.act_quant == WeightOnly("bf16")
    step = nnx.jit(lambda m, x: m(x))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 32)), jnp.float32)
    step(model, x)
    v1 = float(_value(model.query.quant_state).value)
    step(model, 3 * x)
    st = _value(model.query.quant_state)
    assert int(st.count) == 2
    np.testing.assert_allclose(float(st.value), 2 * v1, rtol=1e-6)  # 0.5 v1 + 0.5 (3 v1)
    assert decode_precision(_value(model.query.dyn_precision)) == "fp8_e4m3"
    step(model, x.at[:, 3].multiply(1000.0))
    assert decode_precision(_value(model.query.dyn_precision)) == "fp16"


def test_selector_inside_jit():
    sel = AdaptivePrecisionSelector()
    x = jnp.asarray(np.random.default_rng(2).standard_normal((16, 64)), jnp.float32)

    @jax.jit
    def f(x):
        i = sel.select(x, SelectorContext(phase="prefill", seq_len=1024))
        return sel.apply(x, i), i

    y, i = f(x)
    assert sel.decode(i) == "nvfp4"  # Gaussian: ratio ~1.5, below 10^0.8
    _, i = f(x.at[:, 3].multiply(30.0))  # 10^1.2 < ratio < 10^1.7
    assert sel.decode(i) == "fp8_e4m3"
    y, i = f(x.at[:, 3].multiply(1000.0))
    assert sel.decode(i) == "fp16"
    np.testing.assert_array_equal(
        np.asarray(y), np.asarray(x.at[:, 3].multiply(1000.0).astype(jnp.float16), np.float32)
    )
    kv = sel.table(SelectorContext(is_kv_cache=True))
    assert all(sel.candidates[j].value != "nvfp4" for j in kv)
    assert f._cache_size() == 1


@pytest.mark.parametrize(
    "make,msg",
    [
        (
            lambda: MixedPrecisionConfig("x", {"attention_blender": OperatorPrecision()}),
            "unknown operator",
        ),
        (lambda: OperatorType.parse("qkv_fused"), "unknown operator"),
        (lambda: AdaptivePrecisionSelector(low=1.0, medium=0.5, high=2.0), "low < medium < high"),
        (lambda: AdaptivePrecisionSelector(low=0.5, medium=1.0, high=1.0), "low < medium < high"),
        (lambda: OperatorPrecision(None, DynamicQuantConfig()), "needs quantized weights"),
        (lambda: OperatorPrecision("fp7"), "fp7"),
        (lambda: preset("fp2_yolo"), "unknown preset"),
        (lambda: SelectorContext(phase="train"), "phase"),
        (
            lambda: apply_strategy(
                PARAMS,
                MixedPrecisionConfig("x", {}, {9: {"q_proj": OperatorPrecision("fp8_e4m3")}}),
            ),
            "layer 9",
        ),
    ],
)
def test_bad_configs(make, msg):
    with pytest.raises(ValueError, match=msg):
        make()


def test_nnx_fallback_on_fp16_copy():
    act = DynamicQuantConfig(granularity="per_tensor", fallback_weight="fp16")
    cfg = MixedPrecisionConfig("t", {"q_proj": OperatorPrecision("fp8_e4m3", act)})
    tiny = _Tiny(nnx.Rngs(0))
    w32 = np.asarray(_value(tiny.query.kernel))
    model = apply_strategy_nnx(tiny, cfg)
    copy = np.asarray(_value(model.query.fallback_kernel))
    np.testing.assert_array_equal(copy, w32.astype(np.float16))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 32)), jnp.float32)
    xo = x.at[:, 3].multiply(1000.0)
    y = nnx.jit(lambda m, x: m.query(x))(model, xo)
    assert decode_precision(_value(model.query.dyn_precision)) == "fp16"
    ref = xo.astype(jnp.float16).astype(jnp.float32) @ copy.astype(np.float32)
    ref = ref + np.asarray(_value(model.query.bias))
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-2)


def test_dynamic_operators_store_block_weights_once():
    """block_gemm: per-token/per-tensor specs get their FP8 kernel blocked by 128 along K.

    Same codes and values as the per-channel kernel; with K <= 128 (this model)
    one 1x128 block is the whole row, so the encoder's output is bit for bit
    the per-token path's.
    """
    from jax_bq.dynamic import is_block_weight
    from jax_bq.ops import dequantize

    def strat(**kw):
        act = DynamicQuantConfig(granularity=kw.pop("granularity", "per_token"), **kw)
        return MixedPrecisionConfig("b", {"q_proj": OperatorPrecision("fp8_e4m3", act)})

    blocked = apply_strategy(PARAMS, strat())
    kept = apply_strategy(PARAMS, strat(block_gemm=False))
    chan = apply_strategy(PARAMS, strat(granularity="per_channel"))
    for layer in range(CFG.num_layers):
        wb = blocked[f"layer_{layer}"]["query"]["kernel"]
        wk = kept[f"layer_{layer}"]["query"]["kernel"]
        assert is_block_weight(wb) and wb.granularity.value == "per_block"
        assert wk.granularity.value == "per_channel"
        assert chan[f"layer_{layer}"]["query"]["kernel"].granularity.value == "per_channel"
        np.testing.assert_array_equal(
            np.asarray(dequantize(wb, jnp.float32)), np.asarray(dequantize(wk, jnp.float32))
        )
    f = jax.jit(lambda p: MODEL.apply({"params": p}, IDS, MASK))
    np.testing.assert_array_equal(np.asarray(f(blocked)), np.asarray(f(kept)))
    text = explain_strategy(strat(), blocked)
    assert "as 1x128 block scales" in text and "block_1x128" in text
