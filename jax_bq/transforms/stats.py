"""Calibration statistics of every dense layer's input, from sample batches.

For a Linen model built from :class:`jax_bq.flax.QDense` (the BERT encoder of
:mod:`jax_bq.models`), one forward pass per batch records, for each dense
layer ``l`` with input rows ``x_t`` (tokens ``t`` whose attention mask is 1;
padding rows are left out):

* ``hessian[l] = sum_t x_t x_t^T`` (``[K, K]``, float32, accumulated in
  float64 on the host): the proxy Hessian of the layer's output error
  ``||X W - X W_q||^2 = tr((W - W_q)^T H (W - W_q))`` that GPTQ and the
  per-layer choices of the transforms minimize;
* ``absmax[l] = max_t |x_t|`` per input channel (``[K]``), for SmoothQuant;
* ``samples[l]``: every ``sample_stride``-th row ``x_t``, at most ``max_samples``
  (``[T', K]`` float32),
  on which per-layer choices measure the quantized layer's output error.

The inputs are intercepted with :func:`flax.linen.intercept_methods`, so the
model code is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax_bq.flax.linen import QDense

__all__ = ["LayerStats", "collect_layer_stats"]


@dataclass
class LayerStats:
    """Input statistics of one dense layer over the calibration tokens.

    Attributes:
        hessian: ``sum_t x_t x_t^T``, ``[K, K]`` float64.
        absmax: ``max_t |x_t|`` per input channel, ``[K]`` float64.
        tokens: number of rows ``t`` (unmasked tokens).
        samples: every ``sample_stride``-th row (at most ``max_samples``), ``[T', K]``.
    """

    hessian: np.ndarray
    absmax: np.ndarray
    tokens: int
    samples: np.ndarray


def _observer(module, params):
    def intercept(next_fun, args, kwargs, context):
        mod = context.module
        if isinstance(mod, QDense) and context.method_name == "__call__":
            mod.sow("intermediates", "dense_input", args[0])
        return next_fun(*args, **kwargs)

    @jax.jit
    def observe(p, ids, mask):
        with nn.intercept_methods(intercept):
            _, state = module.apply({"params": p}, ids, mask, mutable=["intermediates"])
        m = mask.astype(jnp.float32)[..., None]
        out = {}
        flat = jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
        for path, x in flat:
            keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
            if "dense_input" not in keys:
                continue
            name = "/".join(k for k in keys if k != "dense_input" and not k.isdigit())
            x = x.astype(jnp.float32)
            x2 = jnp.reshape(x * m, (-1, x.shape[-1]))
            out[name] = (
                jnp.einsum("tk,tl->kl", x2, x2, precision=jax.lax.Precision.HIGHEST),
                jnp.max(jnp.abs(x2), axis=0),
                jnp.reshape(x, (-1, x.shape[-1])),
            )
        return out

    return observe


def collect_layer_stats(
    module, params, batches: Iterable[tuple], max_samples: int = 2048, sample_stride: int = 4
) -> dict[str, LayerStats]:
    """Runs ``module`` on ``batches`` and returns the input statistics per dense layer.

    Args:
        module: a Linen encoder called as ``module.apply({"params": p}, ids, mask)``
            whose dense layers are :class:`QDense` (e.g. :class:`jax_bq.models.BertEncoder`).
        params: its float param tree.
        batches: ``(input_ids, attention_mask)`` pairs.
        max_samples: rows kept per layer in ``samples``.
        sample_stride: keep every this-many-th unmasked row in ``samples``.

    Returns:
        ``{layer path: LayerStats}``, paths like ``layer_0/query`` (the
        kernel is ``params[...]["kernel"]``).

    Raises:
        ValueError: no batches, or no QDense layer saw an input.
    """
    observe = _observer(module, params)
    stats: dict[str, LayerStats] = {}
    n = 0
    for ids, mask in batches:
        n += 1
        keep = np.asarray(mask).reshape(-1).astype(bool)
        tokens = int(np.sum(keep))
        for name, (h, a, x) in jax.device_get(observe(params, ids, mask)).items():
            h = np.asarray(h, np.float64)
            a = np.asarray(a, np.float64)
            x = np.asarray(x, np.float32)[keep][::sample_stride]
            if name in stats:
                s = stats[name]
                s.hessian += h
                s.absmax = np.maximum(s.absmax, a)
                s.tokens += tokens
                if len(s.samples) < max_samples:
                    s.samples = np.concatenate([s.samples, x[: max_samples - len(s.samples)]])
            else:
                stats[name] = LayerStats(h, a, tokens, x[:max_samples])
    if n == 0:
        raise ValueError("collect_layer_stats needs at least one (ids, mask) batch")
    if not stats:
        raise ValueError("no QDense layer saw an input: is the model built from jax_bq QDense?")
    return stats
