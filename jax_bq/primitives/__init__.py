"""One ``jax.extend.core.Primitive`` per op.

quantize, dequantize, quantize_dequantize (fake-quant), qmatmul, qat_matmul,
calibrate, fp4_to_fp8 and hadamard; their differentiation rules live in
:mod:`jax_bq.primitives.autodiff`.
"""

from jax_bq.primitives import autodiff  # noqa: F401,I001 - registers the JVP/transpose rules
from jax_bq.primitives.calibrate import calibrate_p
from jax_bq.primitives.convert import fp4_to_fp8_p
from jax_bq.primitives.dequantize import dequantize_p
from jax_bq.primitives.hadamard import hadamard_p
from jax_bq.primitives.qat_matmul import qat_matmul_p
from jax_bq.primitives.qmatmul import qmatmul_p
from jax_bq.primitives.quantize import quantize_p
from jax_bq.primitives.quantize_dequantize import quantize_dequantize_p

__all__ = [
    "calibrate_p",
    "dequantize_p",
    "fp4_to_fp8_p",
    "hadamard_p",
    "qat_matmul_p",
    "qmatmul_p",
    "quantize_dequantize_p",
    "quantize_p",
]
