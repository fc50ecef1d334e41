"""``qmatmul_p``: ``out[M, N] = x[M, K] . w[N, K]^T`` with quantized ``w``.

Operands: ``x`` (``[M, K]`` float, or FP8 codes when pre-quantized),
``x_scales`` (the activation scales in jax_bq's layout, or an empty array when
the kernel quantizes ``x`` itself), the weight codes, the weight scales, the
NVFP4 tensor scale (``[1]``, ones otherwise), and the epilogue operands:
``bias`` (``[N]`` or empty), ``residual`` (``[M, N]`` or empty) and
``d_scale`` (``[1]``: ``1 / s`` of an FP8 output, or empty). Outputs: ``out``
(``[M, N]``, FP8 codes for an FP8 output), a uint8 workspace (cuBLASLt
scratch, quantized activations, relayouted scales; empty on the fallback
path) that the public wrapper drops, and ``amax`` (``[1]``, or empty).

Epilogue (``cfg.epilogue`` bits, the same values as ``EpilogueBits`` in
ffi/cuda/cublaslt_gemm.h), fused by cuBLASLt on the GPU and spelled out in
float32 by :func:`fallback`::

    y = x . w^T  (+ bias)  (-> gelu_tanh)  (+ residual)         # float32
    out = round(y, out_dtype)   or   RNE(sat(y * d_scale)) as FP8 codes
    amax = max |y|

The single static parameter ``cfg`` (:class:`QmmConfig`) says which path runs.
The CUDA lowering calls FFI target ``jax_bq_qmatmul`` (``BqQmatmulCuda``) for
the cuBLASLt and weight-only paths; every other case, and every other
platform, lowers :func:`fallback` (dequantize, then ``dot_general``).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from jax_bq import _native
from jax_bq.config import ENV_FORCE_FALLBACK, forced_fallback
from jax_bq.formats import Granularity, QuantFormat
from jax_bq.primitives.codec import decode, encode_rows
from jax_bq.primitives.common import def_jitted_impl
from jax_bq.primitives.qmatmul_abi import (
    ACT_BLOCK128,
    ACT_BLOCKFP,  # noqa: F401  (re-exported: jax_bq.primitives.qmatmul.ACT_BLOCKFP)
    ACT_IDS,
    ACT_TENSOR,
    ACT_TOKEN,
    CUBLAS_BLOCKFP,
    CUBLAS_FP8,
    FALLBACK,
    PATH_IDS,
    W4A16,
    W_IDS,
    WEIGHT_ONLY,
    Epi,
)
from jax_bq.qtensor import QuantizedTensor
from jax_bq.sharding import sharding_aware

logger = logging.getLogger("jax_bq")

#: Largest M the weight-only kernel takes (it keeps 8 tokens per MMA tile).
WEIGHT_ONLY_MAX_M = 64

# Epilogue bits as plain ints (configs store their sum).
EPI_BIAS, EPI_GELU_TANH, EPI_RESIDUAL = int(Epi.BIAS), int(Epi.GELU_TANH), int(Epi.RESIDUAL)
EPI_AMAX, EPI_GELU_ERF = int(Epi.AMAX), int(Epi.GELU_ERF)


@dataclass(frozen=True)
class QmmConfig:
    """Everything static about one qmatmul call (hashable: a primitive param)."""

    path: str
    m: int
    n: int
    k: int
    w_format: QuantFormat
    w_granularity: Granularity
    w_block: tuple[int, ...]
    act_dynamic: bool  # x is a float array (quantized by the kernel, or not at all)
    act_format: QuantFormat | None  # None: x stays in 16 bits (weight-only)
    act_granularity: str | None
    act_block: tuple[int, ...]  # block of a pre-quantized x (its QuantizedTensor.block)
    act_qgranularity: Granularity | None  # granularity of a pre-quantized x
    out_dtype: np.dtype
    epilogue: int = 0  # EPI_* bits fused into the GEMM
    out_format: QuantFormat | None = None  # FP8 output codes (with d_scale)

    @property
    def out_aval_dtype(self) -> np.dtype:
        """Dtype of the ``out`` operand: FP8 codes for an FP8 output, else ``out_dtype``."""
        return np.dtype(self.out_format.data_dtype) if self.out_format else np.dtype(self.out_dtype)

    @property
    def epilogue_dtype(self) -> np.dtype:
        """Dtype of ``bias`` and ``residual``.

        bf16 beside an FP8 output, else ``out_dtype`` (also with exact GELU,
        whose GEMM writes ``y + bias`` in the output's type for jax_bq's
        epilogue kernel).
        """
        bf16 = self.out_format is not None
        return np.dtype(jnp.bfloat16) if bf16 else np.dtype(self.out_dtype)

    @property
    def compute_dtype(self) -> np.dtype:
        """Dtype of the fallback's dequantized operands: f16 for f16 output, else bf16."""
        return (
            np.dtype(jnp.float16)
            if self.out_dtype == np.dtype(jnp.float16)
            else np.dtype(jnp.bfloat16)
        )

    def workspace_bytes(self) -> int:
        """Bytes of the workspace output (from the CUDA module's own formula).

        Asked at every abstract evaluation (each bind, in every transform), so
        the answer is cached per config (:func:`_workspace_bytes`).
        """
        if self.path not in (CUBLAS_FP8, CUBLAS_BLOCKFP) or not _native.CUDA.loaded:
            return 0
        return _workspace_bytes(self)

    def ffi_attrs(self) -> dict:
        """Attributes of the ``jax_bq_qmatmul`` custom call, with exact C++ types."""
        wb = self.w_block
        if self.w_granularity is Granularity.TILE_2D:
            bn, bk = wb
        elif self.w_granularity is Granularity.PER_BLOCK:
            bn, bk = 1, wb[0]
        else:
            bn, bk = 0, 0
        return {
            "path": np.int32(PATH_IDS[self.path]),
            "act_dynamic": np.int32(1 if self.act_dynamic else 0),
            "act_format": np.int32(self.act_format.ffi_id if self.act_format else 0),
            "act_gran": np.int32(ACT_IDS[self.act_granularity] if self.act_granularity else 0),
            "w_format": np.int32(self.w_format.ffi_id),
            "w_gran": np.int32(W_IDS[self.w_granularity]),
            "w_block_n": np.int64(bn),
            "w_block_k": np.int64(bk),
            "epilogue": np.int32(self.epilogue),
        }


@functools.lru_cache(maxsize=4096)
def _workspace_bytes(cfg: QmmConfig) -> int:
    """The CUDA module's workspace size of ``cfg`` (a cuBLASLt path), once per config."""
    return int(
        _native.CUDA.module.qmatmul_workspace_bytes(
            int(PATH_IDS[cfg.path]),
            cfg.act_dynamic,
            cfg.act_format.ffi_id if cfg.act_format else 0,
            int(ACT_IDS[cfg.act_granularity]) if cfg.act_granularity else 0,
            int(W_IDS[cfg.w_granularity]),
            cfg.m,
            cfg.n,
            cfg.k,
            cfg.epilogue,
        )
    )


qmatmul_p = Primitive("jax_bq_qmatmul")
qmatmul_p.multiple_results = True
def_jitted_impl(qmatmul_p)


def _abstract_eval(x, x_scales, w_data, w_scales, w_ts, bias, residual, d_scale, *, cfg):
    if x.shape[0] != cfg.m or w_data.shape[0] != cfg.n:
        raise ValueError(
            f"qmatmul_p operands disagree with its config: x {x.shape}, w {w_data.shape}, "
            f"config M={cfg.m} N={cfg.n} K={cfg.k}"
        )
    expect = {
        "bias": (bias, (cfg.n,) if cfg.epilogue & EPI_BIAS else (0,)),
        "residual": (residual, (cfg.m, cfg.n) if cfg.epilogue & EPI_RESIDUAL else (0,)),
        "d_scale": (d_scale, (1,) if cfg.out_format else (0,)),
    }
    for name, (a, shape) in expect.items():
        if tuple(a.shape) != shape:
            raise ValueError(f"qmatmul_p {name} has shape {a.shape}, the config needs {shape}")
    return (
        ShapedArray((cfg.m, cfg.n), cfg.out_aval_dtype),
        ShapedArray((cfg.workspace_bytes(),), np.uint8),
        ShapedArray((1,) if cfg.epilogue & EPI_AMAX else (0,), np.float32),
    )


qmatmul_p.def_abstract_eval(_abstract_eval)


def _act_quant_kwargs(granularity: str) -> dict:
    if granularity == ACT_TENSOR:
        return {"granularity": Granularity.PER_TENSOR}
    if granularity == ACT_TOKEN:
        return {"granularity": Granularity.PER_CHANNEL, "axis": -1}
    if granularity == ACT_BLOCK128:
        return {"granularity": Granularity.PER_BLOCK, "block_size": 128, "axis": -1}
    return {}  # MXFP8 / NVFP4: the format's fixed block along the last axis


def quantize_activations(x, fmt: QuantFormat, granularity: str):
    """``x[M, K]`` quantized as the GPU path quantizes it (:func:`_act_quant_kwargs`)."""
    if granularity == ACT_TENSOR:
        return encode_rows(x, fmt, Granularity.PER_TENSOR)
    if granularity == ACT_TOKEN:
        return encode_rows(x, fmt, Granularity.PER_CHANNEL)
    if granularity == ACT_BLOCK128:
        return encode_rows(x, fmt, Granularity.PER_BLOCK, 128)
    return encode_rows(x, fmt, Granularity.PER_BLOCK)  # MXFP8 / NVFP4: the format's block


def apply_epilogue(y, bias, residual, d_scale, cfg: QmmConfig):
    """The epilogue of ``cfg`` on a float32 product ``y``: ``(out, amax)``, rounded once."""
    y = y.astype(jnp.float32)
    if cfg.epilogue & EPI_BIAS:
        y = y + bias.astype(jnp.float32)
    if cfg.epilogue & EPI_GELU_TANH:
        y = jax.nn.gelu(y, approximate=True)
    if cfg.epilogue & EPI_GELU_ERF:
        y = jax.nn.gelu(y, approximate=False)
    if cfg.epilogue & EPI_RESIDUAL:
        y = y + residual.astype(jnp.float32)
    amax = jnp.max(jnp.abs(y), initial=0.0).reshape((1,)) if cfg.epilogue & EPI_AMAX else None
    if cfg.out_format is not None:
        from jax_bq.static import encode_scaled

        out = encode_scaled(y, d_scale.reshape(()), cfg.out_format)
    else:
        out = y.astype(cfg.out_dtype)
    return out, (amax if amax is not None else jnp.zeros((0,), jnp.float32))


def fallback(x, x_scales, w_data, w_scales, w_ts, bias, residual, d_scale, *, cfg: QmmConfig):
    """The reference path: dequantize both operands to bf16 (f16), then ``dot_general``.

    ``out = (dq(x) @ dq(w).T)`` accumulated in float32, then the epilogue
    (:func:`apply_epilogue`) and one rounding to ``out_dtype`` (or FP8 codes);
    a plain ``x`` is first quantized exactly as the GPU path quantizes it (same
    primitive, same bits), unless the config is weight-only.
    """
    cd = cfg.compute_dtype

    def operand(data, scales, tensor_scale, fmt, granularity, block):
        t = QuantizedTensor(data, scales, tensor_scale, fmt, granularity, block, -1, cfg.k, 2, cd)
        return decode(t, cd)

    wf = cfg.w_format
    ts = w_ts.reshape(()) if wf.has_tensor_scale else None
    wdq = operand(w_data, w_scales, ts, wf, cfg.w_granularity, cfg.w_block)
    if not cfg.act_dynamic:
        xdq = operand(x, x_scales, None, cfg.act_format, cfg.act_qgranularity, cfg.act_block)
    elif cfg.act_format is None:
        xdq = x.astype(cd)
    else:
        xdq = decode(quantize_activations(x, cfg.act_format, cfg.act_granularity), cd)
    y = jax.lax.dot_general(xdq, wdq, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    out, amax = apply_epilogue(y, bias, residual, d_scale, cfg)
    return out, jnp.zeros((cfg.workspace_bytes(),), jnp.uint8), amax


_fallback_rule = mlir.lower_fun(fallback, multiple_results=True)
mlir.register_lowering(qmatmul_p, sharding_aware(qmatmul_p, _fallback_rule))

if _native.CUDA.loaded:
    _ffi_rule = jax.ffi.ffi_lowering("jax_bq_qmatmul")

    def _cuda_rule(ctx, *args, cfg: QmmConfig):
        if cfg.path == FALLBACK or forced_fallback("qmatmul"):
            why = f"forced by {ENV_FORCE_FALLBACK}" if cfg.path != FALLBACK else "planned"
            logger.debug("jax_bq.qmatmul on cuda: dequantize + dot_general (%s)", why)
            return _fallback_rule(ctx, *args, cfg=cfg)
        logger.debug("jax_bq.qmatmul on cuda: %s (M=%d N=%d K=%d)", cfg.path, cfg.m, cfg.n, cfg.k)
        return _ffi_rule(ctx, *args, **cfg.ffi_attrs())

    mlir.register_lowering(qmatmul_p, sharding_aware(qmatmul_p, _cuda_rule), platform="cuda")


def _row_local(cfg: QmmConfig) -> bool:
    """Whether the activation scaling is per row, so batch dims can fold into M."""
    if cfg.act_dynamic:
        return cfg.act_format is None or cfg.act_granularity != ACT_TENSOR
    return cfg.act_qgranularity is not Granularity.PER_TENSOR


def _batch(args, dims, *, cfg: QmmConfig):
    x, xs, wd, wsc, wts, bias, res, dsc = args
    xd, xsd, wdd, wscd, wtsd, bd, rd, dd = dims
    size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
    w_batched = any(d is not None for d in (wdd, wscd, wtsd, bd, dd))
    new_m = cfg.m * size
    fold = (
        not w_batched
        and _row_local(cfg)
        and not cfg.epilogue & EPI_AMAX  # amax spans the call
        and not (cfg.path in (WEIGHT_ONLY, W4A16) and new_m > WEIGHT_ONLY_MAX_M)
    )
    if fold:
        xb = jnp.moveaxis(x, xd, 0) if xd is not None else jnp.broadcast_to(x, (size, *x.shape))
        xs_b = xs
        if not cfg.act_dynamic:
            xs_b = (
                jnp.moveaxis(xs, xsd, 0)
                if xsd is not None
                else jnp.broadcast_to(xs, (size, *xs.shape))
            )
            xs_b = xs_b.reshape((new_m, *xs_b.shape[2:]))
        res_b = res
        if cfg.epilogue & EPI_RESIDUAL:
            res_b = (
                jnp.moveaxis(res, rd, 0)
                if rd is not None
                else jnp.broadcast_to(res, (size, *res.shape))
            ).reshape((new_m, cfg.n))
        out, ws, amax = qmatmul_p.bind(
            xb.reshape((new_m, x.shape[-1])),
            xs_b,
            wd,
            wsc,
            wts,
            bias,
            res_b,
            dsc,
            cfg=replace(cfg, m=new_m),
        )
        return (
            out.reshape((size, cfg.m, cfg.n)),
            jnp.zeros((size, *ws.shape), ws.dtype),
            jnp.broadcast_to(amax, (size, *amax.shape)),
        ), (0, 0, 0)

    # Per-member semantics (stacked weights, per-tensor activation amax): map.
    def one(a):
        return tuple(qmatmul_p.bind(*a, cfg=cfg))

    moved = [
        jnp.moveaxis(a, d, 0) if d is not None else jnp.broadcast_to(a, (size, *a.shape))
        for a, d in zip(args, dims, strict=True)
    ]
    return jax.lax.map(one, tuple(moved)), (0, 0, 0)


batching.primitive_batchers[qmatmul_p] = _batch
