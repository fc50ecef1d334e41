"""W4A16 decode calls for ncu (``-k regex:W4A16``): where the kernel's time goes.

Run under ncu by ``bash docs/experiments/scripts/gpu_check.sh w4prof``; prints the call order.
"""

import jax
import jax.numpy as jnp

import jax_bq as bq

for n in (28672, 8192):
    w = bq.quantize(jax.random.normal(jax.random.PRNGKey(0), (n, 8192), jnp.float32), "nvfp4")
    for m in (1, 16):
        x = jax.random.normal(jax.random.PRNGKey(m), (m, 8192), jnp.bfloat16)
        f = jax.jit(lambda a, b: bq.qmatmul(a, b, act_format="bf16"))
        for _ in range(2):
            jax.block_until_ready(f(x, w))
        print(f"case M={m} N={n} K=8192: {bq.plan(x, w, act_format='bf16').path}", flush=True)
