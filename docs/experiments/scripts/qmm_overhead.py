"""Where do decode-sized qmatmul calls lose time? Per-call cost of a chain of
calls in one executable (slope between chain lengths), for a W8A16 call, a
tiny jax_bq custom call and XLA's own bf16 dot. Run it under different
XLA_FLAGS (command buffers on/off) to see host-side dispatch costs.
"""

import sys

import jax
import jax.numpy as jnp

import jax_bq as bq
from benchmarks.common import per_call  # noqa: E402


def slope(op, xs, w):
    """Microseconds per call: chains of 16 and 64 calls (benchmarks/common.per_call)."""
    return per_call(op, xs, [w], iters=20, scale=8, spans=(2, 8)) * 1e6


k = 8192
w32 = jax.random.normal(jax.random.PRNGKey(0), (k, k), jnp.float32)
wq = bq.quantize(w32, "fp8_e4m3", granularity="per_channel")
wb = w32.astype(jnp.bfloat16)
xs = [jax.random.normal(jax.random.PRNGKey(i), (1, k), jnp.bfloat16) for i in range(64)]
small_w = bq.quantize(w32[:256, :256], "fp8_e4m3", granularity="per_channel")
small_x = [x[:, :256] for x in xs]
dn = (((1,), (1,)), ((), ()))
label = sys.argv[1] if len(sys.argv) > 1 else ""
cases = [
    ("W8A16 1x8192x8192", lambda a, b: bq.qmatmul(a, b, act_format="bf16"), xs, wq),
    ("W8A8 1x8192x8192 per-token", lambda a, b: bq.qmatmul(a, b, act_format="fp8_e4m3"), xs, wq),
    ("W8A16 1x256x256 (floor)", lambda a, b: bq.qmatmul(a, b, act_format="bf16"), small_x, small_w),
    ("XLA bf16 dot 1x256x256", lambda a, b: jax.lax.dot_general(a, b, dn), small_x, wb[:256, :256]),
    ("XLA bf16 dot 1x8192x8192", lambda a, b: jax.lax.dot_general(a, b, dn), xs, wb),
]
for name, op, x, w in cases:
    print(f"[{label}] {name}: {slope(op, x, w):.1f} us/call", flush=True)
