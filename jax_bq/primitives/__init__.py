"""One ``jax.extend.core.Primitive`` per op.

quantize, dequantize, qmatmul, calibrate, fp4_to_fp8 and hadamard.
"""

from jax_bq.primitives.calibrate import calibrate_p
from jax_bq.primitives.convert import fp4_to_fp8_p
from jax_bq.primitives.dequantize import dequantize_p
from jax_bq.primitives.hadamard import hadamard_p
from jax_bq.primitives.qmatmul import qmatmul_p
from jax_bq.primitives.quantize import quantize_p

__all__ = ["calibrate_p", "dequantize_p", "fp4_to_fp8_p", "hadamard_p", "qmatmul_p", "quantize_p"]
