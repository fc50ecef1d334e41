"""Flax integration: Linen and NNX layers that run :func:`jax_bq.qmatmul`.

Needs ``flax`` (``pip install jax_bq[flax]``).
"""

from jax_bq.flax.linen import QDense, QEmbed, quantized_dot_general
from jax_bq.flax.mixed_precision import (
    KernelSensitivity,
    MixedPrecisionPlan,
    kernel_sensitivity,
    plan_mixed_precision,
)
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
    "KernelSensitivity",
    "MixedPrecisionPlan",
    "QDense",
    "QEmbed",
    "QLinear",
    "WeightQuant",
    "cast_float_params",
    "kernel_to_nk",
    "kernel_sensitivity",
    "param_bytes",
    "plan_mixed_precision",
    "quantize_kernel",
    "quantize_model_weights",
    "quantize_nnx_model",
    "quantized_dot_general",
]
