"""Where the end-to-end FP8 encoder loses time: per-call costs at E5-large shapes.

(a) per-call slope (benchmarks/common.per_call) of XLA's bf16 dot vs qmatmul
    (per-token in-call, per-tensor in-call, pre-quantized per-token) for the
    six dense shapes of an E5-large block at M = 4096 and 128;
(b) per-block time: (t(8 layers) - t(4 layers)) / 4 for bf16 and FP8;
(c) kernel-level op counts in the compiled HLO of one block.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import sys

import jax
import jax.numpy as jnp

import jax_bq as bq  # noqa: E402
from benchmarks.common import per_call, time_fn  # noqa: E402
from jax_bq.flax import WeightQuant, cast_float_params, quantize_model_weights  # noqa: E402
from jax_bq.models import E5_LARGE, BertEncoder, random_bert_params  # noqa: E402


def part_a():
    key = jax.random.key(0)
    for m in (4096, 128):
        for n, k in ((1024, 1024), (4096, 1024), (1024, 4096), (3072, 1024)):
            r = 8
            x = jax.random.normal(key, (m, k), jnp.bfloat16)
            xs = [x * (1 + i / 64) for i in range(4 * r)]
            w = [
                jax.random.normal(jax.random.key(i + 1), (n, k), jnp.float32) * 0.02
                for i in range(r)
            ]
            wt = [jnp.asarray(a.T, jnp.bfloat16) for a in w]
            wc = [bq.quantize(a, "fp8_e4m3", granularity="per_channel") for a in w]
            wtens = [bq.quantize(a, "fp8_e4m3", granularity="per_tensor") for a in w]
            xq = [bq.quantize(a, "fp8_e4m3", granularity="per_channel") for a in xs]
            res = {
                "xla bf16": per_call(lambda a, b: a @ b, xs, wt),
                "qmm per-token": per_call(
                    lambda a, b: bq.qmatmul(a, b, act_format="fp8_e4m3"), xs, wc
                ),
                "qmm per-tensor": per_call(
                    lambda a, b: bq.qmatmul(a, b, act_format="fp8_e4m3"), xs, wtens
                ),
                "qmm pre-quantized": per_call(lambda a, b: bq.qmatmul(a, b), xq, wc),
            }
            line = "  ".join(f"{k2} {v * 1e6:7.1f} us" for k2, v in res.items())
            print(f"(a) M={m:5d} N={n:5d} K={k:5d}: {line}", flush=True)


def _model_time(cfg, params, spec, act, agran, b, s):
    if spec is not None:
        params = quantize_model_weights(params, [("kernel$", spec)])
    params = cast_float_params(params, jnp.bfloat16)
    model = BertEncoder(cfg, jnp.bfloat16, act, agran)
    fn = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))
    ids = jax.random.randint(jax.random.key(1), (b, s), 1000, 30000)
    mask = jnp.ones((b, s), jnp.int32)
    t = time_fn(fn, params, ids, mask, warmup=3, iters=20)["median_s"]
    return t, fn.lower(params, ids, mask).compile().as_text()


def part_bc():
    variants = [
        ("bf16", None, None, None),
        ("fp8 per-token", WeightQuant("fp8_e4m3"), "fp8_e4m3", "per_token"),
        ("fp8 per-tensor", WeightQuant("fp8_e4m3", "per_tensor"), "fp8_e4m3", "per_tensor"),
    ]
    for b, s in ((32, 128), (1, 128)):
        for name, spec, act, agran in variants:
            ts = {}
            hlo = ""
            for layers in (4, 8):
                cfg = dataclasses.replace(E5_LARGE, num_layers=layers)
                p = random_bert_params(cfg)
                ts[layers], text = _model_time(cfg, p, spec, act, agran, b, s)
                if layers == 4:
                    hlo = text
            per_block = (ts[8] - ts[4]) / 4
            ops = collections.Counter()
            entry = hlo[hlo.find("ENTRY") :]
            for op in re.findall(r"= \S+ (fusion|custom-call|copy|transpose|convolution)\(", entry):
                ops[op] += 1
            calls = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', entry))
            print(
                f"(b) {b}x{s} {name:15s}: per block {per_block * 1e6:8.1f} us "
                f"(4 layers {ts[4] * 1e3:.2f} ms, 8 layers {ts[8] * 1e3:.2f} ms); "
                f"(c) 4-layer entry ops {dict(ops)} custom calls {dict(calls)}",
                flush=True,
            )
            if name == "fp8 per-token" and b == 32:
                with open(sys.argv[1] if len(sys.argv) > 1 else "/tmp/hlo_fp8.txt", "w") as f:
                    f.write(hlo)


if __name__ == "__main__":
    part_a()
    part_bc()
