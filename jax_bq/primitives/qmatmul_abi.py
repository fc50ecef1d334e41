"""The integer ABI of the ``jax_bq_qmatmul`` custom call, defined once in Python.

Every integer that crosses into the CUDA handler or the cuBLASLt probe is
spelled here and nowhere else in Python; ``tests/ops/test_qmatmul_abi.py`` parses
the C++ headers and fails if a value drifts:

* :class:`QmmPath`, :class:`ActGran`, :class:`WGran`: ``ffi/cuda/qmatmul.h``.
* :class:`ScaleMode`: ``kScale*`` in ``ffi/cuda/qmatmul.h`` (the values of
  cuBLASLt's ``cublasLtMatmulMatrixScale_t``).
* :class:`CudaType`: ``cudaDataType_t`` values of the operand types.
* :class:`Epi`: ``EpilogueBits`` in ``ffi/cuda/cublaslt_gemm.h``.

The string names (paths, activation granularities) are what plans, configs
and tests print and compare; the enums map them to the attribute values.
"""

from __future__ import annotations

import enum

import jax.numpy as jnp
import numpy as np

from jax_bq.formats import Granularity, QuantFormat

# Paths a plan names. W4A16 is the weight-only FFI path with FP4 weights;
# FALLBACK never reaches the FFI (dequantize + dot_general).
CUBLAS_FP8 = "cublaslt_fp8"
WEIGHT_ONLY = "w8a16"
W4A16 = "w4a16"
CUBLAS_BLOCKFP = "cublaslt_blockfp"
FALLBACK = "dequant_dot"

# Activation granularities a plan names.
ACT_TENSOR = "per_tensor"
ACT_TOKEN = "per_token"
ACT_BLOCK128 = "block_1x128"
ACT_BLOCKFP = "blockfp"  # MXFP8 / NVFP4: the format's own block along K


class QmmPath(enum.IntEnum):
    """Attribute ``path`` (``QmmPath`` in qmatmul.h)."""

    CUBLAS_FP8 = 0
    WEIGHT_ONLY = 1
    CUBLAS_BLOCKFP = 2


class ActGran(enum.IntEnum):
    """Attribute ``act_gran`` (``ActGran`` in qmatmul.h)."""

    TENSOR = 0
    TOKEN = 1
    BLOCK128 = 2
    BLOCKFP = 3


class WGran(enum.IntEnum):
    """Attribute ``w_gran`` (``WGran`` in qmatmul.h)."""

    TENSOR = 0
    CHANNEL = 1
    BLOCK = 2
    TILE = 3


class ScaleMode(enum.IntEnum):
    """cuBLASLt scale modes (``kScale*`` in qmatmul.h); the names are cuBLASLt's."""

    SCALAR_32F = 0
    VEC16_UE4M3 = 1
    VEC32_UE8M0 = 2
    OUTER_VEC_32F = 3
    VEC128_32F = 4
    BLK128x128_32F = 5


class CudaType(enum.IntEnum):
    """``cudaDataType_t`` values of the GEMM operands and outputs."""

    R_32F = 0
    R_16F = 2
    R_16BF = 14
    R_8F_E4M3 = 28
    R_8F_E5M2 = 29
    R_4F_E2M1 = 33


class Epi(enum.IntFlag):
    """Epilogue bits (``EpilogueBits`` in cublaslt_gemm.h).

    ``GELU_ERF`` (exact GELU) is not cuBLASLt's (its GELU is the tanh form):
    the CUDA handler runs a bf16 BIAS GEMM into the workspace, then jax_bq's
    own epilogue kernel.
    """

    BIAS = 1
    GELU_TANH = 2
    RESIDUAL = 4
    AMAX = 8
    GELU_ERF = 16


PATH_IDS = {
    CUBLAS_FP8: QmmPath.CUBLAS_FP8,
    WEIGHT_ONLY: QmmPath.WEIGHT_ONLY,
    W4A16: QmmPath.WEIGHT_ONLY,
    CUBLAS_BLOCKFP: QmmPath.CUBLAS_BLOCKFP,
}
ACT_IDS = {
    ACT_TENSOR: ActGran.TENSOR,
    ACT_TOKEN: ActGran.TOKEN,
    ACT_BLOCK128: ActGran.BLOCK128,
    ACT_BLOCKFP: ActGran.BLOCKFP,
}
W_IDS = {
    Granularity.PER_TENSOR: WGran.TENSOR,
    Granularity.PER_CHANNEL: WGran.CHANNEL,
    Granularity.PER_BLOCK: WGran.BLOCK,
    Granularity.TILE_2D: WGran.TILE,
}
#: Operand type of each weight/activation format in a cuBLASLt GEMM (MXFP8's
#: elements are E4M3; NVFP4's E2M1).
CUDA_TYPE = {
    QuantFormat.FP8_E4M3: CudaType.R_8F_E4M3,
    QuantFormat.FP8_E5M2: CudaType.R_8F_E5M2,
    QuantFormat.MXFP8: CudaType.R_8F_E4M3,
    QuantFormat.NVFP4: CudaType.R_4F_E2M1,
}
#: Output type of each output dtype.
CUDA_OUT = {
    np.dtype(np.float32): CudaType.R_32F,
    np.dtype(jnp.bfloat16): CudaType.R_16BF,
    np.dtype(np.float16): CudaType.R_16F,
}
