"""Decode-sized qmatmul calls for ncu: each kernel's device time without host jitter.

Run under ``ncu`` (see docs/experiments/scripts/gpu_check.sh qmm); prints the call order so the
kernels in ncu's CSV can be matched to the cases.
"""

import jax
import jax.numpy as jnp

import jax_bq as bq

N = K = 8192
w32 = jax.random.normal(jax.random.PRNGKey(0), (N, K), jnp.float32)
weights = {
    g: bq.quantize(w32, "fp8_e4m3", granularity=g) for g in ("per_tensor", "per_channel", "tile_2d")
}
for m in (1, 16):
    x = jax.random.normal(jax.random.PRNGKey(m), (m, K), jnp.bfloat16)
    for g, w in weights.items():
        for act in ("bf16", "fp8_e4m3"):
            p = bq.plan(x, w, act_format=act)
            if p.path == "dequant_dot":
                continue  # XLA's own kernels: a JAX process under ncu crashed in them
            f = jax.jit(lambda a, b, act=act: bq.qmatmul(a, b, act_format=act))
            for _ in range(3):
                jax.block_until_ready(f(x, w))
            print(f"case M={m} {g} act={act}: {p.path}", flush=True)
