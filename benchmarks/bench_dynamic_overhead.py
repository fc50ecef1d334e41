"""Overhead of dynamic per-token FP8 activations (stats, EMA) in the jitted E5-large encoder.

E5-large shape (random weights, ``jax_bq.models.bert.E5_LARGE``), bf16,
32 x 128 tokens, every dense kernel FP8 E4M3 per channel. Rows:

* ``static``: static per-tensor activation scales (``act_scale``, calibrated
  on one batch), the baseline.
* ``dynamic_per_token``: :func:`jax_bq.strategies.apply_strategy` with
  ``DynamicQuantConfig(per_token, absmax)`` on every dense layer: the scale,
  the outlier ratio (per-channel amax + median) and the ``lax.cond``
  fallback inside the jitted encoder.
* ``dynamic_per_token_ema``: the same with ``ema_decay=0.9`` (per token the
  EMA smooths the clip ratio), the ``quant_state`` collection threaded
  through the jitted step (``mutable=["quant_state"]``). It must add no host
  sync: a trace of 5 chained calls must hold no device-to-host copy.
* ``dynamic_qmatmul``: qmatmul's own per-token quantization
  (``act_granularity="per_token"``) for reference.

Device time per call from a profiler trace (``common.device_time_per_call``);
overhead = dynamic / static - 1 (target <= 5 %).

``python benchmarks/bench_dynamic_overhead.py --out FILE.json`` (GPU);
writes FILE.json and FILE.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_time_per_call, gpu_kernel_events, machine  # noqa: E402

from jax_bq.dynamic import DynamicQuantConfig  # noqa: E402
from jax_bq.flax.rules import cast_float_params, quantize_model_weights  # noqa: E402
from jax_bq.flax.static_scales import calibrate_activation_scales  # noqa: E402
from jax_bq.models.bert import E5_LARGE, BertEncoder  # noqa: E402
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


def main(out: str) -> None:
    cfg = E5_LARGE
    params = random_bert_params(cfg, seed=0)
    rng = np.random.default_rng(0)
    batches = [
        (jnp.asarray(rng.integers(1000, 30000, (B, S)), jnp.int32), jnp.ones((B, S), jnp.int32))
        for _ in range(4)
    ]
    model = BertEncoder(cfg, dtype=jnp.bfloat16)
    q = quantize_model_weights(params, [("kernel$", "fp8_e4m3")])
    static, _ = calibrate_activation_scales(model, q, batches[:1], margin=2.0)
    static = cast_float_params(static, jnp.bfloat16)
    rows = []

    def plain(p):
        f = jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, mask))
        return f, [(p, ids, mask) for ids, mask in batches]

    f, args = plain(static)
    rows.append({"variant": "static", **device_time_per_call(f, args)})

    def dyn(ema):
        act = DynamicQuantConfig(granularity="per_token", ema_decay=ema)
        strat = MixedPrecisionConfig(
            "d", {op: OperatorPrecision("fp8_e4m3", act) for op in BERT_OPERATORS}
        )
        return cast_float_params(apply_strategy(params, strat), jnp.bfloat16)

    f, args = plain(dyn(None))
    rows.append({"variant": "dynamic_per_token", **device_time_per_call(f, args)})

    pe = dyn(0.9)
    ids0, mask0 = batches[0]
    _, st = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, mutable=["quant_state"]))(
        pe, ids0, mask0
    )
    step = jax.jit(
        lambda p, s, i, m: model.apply({"params": p, **s}, i, m, mutable=["quant_state"])
    )
    ema_args = [(pe, st, ids, mask) for ids, mask in batches]
    r = device_time_per_call(step, ema_args)
    r["d2h_copies_in_5_calls"] = _d2h_copies(step, ema_args[0])
    rows.append({"variant": "dynamic_per_token_ema", **r})

    qm = BertEncoder(cfg, dtype=jnp.bfloat16, act_format="fp8_e4m3", act_granularity="per_token")
    qp = cast_float_params(q, jnp.bfloat16)
    f = jax.jit(lambda p, ids, mask: qm.apply({"params": p}, ids, mask))
    rows.append(
        {"variant": "dynamic_qmatmul", **device_time_per_call(f, [(qp, i, m) for i, m in batches])}
    )

    base = rows[0]["us"]
    for r in rows:
        r["overhead_vs_static"] = r["us"] / base - 1.0
        r.pop("names", None)
    res = {
        "meta": machine() | {"model": "E5-large shape, random weights, bf16", "tokens": [B, S]},
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
    main(ap.parse_args().out)
