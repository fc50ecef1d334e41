"""Flax integration: Linen and NNX layers that run :func:`jax_bq.qmatmul`.

Needs ``flax`` (``pip install jax_bq[flax]``).
"""

from jax_bq.flax.linen import QDense, QEmbed, quantized_dot_general
from jax_bq.flax.nnx import QLinear, quantize_nnx_model
from jax_bq.flax.rules import (
    WeightQuant,
    cast_float_params,
    kernel_to_nk,
    param_bytes,
    quantize_kernel,
    quantize_model_weights,
)

__all__ = [
    "QDense",
    "QEmbed",
    "QLinear",
    "WeightQuant",
    "cast_float_params",
    "kernel_to_nk",
    "param_bytes",
    "quantize_kernel",
    "quantize_model_weights",
    "quantize_nnx_model",
    "quantized_dot_general",
]
