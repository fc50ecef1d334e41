"""Maps a user array, granularity and axis onto the kernels' ``[G, P, A, B]`` view.

Every kernel (CPU, CUDA, jnp twin) sees a rank-4 row-major view: ``G``
independent groups (each with its own NVFP4 tensor scale), ``P`` rows before
the blocked axis, the blocked axis ``A`` and the ``B`` elements after it.
Blocks are ``ba x bb`` elements; packed formats (FP4, FP6) store their codes
in units (``QuantFormat.packed_extent``) along ``A``, or along ``B`` when
``pack_b`` (2-D tiles and per-tensor). A block along the packing axis is a
whole number of units (block sizes are powers of two >= 16) unless it covers
the axis; the kernels reject anything else. All reshapes here are
row-major bitcasts, so they cost nothing in XLA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from jax_bq._util import cdiv as _cdiv
from jax_bq.formats import Granularity, QuantFormat


@dataclass(frozen=True)
class View:
    """A user shape seen as ``[G, P, A, B]`` with ``ba x bb`` blocks."""

    shape: tuple[int, ...]  # logical user shape
    axis: int  # packing axis (negative index)
    g: int
    p: int
    a: int
    b: int
    ba: int
    bb: int
    pack_b: bool

    @property
    def dims(self) -> tuple[int, int, int, int]:
        """The logical rank-4 view."""
        return (self.g, self.p, self.a, self.b)

    @property
    def scale_dims(self) -> tuple[int, int, int, int]:
        """Shape of the scales in the rank-4 view."""
        return (self.g, self.p, _cdiv(self.a, self.ba), _cdiv(self.b, self.bb))

    def data_dims(self, fmt: QuantFormat) -> tuple[int, int, int, int]:
        """Shape of the stored codes in the rank-4 view."""
        if not fmt.is_packed:
            return self.dims
        if self.pack_b:
            return (self.g, self.p, self.a, fmt.packed_extent(self.b))
        return (self.g, self.p, fmt.packed_extent(self.a), self.b)


REDUCE_CHUNK = 8192  # kReduceChunk in ffi/include/jax_bq/layout.h


def fused_row_blocks(v: View) -> bool:
    """Blocks along a contiguous last axis (one pass on CUDA); else two passes."""
    return v.b == 1 and v.bb == 1 and v.ba <= 256


def quantize_workspace_bytes(v: View, fmt: QuantFormat) -> int:
    """Bytes of the quantize workspace output (QuantizeWorkspaceWords in layout.h)."""
    n = v.g * v.p * v.a * v.b
    if n == 0:
        return 0
    words = 0
    if not fused_row_blocks(v):
        block = min(v.ba, v.a) * min(v.bb, v.b)
        chunks = _cdiv(block, REDUCE_CHUNK)
        words += math.prod(v.scale_dims) * (chunks + 1)
    if fmt.has_tensor_scale:
        words += v.g * _cdiv(v.p * v.a * v.b, REDUCE_CHUNK)
    return 4 * words


def packed_shape(shape: tuple[int, ...], axis: int, fmt: QuantFormat) -> tuple[int, ...]:
    """User-facing shape of the stored codes (``fmt.packed_extent`` along ``axis``)."""
    if not fmt.is_packed or len(shape) == 0:
        return tuple(shape)
    s = list(shape)
    s[axis] = fmt.packed_extent(s[axis])
    return tuple(s)


def scale_shape(
    shape: tuple[int, ...], granularity: Granularity, axis: int, block: tuple[int, ...]
) -> tuple[int, ...]:
    """User-facing shape of the scales: ``shape`` with the blocked axes reduced."""
    s = list(shape)
    if granularity is Granularity.PER_TENSOR:
        # One scale; ceil(n / n) along the last two axes, so 0 for an empty tensor.
        out = [1] * len(s)
        lead_rows = math.prod(s[:-1])
        out[-1] = 1 if (s[-1] and lead_rows) else 0
        return tuple(out)
    if granularity is Granularity.PER_CHANNEL:
        s[axis] = 1 if s[axis] else 0
    elif granularity is Granularity.PER_BLOCK:
        s[axis] = _cdiv(s[axis], block[0])
    else:  # TILE_2D over the last two axes
        s[-2] = _cdiv(s[-2], block[0])
        s[-1] = _cdiv(s[-1], block[1])
    return tuple(s)


def make_view(
    shape: tuple[int, ...], granularity: Granularity, axis: int, block: tuple[int, ...]
) -> View:
    """Builds the rank-4 view of ``shape``; ``axis`` is already normalized (negative)."""
    shape = tuple(int(d) for d in shape)
    rank = len(shape)
    if granularity in (Granularity.PER_TENSOR, Granularity.TILE_2D):
        # Both pack along the last axis and block over the last two.
        rows = shape[-2] if rank >= 2 else 1
        lead = math.prod(shape[:-2]) if rank >= 2 else 1
        cols = shape[-1]
        if granularity is Granularity.PER_TENSOR:
            p, a = 1, lead * rows
            ba, bb = max(a, 1), max(cols, 1)
        else:
            p, a = lead, rows
            ba, bb = block
        return View(shape, -1, 1, p, a, cols, ba, bb, True)
    ax = rank + axis
    p = math.prod(shape[:ax])
    a = shape[ax]
    b = math.prod(shape[ax + 1 :])
    ba = max(a, 1) if granularity is Granularity.PER_CHANNEL else block[0]
    return View(shape, axis, 1, p, a, b, ba, 1, False)
