"""Calibrating static FP8 activation scales for Linen models built from QDense.

Run the model on sample batches with the ``intermediates`` collection
mutable: every :class:`~jax_bq.flax.QDense` records the finite amax of its
input (``act_amax``). The largest amax per layer over all batches becomes a
power-of-two scale (:func:`jax_bq.static_scale`, with a margin), stored as
``act_scale`` next to the layer's quantized FP8 kernel; from then on that
layer quantizes its input with the fixed scale (:func:`jax_bq.quantize_static`)
instead of inside each ``qmatmul`` call.

What a static scale trades: inputs beyond ``MAX * act_scale`` saturate (a
dynamic scale would follow them), so calibrate on data like what the model
will see and keep a margin; in exchange the quantization fuses into the
producer of each activation and costs no extra pass over memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jax_bq.formats import QuantFormat
from jax_bq.qtensor import QuantizedTensor
from jax_bq.static import STATIC_FORMATS, _static_format, static_scale

__all__ = ["ActivationScale", "act_scales_summary", "calibrate_activation_scales"]


@dataclass(frozen=True)
class ActivationScale:
    """What calibration found for one layer.

    Attributes:
        amax: largest finite input magnitude over the calibration batches.
        scale: the power-of-two scale stored as ``act_scale`` (``None`` where
            the layer's kernel is not FP8, so no scale was stored).
        reason: why no scale was stored, else ``""``.
    """

    amax: float
    scale: float | None
    reason: str = ""


def layer_scale(amax: float, kernel, fmt: QuantFormat, margin: float) -> ActivationScale:
    """What calibration decides for one layer: a scale for an FP8 kernel, else why not."""
    if not isinstance(kernel, QuantizedTensor) or kernel.format not in STATIC_FORMATS:
        what = kernel.format.value if isinstance(kernel, QuantizedTensor) else "a float kernel"
        return ActivationScale(amax, None, f"not an FP8 kernel ({what})")
    return ActivationScale(amax, static_scale(amax, fmt, margin=margin))


def calibrate_activation_scales(
    model: Any,
    params,
    batches: Iterable[tuple],
    *,
    format="fp8_e4m3",  # noqa: A002 - mirrors jax_bq.quantize
    margin: float = 1.0,
    method: Callable | str | None = None,
) -> tuple[Any, dict[str, ActivationScale]]:
    r"""Adds ``act_scale`` to every QDense with an FP8 kernel, from calibration batches.

    Per layer :math:`\ell` over the batches :math:`b`::

        amax_l  = max_b max_i |x_{l,b,i}|         (finite elements only)
        scale_l = 2^ceil(log2(margin * amax_l / MAX))

    Args:
        model: a Linen module whose dense layers are :class:`QDense`.
        params: its params, kernels already quantized
            (:func:`jax_bq.flax.quantize_model_weights`); calibrating on the
            quantized model makes each layer's amax reflect the quantized
            layers before it.
        batches: iterable of argument tuples for ``model.apply`` (for an
            encoder: ``(ids, mask)``).
        format: ``"fp8_e4m3"`` (default) or ``"fp8_e5m2"``: the MAX above.
        margin: headroom >= 1 over the calibrated amax.
        method: passed to ``model.apply``.

    Returns:
        ``(params with act_scale leaves, {layer path: ActivationScale})``. Layers
        whose kernel is not an FP8 QuantizedTensor get no scale (their entry
        says why).

    Raises:
        ValueError: no batches, no QDense layer reported an amax, a bad format
            or margin.
    """
    fmt = _static_format(format)
    static_scale(1.0, fmt, margin=margin)  # validates the margin before any model run

    @jax.jit
    def observe(p, *args):
        _, state = model.apply({"params": p}, *args, method=method, mutable=["intermediates"])
        return state.get("intermediates", {})

    amax: dict[tuple, float] = {}
    n = 0
    for batch in batches:
        n += 1
        seen = traverse_util.flatten_dict(jax.device_get(observe(params, *batch)))
        for path, values in seen.items():
            if path[-1] != "act_amax":
                continue
            layer = path[:-1]
            amax[layer] = max(amax.get(layer, 0.0), *(float(v) for v in values))
    if n == 0:
        raise ValueError("calibrate_activation_scales needs at least one batch")
    if not amax:
        raise ValueError("no QDense layer recorded an input amax; is the model built from QDense?")

    flat = traverse_util.flatten_dict(params)  # QuantizedTensors are leaves (not dicts)
    report: dict[str, ActivationScale] = {}
    for layer, a in sorted(amax.items()):
        r = report["/".join(layer)] = layer_scale(a, flat.get((*layer, "kernel")), fmt, margin)
        if r.scale is not None:
            flat[(*layer, "act_scale")] = jnp.float32(r.scale)
    return traverse_util.unflatten_dict(flat), report


def act_scales_summary(report: dict[str, ActivationScale]) -> str:
    """One line per layer: path, amax, scale (or why none)."""
    rows = []
    for name, r in report.items():
        tail = f"scale 2^{int(np.log2(r.scale))}" if r.scale is not None else r.reason
        rows.append(f"{name:48s} amax {r.amax:10.4g}  {tail}")
    return "\n".join(rows)
