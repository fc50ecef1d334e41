"""Per-operator activation handling for QDense / QLinear (the strategies' activation half).

:func:`jax_bq.strategies.apply_strategy` stores an activation spec next to a
layer's quantized kernel, the way static calibration stores ``act_scale``:
``params[...]["act_quant"]`` (Linen) or the ``act_quant`` attribute of a
:class:`~jax_bq.flax.QLinear` (NNX). The spec is a static pytree
(:class:`~jax_bq.dynamic.DynamicQuantConfig` or
:class:`~jax_bq.dynamic.WeightOnly`): it has no leaves, so it rides through
``jit`` in the tree structure and the layer picks its branch at trace time.

EMA state (``ema_decay`` set): Linen keeps an :class:`~jax_bq.dynamic.EmaState`
in the ``quant_state`` collection (``ema``); it is updated when that
collection is mutable (``apply(..., mutable=["quant_state"])``), read when it
is present and immutable, and absent otherwise (fresh scales). NNX keeps it
in a :class:`QuantState` variable on the layer, updated on every call.
Whenever ``intermediates`` is mutable (Linen) the layer sows
``dyn_precision`` (int code) and ``dyn_outlier_ratio``; NNX layers keep the
last ones in :class:`DynamicInfo` variables.
"""

from __future__ import annotations

from flax import nnx

from jax_bq.dynamic import DynamicQuantConfig, EmaState, WeightOnly, quantize_dynamic
from jax_bq.matmul import qmatmul

__all__ = [
    "DynamicInfo",
    "QuantState",
    "attach_nnx_spec",
    "dense_with_spec",
    "ema_shape",
    "needs_fallback_copy",
]

ACT_SPEC = "act_quant"
FALLBACK = "fallback_kernel"
STATE = "quant_state"


class QuantState(nnx.Variable):
    """An NNX layer's EMA state (an :class:`~jax_bq.dynamic.EmaState`)."""


class DynamicInfo(nnx.Variable):
    """What an NNX layer's last dynamic call did (precision code, outlier ratio)."""


def check_spec(spec, where: str):
    """``spec`` if it is an activation spec, else a ValueError naming ``where``."""
    if not isinstance(spec, DynamicQuantConfig | WeightOnly):
        raise ValueError(
            f"{where}: act_quant must be a DynamicQuantConfig or WeightOnly, got {spec!r}"
        )
    return spec


def ema_shape(cfg: DynamicQuantConfig, k: int) -> tuple[int, ...]:
    """Shape of the EMA value: ``[K]`` per channel, else a scalar."""
    return (k,) if cfg.granularity == "per_channel" else ()


def attach_nnx_spec(layer, spec, fallback_kernel=None) -> None:
    """Sets ``spec`` on a QLinear with its state variables (EMA, last precision and ratio).

    The variables are created here, outside any transform, so that calls
    under ``nnx.jit`` only update values. ``fallback_kernel`` (``[in, out]``,
    stored as float16 in ``layer.fallback_kernel``) is the FP16 branch's
    weight when ``spec.fallback_weight == "fp16"``.
    """
    import jax.numpy as jnp

    spec = check_spec(spec, type(layer).__name__)
    layer.act_quant = spec
    if needs_fallback_copy(spec):
        if fallback_kernel is None:
            raise ValueError(
                f"{type(layer).__name__}: {spec.describe()} needs the float kernel "
                "(fallback_kernel) for its FP16 branch"
            )
        layer.fallback_kernel = nnx.Param(jnp.asarray(fallback_kernel, jnp.float16))
    if isinstance(spec, DynamicQuantConfig):
        if spec.ema_decay is not None:
            layer.quant_state = QuantState(EmaState.zeros(ema_shape(spec, layer.in_features)))
        layer.dyn_precision = DynamicInfo(jnp.zeros((), jnp.int32))
        layer.dyn_outlier_ratio = DynamicInfo(jnp.zeros((), jnp.float32))


def needs_fallback_copy(spec) -> bool:
    """Whether ``spec`` runs its FP16 fallback on a stored float16 copy of the weight."""
    return (
        isinstance(spec, DynamicQuantConfig)
        and spec.fallback_to_fp16
        and spec.fallback_weight == "fp16"
    )


def dense_with_spec(
    spec, x, w, out_dtype, *, ema: EmaState | None = None, where: str = "dense", fallback=None
):
    """``x[..., K] @ w[N, K]^T`` under an activation spec; returns ``(y, meta or None)``.

    ``fallback``: the float16 ``[N, K]`` copy of the weight for the FP16
    branch (``spec.fallback_weight == "fp16"``).
    """
    spec = check_spec(spec, where)
    if isinstance(spec, WeightOnly):
        return qmatmul(x, w, out_dtype=out_dtype, act_format=spec.dtype), None
    return quantize_dynamic(
        x,
        w,
        operator_name=where,
        config=spec,
        ema=ema,
        out_dtype=out_dtype,
        fallback_weight=fallback,
    )
