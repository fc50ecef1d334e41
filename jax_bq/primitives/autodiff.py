"""Differentiation rules of the jax_bq primitives (JVPs and transposes, no ``custom_vjp``).

The rules are registered on the primitives themselves (``ad.primitive_jvps``,
``ad.primitive_transposes``), so ``jax.jvp``, ``jax.vjp``, ``jax.grad``,
``jax.linearize``, ``vmap`` of ``grad``, ``remat`` and higher-order
transforms compose with them as with JAX's own primitives.

**quantize_p** is piecewise constant: its exact derivative is zero almost
everywhere. Its JVP returns symbolic zeros for every output (codes, scales,
tensor scale, workspace: ``float0`` for uint8 outputs), and does no work.
Consequently ``dequantize(quantize(x))`` written as two calls has a zero
derivative, which is the truth for that composition but never what training
wants: the straight-through estimator lives in the fused round trip below.

**dequantize_p** is linear in the decoded codes, but codes and scales are
discrete storage, not parameters: a non-zero tangent for them (a user asking
for the gradient with respect to a :class:`~jax_bq.QuantizedTensor`'s codes)
raises a ``ValueError`` that names the supported ways to train. Frozen
quantized weights in the Flax layers pass through ``lax.stop_gradient``, so
their tangents are symbolic zeros and gradients flow to everything else.

**quantize_dequantize_p** (``jax_bq.quantize_dequantize``, fake-quant) carries
the **straight-through estimator**. With ``s`` the effective scale of an
element's block (times the NVFP4 tensor scale; the E8M0 power of two for MX)
and ``MAX`` the element format's largest finite value::

    d/dx dq(q(x)) . t  =  t   where |x| <= (MAX + ulp(MAX) / 2) * s
                       =  0   elsewhere (the element was clipped), and for NaN/Inf

``MAX + ulp(MAX)/2`` (464 for E4M3, 61440 for E5M2, 7 for E2M1) is where
round-to-nearest would leave the top code without the clip, so the tangent is
cut exactly where the clip, not the rounding, decided the code. With amax
scaling and float32 block scales (FP8, FP4) nothing clips (``|x| / s <= MAX``
up to one rounding of ``s``), nor for NVFP4 (the E4M3 block scale rounds by
at most 2^-4 relative: ``|x| / s <= 6.375``, unless the block scale is an
E4M3 subnormal); MX formats do clip (the E8M0 exponent is floored: up to 2x
headroom is lost, e.g. MXFP8 elements of ``|x| / s`` in (464, 512)). The
tangent is then cast to the output dtype. The JVP is linear in ``t`` (a
``select`` and a ``convert``), so JAX transposes it itself.

**qmatmul_p** is linear in the float activations ``x``, the ``bias`` and the
``residual``: ``d out = dx . dq(w)^T + d bias + d residual``. Codes and
scales (of ``w``, or of a pre-quantized ``x``) take no tangent (a ValueError,
as for dequantize). A fused GELU is differentiated through its
pre-activation ``z = x . dq(w)^T + bias``, which the JVP recomputes with one
more ``qmatmul`` (the same operands, the GELU and residual dropped):
``d out = gelu'(z) * (dx . dq(w)^T + d bias) + d residual`` (tanh or erf
GELU as fused). An FP8 output (``out_format``) raises: call qmatmul without
it and quantize in jnp. ``workspace`` and ``amax`` get
symbolic zeros. The derivative products follow the forward's precision:

* activations quantized to FP8 in the forward (W8A8): the **hybrid recipe**
  (TransformerEngine's): the tangent/cotangent is quantized to E5M2 with
  per-tensor current scaling (1x128 blocks against 1x128/128x128 block
  weights) and the products run through :func:`jax_bq.qmatmul`, so on a GPU
  with FP8 tensor cores they take the cuBLASLt path and ``jax_bq.explain``
  shows them. ``dx = ct . dq(w)`` needs ``w^T`` blocked along N: the codes
  are transposed as they are for per-tensor scales and 128x128 tiles (exact),
  and ``dq(w)^T`` is requantized per tensor to E4M3 otherwise.
* 16-bit activations (weight-only) or anything else: the products run in
  bf16 (f16 for f16 outputs) on ``dq(w)`` with float32 accumulation.

The JVP binds ``qmatmul_p`` on the tangent (hybrid recipe), which is the
linear map that the transpose rule below inverts, so reverse mode gives
``dx = ct . dq(w)`` through qmatmul as well.

**qat_matmul_p** (``x . quantize(w)^T`` with the float master ``w``): the
``x`` part as qmatmul's, and ``dw`` through the weight's STE
(``mask(w) * (ct^T . dq(q(x)))``). With ``grads="fp8"`` both backward products
run through qmatmul (E5M2 x E4M3 per tensor; the weight for ``dx`` and the
activations for ``dw`` are quantized per tensor from the master and from
``x``, so their transposes are exact); with ``grads="bf16"`` they are bf16
products of the same dequantized operands the forward used.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.interpreters import ad

from jax_bq import reference
from jax_bq.formats import Granularity, QuantFormat
from jax_bq.primitives import qmatmul as qp
from jax_bq.primitives.dequantize import dequantize_p
from jax_bq.primitives.qat_matmul import forward as qat_forward
from jax_bq.primitives.qat_matmul import qat_matmul_p
from jax_bq.primitives.quantize import quantize_p
from jax_bq.primitives.quantize_dequantize import quantize_dequantize_p, round_trip

_FP8 = (QuantFormat.FP8_E4M3, QuantFormat.FP8_E5M2)

#: ``MAX + ulp(MAX) / 2`` per element format (keyed by MAX): the largest
#: ``|x| / s`` that rounds to the top code without clipping.
_STE_LIMIT = {448.0: 464.0, 57344.0: 61440.0, 6.0: 7.0}

_NOT_DIFFERENTIABLE = (
    "jax_bq: cannot differentiate with respect to {what} (discrete storage, not a "
    "parameter). To train quantized weights keep a float master copy and use "
    "jax_bq.quantize_dequantize (straight-through estimator), jax_bq.qat_matmul, or the "
    "Flax layers' qat mode; for frozen quantized weights wrap them in jax.lax.stop_gradient."
)


def _zero(x) -> ad.Zero:
    return ad.Zero(jax.typeof(x).to_tangent_aval())


def _is_zero(t) -> bool:
    return type(t) is ad.Zero


# ---- the straight-through mask ----------------------------------------------------------


def ste_mask_view(x, scales, tensor_scale, fmt: QuantFormat, ba: int, bb: int):
    """Where the STE passes the tangent, on the ``[G, P, A, B]`` view (module docstring)."""
    eff = reference.effective_scales(scales, tensor_scale, fmt)
    _, _, a, b = x.shape
    s = jnp.repeat(jnp.repeat(eff, ba, axis=2)[:, :, :a], bb, axis=3)[:, :, :, :b]
    limit = np.float32(_STE_LIMIT[fmt.max_value])
    return jnp.abs(x.astype(jnp.float32)) <= limit * s


def ste_mask(x, q):
    """The STE mask of ``x`` against its quantization ``q`` (a QuantizedTensor), shape of ``x``."""
    v = q.view()
    ts = (
        jnp.reshape(q.tensor_scale, (v.g,))
        if q.format.has_tensor_scale
        else jnp.ones((v.g,), jnp.float32)
    )
    m = ste_mask_view(
        jnp.reshape(x, v.dims), jnp.reshape(q.scales, v.scale_dims), ts, q.format, v.ba, v.bb
    )
    return jnp.reshape(m, x.shape)


# ---- quantize / dequantize / quantize_dequantize --------------------------------------------


def _quantize_jvp(primals, tangents, **params):
    outs = quantize_p.bind(*primals, **params)
    return outs, [_zero(o) for o in outs]


def _dequantize_jvp(primals, tangents, **params):
    if not all(_is_zero(t) for t in tangents):
        raise ValueError(_NOT_DIFFERENTIABLE.format(what="a QuantizedTensor's codes or scales"))
    y = dequantize_p.bind(*primals, **params)
    return y, _zero(y)


def _quantize_dequantize_jvp(primals, tangents, *, fmt, ba, bb, pack_b, dtype):
    (x,), (t,) = primals, tangents
    _, scales, ts, y = round_trip(x, fmt=fmt, ba=ba, bb=bb, pack_b=pack_b, dtype=dtype)
    if _is_zero(t):
        return y, _zero(y)
    mask = ste_mask_view(x, scales, ts, fmt, ba, bb)
    return y, jnp.where(mask, t, jnp.zeros_like(t)).astype(dtype)


ad.primitive_jvps[quantize_p] = _quantize_jvp
ad.primitive_jvps[dequantize_p] = _dequantize_jvp
ad.primitive_jvps[quantize_dequantize_p] = _quantize_dequantize_jvp


# ---- qmatmul ----------------------------------------------------------------------------


def weight_of(cfg: qp.QmmConfig, w_data, w_scales, w_ts):
    """The ``[N, K]`` QuantizedTensor that qmatmul_p's weight operands describe."""
    from jax_bq.qtensor import QuantizedTensor

    ts = jnp.reshape(w_ts, ()) if cfg.w_format.has_tensor_scale else None
    return QuantizedTensor(
        w_data,
        w_scales,
        ts,
        cfg.w_format,
        cfg.w_granularity,
        cfg.w_block,
        -1,
        cfg.k,
        2,
        cfg.compute_dtype,
    )


def hybrid(cfg: qp.QmmConfig) -> bool:
    """Whether the derivative products of ``cfg`` take the FP8 hybrid recipe."""
    return cfg.act_format is not None and cfg.act_format is not QuantFormat.NVFP4


def grad_granularity(w) -> str:
    """E5M2 gradient scaling against ``w``: 1x128 blocks for block weights, else per tensor."""
    if w.format in _FP8 and w.granularity in (Granularity.PER_BLOCK, Granularity.TILE_2D):
        return qp.ACT_BLOCK128
    return qp.ACT_TENSOR


def transposed_weight(w):
    """``w[N, K]`` as an FP8 ``[K, N]`` QuantizedTensor blocked along N (for ``ct . dq(w)``).

    Per-tensor FP8 and FP8 128x128 tiles transpose exactly (codes and scales);
    anything else is dequantized, transposed and requantized per tensor to E4M3.
    """
    from jax_bq.ops import dequantize, quantize

    n, k = w.shape
    if w.format in _FP8 and w.granularity is Granularity.PER_TENSOR:
        return dataclasses.replace(w, data=w.data.T, axis_len=n)
    if w.format in _FP8 and w.granularity is Granularity.TILE_2D:
        return dataclasses.replace(
            w, data=w.data.T, scales=w.scales.T, block=tuple(w.block[::-1]), axis_len=n
        )
    return quantize(
        dequantize(w, jnp.float32).T, QuantFormat.FP8_E4M3, granularity=Granularity.PER_TENSOR
    )


def _dense(a, b_nk, cd, out_dtype):
    """``a[M, K] . b[N, K]^T`` in ``cd`` with float32 accumulation, cast to ``out_dtype``."""
    y = lax.dot_general(
        a.astype(cd), b_nk.astype(cd), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )
    return y.astype(out_dtype)


def forward_product(t, w, cfg_hybrid: bool, cd, out_dtype):
    """``t[M, K] . dq(w)^T``, linear in ``t`` (the JVP's tangent product)."""
    from jax_bq.matmul import qmatmul
    from jax_bq.ops import dequantize

    if cfg_hybrid:
        return qmatmul(
            t,
            w,
            out_dtype=out_dtype,
            act_format=QuantFormat.FP8_E5M2,
            act_granularity=grad_granularity(w),
        )
    return _dense(t, dequantize(w, cd), cd, out_dtype)


def backward_product(ct, w, cfg_hybrid: bool, cd, out_dtype):
    """``ct[M, N] . dq(w)[N, K]``: the transpose of :func:`forward_product`."""
    from jax_bq.matmul import qmatmul
    from jax_bq.ops import dequantize

    if cfg_hybrid:
        wt = transposed_weight(w)
        return qmatmul(
            ct,
            wt,
            out_dtype=out_dtype,
            act_format=QuantFormat.FP8_E5M2,
            act_granularity=grad_granularity(wt),
        )
    return _dense(ct, dequantize(w, cd).T, cd, out_dtype)


def _check_epilogue(cfg: qp.QmmConfig) -> None:
    if cfg.out_format is not None:
        raise ValueError(
            f"jax_bq.qmatmul with an FP8 ({cfg.out_format.value}) output epilogue has no "
            "derivative rule: call qmatmul without out_format and quantize in jnp (bias, "
            "GELU and residual are supported)"
        )


_GELU_BITS = qp.EPI_GELU_TANH | qp.EPI_GELU_ERF


def _pre_activation(primals, cfg: qp.QmmConfig):
    """``x . dq(w)^T + bias`` in float32: the operands of a GELU-fused call, GELU dropped.

    The product runs with no epilogue at all (the plain GEMM every path has;
    cuBLASLt's FP8 GEMM takes no float32 bias, for one) and the bias is added
    here in float32.
    """
    x, xs, wd, wsc, wts, bias, res, dsc = primals
    lin = dataclasses.replace(cfg, epilogue=0)
    no_bias = jnp.zeros((0,), lin.epilogue_dtype)
    z = qmatmul_p.bind(x, xs, wd, wsc, wts, no_bias, no_bias, dsc, cfg=lin)[0]
    z = z.astype(jnp.float32)
    return z + bias.astype(jnp.float32) if cfg.epilogue & qp.EPI_BIAS else z


def _qmatmul_jvp(primals, tangents, *, cfg: qp.QmmConfig):
    x, xs, wd, wsc, wts, bias, res, dsc = primals
    tx, txs, twd, twsc, twts, tb, tr, tds = tangents
    if not all(_is_zero(t) for t in (txs, twd, twsc, twts, tds)) or (
        not cfg.act_dynamic and not _is_zero(tx)
    ):
        raise ValueError(_NOT_DIFFERENTIABLE.format(what="qmatmul's quantized codes or scales"))
    outs = qmatmul_p.bind(*primals, cfg=cfg)
    out = outs[0]
    if not (_is_zero(tx) and _is_zero(tb) and _is_zero(tr)):
        _check_epilogue(cfg)
    t_pre = None  # the tangent of x . dq(w)^T + bias
    if not _is_zero(tx):
        w = weight_of(cfg, wd, wsc, wts)
        t_pre = forward_product(tx, w, hybrid(cfg), cfg.compute_dtype, cfg.out_dtype)
    if not _is_zero(tb):
        term = jnp.broadcast_to(jnp.reshape(tb, (1, cfg.n)), (cfg.m, cfg.n)).astype(cfg.out_dtype)
        t_pre = term if t_pre is None else t_pre + term
    t_out = t_pre
    if t_pre is not None and cfg.epilogue & _GELU_BITS:
        tanh = bool(cfg.epilogue & qp.EPI_GELU_TANH)
        _, t_act = jax.jvp(
            lambda z: jax.nn.gelu(z, approximate=tanh),
            (_pre_activation(primals, cfg),),
            (t_pre.astype(jnp.float32),),
        )
        t_out = t_act.astype(cfg.out_dtype)
    if not _is_zero(tr):
        term = jnp.reshape(tr, (cfg.m, cfg.n)).astype(cfg.out_dtype)
        t_out = term if t_out is None else t_out + term
    t_out = _zero(out) if t_out is None else t_out
    return outs, [t_out, _zero(outs[1]), _zero(outs[2])]


def _qmatmul_transpose(cts, x, xs, wd, wsc, wts, bias, res, dsc, *, cfg: qp.QmmConfig):
    """Transposes the linear part; the JVP above keeps any GELU out of the linear map."""
    undefined = [ad.is_undefined_primal(a) for a in (x, xs, wd, wsc, wts, bias, res, dsc)]
    if any(undefined[i] for i in (1, 2, 3, 4, 7)) or (undefined[0] and not cfg.act_dynamic):
        raise ValueError(_NOT_DIFFERENTIABLE.format(what="qmatmul's quantized codes or scales"))
    _check_epilogue(cfg)
    if cfg.epilogue & _GELU_BITS:
        raise ValueError("jax_bq: a GELU-fused qmatmul is not linear; differentiate it with jvp")
    ct = cts[0]
    result = [None] * 8
    if _is_zero(ct):
        return result
    if undefined[0]:
        w = weight_of(cfg, wd, wsc, wts)
        result[0] = backward_product(ct, w, hybrid(cfg), cfg.compute_dtype, x.aval.dtype)
    if undefined[5]:
        result[5] = jnp.sum(ct.astype(jnp.float32), axis=0).astype(bias.aval.dtype)
    if undefined[6]:
        result[6] = ct.astype(res.aval.dtype)
    return result


qmatmul_p = qp.qmatmul_p
ad.primitive_jvps[qmatmul_p] = _qmatmul_jvp
ad.primitive_transposes[qmatmul_p] = _qmatmul_transpose


# ---- qat_matmul ---------------------------------------------------------------------------


def _qat_jvp(primals, tangents, *, spec):
    from jax_bq.matmul import plan, qmatmul
    from jax_bq.ops import dequantize, quantize

    (x, w), (tx, tw) = primals, tangents
    y, wq = qat_forward(x, w, spec=spec)
    if _is_zero(tx) and _is_zero(tw):
        return y, _zero(y)
    cfg = plan(x, wq, **spec.matmul_kwargs()).config
    cd = cfg.compute_dtype
    fp8 = spec.grads == "fp8"
    terms = []
    if not _is_zero(tx):
        if fp8:  # per-tensor E4M3 from the master, so that its transpose is exact
            same = wq.format is QuantFormat.FP8_E4M3 and wq.granularity is Granularity.PER_TENSOR
            wg = (
                wq
                if same
                else quantize(w, QuantFormat.FP8_E4M3, granularity=Granularity.PER_TENSOR)
            )
            terms.append(forward_product(tx, wg, True, cd, spec.out_dtype))
        else:
            terms.append(forward_product(tx, wq, False, cd, spec.out_dtype))
    if not _is_zero(tw):
        tw = jnp.where(ste_mask(w, wq), tw, jnp.zeros_like(tw))
        if fp8:  # (tw . dq(xq)^T)^T with the activations quantized per tensor
            xq = quantize(x, QuantFormat.FP8_E4M3, granularity=Granularity.PER_TENSOR)
            t_w = qmatmul(
                tw,
                xq,
                out_dtype=spec.out_dtype,
                act_format=QuantFormat.FP8_E5M2,
                act_granularity=qp.ACT_TENSOR,
            ).T
        else:  # the activations the forward multiplied
            xa = x.astype(cd)
            if cfg.act_dynamic and cfg.act_format is not None:
                kw = qp._act_quant_kwargs(cfg.act_granularity)
                xa = dequantize(quantize(x, cfg.act_format, **kw), cd)
            t_w = _dense(xa, tw, cd, spec.out_dtype)
        terms.append(t_w)
    t = terms[0]
    for term in terms[1:]:
        t = t + term
    return y, t


ad.primitive_jvps[qat_matmul_p] = _qat_jvp
