"""Overhead of dynamic per-token FP8 activations (stats, fallback, EMA) in the jitted E5-large.

E5-large shape (random weights, ``jax_bq.models.bert.E5_LARGE``), bf16,
32 x 128 tokens, every dense kernel FP8 E4M3. Rows, in the order they run
(the JSON is rewritten after each row, so a run cut short keeps its rows):

* ``static``: per-tensor weights, static per-tensor activation scales
  (``act_scale``, calibrated on one batch): cuBLASLt's scalar-scaled GEMM,
  the baseline every overhead is relative to.
* ``dynamic block: ...``: :func:`jax_bq.strategies.apply_strategy` with
  ``DynamicQuantConfig(per_token, absmax)`` on every dense layer, the same
  per-tensor weights stored as 128x128 tiles once at preparation
  (``block_gemm``: :func:`jax_bq.dynamic.block_weight`, same values), so the
  activations are quantized per 1x128 block in the call and the GEMM is the
  block-scaled one. ``+ stats``: the jitted function also returns every
  layer's ``dyn_precision`` and ``dyn_outlier_ratio`` (measured with
  ``outlier_measure="block"``, set by this benchmark; the library's default
  is ``"channel"``: one reduction over the ``[tokens, K / 128]``
  block scales the quantize kernel wrote; the ``channel outlier measure`` row
  is the per-channel amax pass plus a median of K); without it XLA drops
  them. ``fallback: select``: both branches computed, ``jnp.where`` picks.
  ``fallback: cond``: the FP16 fallback selected by ``lax.cond``
  (the outlier ratio is then needed either way). ``+ EMA``: ``ema_decay=0.9``
  with the ``quant_state`` collection threaded from call to call, never read
  on the host.
* ``dynamic outer-vector (old path)``: per-channel weights kept per channel
  (``block_gemm=False``): per-token x per-channel scales through cuBLASLt's
  outer-vector mode, the path the first H200 run measured.
* ``dynamic block, per-channel weights as 1x128 blocks``: per-channel
  weights re-expressed exactly as 1x128 blocks (cuBLASLt VEC128 x VEC128).
* ``static, per-channel weights``: the earlier baseline (static per-tensor
  activations x per-channel weights, outer-vector mode).

Per row: device time per call (sum of kernel durations) and span (first
kernel start to last kernel end: launch gaps and host syncs count) from a
profiler trace (``common.device_time_per_call``), the kernel count, the
device-to-host copies in a separate trace of 5 calls (must be 0: a
``lax.cond`` whose predicate XLA:GPU reads on the host shows up here, one per
operator), the compile time, and the GEMM path of the first query projection
(:func:`jax_bq.dynamic.explain_dynamic` / :func:`jax_bq.plan`).
Overhead = row / static - 1 (target for per-token with stats: <= 5 %).

``jax-bq bench dynamic_overhead --out FILE.json`` (GPU); writes FILE.json
after each row and FILE.md at the end. ``--budget-s`` (default 140) starts
no new row once that many seconds have passed (rows not run are listed as
skipped). ``--smoke`` runs a tiny encoder with wall times and no trace (a CPU
check that the script runs, not a measurement).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import device_time_per_call, gpu_kernel_events, machine, time_fn
from jax_bq.dynamic import DynamicQuantConfig, EmaState, explain_dynamic, precision_code
from jax_bq.flax.rules import WeightQuant, cast_float_params, quantize_model_weights
from jax_bq.flax.static_scales import calibrate_activation_scales
from jax_bq.matmul import plan
from jax_bq.models.bert import E5_LARGE, BertConfig, BertEncoder
from jax_bq.models.loading import random_bert_params
from jax_bq.ops import quantize
from jax_bq.strategies import (
    BERT_OPERATORS,
    MixedPrecisionConfig,
    OperatorPrecision,
    apply_strategy,
)

B, S = 32, 128
PER_TENSOR = WeightQuant("fp8_e4m3", granularity="per_tensor")
PER_CHANNEL = WeightQuant("fp8_e4m3", granularity="per_channel")
BASELINE = "static"


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
    us = 1e6 * time_fn(fn, *args_list[0], warmup=1, iters=3)["median_s"]
    return {"us": us, "span_us": us, "kernels": 0}


def _first_query(params):
    """The ``[N, K]`` QuantizedTensor and ``act_quant`` (or None) of layer 0's query."""
    node = params
    for key in ("layer_0", "attention", "query"):
        node = node[key] if key in node else node
    if "query" in node:
        node = node["query"]
    return node["kernel"], node.get("act_quant")


def _path(params, tokens: int) -> str:
    """The GEMM path of the first query projection (explain_dynamic / plan)."""
    try:
        w, act = _first_query(params)
        x = jax.ShapeDtypeStruct((tokens, w.shape[1]), jnp.bfloat16)
        if act is not None:
            return explain_dynamic(x, w, config=act).split("\n")[1].strip()
        qx = jax.eval_shape(lambda a: quantize(a, "fp8_e4m3", granularity="per_tensor"), x)
        return "static per-tensor x: " + str(plan(qx, w))
    except Exception as e:  # a description only: never fail the measurement for it
        return f"(path not described: {type(e).__name__}: {e})"


def _stats_only(state) -> dict:
    """The dynamic layers' sown stats (precision codes, outlier ratios), nothing else."""
    flat = jax.tree_util.tree_flatten_with_path(state.get("intermediates", {}))[0]
    keep = ("dyn_precision", "dyn_outlier_ratio")
    return {
        jax.tree_util.keystr(p): v
        for p, v in flat
        if any(k in jax.tree_util.keystr(p) for k in keep)
    }


def main(out: str, smoke: bool = False, budget_s: float = 140.0, only: str | None = None) -> None:
    t_start = time.perf_counter()
    b, s = B, S
    cfg = E5_LARGE
    timer, d2h = device_time_per_call, _d2h_copies
    if smoke:
        cfg = BertConfig(hidden_size=256, num_layers=2, num_heads=2, intermediate_size=512)
        b, s = 2, 16
        timer, d2h = _wall, (lambda fn, args: None)
    params = random_bert_params(cfg, seed=0)
    rng = np.random.default_rng(0)
    batches = [
        (jnp.asarray(rng.integers(1000, 30000, (b, s)), jnp.int32), jnp.ones((b, s), jnp.int32))
        for _ in range(4)
    ]
    model = BertEncoder(cfg, dtype=jnp.bfloat16)
    res = {
        "meta": machine()
        | {
            "model": f"{'tiny (smoke)' if smoke else 'E5-large shape'}, random weights, bf16",
            "tokens": [b, s],
            "smoke": smoke,
            "baseline": BASELINE,
        },
        "rows": [],
        "skipped": [],
    }

    def save():
        Path(out).write_text(json.dumps(res, indent=2))

    def static(weight):
        q = quantize_model_weights(params, [("kernel$", weight)])
        st, _ = calibrate_activation_scales(model, q, batches[:1], margin=2.0)
        return cast_float_params(st, jnp.bfloat16)

    def dyn(weight=PER_TENSOR, **kw):
        kw.setdefault("outlier_measure", "block")  # the hot-path measure (default: channel)
        act = DynamicQuantConfig(granularity="per_token", **kw)
        strat = MixedPrecisionConfig(
            "d", {op: OperatorPrecision(weight, act) for op in BERT_OPERATORS}
        )
        return cast_float_params(apply_strategy(params, strat), jnp.bfloat16)

    def measure(variant, p, stats=False, ema=False):
        t0 = time.perf_counter()
        mutable = (["quant_state"] if ema else []) + (["intermediates"] if stats else [])
        ids0, mask0 = batches[0]
        st = {}
        if ema:  # the first call creates the state
            init = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, mutable=mutable))
            _, st = init(p, ids0, mask0)
            st = {"quant_state": st["quant_state"]}

        def call(p, s, i, m):
            if not mutable:
                return model.apply({"params": p}, i, m), s
            y, new = model.apply({"params": p, **s}, i, m, mutable=mutable)
            kept = {"quant_state": new["quant_state"]} if ema else {}
            return (y, _stats_only(new)) if stats else y, kept

        f = jax.jit(call)
        jax.block_until_ready(f(p, st, ids0, mask0))  # compile
        compile_s = time.perf_counter() - t0
        args = [(p, st, i, m) for i, m in batches]

        def chained(p, s, i, m):  # EMA: call t's state feeds call t + 1, never read on host
            nonlocal st
            y, new = f(p, st, i, m)
            if ema:
                st = new
            return y

        r = timer(chained, args)
        r.pop("names", None)
        r["d2h_copies_in_5_calls"] = d2h(chained, args[0])
        if ema:
            leaf = jax.tree_util.tree_leaves(
                st["quant_state"], is_leaf=lambda x: isinstance(x, EmaState)
            )[0]
            r["ema_steps_after_traces"] = int(jax.device_get(leaf.count))
        if stats:
            (_, got), _ = f(p, st, ids0, mask0)
            got = jax.device_get(got)
            codes = [int(v) for k, v in got.items() if "dyn_precision" in k for v in np.ravel(v)]
            r["stats_leaves"] = len(got)
            r["fallbacks_taken"] = sum(c != precision_code("fp8_e4m3") for c in codes)
        r["compile_s"] = compile_s
        r["path"] = _path(p, b * s)
        base = next((x["us"] for x in res["rows"] if x["variant"] == BASELINE), None)
        base_span = next((x["span_us"] for x in res["rows"] if x["variant"] == BASELINE), None)
        r["overhead_vs_static"] = r["us"] / base - 1.0 if base else None
        r["span_overhead_vs_static"] = r["span_us"] / base_span - 1.0 if base_span else None
        res["rows"].append({"variant": variant, **r})
        save()
        ov = r["overhead_vs_static"]
        print(
            f"{variant}: {r['us']:.1f} us device, {r['span_us']:.1f} us span"
            + (f", {ov:+.1%} vs static" if ov is not None else "")
            + f", compile {compile_s:.1f} s",
            flush=True,
        )

    variants = [  # the rows that matter first (the budget may cut the tail)
        (BASELINE, lambda: static(PER_TENSOR), {}),
        (
            "dynamic block: per_token 1x128 + stats",
            lambda: dyn(fallback_to_fp16=False),
            {"stats": True},
        ),
        ("dynamic block: per_token 1x128 + stats, fallback: cond", lambda: dyn(), {"stats": True}),
        ("dynamic block: per_token 1x128, no stats", lambda: dyn(fallback_to_fp16=False), {}),
        (
            "dynamic block: per_token + stats + EMA 0.9 (scales replicated)",
            lambda: dyn(fallback_to_fp16=False, ema_decay=0.9),
            {"stats": True, "ema": True},
        ),
        (
            "dynamic block: per_token 1x128 + stats, fallback: select",
            lambda: dyn(fallback_mode="select"),
            {"stats": True},
        ),
        (
            "dynamic block: per_token 1x128 + stats (channel outlier measure)",
            lambda: dyn(fallback_to_fp16=False, outlier_measure="channel"),
            {"stats": True},
        ),
        (
            "dynamic outer-vector (old path): per_token x per-channel weights + stats",
            lambda: dyn(PER_CHANNEL, fallback_to_fp16=False, block_gemm=False),
            {"stats": True},
        ),
        (
            "dynamic block: per-channel weights as 1x128 blocks + stats",
            lambda: dyn(PER_CHANNEL, fallback_to_fp16=False),
            {"stats": True},
        ),
        ("static, per-channel weights (outer-vector)", lambda: static(PER_CHANNEL), {}),
    ]
    for name, make, kw in variants:
        if only and only not in name and name != BASELINE:
            continue
        elapsed = time.perf_counter() - t_start
        if elapsed > budget_s:
            res["skipped"].append(
                {"variant": name, "why": f"budget: {elapsed:.0f} s > {budget_s:g} s"}
            )
            save()
            print(f"skipped (budget): {name}", flush=True)
            continue
        measure(name, make(), **kw)
    res["meta"]["total_s"] = time.perf_counter() - t_start
    save()
    md = markdown(res)
    Path(out).with_suffix(".md").write_text(md)
    print(md)


def markdown(res: dict) -> str:
    """The table of a result JSON (also ``python -m benchmarks.bench_dynamic_overhead --md``)."""
    m = res["meta"]
    lines = [
        "# dynamic_overhead",
        "",
        f"- {m.get('model')}, tokens {m.get('tokens')}; device {m.get('device', '')}; "
        f"jax {m.get('jax', '')}; total {m.get('total_s', float('nan')):.0f} s",
        "- device = sum of kernel durations per call, span = first kernel start to last "
        "kernel end (median of calls); overhead vs the `static` row",
        "",
        "| variant | device us | span us | overhead (device) | overhead (span) | kernels | "
        "D2H copies (5 calls) | compile s | GEMM path (layer 0 query) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(v):
        return f"{v:+.1%}" if v is not None else ""

    for r in res["rows"]:
        lines.append(
            f"| {r['variant']} | {r['us']:.1f} | {r['span_us']:.1f} | "
            f"{pct(r.get('overhead_vs_static'))} | {pct(r.get('span_overhead_vs_static'))} | "
            f"{r['kernels']} | {r.get('d2h_copies_in_5_calls', '')} | {r['compile_s']:.1f} | "
            f"{r.get('path', '')} |"
        )
    for sk in res.get("skipped", []):
        lines.append(f"| {sk['variant']} | skipped: {sk['why']} | | | | | | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny model, wall time, CPU check")
    ap.add_argument("--budget-s", type=float, default=140.0, help="start no row after this")
    ap.add_argument("--only", default=None, help="run only rows whose name contains this")
    ap.add_argument("--md", action="store_true", help="rewrite FILE.md from FILE.json and exit")
    a = ap.parse_args()
    if a.md:
        Path(a.out).with_suffix(".md").write_text(markdown(json.loads(Path(a.out).read_text())))
    else:
        main(a.out, a.smoke, a.budget_s, a.only)
