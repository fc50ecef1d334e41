"""jax_bq: block-scaled low precision (FP8, FP4, NVFP4, MX) for JAX.

Quantize, dequantize and qmatmul ops are XLA FFI custom calls wrapped
as JAX primitives, with a pure-jnp twin that defines the numerics and serves
as fallback. See the README for the pinned numerics.
"""

from jax_bq import (
    _native,  # registers the FFI targets first
    epilogue,
)
from jax_bq.calibration import (
    CalibrationConfig,
    CalibrationResult,
    calibrate,
    calibrate_tensor,
)
from jax_bq.capabilities import quantize_auto, select_format
from jax_bq.convert import fp4_to_fp8
from jax_bq.formats import Granularity, QuantFormat
from jax_bq.io import load_quantized, save_quantized
from jax_bq.layernorm import layernorm_quantize
from jax_bq.matmul import MatmulPlan, explain, plan, qmatmul
from jax_bq.model_calibration import calibrate_model, quantize_with_calibration
from jax_bq.ops import dequantize, quantize, quantize_dequantize, sqnr_db
from jax_bq.profiles import ModelCalibrationProfile, load_profile, profile_valid, save_profile
from jax_bq.qtensor import QuantizedTensor
from jax_bq.semantic import SemanticDrift, validate_semantic_alignment
from jax_bq.static import pow2_scale, quantize_static, static_scale

__version__ = "0.1.0"

__all__ = [
    "CalibrationConfig",
    "CalibrationResult",
    "Granularity",
    "MatmulPlan",
    "ModelCalibrationProfile",
    "QuantFormat",
    "QuantizedTensor",
    "SemanticDrift",
    "calibrate",
    "calibrate_model",
    "calibrate_tensor",
    "dequantize",
    "epilogue",
    "explain",
    "fp4_to_fp8",
    "layernorm_quantize",
    "load_profile",
    "load_quantized",
    "plan",
    "pow2_scale",
    "profile_valid",
    "qmatmul",
    "quantize",
    "quantize_auto",
    "quantize_dequantize",
    "quantize_static",
    "quantize_with_calibration",
    "save_profile",
    "save_quantized",
    "select_format",
    "sqnr_db",
    "static_scale",
    "validate_semantic_alignment",
]
del _native
