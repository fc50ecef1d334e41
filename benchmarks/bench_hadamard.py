"""Cost of the online FFN2 Hadamard rotation, and GPTQ calibration time, on the E5-large shape.

1. The jitted E5-large-shaped encoder (random weights, bf16 activations) with
   and without the online FFN2-input rotation (``BertConfig.ffn_hadamard_block``
   = 4096: ``gelu(.) * signs`` then the ``jax_bq_hadamard`` FWHT) -- both
   with float kernels and with FP8 W8A8 per-tensor kernels; the extra time
   over the encoder's is the rotation's cost (target <= 5%). Also the FWHT
   alone on the FFN2 activation (``[B*S, 4096]`` bf16).
2. Calibration of the ``fp8_gptq`` / ``nvfp4_gptq`` recipes' work on that
   shape (random weights and token ids): statistics of the 144 dense inputs
   over the calibration batches plus GPTQ of every kernel (target <= 30 s).

``jax-bq bench hadamard --out FILE.json`` (writes FILE.md too).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import device_time_per_call, machine  # noqa: E402
from jax_bq.flax.rules import WeightQuant, cast_float_params, quantize_model_weights  # noqa: E402
from jax_bq.models import E5_LARGE, BertEncoder, random_bert_params  # noqa: E402
from jax_bq.transforms import collect_layer_stats, fwht, gptq_model, rotate_ffn_output  # noqa: E402


def encoder_rows(batch: int, seq: int, iters: int, block: int = 4096) -> list[dict]:
    """Encoder time with and without the online rotation of ``block`` (float and FP8 W8A8 kernels).

    The recipes use ``block = 512`` (:func:`jax_bq.recipes._ffn_block`); 4096 is the full width.
    """
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, E5_LARGE.vocab_size, (batch, seq)), jnp.int32)
    mask = jnp.ones_like(ids)
    base = random_bert_params(E5_LARGE, seed=0)
    rot_cfg = dataclasses.replace(E5_LARGE, ffn_hadamard_block=block)
    rot = rotate_ffn_output(base, block)
    rows = []
    for kernels in ("bf16", "fp8 W8A8 per-tensor"):
        times = {}
        for label, cfg, params in (("plain", E5_LARGE, base), ("rotated", rot_cfg, rot)):
            if kernels == "bf16":
                p, act = cast_float_params(params, jnp.bfloat16), {}
            else:
                p = cast_float_params(quantize_model_weights(params, "fp8_e4m3"), jnp.bfloat16)
                act = dict(act_format="fp8_e4m3", act_granularity="per_tensor")
            mod = BertEncoder(cfg, jnp.bfloat16, **act)
            f = jax.jit(lambda p, i, m, mod=mod: mod.apply({"params": p}, i, m))
            times[label] = device_time_per_call(f, [(p, ids, mask)], calls=iters, warmup=2)
        t_plain, t_rot = times["plain"], times["rotated"]
        rows.append(
            {
                "what": f"E5-large encoder, {kernels} kernels, B={batch} S={seq}, FWHT {block}",
                "plain_ms": t_plain["us"] / 1e3,
                "rotated_ms": t_rot["us"] / 1e3,
                "overhead_pct": 100 * (t_rot["us"] / t_plain["us"] - 1),
                "plain_span_ms": t_plain["span_us"] / 1e3,
                "rotated_span_ms": t_rot["span_us"] / 1e3,
                "span_overhead_pct": 100 * (t_rot["span_us"] / t_plain["span_us"] - 1),
            }
        )
        print(rows[-1], flush=True)
    xs = [(jnp.asarray(rng.standard_normal((batch * seq, 4096)), jnp.bfloat16),) for _ in range(2)]
    t = device_time_per_call(jax.jit(lambda v: fwht(v, block)), xs, calls=50)
    rows.append(
        {
            "what": f"FWHT {block} alone, [{batch * seq}, 4096] bf16 (x24 layers)",
            "plain_ms": 0.0,
            "rotated_ms": 24 * t["us"] / 1e3,
            "overhead_pct": float("nan"),
        }
    )
    print(rows[-1], flush=True)
    return rows


def gptq_rows(batches: int, batch: int, seq: int) -> list[dict]:
    """Statistics + GPTQ time for every kernel of the E5-large shape (random weights)."""
    rng = np.random.default_rng(1)
    params = random_bert_params(E5_LARGE, seed=1)
    data = [
        (
            jnp.asarray(rng.integers(0, E5_LARGE.vocab_size, (batch, seq)), jnp.int32),
            jnp.ones((batch, seq), jnp.int32),
        )
        for _ in range(batches)
    ]
    rows = []
    for name, spec in (
        ("fp8_gptq", WeightQuant("fp8_e4m3")),
        ("nvfp4_gptq", WeightQuant("nvfp4", calibrate=True)),
    ):
        t0 = time.perf_counter()
        stats = collect_layer_stats(BertEncoder(E5_LARGE), params, data)
        t1 = time.perf_counter()
        q, rep = gptq_model(params, stats, spec)
        jax.block_until_ready(jax.tree_util.tree_leaves(q))
        t2 = time.perf_counter()
        rows.append(
            {
                "what": f"{name} calibration, E5-large, {batches}x{batch}x{seq} tokens",
                "stats_s": t1 - t0,
                "gptq_s": t2 - t1,
                "total_s": t2 - t0,
                "kept_gptq": sum(r.used_gptq for r in rep.values()),
                "layers": len(rep),
            }
        )
    return rows


def markdown(meta: dict, enc: list[dict], cal: list[dict]) -> str:
    """Both tables as markdown."""
    out = ["# bench_hadamard", ""] + [f"- {k}: {v}" for k, v in meta.items()] + [""]
    out += [
        "| encoder | plain ms | rotated ms | overhead | span overhead |",
        "|---|---|---|---|---|",
    ]
    out += [
        f"| {r['what']} | {r['plain_ms']:.3f} | {r['rotated_ms']:.3f} | {r['overhead_pct']:.2f}% "
        f"| {r.get('span_overhead_pct', float('nan')):.2f}% |"
        for r in enc
    ]
    out += ["", "| calibration | stats s | GPTQ s | total s | GPTQ kept |", "|---|---|---|---|---|"]
    out += [
        f"| {r['what']} | {r['stats_s']:.1f} | {r['gptq_s']:.1f} | {r['total_s']:.1f} | "
        f"{r['kept_gptq']}/{r['layers']} |"
        for r in cal
    ]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="JSON path (the .md goes next to it)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--cal-batches", type=int, default=4, help="calibration batches of 64x128")
    ap.add_argument("--skip-gptq", action="store_true")
    ap.add_argument("--blocks", default="512,4096", help="FWHT blocks to time (512: the recipes')")
    a = ap.parse_args()
    meta = machine() | {
        "model": "E5-large shape, random weights",
        "timing": "profiler device time (median of calls) and span per encoder call",
    }
    out = Path(a.out)
    enc: list[dict] = []
    cal: list[dict] = []

    def save() -> None:  # after every part: a run cut short keeps what it measured
        out.write_text(json.dumps({"meta": meta, "encoder": enc, "calibration": cal}, indent=1))
        out.with_suffix(".md").write_text(markdown(meta, enc, cal))

    for b in a.blocks.split(","):
        enc += encoder_rows(a.batch, a.seq, a.iters, int(b))
        save()
    if not a.skip_gptq:
        cal += gptq_rows(a.cal_batches, 64, 128)
        save()
    print(markdown(meta, enc, cal))


if __name__ == "__main__":
    main()
