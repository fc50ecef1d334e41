"""End-to-end encoder benchmark: E5-large-shaped BERT, bf16 XLA vs jax_bq FP8 / FP4 weights.

One process, one device, random weights (no offline E5 checkpoint): the whole
jitted encoder (embeddings, 24 blocks, mean pooling, L2 norm) for batch x seq
in (32 x 128) and (1 x 128). Every variant keeps embeddings, LayerNorms,
biases and attention in bf16; only the six dense layers per block change:

* bf16 XLA: ``jnp`` dots on bf16 kernels (the baseline);
* FP8 W8A8: kernels quantized once to FP8 E4M3, activations quantized inside
  each ``qmatmul`` call (dynamic), per-tensor / per-channel x per-token /
  128x128 x 1x128;
* FP8 W8A8 static: per-tensor FP8 kernels, activations quantized with fixed
  power-of-two scales calibrated beforehand on two batches of other token ids
  (``calibrate_activation_scales``, margin 2): the quantization is plain jnp
  that XLA fuses into the LayerNorm / GELU before each GEMM;
* FP8 weight-only and NVFP4 / FP4 weight-only: 16-bit activations;
* fused (``BertEncoder(fused=True)``, :mod:`jax_bq.models.fused`): the same
  params through the fused block, in bf16 (float kernels: the honest baseline
  of what the fusions alone give) and in FP8 (static scales with the FFN1
  GEMM writing FP8 through its epilogue, or dynamic per-token), with the
  GELU exact or tanh-approximated (fused into the GEMM).

Timing: wall clock, each call awaited (``block_until_ready``), 5 warm-ups,
median of 30 (latency); queued: 30 calls dispatched back to back and awaited
once (throughput, host dispatch overlapping the device); and the device's
clock from a profiler trace of 8 calls: device time (summed kernel
durations) and span (first kernel start to last kernel end of a call: the
host gaps inside a call count; XLA runs without command buffers while it is
profiled); the 670 MB of bf16 weights are far beyond the 60 MB L2. Different token ids
per call (pre-generated). ``plan`` of one FFN layer shows which path runs.
Results: ``results/e2e_<config>.{json,md}``.

``jax-bq bench e2e [e5_large|tiny] [--only SUBSTR,..] [--tag T]``
(tiny: a 2-layer smoke configuration for machines without a GPU; ``--only``
keeps the bf16 baseline plus the named variants; ``--tag`` names the results
file, e.g. for a run under other ``XLA_FLAGS``).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_bq as bq  # noqa: E402
from benchmarks.common import device_time_per_call, machine, write  # noqa: E402
from jax_bq.flax import (  # noqa: E402
    WeightQuant,
    calibrate_activation_scales,
    cast_float_params,
    param_bytes,
    quantize_model_weights,
)
from jax_bq.models import E5_LARGE, BertConfig, BertEncoder, random_bert_params  # noqa: E402

STATIC = "static"  # act column: calibrated static activation scales
STATIC_MARGIN = 2.0
PT = WeightQuant("fp8_e4m3", "per_tensor")
# (name, weight spec, activations, act granularity, fused block options or None)
VARIANTS = [
    ("bf16 XLA", None, None, None, None),
    ("bf16 fused (cuDNN attention, exact GELU)", None, None, None, {"gelu": "exact"}),
    ("bf16 fused (cuDNN attention, tanh GELU)", None, None, None, {"gelu": "tanh"}),
    ("FP8 fused static (tanh GELU in the GEMM)", PT, STATIC, None, {"gelu": "tanh"}),
    ("FP8 fused static (exact GELU)", PT, STATIC, None, {"gelu": "exact"}),
    (
        "FP8 fused dynamic per-token",
        WeightQuant("fp8_e4m3"),
        "fp8_e4m3",
        "per_token",
        {"gelu": "tanh"},
    ),
    ("FP8 W8A8 per-tensor", PT, "fp8_e4m3", "per_tensor", None),
    ("FP8 W8A8 static per-tensor", PT, STATIC, None, None),
    ("FP8 W8A8 per-channel x per-token", WeightQuant("fp8_e4m3"), "fp8_e4m3", "per_token", None),
    (
        "FP8 W8A8 128x128 x 1x128",
        WeightQuant("fp8_e4m3", "tile_2d"),
        "fp8_e4m3",
        "block_1x128",
        None,
    ),
    ("FP8 weight-only", WeightQuant("fp8_e4m3"), "bf16", None, None),
    ("NVFP4 weight-only", WeightQuant("nvfp4"), "bf16", None, None),
    ("FP4 b32 weight-only", WeightQuant("fp4", block_size=32), "bf16", None, None),
]
SHAPES = [(32, 128), (32, 512), (1, 128)]


def variant_model(cfg, p32, spec, act, agran, calib, fused=None):
    """(module, bf16 params) of one variant; ``act == STATIC`` calibrates on ``calib``.

    ``fused``: None for the plain block, else the fused block's options
    (``BertEncoder(fused=True, **fused)``); calibration runs the plain block.
    """
    opts = {} if fused is None else {"fused": True, **fused}
    if spec is None:
        return BertEncoder(cfg, jnp.bfloat16, **opts), cast_float_params(p32, jnp.bfloat16)
    params = quantize_model_weights(p32, [("kernel$", spec)])
    params = cast_float_params(params, jnp.bfloat16)
    if act != STATIC:
        return BertEncoder(cfg, jnp.bfloat16, act, agran, **opts), params
    model = BertEncoder(cfg, jnp.bfloat16)
    params, _ = calibrate_activation_scales(model, params, calib, margin=STATIC_MARGIN)
    return BertEncoder(cfg, jnp.bfloat16, **opts), params


WARMUP, ITERS, QUEUED = 5, 30, 30  # calls per wall / queued measurement


def _time(fn, params, batches, warmup=WARMUP, iters=ITERS) -> float:
    for i in range(warmup):
        jax.block_until_ready(fn(params, *batches[i % len(batches)]))
    samples = []
    for i in range(iters):
        ids, mask = batches[i % len(batches)]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, ids, mask))
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _cache_stats() -> dict:
    """qmatmul's graph-cache counters (ffi/cuda/graph_cache.h), {} without the CUDA module."""
    from jax_bq import _native

    return dict(_native.CUDA.module.graph_cache_stats()) if _native.CUDA.loaded else {}


def _host_per_call(before: dict, after: dict, calls: int) -> dict:
    """Per forward pass: qmatmul calls traced by XLA's command buffers and their host us."""
    if not before:
        return {}
    return {
        "traced_per_call": (after["traced"] - before["traced"]) / calls,
        "traced_host_us_per_call": (after["traced_ns"] - before["traced_ns"]) / calls / 1e3,
    }


def _time_async(fn, params, batches, calls=QUEUED) -> float:
    """Seconds per call when calls are queued back to back (one wait at the end): throughput."""
    jax.block_until_ready(fn(params, *batches[0]))
    t0 = time.perf_counter()
    outs = [fn(params, *batches[i % len(batches)]) for i in range(calls)]
    jax.block_until_ready(outs)
    return (time.perf_counter() - t0) / calls


def main(which: str = "e5_large", only: str = "", tag: str = "", shapes: str = "") -> None:
    cfg = {
        "e5_large": E5_LARGE,
        "tiny": BertConfig(hidden_size=256, num_layers=2, num_heads=4, intermediate_size=1024),
    }[which]
    if shapes:
        shapes = [tuple(int(v) for v in bs.split("x")) for bs in shapes.split(",")]
    else:
        shapes = SHAPES if which == "e5_large" else [(4, 32), (1, 32)]
    t0 = time.perf_counter()
    p32 = random_bert_params(cfg, seed=0)
    p16 = cast_float_params(p32, jnp.bfloat16)
    print(f"params ready in {time.perf_counter() - t0:.1f} s", flush=True)
    rng = np.random.default_rng(0)
    rows = []
    for b, s in shapes:
        batches = []
        for _ in range(4):
            ids = jnp.asarray(rng.integers(1000, cfg.vocab_size, (b, s)), jnp.int32)
            batches.append((ids, jnp.ones((b, s), jnp.int32)))
        calib = [
            (jnp.asarray(rng.integers(1000, cfg.vocab_size, (b, s)), jnp.int32), batches[0][1])
            for _ in range(2)
        ]
        ref = None
        base_t = None
        base_dev = None
        for name, spec, act, agran, fused in VARIANTS:
            if only and name != "bf16 XLA" and not any(o in name for o in only.split(",")):
                continue
            if spec is None and fused is None:
                model, params = BertEncoder(cfg, jnp.bfloat16), p16
            else:
                model, params = variant_model(cfg, p32, spec, act, agran, calib, fused)
            fn = jax.jit(lambda p, i, m, model=model: model.apply({"params": p}, i, m))
            path = "xla dot"
            if spec is not None:
                w = params["layer_0"]["intermediate"]["kernel"]
                x = jax.ShapeDtypeStruct((b * s, cfg.hidden_size), jnp.bfloat16)
                if act == STATIC:
                    x = bq.quantize_static(jnp.zeros(x.shape, x.dtype), 1.0)
                    path = bq.plan(x, w).path
                else:
                    path = bq.plan(x, w, act_format=act, act_granularity=agran).path
            try:
                s0 = _cache_stats()
                t = _time(fn, params, batches)
                s1 = _cache_stats()
                t_async = _time_async(fn, params, batches)
                s2 = _cache_stats()
                dev = (
                    device_time_per_call(fn, [(params, *bt) for bt in batches], calls=8)
                    if jax.devices()[0].platform == "gpu"
                    else {"us": float("nan"), "span_us": float("nan"), "kernels": 0}
                )
            except Exception as e:  # record, keep going
                print(f"{name} {b}x{s}: FAILED {type(e).__name__}: {e}", flush=True)
                rows.append({"variant": name, "batch": f"{b}x{s}", "error": str(e)[:200]})
                continue
            emb = np.asarray(fn(params, *batches[0]), np.float32)
            if ref is None:
                ref, base_t, base_dev, base_async = emb, t, dev, t_async
            cos = float(np.mean(np.sum(emb * ref, axis=1)))
            row = {
                "variant": name,
                "batch": f"{b}x{s}",
                "ffn_path": path,
                "ms": t * 1e3,
                "async_ms": t_async * 1e3,
                "async_speedup_vs_bf16": base_async / t_async,
                "device_ms": dev["us"] / 1e3,
                "span_ms": dev["span_us"] / 1e3,
                "kernels": dev["kernels"],
                "tokens_per_s": b * s / t,
                "speedup_vs_bf16": base_t / t,
                "span_speedup_vs_bf16": base_dev["span_us"] / dev["span_us"],
                "cosine_vs_bf16": cos,
                "kernel_MB": param_bytes(params, lambda name: name.endswith("kernel")) / 1e6,
                # XLA re-traces a custom call whose buffers moved: how often, what it costs
                "awaited": _host_per_call(s0, s1, WARMUP + ITERS),
                "queued": _host_per_call(s1, s2, 1 + QUEUED),
            }
            rows.append(row)
            print(
                f"{name:44s} {b:3d}x{s:<4d} {path:14s} wall {t * 1e3:7.3f} ms "
                f"queued {t_async * 1e3:7.3f} ms "
                f"dev {row['device_ms']:7.3f} span {row['span_ms']:7.3f} ms "
                f"{base_t / t:5.2f}x wall {row['span_speedup_vs_bf16']:5.2f}x span "
                f"cos {cos:.5f} retraces awaited {row['awaited']} queued {row['queued']}",
                flush=True,
            )
        _write(which + tag, cfg, rows)  # partial results survive a timeout
    print(_write(which + tag, cfg, rows))


def _write(which, cfg, rows) -> str:
    meta = machine() | {
        "config": dataclasses.asdict(cfg),
        "timing": "whole jitted encoder per call: wall = block_until_ready, 5 warm-ups, median "
        "of 30; device/span = profiler trace of 8 calls (span: first kernel start to last "
        "kernel end of a call), median",
        "weights": "random N(0, 0.02^2) (BERT init), bf16 for non-kernel params",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    return write(
        f"e2e_{which}",
        meta,
        rows,
        [
            ("variant", "variant"),
            ("batch", "batch x seq"),
            ("ffn_path", "FFN qmatmul path"),
            ("ms", "wall ms / call"),
            ("async_ms", "queued ms / call"),
            ("async_speedup_vs_bf16", "x bf16 (queued)"),
            ("device_ms", "device ms"),
            ("span_ms", "span ms"),
            ("kernels", "kernels"),
            ("tokens_per_s", "tokens/s (wall)"),
            ("speedup_vs_bf16", "x bf16 (wall)"),
            ("span_speedup_vs_bf16", "x bf16 (span)"),
            ("cosine_vs_bf16", "cosine vs bf16"),
            ("kernel_MB", "kernel MB"),
        ],
    )


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?", default="e5_large", choices=["e5_large", "tiny"])
    ap.add_argument("--only", default="", help="comma-separated substrings of variant names")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--shapes", default="", help="batch x seq list, e.g. 128x128,32x512")
    a = ap.parse_args()
    main(a.config, a.only, a.tag, a.shapes)
