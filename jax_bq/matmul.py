"""``qmatmul``: quantized-weight matmul with a visible fallback ladder.

The ladder, decided per call at trace time by :func:`plan` (the rungs, as data,
are :data:`jax_bq.ladder.RUNGS`):

1. **cuBLASLt FP8** (SM 8.9/9.0/10.x/12.x, FP8 weights): W8A8 GEMM on the FP8
   tensor cores. Activations are either given quantized or quantized by the
   same custom call right before the GEMM. Scale modes: per-tensor x
   per-tensor, per-channel weights x per-token activations (outer vectors),
   and the DeepSeek recipe (1x128 activation blocks, 128x128 or 1x128 weight
   blocks).
2. **W8A16 weight-only** (FP8 weights, ``M <= 64``): our kernel widens FP8
   weights to 16 bits in registers and multiplies bf16/f16 activations on the
   tensor cores; the win for decode-sized M, and the path where cuBLASLt
   refuses the request (block scales at M = 1 on Hopper).
3. **cuBLASLt MXFP8 / NVFP4** (Blackwell, SM 10.x/12.x only): compiled and
   gated by capability and by asking cuBLASLt; **untested on Blackwell
   hardware** (none was available).
   Without FP4 tensor cores, FP4/NVFP4 weights take the **W4A16** kernel
   (``M <= 64``, ``K % 32 == 0``); with FP8 activations requested, or with
   plain activations from ``M >= FP4_CONVERT_MIN_M`` (256, the measured
   crossover) on a GPU with FP8 tensor cores, they are converted to FP8 1x128
   in the call (:func:`jax_bq.fp4_to_fp8`, one kernel on CUDA) and take rung 1
   (or the fallback, with the same converted weights).
4. **Fallback**: dequantize both operands to bf16 (f16 for f16 output) and
   ``lax.dot_general`` with float32 accumulation. Always correct; used on CPU,
   for ragged shapes (K or N not a multiple of 16), refused scale modes,
   MXFP4/MXFP8 weights on Hopper, FP4 weights at M > 64, and when
   ``JAX_BQ_FORCE_FALLBACK`` names ``qmatmul``.

The epilogue (:mod:`jax_bq.epilogue`: bias, GELU, residual, FP8 output and
its amax) is fused into the cuBLASLt FP8 GEMM where cuBLASLt allows it and
applied right after the GEMM otherwise.

Which path runs and why: :func:`plan` / :func:`explain` (``walk=True`` lists
every rung tried), and a DEBUG log line on the ``jax_bq`` logger at trace and
lowering time.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from jax_bq import epilogue as ep
from jax_bq.convert import fp4_to_fp8
from jax_bq.formats import Granularity, QuantFormat
from jax_bq.ladder import (
    FP4_CONVERT_MIN_M,
    FP4_VIA_FP8,
    WEIGHT_ONLY_CROSSOVER_M,
    Case,
    MatmulPlan,
    plan_epilogue,
    rank_by_model,
    walk,
)
from jax_bq.primitives import qmatmul as qp
from jax_bq.qtensor import QuantizedTensor

__all__ = [
    "FP4_CONVERT_MIN_M",
    "FP4_VIA_FP8",
    "WEIGHT_ONLY_CROSSOVER_M",
    "MatmulPlan",
    "explain",
    "plan",
    "qmatmul",
]

logger = logging.getLogger("jax_bq")

_rank_by_model = rank_by_model  # the ladder's model hook under its former name (tests/test_perf.py)


def plan(
    x,
    w: QuantizedTensor,
    *,
    out_dtype=jnp.bfloat16,
    act_format: QuantFormat | str | None = None,
    act_granularity: str | None = None,
    device: jax.Device | None = None,
    epilogue: ep.Epilogue | None = None,
) -> MatmulPlan:
    """Decides how ``qmatmul(x, w, ...)`` runs on ``device``; see :func:`qmatmul`.

    Walks the rungs of :data:`jax_bq.ladder.RUNGS` in order against the
    request and the device's :class:`~jax_bq.capabilities.DeviceCaps`; the
    first rung that applies gives the path (``MatmulPlan.walk`` lists the
    rungs tried). ``epilogue`` (:class:`jax_bq.epilogue.Epilogue`) says what
    follows the product; the plan then also says which part of it the GEMM
    call fuses and why (cuBLASLt is asked for the exact combination).

    Raises:
        ValueError: for invalid operands or options (same checks as qmatmul).
    """
    case = Case(
        x,
        w,
        out_dtype=out_dtype,
        act_format=act_format,
        act_granularity=act_granularity,
        device=device,
    )
    p = walk(case)
    if epilogue is None or epilogue.empty:
        return p
    return plan_epilogue(p, epilogue, case.device)


def explain(x, w: QuantizedTensor, *, walk: bool = False, **kwargs) -> str:
    """One line saying which path ``qmatmul(x, w, **kwargs)`` takes and why.

    With ``walk=True``, also every rung of the ladder tried, in order: taken,
    or why not (nested for FP4 weights converted to FP8).
    """
    p = plan(x, w, **kwargs)
    if not walk:
        return str(p)
    return f"{p}\nladder:\n{p.describe_walk()}"


def qmatmul(
    x,
    w: QuantizedTensor,
    *,
    out_dtype=jnp.bfloat16,
    act_format: QuantFormat | str | None = None,
    act_granularity: str | None = None,
    bias: jax.Array | None = None,
    activation: str | None = None,
    residual: jax.Array | None = None,
    out_format: QuantFormat | str | None = None,
    out_scale=None,
    return_amax: bool = False,
):
    r"""Matrix product with quantized weights: ``x[..., K] @ w[N, K]^T -> [..., N]``.

    The math, whatever path runs (leading dims of ``x`` fold into M)::

        y[m, n] = sum_k  dq(x)[m, k] * dq(w)[n, k]                   # float32 sum
        y = act(y + bias) + residual                                 # optional epilogue
        out = round(y, out_dtype)  or  RNE(clip(y / s, +-MAX)) as FP8 codes

    i.e. ``out = einsum("mk,nk->mn", dq(x), dq(w))`` in float32, then the
    epilogue and one rounding, where ``dq(w)[n, k] = decode(w_codes[n, k]) *
    s_w(n, k)`` (the weight's block scale, times the NVFP4 tensor scale) and
    ``dq(x)`` is, by path: the codes of ``x`` times its scales when ``x`` is
    a QuantizedTensor; the codes of ``quantize(x, act_format,
    act_granularity)`` times their scales when the activations are quantized
    dynamically (bit-identical codes on every platform); or ``x`` itself in
    16 bits for weight-only. GPU kernels sum in float32 in their own order, so
    results agree with the reference to float32 rounding, not bitwise; the
    fallback rounds ``dq`` of both operands to bf16 (f16 for f16 output)
    before a float32-accumulated dot.

    Args:
        x: float32/bf16/f16 array ``[..., K]``, or an FP8 :class:`QuantizedTensor`
            scaled per tensor, per token (``per_channel`` on the last axis) or
            per 1x128 block.
        w: :class:`QuantizedTensor` ``[N, K]`` blocked along K (``axis=-1``).
        out_dtype: float32, bfloat16 (default) or float16 (with ``out_format``:
            the dtype the codes dequantize to).
        act_format: for a plain ``x``: ``None`` (automatic: FP8 E4M3 for the
            GEMM, or 16-bit weight-only at small M), ``"fp8_e4m3"``,
            ``"fp8_e5m2"``, or ``"bf16"``/``"fp16"`` to force weight-only.
        act_granularity: ``"per_tensor"``, ``"per_token"`` or
            ``"block_1x128"``; defaults to match the weights (per-tensor,
            per-channel -> per-token, blocks -> 1x128).
        bias: ``[N]`` float array added to the product.
        activation: ``None``, ``"gelu"`` (exact, erf: BERT's) or
            ``"gelu_tanh"`` (the tanh approximation cuBLASLt fuses).
        residual: ``[..., N]`` array of ``out_dtype`` added last (not together
            with ``activation``, nor with an FP8 output).
        out_format: ``"fp8_e4m3"``/``"fp8_e5m2"``: return FP8 codes with the
            static per-tensor scale ``out_scale`` (rounded up to a power of
            two, as :func:`jax_bq.quantize_static` does) as a
            :class:`QuantizedTensor`, ready to be the next ``qmatmul``'s ``x``.
        out_scale: scalar scale of the FP8 output (a float or a float32 array).
        return_amax: also return ``max |y|`` (float32 scalar, before the FP8
            rounding): the statistic for the next scale.

    Returns:
        ``[..., N]`` array of ``out_dtype`` (a :class:`QuantizedTensor` with
        ``out_format``); with ``return_amax``, the pair ``(out, amax)``.

    Raises:
        ValueError: K mismatch, weights not a ``[N, K]`` QuantizedTensor
            blocked along K, unsupported dtypes or options, epilogue operands
            of the wrong shape or dtype.
    """
    fmt_out = QuantFormat.parse(out_format) if out_format is not None else None
    epi = ep.Epilogue(bias is not None, activation, residual is not None, fmt_out, return_amax)
    kw = {"act_format": act_format, "act_granularity": act_granularity, "epilogue": epi}
    p = plan(x, w, out_dtype=out_dtype, **kw)
    ep.check_operands(epi, x.shape, p.config.n, out_dtype, bias, residual, out_scale)
    logger.debug("%s", p)
    y, rest_amax, amax = _run(p, x, w, epi, bias, residual, out_scale)
    if not return_amax:
        return y
    return y, rest_amax if rest_amax is not None else jnp.reshape(amax, ())


def _run(p: MatmulPlan, x, w: QuantizedTensor, epi: ep.Epilogue, bias, residual, out_scale):
    """Binds ``qmatmul_p`` for plan ``p``: ``(y, amax of the XLA epilogue or None, amax out)``."""
    c = p.config
    if p.convert_fp4:
        w = fp4_to_fp8(w)
    lead = tuple(x.shape[:-1])
    x2, xs = _gemm_activations(x, c)
    ts = w.tensor_scale if w.tensor_scale is not None else jnp.ones((), jnp.float32)
    empty = jnp.zeros((0,), jnp.float32)
    b = bias.astype(c.epilogue_dtype) if bias is not None else None
    r = jnp.reshape(residual, (c.m, c.n)) if residual is not None else None
    fmt_out = epi.out_format
    s_out, inv = ep.fp8_out_scales(out_scale) if fmt_out is not None else (None, None)
    out, _, amax = qp.qmatmul_p.bind(
        x2,
        xs,
        w.data,
        w.scales,
        jnp.reshape(ts, (1,)).astype(jnp.float32),
        b if c.epilogue & qp.EPI_BIAS else empty.astype(c.epilogue_dtype),
        r if c.epilogue & qp.EPI_RESIDUAL else empty.astype(c.epilogue_dtype),
        jnp.reshape(inv, (1,)) if c.out_format is not None else empty,
        cfg=c,
    )
    y, rest_amax = ep.finish(out, epi, c.epilogue, c.out_format is not None, b, r, inv)
    y = y.reshape((*lead, c.n))
    if fmt_out is not None:
        y = ep.as_quantized(y, s_out, fmt_out, c.out_dtype)
    return y, rest_amax, amax


def _gemm_activations(x, c: qp.QmmConfig):
    """(``x`` as the ``[M, K]`` operand of the primitive, its scales operand)."""
    if isinstance(x, QuantizedTensor):
        return jnp.reshape(x.data, (c.m, c.k)), _scales_2d(x, c)  # the FFI reads the same bytes
    x2 = jnp.reshape(x, (c.m, c.k))
    if c.path == qp.WEIGHT_ONLY and np.dtype(x.dtype) == np.float32:
        x2 = x2.astype(c.compute_dtype)  # W8A16 takes 16-bit activations
    if c.path == qp.W4A16 and np.dtype(x.dtype) != np.dtype(jnp.bfloat16):
        x2 = x2.astype(jnp.bfloat16)  # W4A16 takes bf16 activations
    return x2, jnp.zeros((0,), jnp.float32)


def _scales_2d(x: QuantizedTensor, c: qp.QmmConfig):
    """The scales of a pre-quantized x as those of a rank-2 ``[M, K]`` tensor."""
    if x.granularity is Granularity.PER_TENSOR:
        return jnp.reshape(x.scales, (1, 1))
    if x.granularity is Granularity.PER_CHANNEL:
        return jnp.reshape(x.scales, (c.m, 1))
    return jnp.reshape(x.scales, (c.m, x.scales.shape[-1]))
