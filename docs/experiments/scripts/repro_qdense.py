"""Diagnostic: does a jitted QDense give the same bits as an eager qmatmul?

python docs/experiments/scripts/repro_qdense.py
(GPU machine; JAX_BQ_DEBUG_GEMM=1 prints cuBLASLt choices)
"""

import jax
import jax.numpy as jnp
import numpy as np

import jax_bq as bq
from jax_bq.flax import QDense, WeightQuant, quantize_model_weights

X = jax.random.normal(jax.random.key(1), (3, 5, 256), jnp.float32)
m = QDense(128, act_format="fp8_e4m3")
v = m.init(jax.random.key(0), X)
v["params"]["bias"] = jnp.linspace(-1, 1, 128)
q = quantize_model_weights(v["params"], WeightQuant("fp8_e4m3", "tile_2d"))
w = q["kernel"]
print("explain eager:", bq.explain(X, w, out_dtype=jnp.float32, act_format="fp8_e4m3"))
y = np.asarray(jax.jit(m.apply)({"params": q}, X))
mm = np.asarray(bq.qmatmul(X, w, out_dtype=jnp.float32, act_format="fp8_e4m3"))
mm_jit = np.asarray(
    jax.jit(lambda a, b: bq.qmatmul(a, b, out_dtype=jnp.float32, act_format="fp8_e4m3"))(X, w)
)
ref = mm + np.asarray(v["params"]["bias"])
y2 = np.asarray(jax.jit(m.apply)({"params": q}, X))
print("y == ref:", np.array_equal(y, ref), " y == y2:", np.array_equal(y, y2))
print("eager mm == jit mm:", np.array_equal(mm, mm_jit))
print("y - bias == mm:", np.array_equal(y - np.asarray(v["params"]["bias"]), mm))
hlo = jax.jit(m.apply).lower({"params": q}, X).compile().as_text()
print([ln.strip()[:200] for ln in hlo.splitlines() if "custom-call" in ln or "fusion" in ln][:12])
