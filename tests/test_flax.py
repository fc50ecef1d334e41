"""Flax integration: QDense / quantized_dot_general / QEmbed (Linen), QLinear (NNX), rules."""

from __future__ import annotations

import numpy as np
import pytest

flax = pytest.importorskip("flax", reason="flax not installed (pip install -e '.[flax]')")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from conftest import GPU_DEVICES, on  # noqa: E402
from flax import nnx  # noqa: E402

import jax_bq as bq  # noqa: E402
from jax_bq.flax import (  # noqa: E402
    QDense,
    QEmbed,
    QLinear,
    WeightQuant,
    cast_float_params,
    param_bytes,
    quantize_kernel,
    quantize_model_weights,
    quantize_nnx_model,
    quantized_dot_general,
)
from jax_bq.flax.nnx import _value  # noqa: E402

X = jax.random.normal(jax.random.key(1), (3, 5, 256), jnp.float32)


def _init(module, x=X):
    return module.init(jax.random.key(0), x)


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_float_qdense_is_nn_dense(backend):
    m = QDense(192)
    v = _init(m)
    assert jax.tree.map(jnp.shape, v) == {"params": {"bias": (192,), "kernel": (256, 192)}}
    v = jax.tree.map(lambda a: a + 0.01, v)  # nonzero bias
    np.testing.assert_array_equal(m.apply(v, X), nn.Dense(192).apply(v, X))


@pytest.mark.parametrize("features,axis", [((4, 32), -1), (48, (-2, -1))])
def test_float_qdense_is_dense_general(features, axis):
    x = X.reshape(3, 5, 4, 64) if axis == (-2, -1) else X
    m = QDense(features, axis=axis)
    v = _init(m, x)
    ref = nn.DenseGeneral(features, axis=axis).apply(v, x)
    np.testing.assert_allclose(m.apply(v, x), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "spec,act",
    [
        (WeightQuant("fp8_e4m3"), "fp8_e4m3"),
        (WeightQuant("fp8_e4m3", "tile_2d"), "fp8_e4m3"),
        (WeightQuant("fp8_e4m3", "per_tensor"), "bf16"),
        (WeightQuant("nvfp4"), None),
        (WeightQuant("fp4", block_size=64), None),
    ],
)
def test_quantized_qdense_is_qmatmul(backend, spec, act):
    m = QDense(128, act_format=act)
    v = _init(m)
    v["params"]["bias"] = jnp.linspace(-1, 1, 128)
    q = quantize_model_weights(v["params"], spec)
    w = q["kernel"]
    assert w.shape == (128, 256) and q["bias"] is v["params"]["bias"]
    y = jax.jit(m.apply)({"params": q}, X)
    ref = bq.qmatmul(X, w, out_dtype=jnp.float32, act_format=act) + v["params"]["bias"]
    path = bq.plan(X, w, out_dtype=jnp.float32, act_format=act).path
    if path == "dequant_dot":
        # The fallback's product is XLA's own dot, compiled (and on the GPU
        # autotuned, e.g. split-K with the partial sums reduced inside the bias
        # fusion) per program, so its last bits depend on what surrounds it.
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    else:  # a jax_bq kernel or cuBLASLt call: the same bits inside the layer
        np.testing.assert_array_equal(y, ref)
    # and close to the float layer: FP8 ~ 2^-4 relative, FP4 ~ 2^-2
    tol = 0.08 if "fp8" in str(spec.format) else 0.2
    assert _rel_err(y, m.apply(v, X)) < tol


def test_round_trip_of_the_param_tree():
    v = _init(QDense(64))["params"]
    q = quantize_model_weights(v, "fp8_e4m3")
    np.testing.assert_array_equal(
        bq.dequantize(q["kernel"]).T,
        bq.dequantize(bq.quantize(v["kernel"].T, "fp8_e4m3", granularity="per_channel")).T,
    )
    assert quantize_kernel(v["kernel"], "fp8_e4m3").data.tolist() == q["kernel"].data.tolist()
    assert param_bytes(q) < param_bytes(v) / 3
    c = cast_float_params(q, jnp.bfloat16)
    assert c["bias"].dtype == jnp.bfloat16 and c["kernel"] is q["kernel"]


def test_dot_general_drop_in(backend):
    v = _init(nn.Dense(96))
    dense = nn.Dense(96, dot_general=quantized_dot_general("fp8_e4m3", act_format="fp8_e4m3"))
    y = jax.jit(dense.apply)(v, X)
    q = quantize_model_weights(v["params"], "fp8_e4m3")
    np.testing.assert_array_equal(y, QDense(96, act_format="fp8_e4m3").apply({"params": q}, X))
    hlo = jax.jit(dense.apply).lower(v, X).as_text()
    assert "jax_bq" in hlo


def test_dot_general_refuses_other_contractions():
    dg = quantized_dot_general("fp8_e4m3")
    with pytest.raises(ValueError, match="Dense-style contractions"):
        dg(jnp.ones((4, 32)), jnp.ones((16, 32)), (((1,), (1,)), ((), ())))
    with pytest.raises(ValueError, match="Dense-style"):
        dg(jnp.ones((2, 4, 32)), jnp.ones((2, 32, 16)), (((2,), (1,)), ((0,), (0,))))


def test_dense_general_quantized():
    x = X.reshape(3, 5, 4, 64)
    m = QDense(48, axis=(-2, -1))
    v = _init(m, x)
    q = quantize_model_weights(v["params"], [("kernel", WeightQuant("fp8_e4m3", in_dims=2))])
    assert q["kernel"].shape == (48, 256)
    assert _rel_err(m.apply({"params": q}, x), m.apply(v, x)) < 0.08
    m2 = QDense((4, 32))
    v2 = _init(m2)
    q2 = quantize_model_weights(v2["params"], [("kernel", "nvfp4")])
    assert q2["kernel"].shape == (128, 256)
    assert m2.apply({"params": q2}, X).shape == (3, 5, 4, 32)


def test_rules_first_match_and_defaults():
    params = {
        "embed": {"embedding": jnp.ones((100, 64))},
        "a": {"kernel": jax.random.normal(jax.random.key(0), (64, 32)), "bias": jnp.ones(32)},
        "b": {"kernel": jax.random.normal(jax.random.key(1), (32, 64)), "bias": jnp.ones(64)},
        "norm": {"scale": jnp.ones(64)},
    }
    q = quantize_model_weights(params, "fp8_e4m3")
    assert isinstance(q["a"]["kernel"], bq.QuantizedTensor)
    assert isinstance(q["b"]["kernel"], bq.QuantizedTensor)
    for path in (("embed", "embedding"), ("a", "bias"), ("norm", "scale")):
        assert q[path[0]][path[1]] is params[path[0]][path[1]]
    q = quantize_model_weights(
        params, [("a/", None), ("kernel", "nvfp4"), ("embedding", "fp8_e4m3")]
    )
    assert q["a"]["kernel"] is params["a"]["kernel"]
    assert q["b"]["kernel"].format is bq.QuantFormat.NVFP4
    assert q["embed"]["embedding"].shape == (100, 64)  # not transposed: rows stay tokens


def test_cast_rules_store_leaves_in_16_bit():
    m = QDense(32)
    v = _init(m)["params"]
    q = quantize_model_weights(v, [("kernel", "bf16")])
    assert q["kernel"].dtype == jnp.bfloat16 and q["kernel"].shape == v["kernel"].shape
    np.testing.assert_array_equal(q["kernel"], v["kernel"].astype(jnp.bfloat16))
    assert q["bias"] is v["bias"]
    y = m.apply({"params": q}, X)
    assert y.dtype == jnp.float32 and _rel_err(y, m.apply({"params": v}, X)) < 1e-2
    h = quantize_model_weights({"k": {"kernel": v["kernel"]}}, [("kernel", "fp16")])
    assert h["k"]["kernel"].dtype == jnp.float16
    with pytest.raises(ValueError, match="quantized format"):
        quantize_kernel(v["kernel"], "bf16")


@pytest.mark.parametrize(
    "rules,params,match",
    [
        ([("kernal", "fp8_e4m3")], None, "matched no parameter"),
        ([("(", "fp8_e4m3")], None, "bad regular expression"),
        ([("bias", "fp8_e4m3")], None, r"rank-1 leaf of shape \(32,\)"),
        ([("kernel", 3)], None, "spec must be"),
        ([("kernel",)], None, r"\(pattern: str, spec\) pair"),
        (42, None, "rules must be"),
        ([("kernel", WeightQuant("fp8_e4m3", "per_channel", calibrate=True))], None, "per-block"),
        ([("kernel", WeightQuant("bf16"))], None, "quantized format"),
        ([("kernel", "fp8_e4m3")], {"d": {"kernel": jnp.ones((4, 4), jnp.int32)}}, "dtype int32"),
        ("fp8_e4m3", {"d": {"kernel": jnp.ones((2, 4, 4))}}, "need a rule"),
    ],
)
def test_bad_rules(rules, params, match):
    params = params or {"d": {"kernel": jnp.ones((16, 32)), "bias": jnp.ones(32)}}
    with pytest.raises(ValueError, match=match):
        quantize_model_weights(params, rules)


def test_already_quantized_and_shape_mismatch():
    v = _init(QDense(64))["params"]
    q = quantize_model_weights(v, "fp8_e4m3")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model_weights(q, [("kernel", "fp8_e4m3")])
    with pytest.raises(ValueError, match=r"contracts K = 128"):
        QDense(64).apply({"params": q}, jnp.ones((2, 128)))


def test_calibrated_rule_is_calibrate_tensor():
    w = jax.random.normal(jax.random.key(3), (128, 64))
    q = quantize_model_weights(
        {"k": {"kernel": w}}, [("kernel", WeightQuant("nvfp4", calibrate=True))]
    )
    cfg = bq.CalibrationConfig(format="nvfp4", block_sizes=(16,), progress=False)
    ref = bq.calibrate_tensor(w.T, cfg).quantized
    np.testing.assert_array_equal(q["k"]["kernel"].data, ref.data)
    np.testing.assert_array_equal(q["k"]["kernel"].scales, ref.scales)


@pytest.mark.parametrize(
    "fmt,gran", [("fp8_e4m3", "per_channel"), ("nvfp4", None), ("fp8_e5m2", "per_tensor")]
)
def test_quantized_embedding_gathers_codes(fmt, gran):
    e = QEmbed(100, 64)
    ids = jnp.array([[1, 5, 99], [0, 0, 3]])
    v = _init(e, ids)
    spec = WeightQuant(fmt, gran)
    q = quantize_model_weights(v["params"], [("embedding", spec)])
    full = bq.dequantize(q["embedding"], dtype=jnp.float32)
    np.testing.assert_array_equal(e.apply({"params": q}, ids), full[ids])
    np.testing.assert_array_equal(e.apply(v, ids), nn.Embed(100, 64).apply(v, ids))


def test_nnx_qlinear(backend):
    x = jax.device_put(X, on(backend))
    lin = QLinear(256, 96, act_format="fp8_e4m3", rngs=nnx.Rngs(0))
    ref_lin = nnx.Linear(256, 96, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(lin(x), ref_lin(x), rtol=1e-5, atol=1e-5)
    y_float = lin(x)
    lin.quantize(WeightQuant("fp8_e4m3", "tile_2d"))
    assert lin.quantized
    y = nnx.jit(lambda m, x: m(x))(lin, x)
    ref = bq.qmatmul(x, _value(lin.kernel), out_dtype=jnp.float32, act_format="fp8_e4m3")
    ref = ref + _value(lin.bias)
    if backend == "cpu":
        np.testing.assert_array_equal(y, ref)
    else:  # float32 sums in another order inside and outside jit
        assert _rel_err(y, ref) < 1e-5
    assert _rel_err(y, y_float) < 0.08
    with pytest.raises(ValueError, match="already quantized"):
        lin.quantize("fp8_e4m3")


def test_nnx_model_conversion():
    class Mlp(nnx.Module):
        def __init__(self):
            self.up = nnx.Linear(256, 128, rngs=nnx.Rngs(0))
            self.down = nnx.Linear(128, 64, rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.down(jax.nn.relu(self.up(x)))

    model = Mlp()
    ref = model(X)
    quantize_nnx_model(model, [("down", None), ("up", "fp8_e4m3")], act_format="fp8_e4m3")
    assert isinstance(model.up, QLinear) and model.up.quantized
    assert isinstance(model.down, nnx.Linear)
    assert _rel_err(model(X), ref) < 0.08
    with pytest.raises(ValueError, match="matched no linear layer"):
        quantize_nnx_model(Mlp(), [("middle", "fp8_e4m3")])
    with pytest.raises(ValueError, match="casts to bf16"):
        quantize_nnx_model(Mlp(), [("up", "bf16")])


@pytest.mark.gpu
def test_qdense_runs_the_gpu_kernels():
    m = QDense(512, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(2), (64, 512), jnp.bfloat16)
    v = _init(m, x)
    q = quantize_model_weights(v["params"], "fp8_e4m3")
    with jax.default_device(GPU_DEVICES[0]):
        p = bq.plan(x, q["kernel"])
        assert p.path != "dequant_dot", str(p)
        hlo = jax.jit(m.apply).lower({"params": q}, x).compile().as_text()
        assert "jax_bq_qmatmul" in hlo
        assert _rel_err(m.apply({"params": q}, x), m.apply(v, x)) < 0.08


def _static_layer(fmt="fp8_e4m3", gran="per_tensor"):
    m = QDense(128)
    v = _init(m)
    v["params"]["bias"] = jnp.linspace(-1, 1, 128)
    return m, v, quantize_model_weights(v["params"], WeightQuant(fmt, gran))


def test_qdense_with_act_scale_is_quantize_static_then_qmatmul(backend):
    m, v, q = _static_layer()
    q = dict(q, act_scale=jnp.float32(2.0**-5))
    y = jax.jit(m.apply)({"params": q}, X)
    xq = bq.quantize_static(X, 2.0**-5)
    ref = bq.qmatmul(xq, q["kernel"], out_dtype=jnp.float32) + q["bias"]
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
    assert _rel_err(y, m.apply(v, X)) < 0.08
    # the layer records its input's finite amax when intermediates are mutable
    _, state = m.apply({"params": q}, X, mutable=["intermediates"])
    (amax,) = state["intermediates"]["act_amax"]
    assert float(amax) == float(jnp.max(jnp.abs(X)))


def test_act_scale_errors():
    m, _, q = _static_layer()
    with pytest.raises(ValueError, match="act_format='bf16' asks for something else"):
        QDense(128, act_format="bf16").apply({"params": dict(q, act_scale=1.0)}, X)
    _, _, q4 = _static_layer("nvfp4", None)
    with pytest.raises(ValueError, match="needs FP8 weights .* got nvfp4"):
        m.apply({"params": dict(q4, act_scale=1.0)}, X)


def test_calibrate_activation_scales_on_an_encoder(backend):
    from jax_bq.flax import act_scales_summary, calibrate_activation_scales
    from jax_bq.models import BertConfig, BertEncoder, random_bert_params

    cfg = BertConfig(
        vocab_size=97, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256
    )
    p32 = random_bert_params(cfg, seed=0)
    rules = [
        ("attention_output/kernel$", "bf16"),
        ("kernel$", WeightQuant("fp8_e4m3", "per_tensor")),
    ]
    q = quantize_model_weights(p32, rules)
    rng = np.random.default_rng(0)
    batches = [
        (jnp.asarray(rng.integers(5, 97, (2, 16)), jnp.int32), jnp.ones((2, 16), jnp.int32))
        for _ in range(3)
    ]
    model = BertEncoder(cfg)
    qs, report = calibrate_activation_scales(model, q, batches, margin=2.0)
    fp8_layers = [k for k, r in report.items() if r.scale is not None]
    assert len(fp8_layers) == 5 * cfg.num_layers, act_scales_summary(report)
    skipped = [k for k, r in report.items() if r.scale is None]
    assert len(skipped) == cfg.num_layers and all("attention_output" in k for k in skipped)
    assert all("float kernel" in report[k].reason for k in skipped)
    for name in fp8_layers:
        r = report[name]
        node = qs
        for part in name.split("/"):
            node = node[part]
        assert float(node["act_scale"]) == r.scale == bq.static_scale(r.amax, margin=2.0)
        assert r.amax > 0
    # each layer's amax is the max over the batches of what it saw
    one, _ = calibrate_activation_scales(model, q, batches[:1])
    assert "act_scale" in one["layer_0"]["intermediate"]
    # bf16 serving casts weights and biases, never the scales
    cast = cast_float_params(qs, jnp.bfloat16)
    assert cast["layer_0"]["intermediate"]["act_scale"].dtype == jnp.float32
    assert cast["layer_0"]["intermediate"]["bias"].dtype == jnp.bfloat16
    ids, mask = batches[0]
    ref = np.asarray(model.apply({"params": p32}, ids, mask))
    dyn = np.asarray(
        BertEncoder(cfg, act_format="fp8_e4m3", act_granularity="per_tensor").apply(
            {"params": q}, ids, mask
        )
    )
    st = np.asarray(jax.jit(model.apply)({"params": qs}, ids, mask))
    cos = lambda a, b: float(np.mean(np.sum(a * b, axis=1)))  # noqa: E731 - rows are unit norm
    assert cos(st, ref) > 0.999 and cos(dyn, ref) > 0.999
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate_activation_scales(model, q, [])
    with pytest.raises(ValueError, match="margin must be >= 1"):
        calibrate_activation_scales(model, q, batches, margin=0.5)


def test_nnx_static_activation_scales(backend):
    from jax_bq.flax import calibrate_nnx_activation_scales
    from jax_bq.flax.nnx import ActScale

    class Mlp(nnx.Module):
        def __init__(self):
            self.up = QLinear(256, 128, rngs=nnx.Rngs(0))
            self.down = QLinear(128, 64, rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.down(jax.nn.relu(self.up(x)))

    x = jax.device_put(X, on(backend))
    model = Mlp()
    ref = model(x)
    quantize_nnx_model(model, [("up", WeightQuant("fp8_e4m3", "per_tensor")), ("down", "nvfp4")])
    batches = [(x * 0.5,), (x,)]
    report = calibrate_nnx_activation_scales(model, lambda m, v: m(v), batches, margin=2.0)
    assert report["up"].amax == float(jnp.max(jnp.abs(x)))
    assert report["up"].scale == bq.static_scale(report["up"].amax, margin=2.0)
    assert report["down"].scale is None and "nvfp4" in report["down"].reason
    assert isinstance(model.up.act_scale, ActScale) and model.down.act_scale is None
    assert model.up.act_amax is None and model.down.act_amax is None
    y = nnx.jit(lambda m, v: m(v))(model, x)
    xq = bq.quantize_static(x, report["up"].scale)
    h = bq.qmatmul(xq, _value(model.up.kernel), out_dtype=jnp.float32) + _value(model.up.bias)
    assert _rel_err(model.up(x), h) < 1e-5
    assert _rel_err(y, ref) < 0.2
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate_nnx_activation_scales(model, lambda m, v: m(v), [])
