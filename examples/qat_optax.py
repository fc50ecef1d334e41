"""Quantization-aware training with optax: a Flax MLP whose dense layers train in FP8.

``QDense(qat="fp8_e4m3")`` keeps the float32 master kernel and runs
``jax_bq.qat.qat_matmul``: the kernel and the activations are quantized to
E4M3 on the fly in the forward, the backward products run in bf16
(``qat_grads="bf16"``) or in FP8 with E5M2 gradients (``qat_grads="fp8"``,
the FP8 training step), and ``dW`` flows through the straight-through
estimator. After training, ``quantize_model_weights`` freezes the kernels
to FP8 for inference with the same module (QAT off).

    python examples/qat_optax.py [--grads fp8] [--steps 200]
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jax_bq
from jax_bq.flax import QDense, quantize_model_weights


class MLP(nn.Module):
    """Two dense layers with a GELU; ``qat`` as for :class:`jax_bq.flax.QDense`."""

    qat: str | None = None
    grads: str = "bf16"

    @nn.compact
    def __call__(self, x):
        """``x[..., 64] -> [..., 16]``."""
        kw = {"qat": self.qat, "qat_grads": self.grads, "act_format": "fp8_e4m3"}
        x = jax.nn.gelu(QDense(256, **kw)(x))
        return QDense(16, **kw)(x)


def main() -> None:
    """Trains, then evaluates the frozen FP8 model."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grads", choices=["bf16", "fp8"], default="bf16")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()

    # A regression target: a fixed random teacher network.
    kx, kt = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (512, 64))
    teacher = nn.Dense(16)
    y = jnp.tanh(teacher.apply(teacher.init(kt, x), x))

    model = MLP(qat="fp8_e4m3", grads=args.grads)
    params = model.init(jax.random.PRNGKey(1), x)["params"]
    optimizer = optax.adamw(3e-3)
    opt_state = optimizer.init(params)

    def loss_fn(p, xb, yb):
        return jnp.mean((model.apply({"params": p}, xb) - yb) ** 2)

    @jax.jit
    def step(p, s, xb, yb):
        loss, grads = jax.value_and_grad(loss_fn)(p, xb, yb)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    for i in range(args.steps):
        params, opt_state, loss = step(params, opt_state, x, y)
        if i % 50 == 0 or i == args.steps - 1:
            print(f"step {i}: loss {float(loss):.5f}")

    # Deploy: freeze the kernels to FP8 (qmatmul inference, same module without QAT).
    frozen = quantize_model_weights(params, "fp8_e4m3")
    y_q = MLP().apply({"params": frozen}, x)
    print("frozen FP8 inference loss:", float(jnp.mean((y_q - y) ** 2)))
    print(jax_bq.explain(x, frozen["QDense_0"]["kernel"]))


if __name__ == "__main__":
    main()
