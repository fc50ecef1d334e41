"""The fused inference block of the BERT-family encoder (``BertEncoder(fused=True)``).

Same params as the plain block, same math up to rounding, fewer passes over
memory. Per block, with FP8 kernels and calibrated static activation scales::

    q, k, v = qmatmul(h_q, W_{q,k,v}, bias=b)           # FP8 GEMMs, bias in the epilogue
    a       = attention(q, k, v, lengths)                # cuDNN flash attention on GPU
    o       = qmatmul(quantize_static(a), W_o, bias=b_o, residual=h)
    h1, h1q = layernorm_quantize(o, gamma_1, beta_1, scale=s_ffn1)    # one pass, FP8 out
    f_q     = qmatmul(h1q, W_1, bias=b_1, activation=gelu, out_format=fp8, out_scale=s_ffn2)
    o2      = qmatmul(f_q, W_2, bias=b_2, residual=h1)
    h2, h2q = layernorm_quantize(o2, gamma_2, beta_2, scale=s_next)  # feeds the next block

Each line is one custom call (two for the LayerNorm-quantize where XLA adds a
cast) instead of the plain block's GEMM + bias + GELU + add + LayerNorm +
cast fusions. Without calibrated scales the activations are quantized inside
each ``qmatmul`` (dynamic) and FFN1 writes bf16. With float kernels the same
structure runs in bf16 (XLA dots with the epilogue in jnp, the same
attention): the honest baseline for what quantization itself earns.

Choices, each stated where it is made:

* ``gelu="tanh"`` fuses the tanh-approximated GELU into the FFN1 GEMM
  (cuBLASLt's GELU epilogue); ``"exact"`` (erf, what BERT was trained with)
  keeps the bias fused and runs the GELU after the GEMM.
* Attention takes the padding as sequence lengths (``attention_mask`` must be
  a prefix mask, as right-padding tokenizers produce), which is what cuDNN's
  fused kernel accepts; the implementation is cuDNN on a GPU with bf16/f16
  activations and XLA elsewhere, logged at DEBUG.
* Q, K and V share their input quantization: the codes are made once with
  the largest of the three calibrated scales.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_bq.layernorm import layernorm_quantize
from jax_bq.matmul import qmatmul
from jax_bq.qtensor import QuantizedTensor
from jax_bq.static import quantize_static

logger = logging.getLogger("jax_bq")

GELU_MODES = {"exact": "gelu", "tanh": "gelu_tanh"}


def attention_impl(dtype) -> str:
    """``"cudnn"`` where JAX's default backend is a GPU and the dtype is 16-bit, else ``"xla"``."""
    if jax.default_backend() == "gpu" and np.dtype(dtype) in (
        np.dtype(jnp.bfloat16),
        np.dtype(jnp.float16),
    ):
        return "cudnn"
    logger.debug(
        "jax_bq fused encoder: XLA attention (backend %s, dtype %s; cuDNN needs a GPU and "
        "bf16/f16)",
        jax.default_backend(),
        np.dtype(dtype).name,
    )
    return "xla"


def attention(q, k, v, lengths, impl: str):
    """Softmax attention over the first ``lengths[b]`` keys; q, k, v ``[B, S, heads, d]``."""
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=1.0 / math.sqrt(q.shape[-1]),
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        implementation=impl,
    )


def act_scale(p: dict):
    """The calibrated static input scale of one dense layer, or None."""
    return p.get("act_scale")


def dense(x, p: dict, dtype, **epilogue):
    """One dense layer with its epilogue: ``qmatmul`` for a quantized kernel, else jnp.

    ``x`` is an array or (quantized kernels) an FP8 QuantizedTensor; the
    epilogue keywords are those of :func:`jax_bq.qmatmul` (bias is ``p``'s).
    """
    kernel = p["kernel"]
    bias = p.get("bias")
    if isinstance(kernel, QuantizedTensor):
        bias = None if bias is None else bias.astype(dtype)
        if epilogue.get("out_format") is None:
            epilogue.pop("out_scale", None)
        return qmatmul(x, kernel, out_dtype=dtype, bias=bias, **epilogue)
    y = jnp.dot(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    act = epilogue.get("activation")
    if act is not None:
        y = jax.nn.gelu(y, approximate=act == "gelu_tanh")
    if epilogue.get("residual") is not None:
        y = y + epilogue["residual"].astype(jnp.float32)
    return y.astype(dtype)


def layernorm(x, p: dict, eps: float, dtype, scale=None, granularity=None):
    """``(y, y_q)``: LayerNorm of ``x`` and, when a scale or granularity is given, its FP8 codes."""
    if scale is None and granularity is None:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]
        return y.astype(dtype), None
    q, y = layernorm_quantize(
        x,
        p["scale"],
        p["bias"],
        eps=eps,
        scale=scale,
        granularity=granularity or "per_tensor",
        out_dtype=dtype,
        exact_scale=scale is not None,  # calibration stores powers of two
    )
    return y, q


def _static_scale_of(p: dict):
    """A quantized dense layer's calibrated input scale (None for float kernels or none)."""
    return act_scale(p) if isinstance(p["kernel"], QuantizedTensor) else None


def qkv_scale(p: dict):
    """The shared input scale of Q, K and V: the largest calibrated one (None if any is missing)."""
    scales = [act_scale(p[n]) for n in ("query", "key", "value")]
    if any(s is None for s in scales) or not isinstance(p["query"]["kernel"], QuantizedTensor):
        return None
    return jnp.maximum(jnp.maximum(scales[0], scales[1]), scales[2])


def block(h, h_q, p: dict, cfg, lengths, next_scale, *, gelu: str, dtype, impl: str, dynamic):
    """One fused block: ``(h_out, h_out_q)``; ``h_q`` is the FP8 (or plain) input of Q, K, V.

    ``next_scale``: the static scale of the next block's Q/K/V input (None:
    no codes out, or dynamic per-token codes when ``dynamic == "per_token"``).
    """
    b, s, hidden = h.shape
    heads, dh = cfg.num_heads, hidden // cfg.num_heads
    x = h_q if h_q is not None else h

    def proj(name):
        y = dense(x, p[name], dtype)
        return jnp.reshape(y, (b, s, heads, dh))

    a = attention(proj("query"), proj("key"), proj("value"), lengths, impl)
    a = jnp.reshape(a, (b, s, hidden))
    o_scale = _static_scale_of(p["attention_output"])
    if o_scale is not None:
        a = quantize_static(a, o_scale, exact_scale=True)
    o = dense(a, p["attention_output"], dtype, residual=h)
    ffn1_scale = (
        act_scale(p["intermediate"])
        if isinstance(p["intermediate"]["kernel"], QuantizedTensor)
        else None
    )
    h1, h1_q = layernorm(
        o,
        p["attention_norm"],
        cfg.layer_norm_eps,
        dtype,
        scale=ffn1_scale,
        granularity=dynamic if ffn1_scale is None else None,
    )
    ffn2_scale = (
        act_scale(p["output"]) if isinstance(p["output"]["kernel"], QuantizedTensor) else None
    )
    f = dense(
        h1_q if h1_q is not None else h1,
        p["intermediate"],
        dtype,
        activation=GELU_MODES[gelu],
        out_format="fp8_e4m3" if ffn2_scale is not None else None,
        out_scale=ffn2_scale,
    )
    o2 = dense(f, p["output"], dtype, residual=h1)
    return layernorm(
        o2,
        p["output_norm"],
        cfg.layer_norm_eps,
        dtype,
        scale=next_scale,
        granularity=dynamic if next_scale is None else None,
    )
