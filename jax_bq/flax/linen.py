"""Flax Linen layers that run :func:`jax_bq.qmatmul`.

:class:`QDense` is a drop-in for ``nn.Dense`` / ``nn.DenseGeneral``: same
attributes, same param names and shapes, so a trained checkpoint loads
unchanged and runs in full precision. After
:func:`jax_bq.flax.quantize_model_weights` replaces its ``kernel`` by an
``[N, K]`` :class:`~jax_bq.QuantizedTensor`, the same module runs
``qmatmul`` (FP8 tensor cores, the weight-only kernels, or the visible
fallback; ``jax_bq.explain`` says which). Gradients flow through the
quantized layer to the input and to every other parameter; the quantized
kernel itself is frozen (``lax.stop_gradient``; mask it out of the
optimizer).

Quantization-aware training: with ``qat`` set (a format or a
:class:`~jax_bq.flax.WeightQuant`) and a float kernel, the layer keeps the
float master kernel and runs :func:`jax_bq.qat.qat_matmul`: quantized on the
fly, forward and backward, ``dW`` through the straight-through estimator;
``qat_grads="fp8"`` makes the backward products FP8 too (E5M2 gradients, the
FP8 training step).

:func:`quantized_dot_general` plugs into ``nn.Dense(dot_general=...)`` for
models you do not want to touch: it quantizes the float kernel on every call
(costs one weight quantization per call; use :class:`QDense` with
pre-quantized weights for speed).

:class:`QEmbed` is ``nn.Embed`` that also accepts a quantized table (rows are
gathered as codes and dequantized after the gather).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_bq.flax.rules import WeightQuant, quantize_kernel
from jax_bq.formats import Granularity, QuantFormat
from jax_bq.matmul import qmatmul
from jax_bq.ops import dequantize
from jax_bq.qat import qat_matmul, qat_spec
from jax_bq.qtensor import QuantizedTensor
from jax_bq.static import STATIC_FORMATS, quantize_static

__all__ = ["QDense", "QEmbed", "quantized_dot_general"]

_OUT_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))


def _tuple(v) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, Sequence) else (v,)


def _flatten_contraction(x, w: QuantizedTensor, n_contract: int, out_dtype):
    """(``x`` as ``[..., K]`` with ``K = prod(in)`` checked against ``w``, output dtype)."""
    batch = x.shape[: x.ndim - n_contract]
    k = math.prod(x.shape[x.ndim - n_contract :])
    if w.shape[1] != k:
        raise ValueError(
            f"quantized kernel is [N, K] = {w.shape} but the input {tuple(x.shape)} "
            f"contracts K = {k}"
        )
    out_dtype = np.dtype(out_dtype)
    if out_dtype not in _OUT_DTYPES:
        out_dtype = np.dtype(np.float32)
    return jnp.reshape(x, (*batch, k)), out_dtype


def _qmatmul_nd(x, w: QuantizedTensor, n_contract: int, out_dtype, act_format, act_granularity):
    """``x[..., *in] @ w[N, K]^T`` with ``K = prod(in)``, output ``[..., N]``."""
    x, out_dtype = _flatten_contraction(x, w, n_contract, out_dtype)
    return qmatmul(
        x, w, out_dtype=out_dtype, act_format=act_format, act_granularity=act_granularity
    )


def qat_nd(x, kernel, n_contract: int, out_dtype, spec, grads, act_format, act_granularity):
    """QAT product ``x[..., *in] @ kernel[*in, N]`` (float master) via ``qat_matmul``."""
    spec = WeightQuant(spec) if not isinstance(spec, WeightQuant) else spec
    spec = spec.resolved()
    batch = x.shape[: x.ndim - n_contract]
    k = math.prod(x.shape[x.ndim - n_contract :])
    n = math.prod(kernel.shape[n_contract:])
    out_dtype = np.dtype(out_dtype)
    if out_dtype not in _OUT_DTYPES:
        out_dtype = np.dtype(np.float32)
    qs = qat_spec(
        spec.format,
        w_granularity=spec.granularity,
        w_block_size=spec.block_size,
        out_dtype=out_dtype,
        act_format=act_format,
        act_granularity=act_granularity,
        grads=grads,
    )
    w = jnp.reshape(kernel, (k, n)).T
    return qat_matmul(jnp.reshape(x, (*batch, k)), w, qs)


def finite_amax(x: jax.Array) -> jax.Array:
    """``max |x|`` over the finite elements, as a float32 scalar (0 for none)."""
    a = jnp.abs(x.astype(jnp.float32))
    return jnp.max(jnp.where(jnp.isfinite(a), a, 0.0), initial=0.0)


def _static_qmatmul(x, w: QuantizedTensor, scale, n_contract: int, out_dtype, act_format, where):
    """Qmatmul of ``x`` quantized per tensor with a fixed scale (see QDense)."""
    if act_format is not None and QuantFormat.parse(act_format) not in STATIC_FORMATS:
        raise ValueError(
            f"{'/'.join(where)}: act_scale quantizes activations to FP8, but act_format="
            f"{act_format!r} asks for something else; drop act_scale for that"
        )
    if w.format not in STATIC_FORMATS:
        raise ValueError(
            f"{'/'.join(where)}: act_scale needs FP8 weights (the FP8 GEMM), got "
            f"{w.format.value} weights"
        )
    fmt = QuantFormat.FP8_E4M3 if act_format is None else QuantFormat.parse(act_format)
    x, out_dtype = _flatten_contraction(x, w, n_contract, out_dtype)
    xq = quantize_static(x, scale, fmt, exact_scale=True)  # calibration stores powers of two
    return qmatmul(xq, w, out_dtype=out_dtype)


class QDense(nn.Module):
    """``nn.DenseGeneral``-compatible layer that runs ``qmatmul`` on quantized kernels.

    ``y = x @ W + b`` contracting ``axis`` of ``x`` with the leading dims of
    ``W[*in, *features]``. With a quantized kernel (``[N, K]`` QuantizedTensor,
    ``N = prod(features)``, ``K = prod(in)``) the product is
    ``qmatmul(x[..., K], W_q, act_format, act_granularity)``.

    Attributes:
        features: output features (int, or a tuple as for DenseGeneral).
        axis: contracted input axes (int or tuple).
        use_bias: add a bias (kept in high precision).
        dtype: computation/output dtype (default: the input's).
        param_dtype: dtype of freshly initialized params.
        precision: for the float path's ``dot_general``.
        kernel_init, bias_init: initializers (Dense's defaults).
        act_format: activation handling when the kernel is quantized, passed
            to :func:`jax_bq.qmatmul`: ``None`` (automatic), ``"fp8_e4m3"``
            (dynamic W8A8), ``"bf16"`` (weight-only).
        act_granularity: ``"per_tensor"``, ``"per_token"``, ``"block_1x128"``
            or ``None`` (match the weights).
        qat: quantization-aware training of a float kernel: a format name or
            :class:`~jax_bq.flax.WeightQuant` (``None``: plain float dot).
        qat_grads: ``"bf16"`` (backward products in bf16) or ``"fp8"``
            (E5M2 x E4M3 through qmatmul: the FP8 training step).

    Static activation scales: when the params hold an ``act_scale`` next to
    a quantized FP8 kernel (:func:`jax_bq.flax.calibrate_activation_scales`
    puts it there), the input is quantized with it by
    :func:`jax_bq.quantize_static` (per tensor, power of two, plain jnp that
    XLA fuses into the producer of ``x``) and ``qmatmul`` gets pre-quantized
    activations: ``act_format`` then only picks E4M3 (default) or E5M2, and
    ``act_granularity`` is per tensor. Whenever the ``intermediates``
    collection is mutable the layer records the finite amax of its input
    there (``act_amax``), which is what the calibration reads.

    A strategy's activation spec (``act_quant`` in the params next to the
    quantized kernel, put there by :func:`jax_bq.strategies.apply_strategy`)
    takes precedence over both: see :mod:`jax_bq.flax.dynamic_dense`.
    """

    features: int | Sequence[int]
    axis: int | Sequence[int] = -1
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    act_format: str | None = None
    act_granularity: str | None = None
    qat: Any = None
    qat_grads: str = "bf16"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x[..., *in] -> [..., *features]``."""
        features = _tuple(self.features)
        axis = tuple(a % x.ndim for a in _tuple(self.axis))
        n_in = len(axis)
        trailing = tuple(range(x.ndim - n_in, x.ndim))
        if axis != trailing:
            x = jnp.moveaxis(x, axis, trailing)
        in_shape = x.shape[x.ndim - n_in :]
        batch = x.shape[: x.ndim - n_in]
        dtype = self.dtype or x.dtype

        stored = (
            self.get_variable("params", "kernel") if self.has_variable("params", "kernel") else None
        )
        if self.is_mutable_collection("intermediates"):
            self.sow("intermediates", "act_amax", finite_amax(x))
        if isinstance(stored, QuantizedTensor):
            stored = lax.stop_gradient(stored)  # frozen: no gradient for codes and scales
        if isinstance(stored, QuantizedTensor) and self.has_variable("params", "act_quant"):
            y = self._dynamic(x, stored, n_in, dtype)  # a strategy's activation spec
        elif isinstance(stored, QuantizedTensor) and self.has_variable("params", "act_scale"):
            scale = self.get_variable("params", "act_scale")
            y = _static_qmatmul(x, stored, scale, n_in, dtype, self.act_format, self.scope.path)
            y = y.astype(dtype)
        elif isinstance(stored, QuantizedTensor):
            y = _qmatmul_nd(x, stored, n_in, dtype, self.act_format, self.act_granularity)
            y = y.astype(dtype)
        else:

            def init(key, shape, dt):
                flat = (math.prod(in_shape), math.prod(features))
                return jnp.reshape(self.kernel_init(key, flat, dt), shape)

            kernel = self.param("kernel", init, in_shape + features, self.param_dtype)
            if self.qat is not None:
                y = qat_nd(
                    x,
                    kernel,
                    n_in,
                    dtype,
                    self.qat,
                    self.qat_grads,
                    self.act_format,
                    self.act_granularity,
                ).astype(dtype)
            else:
                x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
                y = lax.dot_general(
                    x,
                    kernel,
                    ((trailing, tuple(range(n_in))), ((), ())),
                    precision=self.precision,
                )
        y = jnp.reshape(y, (*batch, *features))
        if self.use_bias:
            bias = self.param("bias", self.bias_init, features, self.param_dtype)
            y = y + bias.astype(y.dtype)
        return y

    def _dynamic(self, x, w: QuantizedTensor, n_in: int, dtype) -> jax.Array:
        """The ``act_quant`` spec's product (:mod:`jax_bq.flax.dynamic_dense`)."""
        from jax_bq.flax import dynamic_dense as dd

        where = "/".join(self.scope.path)
        spec = dd.check_spec(self.get_variable("params", dd.ACT_SPEC), where)
        x, out_dtype = _flatten_contraction(x, w, n_in, dtype)
        ema = None
        if getattr(spec, "ema_decay", None) is not None and (
            self.has_variable(dd.STATE, "ema") or self.is_mutable_collection(dd.STATE)
        ):
            shape = dd.ema_shape(spec, x.shape[-1])
            ema = self.variable(dd.STATE, "ema", dd.EmaState.zeros, shape)
        state = ema.value if ema is not None else None
        fallback = None
        if self.has_variable("params", dd.FALLBACK):  # [*in, *out] float16 copy -> [N, K]
            fallback = self.get_variable("params", dd.FALLBACK)
            fallback = jnp.reshape(fallback, (x.shape[-1], -1)).T
        y, meta = dd.dense_with_spec(
            spec, x, w, out_dtype, ema=state, where=where, fallback=fallback
        )
        if meta is not None and ema is not None and self.is_mutable_collection(dd.STATE):
            ema.value = meta.ema
        if meta is not None and self.is_mutable_collection("intermediates"):
            self.sow("intermediates", "dyn_precision", meta.precision)
            self.sow("intermediates", "dyn_outlier_ratio", meta.outlier_ratio)
        return y.astype(dtype)


def quantized_dot_general(
    spec: WeightQuant | str,
    *,
    act_format: str | None = None,
    act_granularity: str | None = None,
) -> Callable:
    """A ``dot_general`` for ``nn.Dense(dot_general=...)`` that runs ``qmatmul``.

    The returned function accepts the contraction ``nn.Dense`` /
    ``nn.DenseGeneral`` issue (trailing input dims against leading kernel
    dims, no batch dims); it quantizes the kernel by ``spec`` (transposed to
    ``[N, K]``) on every call, then computes
    ``qmatmul(lhs[..., K], quantize(kernel^T))``.

    Raises:
        ValueError: for other contractions (naming the dimension numbers).
    """
    spec = WeightQuant(spec) if not isinstance(spec, WeightQuant) else spec
    spec = spec.resolved()

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        del precision  # qmatmul's precision is the format's
        (lc, rc), (lb, rb) = dimension_numbers
        lc, rc = tuple(int(a) for a in lc), tuple(int(a) for a in rc)
        n = len(lc)
        if lb or rb or rc != tuple(range(n)) or lc != tuple(range(lhs.ndim - n, lhs.ndim)):
            raise ValueError(
                "quantized_dot_general supports Dense-style contractions only (trailing lhs "
                f"dims with leading rhs dims, no batch dims); got {dimension_numbers} for "
                f"lhs {tuple(lhs.shape)} and rhs {tuple(rhs.shape)}"
            )
        w = quantize_kernel(rhs, dataclasses.replace(spec, in_dims=n), name="dot_general rhs")
        out = preferred_element_type or lhs.dtype
        y = _qmatmul_nd(lhs, w, n, out, act_format, act_granularity)
        return jnp.reshape(y, (*lhs.shape[: lhs.ndim - n], *rhs.shape[n:])).astype(out)

    return dot_general


class QEmbed(nn.Module):
    """``nn.Embed`` whose table may be a QuantizedTensor (rows dequantized after the gather).

    A quantized table must be scaled per tensor, per row (``per_channel``) or
    per block along the feature axis, so that a row's codes and scales are a
    row of ``data`` and of ``scales``.
    """

    num_embeddings: int
    features: int
    dtype: Any = None
    param_dtype: Any = jnp.float32
    embedding_init: Callable = nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        """Int ids of any shape -> ``[*ids.shape, features]``."""
        stored = (
            self.get_variable("params", "embedding")
            if self.has_variable("params", "embedding")
            else None
        )
        if isinstance(stored, QuantizedTensor):
            q = lax.stop_gradient(stored)  # frozen table
            if q.granularity is Granularity.TILE_2D or q.ndim != 2:
                raise ValueError(
                    f"a quantized embedding table must be rank 2 with per-tensor, per-channel "
                    f"or per-block scales, got {q.granularity.value} {q.shape}"
                )
            flat = jnp.reshape(ids, (-1,))
            scales = q.scales if q.granularity is Granularity.PER_TENSOR else q.scales[flat]
            rows = dataclasses.replace(q, data=q.data[flat], scales=scales)
            out = dequantize(rows, dtype=self.dtype or q.dtype)
            return jnp.reshape(out, (*ids.shape, self.features))
        table = self.param(
            "embedding",
            self.embedding_init,
            (self.num_embeddings, self.features),
            self.param_dtype,
        )
        (table,) = nn.dtypes.promote_dtype(table, dtype=self.dtype, inexact=False)
        return jnp.take(table, ids, axis=0)
