"""Performance models of jax_bq on GPUs, checked against measurements.

* :mod:`jax_bq.perf.hardware`: device registry (sourced datasheet figures) and
  measured, versioned hardware profiles (``jax-bq calibrate-hw``).
* :mod:`jax_bq.perf.roofline`: per-operator time = latency + max(compute, memory)
  for every qmatmul path and format, quantize/dequantize, LayerNorm.
* :mod:`jax_bq.perf.attention`: the attention JAX runs, and models of FlashAttention 1-4.
* :mod:`jax_bq.perf.models`: whole encoders (BERT family) and decoders (Llama-3-8B-like).
* :mod:`jax_bq.perf.fit`: efficiency factors fitted from measurements, with held-out error.
* :mod:`jax_bq.perf.recommend`: :func:`recommend` -> :class:`QuantizationRecommendation`.
* :mod:`jax_bq.perf.planner`: the ranking ``jax_bq.matmul.plan`` uses with a measured profile.
"""

from jax_bq.perf.hardware import REGISTRY, DeviceSpec, HardwareProfile, effective, load_profile
from jax_bq.perf.recommend import QuantizationRecommendation, recommend

__all__ = [
    "REGISTRY",
    "DeviceSpec",
    "HardwareProfile",
    "QuantizationRecommendation",
    "effective",
    "load_profile",
    "recommend",
]
