"""MSE-optimal block scales and block-size choice, per tensor.

``calibrate(x, fmt, block_size)`` is the op: for every block along the last
axis it searches the candidate scales of ``ffi/include/jax_bq/calibrate_math.h``
(absmax first, so the result is never worse than ``quantize``) and returns
the ``QuantizedTensor`` with the scale of least squared error, plus per-block
statistics. The search is exhaustive over a fixed candidate list rather than
a ternary search: squared error against the scale is not unimodal for FP4
(codes jump between grid points as the scale moves), so a bracketing search
can stop in a local minimum. CPU and CUDA kernels and the jnp twin agree bit
for bit.

Block-size choice (FP32-scale formats, over ``CalibrationConfig.block_sizes``):
smaller blocks always lower the MSE but cost ``32 / b`` extra bits per element
for their float32 scales. Each candidate block size ``b`` is scored by its
MSE brought to equal bits per element at the rate-distortion slope of a
uniform quantizer (6.02 dB, a factor of 4 in MSE, per bit)::

    score(b) = MSE(b) * 4 ** (32 / b)

and the smallest score wins (ties go to the larger block). NVFP4 and the MX
formats have fixed blocks, so there is nothing to choose.

Whole models (every selected leaf, with a profile on disk) are calibrated by
:mod:`jax_bq.model_calibration`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from jax_bq.formats import FLOAT_DTYPES, Granularity, QuantFormat
from jax_bq.layout import make_view, packed_shape, scale_shape
from jax_bq.primitives import calibrate_p
from jax_bq.qtensor import QuantizedTensor

logger = logging.getLogger("jax_bq")

#: Bits of one stored scale, per format (the storage overhead of a block).
_SCALE_BITS = {"float32": 32, "float8_e4m3fn": 8, "float8_e8m0fnu": 8}


@dataclass(frozen=True)
class BlockStats:
    """Per-block results of :func:`calibrate` (arrays shaped like the scales)."""

    mse_absmax: jax.Array  # squared error with quantize's absmax scale
    mse_best: jax.Array  # squared error with the chosen scale
    clipped: jax.Array  # int32: elements beyond the format's max under the chosen scale


def calibrate(x, fmt: QuantFormat | str, block_size: int | None = None):
    """Quantizes ``x`` along its last axis with MSE-optimal block scales.

    For each block the candidate scales ``s_j`` are tried in a fixed order
    and the one minimizing ``sum_i (x_i / s_j - decode(q_i))^2 * s_j^2`` is
    kept, where ``q_i = encode(clip(x_i / s_j))``; candidate 0 is the absmax
    scale of :func:`jax_bq.quantize`, and ties keep the earlier candidate.
    Candidates: float32 scales ``s_0 * f`` with ``f`` in 1 and 1.25 down to
    33/128 in steps of 1/128 (128 in all); NVFP4 E4M3 codes ``c_0 - 8 .. c_0 + 2``;
    MX exponents ``X_0 - 1 .. X_0 + 1``.

    Args:
        x: float32/bf16/f16 array of rank 1 to 4, blocked along the last axis.
        fmt: a quantized :class:`QuantFormat`.
        block_size: elements per block (16..256, a power of two; fixed for
            NVFP4 and MX). Defaults to the format's default.

    Returns:
        ``(QuantizedTensor, BlockStats)``.

    Raises:
        ValueError: for unsupported dtypes, ranks, formats or block sizes.
    """
    fmt = QuantFormat.parse(fmt)
    if not fmt.is_quantized:
        raise ValueError(f"{fmt.value} is not a quantized format")
    dtype = getattr(x, "dtype", None)
    shape = tuple(getattr(x, "shape", ()))
    if dtype is None or np.dtype(dtype) not in FLOAT_DTYPES or not 1 <= len(shape) <= 4:
        raise ValueError(
            f"calibrate expects a float32/bfloat16/float16 array of rank 1-4, got "
            f"{type(x).__name__} {shape} {dtype}"
        )
    block = fmt.default_block_size if block_size is None else block_size
    if fmt.fixed_block is not None and block != fmt.fixed_block:
        raise ValueError(f"{fmt.value} uses a fixed block of {fmt.fixed_block}, got {block_size}")
    if block not in fmt.allowed_block_sizes:
        raise ValueError(
            f"calibrate block_size for {fmt.value} must be one of {fmt.allowed_block_sizes}, "
            f"got {block_size!r}"
        )
    view = make_view(shape, Granularity.PER_BLOCK, -1, (block,))
    data, scales, ts, mse0, mse1, clipped, _ = calibrate_p.bind(
        jnp.reshape(x, view.dims), fmt=fmt, ba=block
    )
    sshape = scale_shape(shape, Granularity.PER_BLOCK, -1, (block,))
    q = QuantizedTensor(
        data=data.reshape(packed_shape(shape, -1, fmt)),
        scales=scales.reshape(sshape),
        tensor_scale=ts.reshape(()) if fmt.has_tensor_scale else None,
        format=fmt,
        granularity=Granularity.PER_BLOCK,
        block=(block,),
        axis=-1,
        axis_len=shape[-1],
        rank=len(shape),
        dtype=np.dtype(dtype),
    )
    stats = BlockStats(mse0.reshape(sshape), mse1.reshape(sshape), clipped.reshape(sshape))
    return q, stats


@dataclass(frozen=True)
class CalibrationConfig:
    """What :func:`calibrate_model` does.

    Attributes:
        format: storage format of the calibrated weights.
        block_sizes: block sizes to choose from (FP32-scale formats only; the
            rule is in the module docstring). NVFP4/MX use their fixed block.
        min_size: leaves with fewer elements (biases, norms) stay unquantized.
        min_rank: leaves of lower rank stay unquantized (2: matrices only).
        skip: substrings of leaf names to leave unquantized (e.g. embeddings).
        max_workers: tensors calibrated in parallel (default: CPU count).
        progress: show a tqdm progress bar.
    """

    format: QuantFormat = QuantFormat.NVFP4
    block_sizes: tuple[int, ...] = (32, 64, 128, 256)
    min_size: int = 4096
    min_rank: int = 2
    skip: tuple[str, ...] = ("embedding",)
    max_workers: int | None = None
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "format", QuantFormat.parse(self.format))  # accept names

    def to_json(self) -> dict:
        """JSON-able form (stored in profiles)."""
        d = dataclasses.asdict(self)
        d["format"] = self.format.value
        d["block_sizes"] = list(self.block_sizes)
        d["skip"] = list(self.skip)
        return d

    @classmethod
    def from_json(cls, d: dict) -> CalibrationConfig:
        """Inverse of :meth:`to_json`."""
        d = dict(d)
        d["format"] = QuantFormat.parse(d["format"])
        d["block_sizes"] = tuple(d["block_sizes"])
        d["skip"] = tuple(d["skip"])
        return cls(**d)


@dataclass
class CalibrationResult:
    """Calibration of one tensor.

    ``mse_before``/``mse_after`` are mean squared errors per element with the
    absmax and the calibrated scales; ``improvement = 1 - after / before``.
    """

    name: str
    format: QuantFormat
    block_size: int
    quantized: QuantizedTensor = field(repr=False)
    mse_before: float
    mse_after: float
    clipped: int
    numel: int
    block_scores: dict[int, float] = field(default_factory=dict)

    @property
    def scales(self) -> jax.Array:
        """The calibrated block scales."""
        return self.quantized.scales

    @property
    def improvement(self) -> float:
        """``1 - mse_after / mse_before`` (0 when both are zero)."""
        if self.mse_before == 0:
            return 0.0
        return 1.0 - self.mse_after / self.mse_before


def _block_score(mse: float, block: int, fmt: QuantFormat) -> float:
    bits = _SCALE_BITS.get(np.dtype(fmt.scale_dtype).name, 32)
    return mse * 4.0 ** (bits / block)


def calibrate_tensor(x, config: CalibrationConfig, name: str = "") -> CalibrationResult:
    """Calibrates one tensor, choosing its block size by the documented rule."""
    fmt = config.format
    sizes = (fmt.fixed_block,) if fmt.fixed_block else tuple(sorted(config.block_sizes))
    numel = int(math.prod(x.shape))
    best = None
    scores = {}
    for b in sizes:
        if b not in fmt.allowed_block_sizes:
            raise ValueError(f"block size {b} is not allowed for {fmt.value}")
        q, st = calibrate(x, fmt, b)
        before = float(np.sum(np.asarray(st.mse_absmax, np.float64))) / max(numel, 1)
        after = float(np.sum(np.asarray(st.mse_best, np.float64))) / max(numel, 1)
        scores[b] = _block_score(after, b, fmt)
        # Larger blocks come later: "<=" gives ties to them.
        if best is None or scores[b] <= scores[best[0]]:
            best = (b, q, before, after, int(np.sum(np.asarray(st.clipped, np.int64))))
    b, q, before, after, clipped = best
    return CalibrationResult(name, fmt, b, q, before, after, clipped, numel, scores)


def leaf_name(path) -> str:
    """The name of a pytree leaf in profiles and checkpoints (``jax.tree_util.keystr``)."""
    return jax.tree_util.keystr(path)


def checkpoint_hash(params) -> str:
    """sha256 over every leaf's name, dtype, shape and bytes, in tree order."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.asarray(leaf)
        h.update(leaf_name(path).encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()
