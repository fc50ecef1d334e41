"""Flax integration: Linen and NNX layers that run :func:`jax_bq.qmatmul`.

Needs ``flax`` (``pip install "jax_bq[flax]"``).
"""

try:
    import flax as _flax
except ModuleNotFoundError as _e:
    if _e.name != "flax":
        raise
    raise ModuleNotFoundError(
        'jax_bq.flax needs Flax, which is not installed: pip install "jax_bq[flax]"',
        name="flax",
    ) from None
del _flax

from jax_bq.flax.linen import QDense, QEmbed, quantized_dot_general  # noqa: E402
from jax_bq.flax.mixed_precision import (  # noqa: E402
    KernelSensitivity,
    MixedPrecisionPlan,
    kernel_sensitivity,
    plan_mixed_precision,
)
from jax_bq.flax.nnx import QLinear, calibrate_nnx_activation_scales, quantize_nnx_model  # noqa: E402
from jax_bq.flax.rules import (  # noqa: E402
    WeightQuant,
    cast_float_params,
    kernel_to_nk,
    param_bytes,
    quantize_kernel,
    quantize_model_weights,
)
from jax_bq.flax.static_scales import (  # noqa: E402
    ActivationScale,
    act_scales_summary,
    calibrate_activation_scales,
)

__all__ = [
    "ActivationScale",
    "KernelSensitivity",
    "MixedPrecisionPlan",
    "QDense",
    "QEmbed",
    "QLinear",
    "WeightQuant",
    "act_scales_summary",
    "calibrate_activation_scales",
    "calibrate_nnx_activation_scales",
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
