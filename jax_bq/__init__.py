"""jax_bq: block-scaled low precision (FP8, FP4, NVFP4, MX) for JAX.

Quantize, dequantize and qmatmul ops are XLA FFI custom calls wrapped
as JAX primitives, with a pure-jnp twin that defines the numerics and serves
as fallback. See the README for the pinned numerics.
"""

from jax_bq import _native  # registers the FFI targets first
from jax_bq.capabilities import quantize_auto, select_format
from jax_bq.formats import Granularity, QuantFormat
from jax_bq.matmul import MatmulPlan, explain, plan, qmatmul
from jax_bq.ops import dequantize, quantize, quantize_dequantize, sqnr_db
from jax_bq.qtensor import QuantizedTensor

__version__ = "0.1.0"

__all__ = [
    "Granularity",
    "MatmulPlan",
    "QuantFormat",
    "QuantizedTensor",
    "dequantize",
    "explain",
    "plan",
    "qmatmul",
    "quantize",
    "quantize_auto",
    "quantize_dequantize",
    "select_format",
    "sqnr_db",
]
del _native
