"""Quantization formats, granularities and their constants.

Element formats follow the OCP 8-bit floating point specification (E4M3FN,
E5M2), the OCP Microscaling (MX) v1.0 specification (E2M1 elements, E8M0
shared scales) and NVIDIA's NVFP4 definition (E2M1 elements, an E4M3 scale per
16 elements and a float32 scale per tensor).

The numbers below are pinned: the CPU kernel, the CUDA kernel and the jnp
twin in :mod:`jax_bq.reference` all use them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import jax.numpy as jnp
import ml_dtypes
import numpy as np

F8E4M3_MAX = 448.0  # 0x7E = S.1111.110
F8E5M2_MAX = 57344.0  # 0x7B = S.11110.11
F4E2M1_MAX = 6.0  # 0x7 = S.11.1
NVFP4_TENSOR_DIVISOR = F8E4M3_MAX * F4E2M1_MAX  # 2688: tensor scale = amax / 2688
NVFP4_BLOCK = 16
MX_BLOCK = 32
MIN_BLOCK = 16
MAX_BLOCK = 256
DEFAULT_TILE = (128, 128)

#: Input / output dtypes the kernels accept.
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))


class Granularity(enum.Enum):
    """How elements share a scale.

    * ``PER_TENSOR``: one scale for the whole array.
    * ``PER_CHANNEL``: one scale per slice along ``axis`` (the whole axis is one
      block; e.g. one scale per row of a ``[N, K]`` weight for ``axis=-1``).
    * ``PER_BLOCK``: blocks of ``block_size`` consecutive elements along ``axis``.
    * ``TILE_2D``: ``block_size = (rows, cols)`` tiles over the last two axes
      (128 x 128 for GEMM weights, the DeepSeek-V3 recipe).
    """

    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"
    PER_BLOCK = "per_block"
    TILE_2D = "tile_2d"


@dataclass(frozen=True)
class _FormatSpec:
    ffi_id: int
    bits: int
    max_value: float | None
    data_dtype: np.dtype | None  # dtype of QuantizedTensor.data
    element_dtype: np.dtype | None  # ml_dtypes element type (for the oracle)
    scale_dtype: np.dtype | None
    fixed_block: int | None  # NVFP4 / MX: hardware block size
    min_block: int


class QuantFormat(enum.Enum):
    """A storage format.

    ``FP16``/``BF16`` are the unquantized baselines of the capability ladder.
    The others store codes plus scales; see the table in the README.
    """

    FP16 = "fp16"
    BF16 = "bf16"
    FP8_E4M3 = "fp8_e4m3"
    FP8_E5M2 = "fp8_e5m2"
    FP4 = "fp4"
    NVFP4 = "nvfp4"
    MXFP8 = "mxfp8"
    MXFP4 = "mxfp4"

    @property
    def _spec(self) -> _FormatSpec:
        return _SPECS[self]

    @property
    def ffi_id(self) -> int:
        """Format id shared with the C++ ``jax_bq::Format`` enum."""
        return self._spec.ffi_id

    @property
    def bits(self) -> int:
        """Bits per element of the stored data."""
        return self._spec.bits

    @property
    def max_value(self) -> float | None:
        """Largest finite element magnitude (``None`` for FP16/BF16)."""
        return self._spec.max_value

    @property
    def data_dtype(self) -> np.dtype | None:
        """Dtype of ``QuantizedTensor.data``: float8 for FP8, uint8 (2 codes) for FP4."""
        return self._spec.data_dtype

    @property
    def element_dtype(self) -> np.dtype | None:
        """The ml_dtypes element type of one code."""
        return self._spec.element_dtype

    @property
    def scale_dtype(self) -> np.dtype | None:
        """Dtype of the per-block scales (float32, E4M3 for NVFP4, E8M0 for MX)."""
        return self._spec.scale_dtype

    @property
    def is_quantized(self) -> bool:
        """False for the FP16/BF16 baselines."""
        return self.ffi_id >= 0

    @property
    def is_packed(self) -> bool:
        """True when two 4-bit codes share a byte."""
        return self.bits == 4

    @property
    def has_tensor_scale(self) -> bool:
        """True for NVFP4 (second-level float32 scale per tensor)."""
        return self is QuantFormat.NVFP4

    @property
    def is_mx(self) -> bool:
        """True for the OCP MX formats (E8M0 scale per 32)."""
        return self in (QuantFormat.MXFP8, QuantFormat.MXFP4)

    @property
    def fixed_block(self) -> int | None:
        """Block size fixed by the format (16 for NVFP4, 32 for MX), else None."""
        return self._spec.fixed_block

    @property
    def allowed_block_sizes(self) -> tuple[int, ...]:
        """Block sizes accepted for ``Granularity.PER_BLOCK``."""
        if self._spec.fixed_block is not None:
            return (self._spec.fixed_block,)
        if not self.is_quantized:
            return ()
        sizes = []
        b = self._spec.min_block
        while b <= MAX_BLOCK:
            sizes.append(b)
            b *= 2
        return tuple(sizes)

    @property
    def default_block_size(self) -> int | None:
        """Block size used when the caller gives none."""
        if self._spec.fixed_block is not None:
            return self._spec.fixed_block
        if not self.is_quantized:
            return None
        return 32 if self.is_packed else 128

    @property
    def allowed_granularities(self) -> tuple[Granularity, ...]:
        """Granularities this format supports."""
        if not self.is_quantized:
            return tuple(Granularity)
        if self._spec.fixed_block is not None:
            return (Granularity.PER_BLOCK,)
        return tuple(Granularity)

    @classmethod
    def parse(cls, value: QuantFormat | str) -> QuantFormat:
        """Accepts a QuantFormat or its name/value, case-insensitively."""
        if isinstance(value, QuantFormat):
            return value
        if isinstance(value, str):
            key = value.strip().lower()
            for f in cls:
                if key in (f.value, f.name.lower()):
                    return f
        names = ", ".join(f.value for f in cls)
        raise ValueError(f"unknown quantization format {value!r}; expected one of: {names}")


_F32 = np.dtype(np.float32)
_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
_E5M2 = np.dtype(ml_dtypes.float8_e5m2)
_E2M1 = np.dtype(ml_dtypes.float4_e2m1fn)
_E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)
_U8 = np.dtype(np.uint8)

_SPECS = {
    QuantFormat.FP16: _FormatSpec(-1, 16, None, None, None, None, None, 0),
    QuantFormat.BF16: _FormatSpec(-2, 16, None, None, None, None, None, 0),
    QuantFormat.FP8_E4M3: _FormatSpec(2, 8, F8E4M3_MAX, _E4M3, _E4M3, _F32, None, MIN_BLOCK),
    QuantFormat.FP8_E5M2: _FormatSpec(3, 8, F8E5M2_MAX, _E5M2, _E5M2, _F32, None, MIN_BLOCK),
    QuantFormat.FP4: _FormatSpec(4, 4, F4E2M1_MAX, _U8, _E2M1, _F32, None, MIN_BLOCK),
    QuantFormat.NVFP4: _FormatSpec(5, 4, F4E2M1_MAX, _U8, _E2M1, _E4M3, NVFP4_BLOCK, NVFP4_BLOCK),
    QuantFormat.MXFP8: _FormatSpec(6, 8, F8E4M3_MAX, _E4M3, _E4M3, _E8M0, MX_BLOCK, MX_BLOCK),
    QuantFormat.MXFP4: _FormatSpec(7, 4, F4E2M1_MAX, _U8, _E2M1, _E8M0, MX_BLOCK, MX_BLOCK),
}

QUANTIZED_FORMATS = tuple(f for f in QuantFormat if f.is_quantized)
