"""Mixed precision by measured sensitivity (jax_bq.flax.plan_mixed_precision).

A toy "model" keeps these tests fast and their answers known: each kernel
feeds its own slice of the output, so its share of the output norm decides
how much its quantization error costs the cosine.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flax", reason="flax not installed (pip install -e '.[flax]')")

import jax.numpy as jnp  # noqa: E402

import jax_bq as bq  # noqa: E402
from jax_bq.flax import (  # noqa: E402
    WeightQuant,
    kernel_sensitivity,
    plan_mixed_precision,
    quantize_model_weights,
)

RNG = np.random.default_rng(7)
X = jnp.asarray(RNG.standard_normal((48, 64)), jnp.float32)
# Output share of each kernel: "big" dominates the norm, so its error dominates.
GAINS = {"big": 4.0, "mid": 2.0, "small": 1.0, "tiny": 0.5}


def _params(wide: tuple[str, ...] = ()):
    out = {}
    for i, (name, g) in enumerate(GAINS.items()):
        n = 64 if name in wide else 32
        w = np.random.default_rng(i).standard_normal((64, n)).astype(np.float32)
        out[name] = {"kernel": jnp.asarray(w * g / 8), "bias": jnp.zeros((n,), jnp.float32)}
    return out


def run(params):
    """Concatenated ``x @ W`` per kernel; quantized kernels are ``[N, K]``."""
    outs = []
    for name in GAINS:
        w = params[name]["kernel"]
        if isinstance(w, bq.QuantizedTensor):
            w = bq.dequantize(w, jnp.float32).T
        outs.append(X @ w + params[name]["bias"])
    return np.asarray(jnp.concatenate(outs, axis=1))


def _cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


FP4 = WeightQuant("fp4", block_size=32)


def test_sensitivity_ranks_by_output_share():
    sens = kernel_sensitivity(_params(), run, FP4)
    assert [s.name for s in sens] == [f"{n}/kernel" for n in GAINS]
    assert all(s.fallback_loss == 0.0 and s.loss > 0 for s in sens)
    # Each loss is exactly what quantizing that kernel alone does.
    p = _params()
    q = quantize_model_weights(p, [("^mid/kernel$", FP4)])
    assert sens[1].loss == pytest.approx(1 - _cos(run(p), run(q)), rel=1e-9)
    assert sens[0].bytes_kept == 64 * 32 * 4 and sens[0].bytes_quantized < 64 * 32


def test_density_prefers_fewer_bytes():
    # "mid" made twice as wide costs twice the bytes to keep: the order is by
    # loss removed per byte, not by loss.
    sens = kernel_sensitivity(_params(wide=("mid",)), run, FP4)
    by = {s.name: s for s in sens}
    mid, small = by["mid/kernel"], by["small/kernel"]
    assert mid.bytes_kept == 2 * small.bytes_kept
    assert [s.density for s in sens] == sorted((s.density for s in sens), reverse=True)
    assert mid.density == pytest.approx(
        mid.gain / (mid.bytes_kept - mid.bytes_quantized), rel=1e-12
    )


def test_losses_add_to_first_order():
    p = _params()
    sens = kernel_sensitivity(p, run, FP4)
    all_q = 1 - _cos(run(p), run(quantize_model_weights(p, FP4)))
    assert all_q == pytest.approx(sum(s.loss for s in sens), rel=0.15)


def test_plan_meets_target_and_rules_rebuild_it():
    p = _params()
    ref = run(p)
    all_q = _cos(ref, run(quantize_model_weights(p, FP4)))
    target = 1 - (1 - all_q) / 4  # needs the biggest contributors kept
    plan = plan_mixed_precision(p, run, FP4, target)
    assert plan.met and plan.measured >= target > plan.all_quantized
    assert plan.all_quantized == pytest.approx(all_q, abs=1e-12)
    assert plan.kept[0] == "big/kernel" and 0 < len(plan.kept) < len(GAINS)
    built = quantize_model_weights(p, plan.rules)
    for name in GAINS:
        leaf = built[name]["kernel"]
        assert isinstance(leaf, bq.QuantizedTensor) == (f"{name}/kernel" not in plan.kept)
    assert _cos(ref, run(built)) == pytest.approx(plan.measured, abs=1e-12)


def test_plan_with_fallback_keeps_kernels_in_fallback_format():
    p = _params()
    fp8 = WeightQuant("fp8_e4m3")
    plan = plan_mixed_precision(p, run, FP4, 0.9995, fallback=fp8, metric="pearson")
    assert plan.kept and plan.met
    assert all(s.fallback_loss > 0 for s in plan.sensitivities)
    built = quantize_model_weights(p, plan.rules)
    for name in GAINS:
        fmt = built[name]["kernel"].format
        assert fmt is (
            bq.QuantFormat.FP8_E4M3 if f"{name}/kernel" in plan.kept else bq.QuantFormat.FP4
        )


def test_plan_with_bf16_fallback_stores_kept_kernels_in_bf16():
    p = _params()
    plan = plan_mixed_precision(p, run, FP4, 0.9995, fallback="bf16")
    assert plan.kept and plan.met
    by = {s.name: s for s in plan.sensitivities}
    assert all(by[n].bytes_kept == 64 * 32 * 2 for n in plan.kept)  # bf16, not f32
    assert all(spec == "bf16" for pat, spec in plan.rules[: len(plan.kept)])
    built = quantize_model_weights(p, plan.rules)
    for name in GAINS:
        leaf = built[name]["kernel"]
        if f"{name}/kernel" in plan.kept:
            assert leaf.dtype == jnp.bfloat16 and leaf.shape == (64, 32)
        else:
            assert isinstance(leaf, bq.QuantizedTensor)
    assert _cos(run(p), run(built)) == pytest.approx(plan.measured, abs=1e-12)


def test_unreachable_target_keeps_everything_and_says_so():
    plan = plan_mixed_precision(_params(), run, FP4, 0.9999999, fallback=WeightQuant("fp8_e4m3"))
    assert not plan.met and len(plan.kept) == len(GAINS)


def test_target_already_met_keeps_nothing():
    plan = plan_mixed_precision(_params(), run, WeightQuant("fp8_e4m3"), 0.5)
    assert plan.kept == [] and plan.met and plan.measured == plan.all_quantized


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target": 1.0}, "target must be in"),
        ({"target": 0.0}, "target must be in"),
        ({"target": 0.9, "metric": "l2"}, "metric must be one of"),
        ({"target": 0.9, "select": lambda n: n.endswith("nothing")}, "no candidate kernel"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_mixed_precision(_params(), run, FP4, **kwargs)


def test_spec_must_be_quantized():
    with pytest.raises(ValueError, match="spec must be a quantized format"):
        plan_mixed_precision(_params(), run, "bf16", 0.9)


def test_already_quantized_params_are_refused():
    q = quantize_model_weights(_params(), FP4)
    with pytest.raises(ValueError, match="already quantized"):
        kernel_sensitivity(q, run, FP4)
