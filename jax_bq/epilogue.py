"""The epilogue of ``qmatmul``: bias, GELU, residual and an FP8 output after the product.

What ``qmatmul(x, w, bias=b, activation=a, residual=r, out_format=f, out_scale=s)``
computes, on every path::

    y   = x . w^T                      (float32 accumulation, as without epilogue)
    y   = y + b                        (bias, [N])
    y   = gelu(y)  or  gelu_tanh(y)    (activation)
    y   = y + r                        (residual, [..., N]; not together with an activation)
    out = round(y, out_dtype)          or, with out_format:
    out = RNE(clip(y / s', -MAX, MAX)) as FP8 codes, s' = pow2_scale(s)
    amax = max |y|                     (return_amax: the float32 amax before the FP8 rounding)

Where it runs is part of the plan (:func:`jax_bq.explain` says which):

* **fused** on the cuBLASLt FP8 GEMM: ``BIAS``, ``GELU_BIAS``/``GELU`` (cuBLASLt's
  GELU is the tanh approximation, ``activation="gelu_tanh"``), the residual as
  its ``C`` matrix with ``beta = 1``, an FP8 ``D`` with ``D_SCALE = 1 / s'`` and
  ``AMAX_D``. cuBLASLt is asked at plan time whether it has an algorithm for
  the exact combination (scale modes, output type, epilogue); one rounding.
  Exact (erf) GELU, which cuBLASLt does not compute, runs in the same custom
  call: a ``BIAS`` GEMM into the workspace in the output's type (bf16 for an
  FP8 output), then jax_bq's epilogue kernel (GELU, FP8 conversion, amax)
  reading it once; the product is rounded to that type once before the GELU
  (no extra rounding for a float32 output).
* **in the reference** (the fallback on CPU and elsewhere): the same float32
  math, one rounding.
* **after the GEMM** (unfused): where the GEMM cannot take the epilogue (the
  weight-only kernels, a combination cuBLASLt refuses), the GEMM writes
  ``out_dtype`` (bf16 for an FP8 output) and the rest runs as plain jnp that
  XLA fuses into one elementwise pass. That rounds the product once more
  before the epilogue.

FP8 output codes on cuBLASLt and in the reference agree except where the
GEMM's own float32 sum order moves ``y`` across a rounding boundary (at most
one code apart); ``tests/ops/test_qmatmul_epilogue.py`` counts and bounds those.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jax_bq.formats import FLOAT_DTYPES, Granularity, QuantFormat
from jax_bq.primitives import qmatmul as qp
from jax_bq.qtensor import QuantizedTensor
from jax_bq.static import STATIC_FORMATS, encode_scaled, pow2_reciprocal, pow2_scale

__all__ = ["ACTIVATIONS", "Epilogue"]

#: ``activation=`` values: exact (erf) GELU as BERT defines it, and the tanh form.
ACTIVATIONS = (None, "gelu", "gelu_tanh")

EPI_GELU_ERF = qp.EPI_GELU_ERF  # exact GELU: jax_bq's epilogue kernel after the GEMM


@dataclass(frozen=True)
class Epilogue:
    """Static description of a ``qmatmul`` epilogue (which operands exist, what follows).

    Attributes:
        bias: a ``[N]`` bias is added.
        activation: ``None``, ``"gelu"`` (erf) or ``"gelu_tanh"``.
        residual: a ``[..., N]`` residual is added (after the activation is not allowed).
        out_format: FP8 E4M3/E5M2 output codes with a static per-tensor scale, or None.
        amax: the float32 amax of the result is returned too.
    """

    bias: bool = False
    activation: str | None = None
    residual: bool = False
    out_format: QuantFormat | None = None
    amax: bool = False

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.activation is not None and self.residual:
            raise ValueError(
                "qmatmul applies the residual after the activation nowhere: pass either "
                "activation= or residual=, not both"
            )
        if self.out_format is not None and self.out_format not in STATIC_FORMATS:
            raise ValueError(
                f"out_format must be fp8_e4m3 or fp8_e5m2 (a per-tensor static scale), got "
                f"{self.out_format.value}"
            )
        if self.out_format is not None and self.residual:
            raise ValueError(
                "an FP8 output takes no residual (cuBLASLt has no C accumulation with an FP8 D): "
                "add the residual in the next LayerNorm (jax_bq.layernorm_quantize) instead"
            )

    @property
    def empty(self) -> bool:
        """Nothing after the product."""
        return self == Epilogue()

    @property
    def bits(self) -> int:
        """All of it as EPI_* bits (exact GELU as the reference-only bit)."""
        act = {None: 0, "gelu_tanh": qp.EPI_GELU_TANH, "gelu": EPI_GELU_ERF}[self.activation]
        return (
            (qp.EPI_BIAS if self.bias else 0)
            | act
            | (qp.EPI_RESIDUAL if self.residual else 0)
            | (qp.EPI_AMAX if self.amax else 0)
        )

    def describe(self) -> str:
        """Short human form, e.g. ``+bias gelu_tanh -> fp8_e4m3``."""
        parts = ["+bias"] if self.bias else []
        parts += [self.activation] if self.activation else []
        parts += ["+residual"] if self.residual else []
        parts += [f"-> {self.out_format.value}"] if self.out_format else []
        parts += ["amax"] if self.amax else []
        return " ".join(parts) or "none"


def bits_description(bits: int, out_format: QuantFormat | None) -> str:
    names = [
        n
        for b, n in (
            (qp.EPI_BIAS, "bias"),
            (qp.EPI_GELU_TANH, "gelu_tanh"),
            (EPI_GELU_ERF, "gelu"),
            (qp.EPI_RESIDUAL, "residual"),
            (qp.EPI_AMAX, "amax"),
        )
        if bits & b
    ]
    if out_format is not None:
        names.append(f"{out_format.value} out")
    return ", ".join(names) or "nothing"


def check_operands(epi: Epilogue, x_shape, n: int, out_dtype, bias, residual, out_scale) -> None:
    """``ValueError`` (naming shapes and dtypes) for epilogue operands that do not fit."""
    if epi.bias and tuple(np.shape(bias)) != (n,):
        raise ValueError(f"qmatmul bias must have shape (N,) = ({n},), got {tuple(np.shape(bias))}")
    if epi.bias and np.dtype(bias.dtype) not in FLOAT_DTYPES:
        raise ValueError(f"qmatmul bias must be float32/bfloat16/float16, got {bias.dtype}")
    if epi.residual:
        want = (*tuple(x_shape[:-1]), n)
        if tuple(residual.shape) != want:
            raise ValueError(
                f"qmatmul residual must have the output's shape {want}, got {tuple(residual.shape)}"
            )
        if np.dtype(residual.dtype) != np.dtype(out_dtype):
            raise ValueError(
                f"qmatmul residual dtype {np.dtype(residual.dtype).name} differs from out_dtype "
                f"{np.dtype(out_dtype).name}"
            )
    if epi.out_format is not None:
        if out_scale is None:
            raise ValueError("qmatmul out_format needs out_scale (the static per-tensor scale)")
        if np.ndim(out_scale) != 0 and np.size(out_scale) != 1:
            raise ValueError(f"qmatmul out_scale must be a scalar, got shape {np.shape(out_scale)}")
    elif out_scale is not None:
        raise ValueError("qmatmul out_scale is only used with out_format")


def split_for_gemm(epi: Epilogue, gemm_takes_epilogue: bool) -> tuple[int, bool]:
    """(bits the GEMM fuses, whether the FP8 output is fused) for a GEMM path.

    ``gemm_takes_epilogue``: the cuBLASLt paths (all or nothing is then decided
    by asking cuBLASLt); the weight-only kernels fuse nothing.
    """
    if not gemm_takes_epilogue:
        return 0, False
    return epi.bits, epi.out_format is not None


def finish(y, epi: Epilogue, fused_bits: int, fused_fp8: bool, bias, residual, inv_scale):
    """Applies in jnp what the GEMM did not fuse; returns ``(out, amax or None)``.

    ``y`` is the primitive's ``out`` (already carrying ``fused_bits``) and
    ``amax`` what it returned when fused.
    """
    rest = epi.bits & ~fused_bits
    if not rest and (fused_fp8 or epi.out_format is None):
        return y, None
    v = y.astype(jnp.float32)
    if rest & qp.EPI_BIAS:
        v = v + bias.astype(jnp.float32)
    if rest & qp.EPI_GELU_TANH:
        v = jax.nn.gelu(v, approximate=True)
    if rest & EPI_GELU_ERF:
        v = jax.nn.gelu(v, approximate=False)
    if rest & qp.EPI_RESIDUAL:
        v = v + residual.astype(jnp.float32)
    amax = jnp.max(jnp.abs(v), initial=0.0) if rest & qp.EPI_AMAX else None
    if epi.out_format is not None:
        return encode_scaled(v, inv_scale, epi.out_format), amax
    return v.astype(y.dtype), amax


def fp8_out_scales(out_scale) -> tuple[jax.Array, jax.Array]:
    """``(s', 1 / s')``: the power-of-two output scale and its exact reciprocal."""
    s = pow2_scale(jnp.reshape(jnp.asarray(out_scale, jnp.float32), ()))
    return s, jnp.where(jnp.isnan(s), jnp.float32(jnp.nan), pow2_reciprocal(s))


def as_quantized(codes, s, fmt: QuantFormat, dtype) -> QuantizedTensor:
    """The per-tensor :class:`QuantizedTensor` of FP8 output codes ``[..., N]``."""
    shape = tuple(codes.shape)
    return QuantizedTensor(
        data=codes,
        scales=jnp.reshape(s, (1,) * len(shape)),
        tensor_scale=None,
        format=fmt,
        granularity=Granularity.PER_TENSOR,
        block=(),
        axis=-1,
        axis_len=shape[-1],
        rank=len(shape),
        dtype=np.dtype(dtype),
    )


def replace_bits(cfg: qp.QmmConfig, bits: int, out_format) -> qp.QmmConfig:
    return dataclasses.replace(cfg, epilogue=bits, out_format=out_format)
