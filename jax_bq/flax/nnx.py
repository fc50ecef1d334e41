"""Flax NNX counterpart of :class:`jax_bq.flax.QDense`.

:class:`QLinear` has ``nnx.Linear``'s constructor and params (``kernel``
``[in, out]``, ``bias``); :meth:`QLinear.quantize` replaces the kernel by an
``[N, K]`` QuantizedTensor (in place), after which calls run
:func:`jax_bq.qmatmul`. :func:`quantize_nnx_model` does that to every
``QLinear`` (and converts plain ``nnx.Linear`` attributes) in a module graph.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jax_bq.flax.linen import _qmatmul_nd, _static_qmatmul, finite_amax, qat_nd
from jax_bq.flax.rules import WeightQuant, _Cast, _compile_rules, quantize_kernel
from jax_bq.flax.static_scales import ActivationScale, layer_scale
from jax_bq.qtensor import QuantizedTensor
from jax_bq.static import _static_format, static_scale

__all__ = [
    "ActAmax",
    "ActScale",
    "QLinear",
    "calibrate_nnx_activation_scales",
    "quantize_nnx_model",
]


_data = getattr(nnx, "data", lambda v: v)


class ActScale(nnx.Variable):
    """A layer's static FP8 activation scale (a power of two; not trained)."""


class ActAmax(nnx.Variable):
    """Running finite amax of a layer's input, kept only while calibrating."""


def _value(var):
    """A Variable's value (``get_value`` in new Flax, ``.value`` in older)."""
    get = getattr(var, "get_value", None)
    return get() if get is not None else var.value


def _set_value(var, value) -> None:
    """Sets a Variable's value (``set_value`` in new Flax, ``.value =`` in older)."""
    setter = getattr(var, "set_value", None)
    if setter is not None:
        setter(value)
    else:
        var.value = value


class QLinear(nnx.Module):
    """``nnx.Linear`` that runs ``qmatmul`` once its kernel is quantized.

    ``y = x @ W + b``; quantized: ``qmatmul(x, W_q[N, K], act_format,
    act_granularity) + b``.

    Args:
        in_features, out_features: sizes (K, N).
        use_bias: add a bias (kept in high precision).
        dtype: computation/output dtype (default: the input's).
        param_dtype: dtype of the initialized params.
        act_format, act_granularity: as for :func:`jax_bq.qmatmul`.
        qat, qat_grads: quantization-aware training of the float kernel, as
            for :class:`jax_bq.flax.QDense` (``None``: plain float dot).
        rngs: ``nnx.Rngs`` for initialization.

    Static activation scales, as for :class:`jax_bq.flax.QDense`: with an FP8
    kernel and ``act_scale`` (an :class:`ActScale`, set by
    :func:`calibrate_nnx_activation_scales`) the input is quantized per
    tensor with that fixed power of two by :func:`jax_bq.quantize_static`.
    While ``act_amax`` (an :class:`ActAmax`) is set, each call raises it to
    the input's finite amax.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        act_format: str | None = None,
        act_granularity: str | None = None,
        kernel_init=None,
        bias_init=None,
        qat: Any = None,
        qat_grads: str = "bf16",
        rngs: nnx.Rngs,
    ):
        kernel_init = kernel_init or nnx.initializers.lecun_normal()
        bias_init = bias_init or nnx.initializers.zeros_init()
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.act_format = act_format
        self.act_granularity = act_granularity
        self.qat = qat
        self.qat_grads = qat_grads
        self.kernel = nnx.Param(
            kernel_init(rngs.params(), (in_features, out_features), param_dtype)
        )
        self.bias = (
            nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None
        )
        # Data attributes that start as None (newer Flax wants that said; older has no nnx.data).
        self.act_scale: ActScale | None = _data(None)
        self.act_amax: ActAmax | None = _data(None)

    @classmethod
    def from_linear(cls, linear: nnx.Linear, **kwargs) -> QLinear:
        """A QLinear sharing ``linear``'s kernel and bias values."""
        new = nnx.eval_shape(
            lambda: cls(
                linear.in_features,
                linear.out_features,
                use_bias=linear.bias is not None,
                dtype=linear.dtype,
                rngs=nnx.Rngs(0),
                **kwargs,
            )
        )
        new.kernel = nnx.Param(_value(linear.kernel))
        new.bias = nnx.Param(_value(linear.bias)) if linear.bias is not None else None
        return new

    @property
    def quantized(self) -> bool:
        """Whether the kernel is a QuantizedTensor."""
        return isinstance(_value(self.kernel), QuantizedTensor)

    def quantize(self, spec: WeightQuant | str) -> QLinear:
        """Replaces the kernel by its ``[N, K]`` quantization (in place); returns self."""
        if self.quantized:
            raise ValueError("QLinear kernel is already quantized")
        self.kernel = nnx.Param(quantize_kernel(_value(self.kernel), spec))
        return self

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x[..., in] -> [..., out]`` (float dot, or qmatmul once quantized)."""
        dtype = self.dtype or x.dtype
        w = _value(self.kernel)
        if isinstance(w, QuantizedTensor):
            w = jax.lax.stop_gradient(w)  # frozen: no gradient for codes and scales
        if self.act_amax is not None:
            _set_value(self.act_amax, jnp.maximum(_value(self.act_amax), finite_amax(x)))
        if isinstance(w, QuantizedTensor) and getattr(self, "act_quant", None) is not None:
            y = self._dynamic(x, w, dtype)  # a strategy's activation spec
        elif isinstance(w, QuantizedTensor) and self.act_scale is not None:
            where = (type(self).__name__,)
            y = _static_qmatmul(x, w, _value(self.act_scale), 1, dtype, self.act_format, where)
            y = y.astype(dtype)
        elif isinstance(w, QuantizedTensor):
            y = _qmatmul_nd(x, w, 1, dtype, self.act_format, self.act_granularity).astype(dtype)
        elif self.qat is not None:
            y = qat_nd(
                x, w, 1, dtype, self.qat, self.qat_grads, self.act_format, self.act_granularity
            ).astype(dtype)
        else:
            y = jnp.dot(x.astype(dtype), w.astype(dtype))
        if self.bias is not None:
            y = y + _value(self.bias).astype(y.dtype)
        return y

    def _dynamic(self, x, w: QuantizedTensor, dtype) -> jax.Array:
        """The ``act_quant`` spec's product (:mod:`jax_bq.flax.dynamic_dense`)."""
        from jax_bq.flax import dynamic_dense as dd

        state = getattr(self, "quant_state", None)
        ema = _value(state) if state is not None else None
        fb = getattr(self, dd.FALLBACK, None)  # [in, out] float16 copy -> [N, K]
        fb = _value(fb).T if fb is not None else None
        y, meta = dd.dense_with_spec(
            self.act_quant, x, w, dtype, ema=ema, where="QLinear", fallback=fb
        )
        if meta is not None:  # the variables exist from attach_nnx_spec
            if meta.ema is not None and state is not None:
                _set_value(state, meta.ema)
            for name in ("precision", "outlier_ratio"):
                info = getattr(self, f"dyn_{name}", None)
                if info is not None:
                    _set_value(info, getattr(meta, name))
        return y.astype(dtype)


def quantize_nnx_model(model: nnx.Module, rules, **qlinear_kwargs) -> nnx.Module:
    """Quantizes the linear layers of an NNX module graph in place.

    ``rules`` is a format / :class:`WeightQuant` (every linear layer), or
    ``(pattern, spec)`` pairs matched with :func:`re.search` against the
    layer's ``/``-joined attribute path, first match wins, ``None`` keeps it.
    ``nnx.Linear`` attributes are replaced by :class:`QLinear`
    (``qlinear_kwargs`` go to it, e.g. ``act_format``).

    Raises:
        ValueError: bad rules, or a rule that matches no linear layer.
    """
    compiled = _compile_rules(rules, "", "<all linear layers>")
    used = set()
    targets = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, QLinear | nnx.Linear) and path:
            name = "/".join(str(p) for p in path)
            for pat, spec, src in compiled:
                if pat.search(name):
                    used.add(src)
                    if isinstance(spec, _Cast):
                        raise ValueError(
                            f"quantize_nnx_model: rule {src!r} casts to {spec.name}; "
                            "only quantized formats or None are supported for NNX layers"
                        )
                    if spec is not None:
                        targets.append((path, node, spec))
                    break
    unused = [src for _, _, src in compiled if src not in used]
    if unused:
        raise ValueError(f"rules matched no linear layer: {unused}")
    for path, node, spec in targets:
        layer = node if isinstance(node, QLinear) else QLinear.from_linear(node, **qlinear_kwargs)
        layer.quantize(spec)
        if layer is not node:
            parent = model
            for p in path[:-1]:
                parent = parent[p] if isinstance(p, int) else getattr(parent, p)
            if isinstance(path[-1], int):
                parent[path[-1]] = layer
            else:
                setattr(parent, path[-1], layer)
    return model


def calibrate_nnx_activation_scales(
    model: nnx.Module,
    run,
    batches,
    *,
    format="fp8_e4m3",  # noqa: A002 - mirrors jax_bq.quantize
    margin: float = 1.0,
) -> dict[str, ActivationScale]:
    """Sets ``act_scale`` on every QLinear with an FP8 kernel (in place), from batches.

    The NNX counterpart of :func:`jax_bq.flax.calibrate_activation_scales`
    (same math): every :class:`QLinear` gets an :class:`ActAmax`, ``run(model,
    *batch)`` is called for each batch (eagerly or under ``nnx.jit``), then
    each layer with an FP8 kernel gets ``ActScale(static_scale(amax))`` and
    the amax variables are removed.

    Returns:
        ``{layer path: ActivationScale}`` (layers without an FP8 kernel get no
        scale; their entry says why).

    Raises:
        ValueError: no QLinear in the model, no batches, bad format or margin.
    """
    fmt = _static_format(format)
    static_scale(1.0, fmt, margin=margin)  # validates the margin before any model run
    layers = [
        ("/".join(str(p) for p in path), node)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, QLinear)
    ]
    if not layers:
        raise ValueError("calibrate_nnx_activation_scales: the model has no QLinear layer")
    for _, layer in layers:
        layer.act_amax = ActAmax(jnp.float32(0.0))
    n = 0
    try:
        for batch in batches:
            n += 1
            run(model, *batch)
    finally:
        amax = {name: float(_value(layer.act_amax)) for name, layer in layers}
        for _, layer in layers:
            layer.act_amax = None
    if n == 0:
        raise ValueError("calibrate_nnx_activation_scales needs at least one batch")
    report = {}
    for name, layer in layers:
        r = report[name] = layer_scale(amax[name], _value(layer.kernel), fmt, margin)
        if r.scale is not None:
            layer.act_scale = ActScale(jnp.float32(r.scale))
    return report
