"""Device time per kernel of the jitted E5-large-shaped encoder, from a JAX profiler trace.

``python -m scripts.e2e_kernels [OUT_DIR] [--shape 32x128] [--calls 2]``: for
bf16 XLA and the FP8 W8A8 variants (static per-tensor, per-token, per-tensor
dynamic), compiles and warms up the whole 24-layer encoder (random weights),
traces ``--calls`` calls with ``jax.profiler.trace`` and reads the GPU
plane of the trace with ``jax.profiler.ProfileData`` (no TensorBoard needed).
Prints, per variant, the summed device time of every kernel per call grouped
by kind (GEMMs, jax_bq kernels, XLA fusions, ...), the 25 costliest kernel
names, and the wall time per call for comparison (kernels of different
streams may overlap, so the sum can exceed it).
"""

from __future__ import annotations

import argparse
import collections
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_e2e import VARIANTS as E2E_VARIANTS  # noqa: E402
from benchmarks.bench_e2e import variant_model  # noqa: E402
from benchmarks.common import gpu_kernel_events  # noqa: E402
from jax_bq.flax import cast_float_params
from jax_bq.models import E5_LARGE, BertEncoder, random_bert_params

# name -> (weight spec, activations, act granularity, fused options): bench_e2e's variants.
VARIANTS = {name: rest for name, *rest in E2E_VARIANTS}
KINDS = [
    ("FP8 GEMM (cuBLASLt)", r"e4m3|qqtst"),
    ("attention (cuDNN)", r"cudnn|flash|fmha|sdpa"),
    ("jax_bq kernels", r"jax_bq|Quantize|RowQuant|Amax|Broadcast|Relayout|Swizzle|LayerNorm"),
    ("bf16 GEMM (cuBLAS / Triton)", r"gemm|nvjet|xmma|cutlass|triton_gemm|dot"),
    ("reductions / softmax", r"reduce|softmax"),
    ("other fusions (LN, GELU, bias, casts, transposes)", r".*"),
]


def _kind(name: str) -> str:
    return next(k for k, pat in KINDS if re.search(pat, name, re.I))


def profile(name, cfg, p32, batches, calls: int) -> None:
    spec, act, gran, fused = VARIANTS[name]
    if spec is None and fused is None:
        model, params = BertEncoder(cfg, jnp.bfloat16), cast_float_params(p32, jnp.bfloat16)
    else:  # the same construction (and calibration) as the benchmark's
        model, params = variant_model(cfg, p32, spec, act, gran, batches[1:], fused)
    fn = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))
    for _ in range(3):
        jax.block_until_ready(fn(params, *batches[0]))
    t0 = time.perf_counter()
    for _ in range(5):
        jax.block_until_ready(fn(params, *batches[0]))
    wall = (time.perf_counter() - t0) / 5
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(calls):
                jax.block_until_ready(fn(params, *batches[0]))
        kernels = [(name, us) for name, _, us in gpu_kernel_events(d)]
    by_kind = collections.defaultdict(lambda: [0, 0.0])
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for n, us in kernels:
        by_kind[_kind(n)][0] += 1
        by_kind[_kind(n)][1] += us
        by_name[n[:100]][0] += 1
        by_name[n[:100]][1] += us
    total = sum(us for _, us in kernels) / calls
    print(
        f"## {name}: {len(kernels) / calls:.0f} kernels, {total:.0f} us of kernels per call; "
        f"wall {wall * 1e6:.0f} us per call"
    )
    for k, (c, us) in sorted(by_kind.items(), key=lambda kv: -kv[1][1]):
        print(
            f"  {k:50s} {c / calls:6.0f} kernels {us / calls:9.1f} us "
            f"({us / calls / cfg.num_layers:6.1f} us per block)"
        )
    for n, (c, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:25]:
        print(f"    {c / calls:5.0f} x {us / c:7.2f} us = {us / calls:8.1f}  {n}")
    print(flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="32x128")
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--only", default="", help="';'-separated variant names of bench_e2e")
    a = ap.parse_args()
    b, s = (int(v) for v in a.shape.split("x"))
    cfg = E5_LARGE
    p32 = random_bert_params(cfg)
    rng = np.random.default_rng(0)
    batches = [
        (
            jnp.asarray(rng.integers(1000, cfg.vocab_size, (b, s)), jnp.int32),
            jnp.ones((b, s), jnp.int32),
        )
        for _ in range(3)
    ]
    for name in VARIANTS:
        if a.only and not any(o == name for o in a.only.split(";")):
            continue
        profile(name, cfg, p32, batches, a.calls)


if __name__ == "__main__":
    main()
