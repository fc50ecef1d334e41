"""Quantization-aware training: :func:`qat_matmul` (float master weights, quantized on the fly).

Forward, ``qat_matmul(x, w)`` is exactly ``qmatmul(x, quantize(w))``: the
master weight ``w`` (bf16/f32, ``[N, K]``) is quantized in the call and the
product takes qmatmul's fast path (FP8 tensor cores where the device has
them). Backward (:mod:`jax_bq.primitives.autodiff`)::

    dx = ct . dq(w_q)                        # the weight the forward used
    dw = mask(w) * (ct^T . dq(x_q))          # straight-through estimator

``mask(w)`` is 1 inside the representable range of each weight block and 0
where quantization clipped (never, with amax-scaled FP8). ``grads="fp8"``
runs both backward products through :func:`jax_bq.qmatmul` with E5M2
gradients and per-tensor E4M3 operands (TransformerEngine's hybrid recipe:
the FP8 training step); ``grads="bf16"`` keeps them in bf16 on the
dequantized operands (QAT that only simulates quantization in the forward).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_bq.formats import FLOAT_DTYPES, Granularity, QuantFormat
from jax_bq.primitives.qat_matmul import GRAD_RECIPES, QatSpec, qat_matmul_p

__all__ = [
    "explain_jaxpr",
    "explain_step",
    "jaxpr_matmul_configs",
    "matmul_configs",
    "qat_matmul",
    "qat_spec",
    "snap_weights",
]

_FP8 = (QuantFormat.FP8_E4M3, QuantFormat.FP8_E5M2)


def qat_spec(
    w_format: QuantFormat | str = QuantFormat.FP8_E4M3,
    *,
    w_granularity: Granularity | str | None = None,
    w_block_size: int | tuple[int, int] | None = None,
    out_dtype=jnp.bfloat16,
    act_format: QuantFormat | str | None = None,
    act_granularity: str | None = None,
    grads: str = "bf16",
) -> QatSpec:
    """Validates and resolves the options of :func:`qat_matmul` into a :class:`QatSpec`."""
    fmt = QuantFormat.parse(w_format)
    if not fmt.is_quantized:
        raise ValueError(f"qat_matmul w_format must be a quantized format, got {fmt.value}")
    if w_granularity is None:
        per_channel = fmt in _FP8 and w_block_size is None
        w_granularity = Granularity.PER_CHANNEL if per_channel else Granularity.PER_BLOCK
    gran = Granularity(w_granularity)
    if grads not in GRAD_RECIPES:
        raise ValueError(f"qat_matmul grads must be one of {GRAD_RECIPES}, got {grads!r}")
    out_dtype = np.dtype(out_dtype)
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    act = QuantFormat.parse(act_format) if act_format is not None else None
    block = tuple(w_block_size) if isinstance(w_block_size, (list, tuple)) else w_block_size
    return QatSpec(fmt, gran, block, out_dtype, act, act_granularity, grads)


def qat_matmul(x: jax.Array, w: jax.Array, spec: QatSpec | None = None, **kwargs) -> jax.Array:
    """``x[..., K] @ quantize(w[N, K])^T -> [..., N]``, differentiable in ``x`` and ``w``.

    Args:
        x: float32/bf16/f16 activations ``[..., K]``.
        w: float32/bf16/f16 master weight ``[N, K]`` (a Flax kernel ``[K, N]``
            is ``kernel.T``).
        spec: a :func:`qat_spec` (or pass its keyword arguments instead).
        **kwargs: the keyword arguments of :func:`qat_spec` (``w_format``,
            ``w_granularity``, ``w_block_size``, ``out_dtype``, ``act_format``,
            ``act_granularity``, ``grads``) when ``spec`` is not given.

    Returns:
        ``[..., N]`` of ``spec.out_dtype``: the value of
        ``qmatmul(x, quantize(w, w_format, ...), ...)``.

    Raises:
        ValueError: for non-float operands, a K mismatch, or bad options.
    """
    if spec is None:
        spec = qat_spec(**kwargs)
    elif kwargs:
        raise ValueError(f"pass either spec or keyword options, not both: {sorted(kwargs)}")
    for name, a, rank in (("x", x, None), ("w", w, 2)):
        dtype = getattr(a, "dtype", None)
        if dtype is None or np.dtype(dtype) not in FLOAT_DTYPES or (rank and a.ndim != rank):
            raise ValueError(
                f"qat_matmul {name} must be a float32/bfloat16/float16 array"
                f"{' [N, K]' if rank else ' [..., K]'}; got {type(a).__name__} "
                f"{getattr(a, 'shape', '')} {dtype}"
            )
    if x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"qat_matmul K mismatch: x {tuple(x.shape)} vs w [N, K] = {w.shape}")
    lead = tuple(x.shape[:-1])
    x2 = jnp.reshape(x, (math.prod(lead), x.shape[-1]))
    y = qat_matmul_p.bind(x2, w, spec=spec)
    return jnp.reshape(y, (*lead, w.shape[0]))


def matmul_configs(fn, *args, **kwargs) -> list:
    """The ``QmmConfig`` of every qmatmul that ``fn(*args)`` runs, forward and backward.

    Traces ``fn`` (e.g. a training step that calls ``jax.grad``) to a jaxpr
    and collects the ``qmatmul_p`` equations (:func:`jaxpr_matmul_configs`).
    """
    return jaxpr_matmul_configs(jax.make_jaxpr(fn)(*args, **kwargs))


def jaxpr_matmul_configs(jaxpr) -> list:
    """The ``QmmConfig`` of every ``qmatmul_p`` equation of ``jaxpr``, in program order.

    ``jaxpr``: a ``Jaxpr`` or ``ClosedJaxpr`` (e.g. ``jax.jit(f).trace(*args).jaxpr``,
    so that a program traced once for compilation is not traced again);
    sub-jaxprs (jit, remat, scan, cond) included.
    """
    from jax_bq.primitives import qmatmul_p

    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive is qmatmul_p:
                found.append(eqn.params["cfg"])
            for p in eqn.params.values():
                for sub in p if isinstance(p, (list, tuple)) else (p,):
                    inner = getattr(sub, "jaxpr", None)
                    if inner is not None and hasattr(inner, "eqns"):
                        walk(inner)
                    elif hasattr(sub, "eqns"):
                        walk(sub)

    walk(getattr(jaxpr, "jaxpr", jaxpr))
    return found


def explain_step(fn, *args, **kwargs) -> str:
    """One line per distinct qmatmul that ``fn(*args)`` runs (forward and backward), with counts.

    Each line: how many calls, ``M x N x K``, the path (``cublaslt_fp8``,
    ``dequant_dot``, ...), the activation (or gradient) format and scaling,
    and the weight format and scaling. Backward products of the FP8 hybrid
    recipe show up with ``fp8_e5m2`` activations. :func:`explain_jaxpr` says
    the same of an already traced program.
    """
    return explain_jaxpr(jax.make_jaxpr(fn)(*args, **kwargs))


def explain_jaxpr(jaxpr) -> str:
    """:func:`explain_step` of a traced program (``Jaxpr`` or ``ClosedJaxpr``)."""
    counts: dict[str, int] = {}
    for c in jaxpr_matmul_configs(jaxpr):
        act = "16-bit" if c.act_format is None else f"{c.act_format.value} {c.act_granularity}"
        line = (
            f"{c.m}x{c.n}x{c.k} {c.path}: activations {act}, weights {c.w_format.value} "
            f"{c.w_granularity.value}"
        )
        counts[line] = counts.get(line, 0) + 1
    return "\n".join(f"{n:4d} x qmatmul {line}" for line, n in counts.items())


def snap_weights(params, spec="fp8_e4m3", *, is_kernel=None):
    r"""Float params whose kernels are replaced by their quantized values, ``dq(q(W))``.

    What a QAT run exports: the master weights projected onto the grid the
    quantized forward uses, so that the float forward of the exported
    weights differs from the quantized forward only by the activations'
    quantization. ``W[*in, *out] -> dq(quantize_model_weights(W, spec))``
    reshaped back to ``[*in, *out]`` in the kernel's dtype; other leaves are
    returned as they are.

    Args:
        params: float params (``variables["params"]``).
        spec: a format or :class:`~jax_bq.flax.WeightQuant` (the QAT weight spec).
        is_kernel: as in :func:`jax_bq.flax.quantize_model_weights`.
    """
    from jax_bq.flax.rules import quantize_model_weights
    from jax_bq.ops import dequantize
    from jax_bq.qtensor import QuantizedTensor

    quantized = quantize_model_weights(params, spec, is_kernel=is_kernel)

    def back(orig, q):
        if not isinstance(q, QuantizedTensor):
            return orig
        w_nk = dequantize(q, jnp.float32)  # [N, K] -> [K, N] -> [*in, *out]
        return jnp.reshape(w_nk.T, orig.shape).astype(orig.dtype)

    return jax.tree_util.tree_map(
        back, params, quantized, is_leaf=lambda x: isinstance(x, QuantizedTensor)
    )
