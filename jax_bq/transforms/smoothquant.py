"""SmoothQuant-style migration of activation range into the weights, where it folds exactly.

For a linear layer ``y = x W`` (``W[K, N]``) and per-input-channel factors
``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (``X`` the calibration inputs,
``W_j`` row ``j`` of the kernel), ``y = (x / s)(diag(s) W)``: the quantized
layer sees flatter activations and steeper weights.

Where the division by ``s`` can be folded into the producer of ``x`` in a
post-LayerNorm BERT block:

* **attention_output** (input: attention over V). Attention is linear in V
  per channel, so ``W_v[:, j] /= s_j``, ``b_v[j] /= s_j`` and
  ``W_o[j, :] *= s_j`` is exact: :func:`smooth_value_output`.
* **Q/K/V and FFN1** (input: a LayerNorm's output ``h``). Dividing that
  LayerNorm's gamma and beta by ``s`` would also divide the residual stream
  ``h`` (post-LN: ``h`` is both the layer input and the residual), and the
  next LayerNorm is not invariant to per-channel scaling, so the fold is
  **not exact** in post-LN BERT (it is in pre-LN models, where the LayerNorm
  feeds only the linear layers). These layers are left unsmoothed; doing it
  exactly needs an online per-channel multiply.
* **FFN2** (input: GELU output): nothing folds through GELU; the online
  Hadamard rotation (:mod:`jax_bq.transforms.hadamard`) is used there.

Why this matters less for FP8 than for INT8: a floating-point format's
relative rounding error is (away from subnormals and saturation) the same at
every magnitude, so the output error ``sum_j x_j^2 W_jn^2 * eps^2`` is
unchanged by ``x_j / s_j, s_j W_jn``. Smoothing helps FP8 only where the
small channels fall into the subnormal range of a per-tensor scale, and
helps block-scaled weights (AWQ's effect) by changing which weights share
a block scale. ``alpha`` is therefore chosen per layer by the measured
output error on calibration rows, including "no smoothing".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jax_bq.flax.rules import WeightQuant, _as_spec, quantize_kernel
from jax_bq.ops import dequantize, quantize

__all__ = ["ALPHAS", "smoothing_factors", "smoothed_layer_error", "smooth_value_output"]

#: Migration strengths tried per layer (plus ``None``: no smoothing).
ALPHAS = (0.25, 0.5, 0.75)


def smoothing_factors(act_absmax, kernel, alpha: float) -> np.ndarray:
    """Smoothing factors ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``.

    ``kernel`` is ``[K, N]``; factors are clamped to ``[1e-5, 1e5]``; channels
    that never fire (``max|X_j| = 0``) or have no weight get 1.
    """
    a = np.asarray(act_absmax, np.float64)
    w = np.max(np.abs(np.asarray(kernel, np.float64)), axis=1)
    s = np.where((a > 0) & (w > 0), a**alpha / np.maximum(w, 1e-30) ** (1 - alpha), 1.0)
    return np.clip(s, 1e-5, 1e5)


def _fake_quant_act(x, act_format: str, act_granularity: str | None):
    gran = "per_tensor" if act_granularity in (None, "per_tensor") else "per_channel"
    q = quantize(jnp.asarray(x, jnp.float32), act_format, granularity=gran)
    return np.asarray(dequantize(q, jnp.float32), np.float64)


def smoothed_layer_error(
    samples, kernel, s, spec: WeightQuant, act_format: str | None, act_granularity: str | None
) -> float:
    """``||X W - Q_a(X / s) Q_w(diag(s) W)||^2`` on calibration rows ``X`` (``s = None``: 1).

    ``Q_a`` quantizes activations like ``qmatmul`` does (``act_format`` FP8,
    per tensor or per token; ``None`` or ``"bf16"``: activations in bf16).
    """
    x = np.asarray(samples, np.float64)
    w = np.asarray(kernel, np.float64)
    ref = x @ w
    if s is not None:
        x, w = x / s[None, :], w * s[:, None]
    wq = np.asarray(dequantize(quantize_kernel(jnp.asarray(w, jnp.float32), spec)), np.float64).T
    if act_format in (None, "bf16"):
        xq = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)
    else:
        xq = _fake_quant_act(x, act_format, act_granularity)
    return float(np.sum((xq @ wq - ref) ** 2))


def smooth_value_output(
    params,
    stats,
    spec: WeightQuant | str,
    act_format: str | None = "fp8_e4m3",
    act_granularity: str | None = "per_tensor",
    alphas=ALPHAS,
):
    """Smooths every ``layer_i/attention_output`` input, folded exactly into V.

    Per layer, each ``alpha`` in ``alphas`` and no smoothing are scored by
    :func:`smoothed_layer_error` on ``stats[...].samples`` and the best is
    folded: ``W_v[:, j] /= s_j``, ``b_v[j] /= s_j``, ``W_o[j, :] *= s_j``.

    Args:
        params: float BertEncoder params.
        stats: :func:`collect_layer_stats` of ``params``.
        spec: the weight format the model will be quantized to.
        act_format: the activation format it will run with (``"bf16"``: weight-only).
        act_granularity: ``"per_tensor"`` or ``"per_token"``.
        alphas: candidate migration strengths.

    Returns:
        ``(new params, {layer: (alpha, s) or None})``: the chosen strength
        and factors ``s[K]`` per layer (``None``: not smoothed).

    Raises:
        ValueError: params without BERT blocks, or stats without their attention_output.
    """
    spec = _as_spec(spec)
    out = jax.tree_util.tree_map(lambda a: a, params)
    layers = sorted(k for k in params if k.startswith("layer_"))
    if not layers:
        raise ValueError("smooth_value_output: params has no 'layer_<i>' blocks (not BERT)")
    chosen = {}
    for name in layers:
        st = stats.get(f"{name}/attention_output")
        if st is None:
            raise ValueError(f"smooth_value_output: no stats for {name}/attention_output")
        p = out[name]
        wo = np.asarray(p["attention_output"]["kernel"], np.float64)
        best, best_err = (
            None,
            smoothed_layer_error(st.samples, wo, None, spec, act_format, act_granularity),
        )
        for a in alphas:
            s = smoothing_factors(st.absmax, wo, a)
            e = smoothed_layer_error(st.samples, wo, s, spec, act_format, act_granularity)
            if e < best_err:
                best, best_err = (a, s), e
        chosen[name] = best
        if best is None:
            continue
        s = best[1]
        p["value"] = dict(
            p["value"],
            kernel=jnp.asarray(np.asarray(p["value"]["kernel"], np.float64) / s, jnp.float32),
            bias=jnp.asarray(np.asarray(p["value"]["bias"], np.float64) / s, jnp.float32),
        )
        p["attention_output"] = dict(
            p["attention_output"], kernel=jnp.asarray(wo * s[:, None], jnp.float32)
        )
    return out, chosen
