"""``qat_matmul_p``: ``x[M, K] . quantize(w[N, K])^T`` with a float master weight.

The primitive that quantization-aware training differentiates: its operands
are the float activations and the float (bf16/f32) master weight, its value is
exactly ``qmatmul(x, quantize(w, spec...), ...)`` (every lowering binds
``quantize_p`` and ``qmatmul_p``, so the weight quantize kernel and the
qmatmul fast path run), and its JVP (:mod:`jax_bq.primitives.autodiff`)
carries the weight's straight-through estimator, which ``quantize_p`` alone
cannot (its codes have no useful derivative). The single parameter ``spec``
(:class:`QatSpec`) is static.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from jax_bq.formats import Granularity, QuantFormat
from jax_bq.primitives.common import def_jitted_impl

#: Gradient recipes: "bf16" (derivative products in bf16/f16 with float32
#: accumulation, dequantized operands) and "fp8" (TransformerEngine's hybrid
#: recipe: E5M2 gradients x E4M3 weights/activations, per-tensor current
#: scaling, through qmatmul).
GRAD_RECIPES = ("bf16", "fp8")


@dataclass(frozen=True)
class QatSpec:
    """Everything static about one ``qat_matmul`` call (hashable)."""

    w_format: QuantFormat
    w_granularity: Granularity
    w_block: int | tuple[int, int] | None
    out_dtype: np.dtype
    act_format: QuantFormat | None
    act_granularity: str | None
    grads: str

    def quantize_weight(self, w):
        """``quantize(w[N, K])`` blocked along K (axis -1)."""
        from jax_bq.ops import quantize

        return quantize(
            w, self.w_format, granularity=self.w_granularity, block_size=self.w_block, axis=-1
        )

    def matmul_kwargs(self) -> dict:
        """The keyword arguments of the forward :func:`jax_bq.qmatmul`."""
        return {
            "out_dtype": self.out_dtype,
            "act_format": self.act_format,
            "act_granularity": self.act_granularity,
        }


qat_matmul_p = Primitive("jax_bq_qat_matmul")
def_jitted_impl(qat_matmul_p)


def _abstract_eval(x, w, *, spec: QatSpec):
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"qat_matmul_p expects x [M, K] and w [N, K], got {x.shape}, {w.shape}")
    return ShapedArray((x.shape[0], w.shape[0]), spec.out_dtype)


qat_matmul_p.def_abstract_eval(_abstract_eval)


def forward(x, w, *, spec: QatSpec):
    """``(y, w_q)``: the primal product and the quantized weight it used."""
    from jax_bq.matmul import qmatmul

    wq = spec.quantize_weight(w)
    return qmatmul(x, wq, **spec.matmul_kwargs()), wq


def _lower(x, w, *, spec):
    return forward(x, w, spec=spec)[0]


mlir.register_lowering(qat_matmul_p, mlir.lower_fun(_lower, multiple_results=False))


def _batch(args, dims, *, spec):
    # Per-member semantics (each member quantizes its own weight and activations).
    return jax.vmap(lambda x, w: _lower(x, w, spec=spec), in_axes=tuple(dims))(*args), 0


batching.primitive_batchers[qat_matmul_p] = _batch
