"""``QuantizedTensor``: codes + scales as one pytree.

Invariants (checked by :meth:`QuantizedTensor.validate`):

* ``data`` holds the codes: ``float8_e4m3fn``/``float8_e5m2`` for the FP8
  formats and MXFP8, ``uint8`` packed units along ``axis`` for the sub-byte
  formats (FP4, NVFP4, MXFP4: two E2M1 codes per byte, the first in the low
  nibble; MXFP6: four codes per three bytes; the bit order is that of
  ``QuantFormat.packed_extent``). Its shape is the logical shape with ``axis``
  replaced by ``fmt.packed_extent(axis_len)`` for packed formats.
* ``scales`` has the logical shape with the blocked axes reduced to
  ``ceil(n / block)`` (all ones for per-tensor, the axis to 1 for
  per-channel); dtype float32, E4M3 (NVFP4) or E8M0 (MX).
* ``tensor_scale`` is the NVFP4 float32 second-level scale, else ``None``.
* Leading *stack* dimensions (``data.ndim - rank``, e.g. added by ``vmap`` or
  by stacking layers for ``lax.scan``) hold independently quantized members:
  each has its own scales, and ``tensor_scale`` has the stack shape.

Children are the arrays; everything else is static aux data, so the tensor
passes through ``jit``, ``vmap``, ``tree_map``, checkpointing and
``device_put`` unchanged. The blocked axis is stored as a negative index so
that stack dimensions never shift it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from jax_bq.formats import FLOAT_DTYPES, Granularity, QuantFormat
from jax_bq.layout import make_view, packed_shape, scale_shape


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True)
class QuantizedTensor:
    """A block-scaled quantized array. Create with :func:`jax_bq.quantize`.

    Attributes:
        data: codes (see module docstring for dtype and packing).
        scales: per-block scales.
        tensor_scale: NVFP4 per-tensor float32 scale, else ``None``.
        format: the :class:`QuantFormat`.
        granularity: the :class:`Granularity`.
        block: block extents: ``(n,)`` per-block, ``(rows, cols)`` for tiles,
            ``()`` for per-tensor and per-channel.
        axis: blocked / packed axis, negative.
        axis_len: logical length of ``axis`` (packing hides it).
        rank: logical rank of one member (without stack dimensions).
        dtype: dtype of the array that was quantized (dequantize's default).
    """

    data: jax.Array
    scales: jax.Array
    tensor_scale: jax.Array | None
    format: QuantFormat = field(metadata={"static": True})
    granularity: Granularity = field(metadata={"static": True})
    block: tuple[int, ...] = field(metadata={"static": True})
    axis: int = field(metadata={"static": True})
    axis_len: int = field(metadata={"static": True})
    rank: int = field(metadata={"static": True})
    dtype: np.dtype = field(metadata={"static": True})

    def tree_flatten(self):
        """Children: (data, scales, tensor_scale); aux: the static fields."""
        aux = (
            self.format,
            self.granularity,
            self.block,
            self.axis,
            self.axis_len,
            self.rank,
            np.dtype(self.dtype),
        )
        return (self.data, self.scales, self.tensor_scale), aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        """Inverse of :meth:`tree_flatten`; performs no validation."""
        return cls(*children, *aux)

    # ---- derived properties -------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape, stack dimensions included."""
        s = list(self.data.shape)
        if s:
            s[self.axis] = self.axis_len
        return tuple(s)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """Leading dimensions whose members were quantized independently."""
        return self.shape[: len(self.shape) - self.rank]

    @property
    def member_shape(self) -> tuple[int, ...]:
        """Logical shape of one member."""
        return self.shape[len(self.shape) - self.rank :]

    @property
    def ndim(self) -> int:
        """Logical rank, stack dimensions included."""
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of codes plus scales (plus the NVFP4 tensor scale)."""
        total = _nbytes(self.data) + _nbytes(self.scales)
        if self.tensor_scale is not None:
            total += _nbytes(self.tensor_scale)
        return total

    def arrays(self) -> dict[str, jax.Array]:
        """The arrays by part name: ``data``, ``scales`` and, when set, ``tensor_scale``."""
        parts = {"data": self.data, "scales": self.scales}
        if self.tensor_scale is not None:
            parts["tensor_scale"] = self.tensor_scale
        return parts

    def layout_record(self) -> dict:
        """Everything but the arrays, as JSON values (how jax_bq.io and profiles save it)."""
        return {
            "format": self.format.value,
            "granularity": self.granularity.value,
            "block": list(self.block),
            "axis": self.axis,
            "axis_len": self.axis_len,
            "rank": self.rank,
            "dtype": np.dtype(self.dtype).name,
        }

    @classmethod
    def from_record(cls, record: dict, data, scales, tensor_scale=None) -> QuantizedTensor:
        """The tensor of these arrays in the layout ``record`` of :meth:`layout_record`.

        Not validated: the caller calls :meth:`validate` (and maps its error).
        """
        return cls(
            data,
            scales,
            tensor_scale,
            QuantFormat.parse(record["format"]),
            Granularity(record["granularity"]),
            tuple(record["block"]),
            record["axis"],
            record["axis_len"],
            record["rank"],
            np.dtype(jnp.dtype(record["dtype"])),
        )

    def view(self):
        """The kernels' ``[G, P, A, B]`` view (G = number of stack members)."""
        v = make_view(self.member_shape, self.granularity, self.axis, self.block)
        g = math.prod(self.stack_shape)
        return type(v)(v.shape, v.axis, g, v.p, v.a, v.b, v.ba, v.bb, v.pack_b)

    def validate(self) -> QuantizedTensor:
        """Checks every invariant; raises ``ValueError`` naming shapes and dtypes.

        Returns:
            ``self``, so calls can be chained.
        """
        f = self.format
        if not isinstance(f, QuantFormat) or not f.is_quantized:
            raise ValueError(f"QuantizedTensor.format must be a quantized QuantFormat, got {f!r}")
        if self.granularity not in f.allowed_granularities:
            raise ValueError(f"{f.value} does not support granularity {self.granularity.value}")
        data_shape = tuple(self.data.shape)
        if len(data_shape) < self.rank or self.rank < 1:
            raise ValueError(
                f"QuantizedTensor data shape {data_shape} has fewer dims than its "
                f"member rank {self.rank}"
            )
        if not -self.rank <= self.axis < 0:
            raise ValueError(f"QuantizedTensor axis {self.axis} out of range for rank {self.rank}")
        if np.dtype(self.data.dtype) != f.data_dtype:
            raise ValueError(
                f"{f.value} data must be {f.data_dtype}, got {self.data.dtype} "
                f"with shape {data_shape}"
            )
        if np.dtype(self.scales.dtype) != f.scale_dtype:
            raise ValueError(
                f"{f.value} scales must be {f.scale_dtype}, got "
                f"{self.scales.dtype} with shape {tuple(self.scales.shape)}"
            )
        member = self.member_shape
        want_data = self.stack_shape + packed_shape(member, self.axis, f)
        if data_shape != want_data or (
            f.is_packed and f.packed_extent(self.axis_len) != data_shape[self.axis]
        ):
            raise ValueError(
                f"{f.value} data shape {data_shape} does not hold a logical shape "
                f"{self.shape} (axis {self.axis} of length {self.axis_len})"
            )
        want_scales = self.stack_shape + scale_shape(
            member, self.granularity, self.axis, self.block
        )
        if tuple(self.scales.shape) != want_scales:
            raise ValueError(
                f"scales shape {tuple(self.scales.shape)} disagrees with data "
                f"{data_shape}: expected {want_scales} for {self.granularity.value} "
                f"block {self.block}"
            )
        if f.has_tensor_scale:
            ts = self.tensor_scale
            if (
                ts is None
                or tuple(ts.shape) != self.stack_shape
                or np.dtype(ts.dtype) != np.float32
            ):
                got = None if ts is None else (tuple(ts.shape), ts.dtype)
                raise ValueError(
                    f"NVFP4 needs a float32 tensor_scale of shape {self.stack_shape}, got {got}"
                )
        elif self.tensor_scale is not None:
            raise ValueError(
                f"{f.value} has no tensor_scale, got one of shape {tuple(self.tensor_scale.shape)}"
            )
        if np.dtype(self.dtype) not in FLOAT_DTYPES:
            raise ValueError(f"QuantizedTensor.dtype must be f32/bf16/f16, got {self.dtype}")
        return self


def _nbytes(a) -> int:
    return int(math.prod(a.shape)) * np.dtype(a.dtype).itemsize
