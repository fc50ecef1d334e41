"""FP4 weights as FP8 E4M3: the large-M path on GPUs without FP4 tensor cores.

Hopper has FP8 tensor cores but no FP4 ones. For decode-sized M the W4A16
kernel reads the 4-bit weights directly; for large M the FP8 GEMM wins, so FP4
weights are converted to FP8 E4M3 with 1x128 block scales along K (the scale
layout cuBLASLt's FP8 block-scaled GEMM takes on Hopper)::

    w8 = quantize(dequantize(w4, float32), "fp8_e4m3", per_block, block 128)

i.e. per block of 128 weights along K, ``S = max|dq(w4)| / 448`` and
``code = RNE(dq(w4) / S)``. The E2M1 values themselves are exact in E4M3, but
folding the FP4 block scales (per 16/32) into one scale per 128 re-rounds each
weight to E4M3's 3 mantissa bits: ``|dq(w8) - dq(w4)| <= 2^-4 |dq(w4)|``
(plus E4M3 subnormal steps), far below the FP4 error itself. The bytes are
defined by :func:`jax_bq.quantize`/:func:`jax_bq.dequantize`, so they are the
same on every platform.

Users who keep weights resident call :func:`fp4_to_fp8` once (2x the bytes
of FP4, half of bf16) and pass the FP8 weights to :func:`jax_bq.qmatmul`.
With FP4 weights, ``qmatmul(x, w4, act_format="fp8_e4m3")`` converts inside
the call, and so does ``qmatmul`` with plain activations from M = 256 on a GPU
with FP8 but no FP4 tensor cores (``jax_bq.matmul.FP4_CONVERT_MIN_M``).
On CUDA the per-block conversion of ``[N, K]`` weights (K % 16 == 0) is one
kernel (``fp4_to_fp8_p``, FFI target ``jax_bq_fp4_to_fp8``) that writes the
bytes of the definition above without the float32 intermediate: 58 us for
8192 x 8192 NVFP4 weights and 177 us for 28672 x 8192 on the H200 (kernel
time; the two launches it replaces took ~0.15 / ~0.5 ms). Other platforms,
the 128x128 granularity, other 4-bit layouts and vmapped calls run the
definition itself.
"""

from __future__ import annotations

import jax.numpy as jnp

from jax_bq.formats import Granularity, QuantFormat
from jax_bq.ops import dequantize, quantize
from jax_bq.primitives.convert import fp4_to_fp8_p
from jax_bq.qtensor import QuantizedTensor

__all__ = ["FP4_FORMATS", "fp4_to_fp8"]

FP4_FORMATS = (QuantFormat.FP4, QuantFormat.NVFP4, QuantFormat.MXFP4)


def fp4_to_fp8(w: QuantizedTensor, *, granularity: Granularity | str = "per_block"):
    """FP4 / NVFP4 / MXFP4 weights ``[N, K]`` -> FP8 E4M3 with 128-wide scales.

    Args:
        w: a 4-bit :class:`QuantizedTensor` ``[N, K]`` blocked along K.
        granularity: ``"per_block"`` (1x128 along K, default) or ``"tile_2d"``
            (128x128).

    Returns:
        ``quantize(dequantize(w, float32), "fp8_e4m3", granularity=..., block 128)``.

    Raises:
        ValueError: ``w`` is not a rank-2, axis -1 FP4-family QuantizedTensor,
            or the granularity is neither of the two.
    """
    if not isinstance(w, QuantizedTensor) or w.format not in FP4_FORMATS:
        fmt = getattr(getattr(w, "format", None), "value", type(w).__name__)
        raise ValueError(f"fp4_to_fp8 takes FP4/NVFP4/MXFP4 QuantizedTensors, got {fmt}")
    if w.ndim != 2 or w.axis != -1:
        raise ValueError(
            f"fp4_to_fp8 takes [N, K] weights blocked along K, got shape {w.shape} axis {w.axis}"
        )
    gran = Granularity(granularity)
    if gran not in (Granularity.PER_BLOCK, Granularity.TILE_2D):
        raise ValueError(f"granularity must be per_block or tile_2d, got {gran.value}")
    if (
        gran is Granularity.PER_BLOCK
        and w.granularity is Granularity.PER_BLOCK
        and w.axis_len % 16 == 0
        and w.data.ndim == 2
    ):
        # One pass on CUDA (same bytes); the definition below everywhere else.
        ts = (
            jnp.ones((1,), jnp.float32)
            if w.tensor_scale is None
            else jnp.reshape(w.tensor_scale, (1,)).astype(jnp.float32)
        )
        data, scales = fp4_to_fp8_p.bind(
            w.data, w.scales, ts, fmt=w.format, block=w.block[0], k=w.axis_len, dtype=w.dtype
        )
        return QuantizedTensor(
            data=data,
            scales=scales,
            tensor_scale=None,
            format=QuantFormat.FP8_E4M3,
            granularity=Granularity.PER_BLOCK,
            block=(128,),
            axis=-1,
            axis_len=w.axis_len,
            rank=2,
            dtype=jnp.dtype(jnp.float32),
        )
    block = 128 if gran is Granularity.PER_BLOCK else (128, 128)
    return quantize(
        dequantize(w, jnp.float32), QuantFormat.FP8_E4M3, granularity=gran, block_size=block
    )
