"""Overhead of dynamic per-token FP8 activations (stats, EMA) in the jitted E5-large encoder.

E5-large shape (random weights, ``jax_bq.models.bert.E5_LARGE``), bf16,
32 x 128 tokens, every dense kernel FP8 E4M3 per channel. Rows:

* ``static``: static per-tensor activation scales (``act_scale``, calibrated
  on one batch), the baseline.
* ``dynamic_per_token (...)``: :func:`jax_bq.strategies.apply_strategy`
  with ``DynamicQuantConfig(per_token, absmax)`` on every dense layer: the
  per-token scales, the outlier ratio (per-channel amax + median of K) and
  the FP16 fallback (off, ``lax.cond``, or ``select``; ``lax.cond`` on a
  float16 copy of each weight, ``fallback_weight="fp16"``) inside the
  jitted encoder.
* ``... + EMA``: the same with ``ema_decay=0.9`` (per token the EMA smooths
  the clip ratio), the ``quant_state`` collection threaded from call to
  call (``mutable=["quant_state"]``), never read on the host.
* ``qmatmul in-kernel per_token``: qmatmul's own per-token quantization
  (``act_granularity="per_token"``, no statistics) for reference.

Every row counts the device-to-host copies in a trace of 5 calls: none may
appear (no host sync); a ``lax.cond`` whose predicate XLA:GPU reads on the
host would show up here, one per operator.

Device time per call from a profiler trace (``common.device_time_per_call``);
overhead = dynamic / static - 1 (target <= 5 %).

``jax-bq bench dynamic_overhead --out FILE.json`` (GPU);
writes FILE.json and FILE.md. ``--smoke`` runs a tiny encoder with wall
times and no trace (a CPU check that the script runs, not a measurement).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import device_time_per_call, gpu_kernel_events, machine, time_fn  # noqa: E402
from jax_bq.dynamic import DynamicQuantConfig, EmaState  # noqa: E402
from jax_bq.flax.rules import cast_float_params, quantize_model_weights  # noqa: E402
from jax_bq.flax.static_scales import calibrate_activation_scales  # noqa: E402
from jax_bq.models.bert import E5_LARGE, BertConfig, BertEncoder  # noqa: E402
from jax_bq.models.loading import random_bert_params  # noqa: E402
from jax_bq.strategies import (
    BERT_OPERATORS,
    MixedPrecisionConfig,
    OperatorPrecision,
    apply_strategy,
)  # noqa: E402

B, S = 32, 128


def _d2h_copies(fn, args) -> int:
    """Device-to-host memcpy events in a trace of 5 calls (must be 0: no host sync)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(5):
                out = fn(*args)
            jax.block_until_ready(out)
        ev = gpu_kernel_events(d, copies=True)
    return sum(1 for name, _, _ in ev if "DtoH" in name or "Device to Host" in name)


def _wall(fn, args_list) -> dict:
    """Smoke mode: wall time of one call (CPU), not a device-time measurement."""
    return {"us": 1e6 * time_fn(fn, *args_list[0], warmup=1, iters=3)["median_s"], "kernels": 0}


def main(out: str, smoke: bool = False) -> None:
    b, s = B, S
    cfg = E5_LARGE
    timer, d2h = device_time_per_call, _d2h_copies
    if smoke:
        cfg = BertConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
        b, s = 2, 16
        timer, d2h = _wall, (lambda fn, args: None)
    params = random_bert_params(cfg, seed=0)
    rng = np.random.default_rng(0)
    batches = [
        (jnp.asarray(rng.integers(1000, 30000, (b, s)), jnp.int32), jnp.ones((b, s), jnp.int32))
        for _ in range(4)
    ]
    model = BertEncoder(cfg, dtype=jnp.bfloat16)
    q = quantize_model_weights(params, [("kernel$", "fp8_e4m3")])
    static, _ = calibrate_activation_scales(model, q, batches[:1], margin=2.0)
    static = cast_float_params(static, jnp.bfloat16)
    rows = []

    def measure(variant, p, module=model, ema=False):
        if ema:
            ids0, mask0 = batches[0]
            init = jax.jit(
                lambda p, i, m: module.apply({"params": p}, i, m, mutable=["quant_state"])
            )
            _, st = init(p, ids0, mask0)
            f = jax.jit(
                lambda p, s, i, m: module.apply({"params": p, **s}, i, m, mutable=["quant_state"])
            )
            args = [(p, st, i, m) for i, m in batches]

            def chained(p, s, i, m):  # the state of call t feeds call t + 1, never read on host
                nonlocal st
                y, st = f(p, st, i, m)
                return y

            r = timer(f, args)
            r["d2h_copies_in_5_calls"] = d2h(chained, args[0])
            ema_leaf = jax.tree_util.tree_leaves(
                st["quant_state"], is_leaf=lambda x: isinstance(x, EmaState)
            )[0]
            r["ema_steps_after_trace"] = int(jax.device_get(ema_leaf.count))
        else:
            f = jax.jit(lambda p, i, m: module.apply({"params": p}, i, m))
            args = [(p, i, m) for i, m in batches]
            r = timer(f, args)
            r["d2h_copies_in_5_calls"] = d2h(f, args[0])
        rows.append({"variant": variant, **r})
        print(rows[-1]["variant"], f"{r['us']:.1f} us", flush=True)

    def dyn(**kw):
        act = DynamicQuantConfig(granularity="per_token", **kw)
        strat = MixedPrecisionConfig(
            "d", {op: OperatorPrecision("fp8_e4m3", act) for op in BERT_OPERATORS}
        )
        return cast_float_params(apply_strategy(params, strat), jnp.bfloat16)

    measure("static", static)
    measure("dynamic_per_token (no fallback)", dyn(fallback_to_fp16=False))
    measure("dynamic_per_token (fallback: cond)", dyn())
    measure("dynamic_per_token (fallback: select)", dyn(fallback_mode="select"))
    measure("dynamic_per_token (fallback: cond, fp16 weight copy)", dyn(fallback_weight="fp16"))
    measure(
        "dynamic_per_token (no fallback) + EMA",
        dyn(fallback_to_fp16=False, ema_decay=0.9),
        ema=True,
    )
    measure("dynamic_per_token (fallback: cond) + EMA", dyn(ema_decay=0.9), ema=True)
    qm = BertEncoder(cfg, dtype=jnp.bfloat16, act_format="fp8_e4m3", act_granularity="per_token")
    measure("qmatmul in-kernel per_token (no stats)", cast_float_params(q, jnp.bfloat16), qm)

    base = rows[0]["us"]
    for r in rows:
        r["overhead_vs_static"] = r["us"] / base - 1.0
        r.pop("names", None)
    res = {
        "meta": machine()
        | {"model": "E5-large shape, random weights, bf16", "tokens": [b, s], "smoke": smoke},
        "rows": rows,
    }
    Path(out).write_text(json.dumps(res, indent=2))
    lines = [
        "| variant | device us/call | kernels | overhead vs static | D2H copies (5 calls) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['us']:.1f} | {r['kernels']} | {r['overhead_vs_static']:+.1%} | "
            f"{r.get('d2h_copies_in_5_calls', '')} |"
        )
    Path(out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny model, wall time, CPU check")
    a = ap.parse_args()
    main(a.out, a.smoke)
