"""Quantization formats, granularities and their constants.

Element formats follow the OCP 8-bit floating point specification (E4M3FN,
E5M2), the OCP Microscaling (MX) v1.0 specification (E2M1 and the FP6 E2M3 /
E3M2 elements, E8M0 shared scales) and NVIDIA's NVFP4 definition (E2M1
elements, an E4M3 scale per 16 elements and a float32 scale per tensor).

The numbers below are pinned: the CPU kernel, the CUDA kernel and the jnp
twin in :mod:`jax_bq.reference` all use them.
"""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass

import jax.numpy as jnp
import ml_dtypes
import numpy as np

F8E4M3_MAX = 448.0  # 0x7E = S.1111.110
F8E5M2_MAX = 57344.0  # 0x7B = S.11110.11
F4E2M1_MAX = 6.0  # 0x7 = S.11.1
F6E2M3_MAX = 7.5  # 0x1F = S.11.111 (OCP MX FP6, no Inf/NaN codes)
F6E3M2_MAX = 28.0  # 0x1F = S.111.11
NVFP4_TENSOR_DIVISOR = F8E4M3_MAX * F4E2M1_MAX  # 2688: tensor scale = amax / 2688
NVFP4_BLOCK = 16
MX_BLOCK = 32
MIN_BLOCK = 16
MAX_BLOCK = 256
DEFAULT_TILE = (128, 128)

#: Input / output dtypes the kernels accept.
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))

logger = logging.getLogger("jax_bq")


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
    default_block: int | None = None
    elements_per_unit: int = 1  # packing: elements per stored unit ...
    bytes_per_unit: int = 1  # ... of this many bytes
    exponent_bits: int = 0
    mantissa_bits: int = 0


class _SpecField:
    """A read-only ``QuantFormat`` attribute: the same-named field of the format's spec row."""

    def __init__(self, doc: str):
        self.__doc__ = doc

    def __set_name__(self, owner, name: str):
        self.name = name

    def __get__(self, fmt, owner=None):
        return self if fmt is None else getattr(_SPECS[fmt], self.name)


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
    MXFP6_E2M3 = "mxfp6_e2m3"
    MXFP6_E3M2 = "mxfp6_e3m2"

    @property
    def _spec(self) -> _FormatSpec:
        return _SPECS[self]

    # Fields of the format's spec row, read as attributes (``QuantFormat.NVFP4.bits``).
    ffi_id = _SpecField("Format id shared with the C++ ``jax_bq::Format`` enum.")
    bits = _SpecField("Bits per element of the stored data.")
    exponent_bits = _SpecField("Exponent bits of one element (0 for FP16/BF16).")
    mantissa_bits = _SpecField("Mantissa bits of one element (0 for FP16/BF16).")
    max_value = _SpecField("Largest finite element magnitude (``None`` for FP16/BF16).")
    data_dtype = _SpecField("Dtype of ``QuantizedTensor.data``: float8, or uint8 packed units.")
    element_dtype = _SpecField("The ml_dtypes element type of one code.")
    scale_dtype = _SpecField("Dtype of the block scales (float32, E4M3 for NVFP4, E8M0 for MX).")
    elements_per_unit = _SpecField("Codes per packed unit (2 for FP4, 4 for FP6, else 1).")
    bytes_per_unit = _SpecField("Bytes per packed unit (1 for FP4, 3 for FP6, else 1).")
    fixed_block = _SpecField("Block size fixed by the format (16 for NVFP4, 32 for MX), else None.")

    @property
    def is_quantized(self) -> bool:
        """False for the FP16/BF16 baselines."""
        return self.ffi_id >= 0

    @property
    def is_packed(self) -> bool:
        """True when several codes share a stored unit (FP4: two per byte)."""
        return self._spec.elements_per_unit > 1

    def packed_extent(self, n: int) -> int:
        """Stored bytes along the packing axis for ``n`` elements.

        ``ceil(n / elements_per_unit) * bytes_per_unit``; a partial last unit
        is zero-padded (FP4: ``ceil(n / 2)``, the last high nibble zero; FP6:
        ``3 * ceil(n / 4)``).

        Bit order of a unit (every packed format; ``ffi/include/jax_bq/layout.h``,
        ``Packing``): its bytes read as one little-endian integer ``w``
        (byte ``t`` is bits ``8t .. 8t+7``), code ``e`` of the unit (``e`` =
        index along the packing axis mod ``elements_per_unit``) is
        ``(w >> (bits * e)) & (2^bits - 1)``. FP6: ``w = b0 | b1 << 8 | b2 << 16``,
        code ``e`` at bits ``6e .. 6e+5``.
        """
        unit = self._spec.elements_per_unit
        return -(-n // unit) * self._spec.bytes_per_unit

    @property
    def has_tensor_scale(self) -> bool:
        """True for NVFP4 (second-level float32 scale per tensor)."""
        return self is QuantFormat.NVFP4

    @property
    def is_mx(self) -> bool:
        """True for the OCP MX formats (E8M0 scale per 32)."""
        return self._spec.scale_dtype == _SCALE_DTYPES["e8m0"]

    @property
    def element_emax(self) -> int | None:
        """OCP MX ``emax_elem``: exponent of the largest normal element.

        ``floor(log2(max_value))``: 8 for E4M3, 2 for E2M1 and E2M3, 4 for
        E3M2. The MX block scale is ``2^(floor(log2(amax)) - emax_elem)``.
        """
        if self._spec.max_value is None:
            return None
        return math.frexp(self._spec.max_value)[1] - 1

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
        return self._spec.default_block

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
_U8 = np.dtype(np.uint8)
# Element dtypes by (bits, exponent bits, mantissa bits).
_ELEMENT_DTYPES = {
    (8, 4, 3): np.dtype(ml_dtypes.float8_e4m3fn),
    (8, 5, 2): np.dtype(ml_dtypes.float8_e5m2),
    (4, 2, 1): np.dtype(ml_dtypes.float4_e2m1fn),
    (6, 2, 3): np.dtype(ml_dtypes.float6_e2m3fn),
    (6, 3, 2): np.dtype(ml_dtypes.float6_e3m2fn),
}
_SCALE_DTYPES = {
    "f32": _F32,
    "e4m3": np.dtype(ml_dtypes.float8_e4m3fn),
    "e8m0": np.dtype(ml_dtypes.float8_e8m0fnu),
}

# The registry of ffi/include/jax_bq/format_registry.h, for when the compiled
# CPU module cannot be imported (tests/test_format_registry.py checks that it
# equals the module's table).
FALLBACK_FORMAT_TABLE = (
    # id, name, bits, exp, man, max, scale, default block, fixed, unit, bytes
    (2, "fp8_e4m3", 8, 4, 3, F8E4M3_MAX, "f32", 128, False, 1, 1),
    (3, "fp8_e5m2", 8, 5, 2, F8E5M2_MAX, "f32", 128, False, 1, 1),
    (4, "fp4", 4, 2, 1, F4E2M1_MAX, "f32", 32, False, 2, 1),
    (5, "nvfp4", 4, 2, 1, F4E2M1_MAX, "e4m3", NVFP4_BLOCK, True, 2, 1),
    (6, "mxfp8", 8, 4, 3, F8E4M3_MAX, "e8m0", MX_BLOCK, True, 1, 1),
    (7, "mxfp4", 4, 2, 1, F4E2M1_MAX, "e8m0", MX_BLOCK, True, 2, 1),
    (8, "mxfp6_e2m3", 6, 2, 3, F6E2M3_MAX, "e8m0", MX_BLOCK, True, 4, 3),
    (9, "mxfp6_e3m2", 6, 3, 2, F6E3M2_MAX, "e8m0", MX_BLOCK, True, 4, 3),
)
_TABLE_KEYS = (
    "id",
    "name",
    "bits",
    "exponent_bits",
    "mantissa_bits",
    "max_value",
    "scale",
    "default_block",
    "fixed_block",
    "elements_per_unit",
    "bytes_per_unit",
)


def _load_format_table() -> tuple[list[dict], str]:
    """The native registry, or the fallback copy with the reason it was used."""
    try:
        from jax_bq import _jax_bq_cpu
    except ImportError as e:
        reason = f"fallback copy in jax_bq/formats.py (the CPU module did not import: {e})"
        logger.warning("jax_bq format registry: %s", reason)
        return [dict(zip(_TABLE_KEYS, row, strict=True)) for row in FALLBACK_FORMAT_TABLE], reason
    return list(_jax_bq_cpu.format_table()), "the compiled CPU module (format_registry.h)"


def _spec_from_row(row: dict) -> _FormatSpec:
    key = (row["bits"], row["exponent_bits"], row["mantissa_bits"])
    if key not in _ELEMENT_DTYPES or row["scale"] not in _SCALE_DTYPES:
        raise ImportError(f"jax_bq: format registry row without a numpy dtype mapping: {row}")
    element = _ELEMENT_DTYPES[key]
    packed = row["elements_per_unit"] > 1
    fixed = row["default_block"] if row["fixed_block"] else None
    return _FormatSpec(
        ffi_id=row["id"],
        bits=row["bits"],
        max_value=float(row["max_value"]),
        data_dtype=_U8 if packed else element,
        element_dtype=element,
        scale_dtype=_SCALE_DTYPES[row["scale"]],
        fixed_block=fixed,
        min_block=fixed if fixed is not None else MIN_BLOCK,
        default_block=row["default_block"],
        elements_per_unit=row["elements_per_unit"],
        bytes_per_unit=row["bytes_per_unit"],
        exponent_bits=row["exponent_bits"],
        mantissa_bits=row["mantissa_bits"],
    )


def _build_specs() -> dict[QuantFormat, _FormatSpec]:
    by_name = {row["name"]: row for row in FORMAT_TABLE}
    members = {f.value for f in QuantFormat} - {"fp16", "bf16"}
    if set(by_name) != members:
        raise ImportError(
            f"jax_bq: QuantFormat members {sorted(members)} and the format registry "
            f"{sorted(by_name)} disagree; add the format to both"
        )
    specs = {
        QuantFormat.FP16: _FormatSpec(-1, 16, None, None, None, None, None, 0),
        QuantFormat.BF16: _FormatSpec(-2, 16, None, None, None, None, None, 0),
    }
    for name, row in by_name.items():
        specs[QuantFormat(name)] = _spec_from_row(row)
    return specs


#: The format registry rows (dicts) and where they came from.
FORMAT_TABLE, FORMAT_TABLE_SOURCE = _load_format_table()
_SPECS = _build_specs()

QUANTIZED_FORMATS = tuple(f for f in QuantFormat if f.is_quantized)
