"""``qmatmul``: quantized-weight matmul with a visible fallback ladder.

The ladder (DESIGN §5), decided per call at trace time by :func:`plan`:

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

Which path runs and why: :func:`plan` / :func:`explain`, and a DEBUG log line
on the ``jax_bq`` logger at trace and lowering time.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jax_bq import _native
from jax_bq import epilogue as ep
from jax_bq.capabilities import compute_capability, native_matmul
from jax_bq.config import ENV_FORCE_FALLBACK, forced_fallback
from jax_bq.convert import FP4_FORMATS, fp4_to_fp8
from jax_bq.formats import FLOAT_DTYPES, Granularity, QuantFormat
from jax_bq.primitives import qmatmul as qp
from jax_bq.qtensor import QuantizedTensor

logger = logging.getLogger("jax_bq")

FP4_VIA_FP8 = "fp4_via_fp8"

#: Up to this M (per weight granularity) a plain-activation call with FP8
#: weights takes the weight-only kernel rather than quantizing activations for
#: the FP8 GEMM: the crossovers measured on the H200 at 8192 x 8192
#: (benchmarks/results/qmatmul_crossover.md). Below these M the two paths are
#: within run-to-run noise of each other for per-tensor and tiled weights, and
#: the weight-only path keeps the activations unrounded, so it is preferred.
WEIGHT_ONLY_CROSSOVER_M = {
    Granularity.PER_TENSOR: 8,
    Granularity.PER_CHANNEL: 16,
    Granularity.PER_BLOCK: 8,
    Granularity.TILE_2D: 8,
}

#: From this M, FP4 weights with plain activations (``act_format=None``) on a
#: device with FP8 tensor cores but none for FP4 are converted to FP8 in the
#: call (one fp4_to_fp8 launch) for the FP8 GEMM, with activations quantized
#: per 1x128 block: on the H200 that beats dequantize + bf16 dot from M = 256
#: (0.41x -> 0.42x bf16 at 256 x 8192², 0.64x -> 0.77x at 1024, 0.80x -> 1.08x
#: at 4096; equal at 128; benchmarks/NOTES.md, the fp4 run before this rule).
#: Below it, W4A16 (M <= 64) or the fallback. Pass ``act_format="bf16"`` to
#: keep weight-only numerics.
FP4_CONVERT_MIN_M = 256

_FP8 = (QuantFormat.FP8_E4M3, QuantFormat.FP8_E5M2)
_BLOCKFP = (QuantFormat.MXFP8, QuantFormat.NVFP4)
# cudaDataType_t values and cuBLASLt scale modes (see ffi/cuda/qmatmul.h).
_CUDA_TYPE = {
    QuantFormat.FP8_E4M3: 28,
    QuantFormat.FP8_E5M2: 29,
    QuantFormat.MXFP8: 28,
    QuantFormat.NVFP4: 33,
}
_CUDA_OUT = {np.dtype(np.float32): 0, np.dtype(jnp.bfloat16): 14, np.dtype(np.float16): 2}
_SCALAR, _VEC16, _VEC32, _OUTER, _VEC128, _BLK128 = 0, 1, 2, 3, 4, 5
_MODE_NAMES = {
    _SCALAR: "SCALAR_32F",
    _VEC16: "VEC16_UE4M3",
    _VEC32: "VEC32_UE8M0",
    _OUTER: "OUTER_VEC_32F",
    _VEC128: "VEC128_32F",
    _BLK128: "BLK128x128_32F",
}
_ACT_GRANULARITIES = (qp.ACT_TENSOR, qp.ACT_TOKEN, qp.ACT_BLOCK128)


@dataclass(frozen=True)
class MatmulPlan:
    """The path one ``qmatmul`` call takes and why.

    Attributes:
        path: ``"cublaslt_fp8"``, ``"w8a16"``, ``"w4a16"``,
            ``"fp4_via_fp8"`` (FP4 weights converted to FP8 in the call, then
            cuBLASLt), ``"cublaslt_blockfp"`` or ``"dequant_dot"`` (the
            fallback).
        reason: why this path (and why not the faster ones).
        config: the static configuration bound into the primitive.
        scale_modes: cuBLASLt ``(weight, activation)`` scale modes, if any.
        convert_fp4: the FP4 weights are converted with
            :func:`jax_bq.convert.fp4_to_fp8` first; ``config`` describes the
            converted weights.
    """

    path: str
    reason: str
    config: qp.QmmConfig
    scale_modes: tuple[str, str] | None = None
    convert_fp4: bool = False
    epilogue: ep.Epilogue | None = None
    epilogue_reason: str = ""

    def __str__(self) -> str:
        c = self.config
        act = "bf16/f16 (weight-only)" if c.act_format is None else c.act_format.value
        if c.act_format is not None:
            act += f" {c.act_granularity}" + (" (quantized in-kernel)" if c.act_dynamic else "")
        modes = f", cuBLASLt scale modes {self.scale_modes}" if self.scale_modes else ""
        conv = " (converted from FP4 in the call)" if self.convert_fp4 else ""
        epi = ""
        if self.epilogue is not None and not self.epilogue.empty:
            fused = ep.bits_description(c.epilogue, c.out_format)
            epi = (
                f" Epilogue {self.epilogue.describe()}: in the GEMM call: {fused}; "
                f"{self.epilogue_reason}"
            )
        return (
            f"qmatmul M={c.m} N={c.n} K={c.k}: {self.path}{modes}; weights{conv} "
            f"{c.w_format.value} {c.w_granularity.value} {c.w_block}, activations {act}, "
            f"out {np.dtype(c.out_dtype).name}. Why: {self.reason}.{epi}"
        )


def _check_weights(w) -> None:
    if not isinstance(w, QuantizedTensor):
        raise ValueError(
            f"qmatmul expects w as a QuantizedTensor stored [N, K] (quantize it with "
            f"jax_bq.quantize(w, fmt, axis=-1)); got {type(w).__name__} "
            f"{getattr(w, 'shape', '')} {getattr(w, 'dtype', '')}"
        )
    w.validate()
    if w.ndim != 2 or w.rank != 2:
        raise ValueError(
            f"qmatmul weights must be one [N, K] matrix, got shape {w.shape} (member rank {w.rank})"
        )
    if w.axis != -1:
        raise ValueError(
            f"qmatmul weights must be blocked/packed along K (axis=-1, the [N, K] layout); "
            f"got axis {w.axis} for shape {w.shape}"
        )


def _check_activations(x, k: int) -> None:
    if isinstance(x, QuantizedTensor):
        x.validate()
        if x.stack_shape:
            raise ValueError(f"qmatmul activations cannot have stack dims, got {x.shape}")
        if x.format not in _FP8:
            raise ValueError(
                f"pre-quantized activations must be FP8 (E4M3/E5M2), got {x.format.value}"
            )
        if x.axis != -1 or x.granularity is Granularity.TILE_2D:
            raise ValueError(
                f"pre-quantized activations must be scaled per tensor, per token "
                f"(per_channel, axis=-1) or per 1x128 block; got {x.granularity.value} "
                f"axis {x.axis}"
            )
        if x.granularity is Granularity.PER_BLOCK and x.block != (128,):
            raise ValueError(f"activation blocks must be 1x128, got {x.block}")
    else:
        dtype = getattr(x, "dtype", None)
        if dtype is None or np.dtype(dtype) not in FLOAT_DTYPES or len(x.shape) < 1:
            raise ValueError(
                f"qmatmul activations must be a float32/bfloat16/float16 array [..., K] "
                f"or a QuantizedTensor; got {type(x).__name__} {getattr(x, 'shape', '')} "
                f"{dtype}"
            )
    if x.shape[-1] != k:
        raise ValueError(f"qmatmul K mismatch: x {tuple(x.shape)} vs w [N, K] with K={k}")


@functools.lru_cache(maxsize=1024)
def _probe(
    device_id: int, m, n, k, a_type, b_type, a_mode, b_mode, d_type, epilogue=0, c_type=None
) -> str:
    """CuBLASLt's answer for one GEMM spec ("" = it has an algorithm, now cached)."""
    c_type = d_type if c_type is None else c_type
    return _native.CUDA.module.cublaslt_probe(
        device_id, m, n, k, a_type, b_type, a_mode, b_mode, d_type, epilogue, c_type, c_type
    )


def _default_device(x) -> jax.Device:
    """The device ``x`` lives on if it is a concrete array, else JAX's default device."""
    try:
        devs = x.devices()
        if len(devs) == 1:
            return next(iter(devs))
    except Exception:  # tracers and QuantizedTensors have no single device
        pass
    d = jax.config.jax_default_device
    if d is None:
        return jax.devices()[0]
    return jax.devices(d)[0] if isinstance(d, str) else d


def _gpu_index(device) -> int:
    return int(getattr(device, "local_hardware_id", None) or device.id)


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

    ``epilogue`` (:class:`jax_bq.epilogue.Epilogue`) says what follows the
    product; the plan then also says which part of it the GEMM call fuses and
    why (cuBLASLt is asked for the exact combination).

    Raises:
        ValueError: for invalid operands or options (same checks as qmatmul).
    """
    p = _plan_path(
        x,
        w,
        out_dtype=out_dtype,
        act_format=act_format,
        act_granularity=act_granularity,
        device=device,
    )
    if epilogue is None or epilogue.empty:
        return p
    return _plan_epilogue(p, epilogue, device or _default_device(x))


_MODE_IDS = {name: mode for mode, name in _MODE_NAMES.items()}
_CUBLAS_PATHS = (qp.CUBLAS_FP8, FP4_VIA_FP8, qp.CUBLAS_BLOCKFP)


def _plan_epilogue(p: MatmulPlan, epi: ep.Epilogue, device) -> MatmulPlan:
    """``p`` with the part of ``epi`` its GEMM call fuses, and why."""
    c = p.config
    if p.path == qp.FALLBACK:
        cfg = ep.replace_bits(c, epi.bits, epi.out_format)
        why = "computed with the reference product in float32, rounded once"
        return dataclasses.replace(p, config=cfg, epilogue=epi, epilogue_reason=why)
    cublas = p.path in _CUBLAS_PATHS
    bits, fp8 = ep.split_for_gemm(epi, cublas)
    if not cublas:
        why = f"the {p.path} kernel takes no epilogue: XLA applies it after the GEMM"
    else:
        out = epi.out_format if fp8 else None
        d_type = _CUDA_TYPE[out] if out else _CUDA_OUT[np.dtype(c.out_dtype)]
        c_type = _CUDA_OUT[np.dtype(jnp.bfloat16)] if out else d_type
        gemm_bits = bits
        if bits & ep.EPI_GELU_ERF:  # the GEMM itself: bf16 with the bias, into the workspace
            gemm_bits = bits & qp.EPI_BIAS
            d_type = c_type = _CUDA_OUT[np.dtype(jnp.bfloat16)]
        a_mode, b_mode = (_MODE_IDS[m] for m in p.scale_modes)
        refusal = _probe(
            _gpu_index(device),
            c.m,
            c.n,
            c.k,
            _CUDA_TYPE[c.w_format] if c.w_format in _CUDA_TYPE else 28,
            _CUDA_TYPE[c.act_format],
            a_mode,
            b_mode,
            d_type,
            gemm_bits,
            c_type,
        )
        if refusal:
            bits, fp8 = 0, False
            why = (
                f"cuBLASLt refuses the epilogue with {p.scale_modes[0]} x {p.scale_modes[1]} "
                f"({refusal}): XLA applies it after the GEMM"
            )
        else:
            why = f"fused into the cuBLASLt GEMM ({p.scale_modes[0]} x {p.scale_modes[1]})"
        if epi.activation == "gelu" and not refusal:
            why += (
                "; exact (erf) GELU by jax_bq's epilogue kernel in the same call (cuBLASLt's "
                "GELU is the tanh form: activation='gelu_tanh' fuses it into the GEMM)"
            )
    cfg = ep.replace_bits(c, bits, epi.out_format if fp8 else None)
    return dataclasses.replace(p, config=cfg, epilogue=epi, epilogue_reason=why)


def _plan_path(
    x,
    w: QuantizedTensor,
    *,
    out_dtype=jnp.bfloat16,
    act_format: QuantFormat | str | None = None,
    act_granularity: str | None = None,
    device: jax.Device | None = None,
) -> MatmulPlan:
    """The GEMM path of :func:`plan` (the ladder), before any epilogue."""
    _check_weights(w)
    n, k = w.shape
    _check_activations(x, k)
    out_dtype = np.dtype(out_dtype)
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    m = math.prod(x.shape[:-1])
    pre = isinstance(x, QuantizedTensor)
    weight_only_requested = False
    if act_format is not None:
        fmt = QuantFormat.parse(act_format)
        if fmt in (QuantFormat.BF16, QuantFormat.FP16):
            weight_only_requested = True
            act_format = None
        else:
            act_format = fmt
    if pre:
        if act_format is not None and act_format is not x.format:
            raise ValueError(
                f"act_format={act_format.value} disagrees with the quantized x ({x.format.value})"
            )
        if weight_only_requested:
            raise ValueError("weight-only (16-bit activations) needs a plain array x")
        act_format = x.format
        act_granularity = {
            Granularity.PER_TENSOR: qp.ACT_TENSOR,
            Granularity.PER_CHANNEL: qp.ACT_TOKEN,
            Granularity.PER_BLOCK: qp.ACT_BLOCK128,
        }[x.granularity]
    elif act_granularity is not None and act_granularity not in _ACT_GRANULARITIES:
        raise ValueError(
            f"act_granularity must be one of {_ACT_GRANULARITIES}, got {act_granularity!r}"
        )
    if act_format is not None and act_format not in _FP8 + _BLOCKFP:
        raise ValueError(
            f"act_format must be fp8_e4m3, fp8_e5m2, mxfp8, nvfp4 or bf16/fp16 (weight-only), "
            f"got {act_format.value}"
        )

    wf, wg = w.format, w.granularity
    if (
        wf in FP4_FORMATS
        and act_format is None
        and not weight_only_requested
        and not pre
        and m >= FP4_CONVERT_MIN_M
    ):
        dev = device or _default_device(x)
        if native_matmul(QuantFormat.FP8_E4M3, dev) and not native_matmul(wf, dev):
            auto = _plan_path(
                x,
                w,
                out_dtype=out_dtype,
                act_format=QuantFormat.FP8_E4M3,
                act_granularity=act_granularity,
                device=dev,
            )
            if auto.path == FP4_VIA_FP8:
                why = (
                    f"M={m} >= {FP4_CONVERT_MIN_M} (measured crossover, FP4_CONVERT_MIN_M): "
                    f"{auto.reason}; act_format='bf16' keeps weight-only numerics"
                )
                return dataclasses.replace(auto, reason=why)
    if wf in FP4_FORMATS and act_format in _FP8:
        # FP8 activations with FP4 weights: always the converted FP8 weights, so
        # the numerics are the same on every platform and path. On request, or
        # from FP4_CONVERT_MIN_M with plain activations (above).
        inner = _plan_path(
            x,
            _converted_shape(w),
            out_dtype=out_dtype,
            act_format=act_format,
            act_granularity=act_granularity or qp.ACT_BLOCK128,
            device=device,
        )
        path = FP4_VIA_FP8 if inner.path == qp.CUBLAS_FP8 else inner.path
        why = f"{wf.value} weights with {act_format.value} activations: weights converted to "
        return MatmulPlan(
            path, why + f"FP8 E4M3 1x128 ({inner.reason})", inner.config, inner.scale_modes, True
        )
    default_gran = {
        Granularity.PER_TENSOR: qp.ACT_TENSOR,
        Granularity.PER_CHANNEL: qp.ACT_TOKEN,
        Granularity.PER_BLOCK: qp.ACT_BLOCK128,
        Granularity.TILE_2D: qp.ACT_BLOCK128,
    }[wg]

    def config(path, afmt, agran):
        return qp.QmmConfig(
            path=path,
            m=m,
            n=n,
            k=k,
            w_format=wf,
            w_granularity=wg,
            w_block=w.block,
            act_dynamic=not pre,
            act_format=afmt,
            act_granularity=agran,
            act_block=x.block if pre else (),
            act_qgranularity=x.granularity if pre else None,
            out_dtype=out_dtype,
        )

    device = device or _default_device(x)
    # The numerics the fallback reproduces: the requested (or default) activation
    # format. MXFP8/NVFP4 weights pair with their own activation format only
    # where that GEMM is native; elsewhere the default is weight-only.
    if weight_only_requested:
        fb_fmt, fb_gran = None, None
    elif wf in _BLOCKFP and act_format is None:
        native = bool(native_matmul(wf, device)) and not pre
        fb_fmt, fb_gran = (wf, qp.ACT_BLOCKFP) if native else (None, None)
    elif wf in _FP8 + _BLOCKFP or act_format is not None:
        fb_fmt = act_format or QuantFormat.FP8_E4M3
        fb_gran = act_granularity or (qp.ACT_BLOCKFP if fb_fmt in _BLOCKFP else default_gran)
    else:  # FP4 / MXFP4 weights: weight-only numerics (no FP4 activations asked for)
        fb_fmt, fb_gran = None, None

    def fallback(reason: str) -> MatmulPlan:
        return MatmulPlan(qp.FALLBACK, reason, config(qp.FALLBACK, fb_fmt, fb_gran))

    if forced_fallback("qmatmul"):
        return fallback(f"forced by {ENV_FORCE_FALLBACK}")
    if device.platform != "gpu":
        return fallback(f"{device.platform} has no jax_bq matmul kernels")
    if not _native.CUDA.loaded:
        return fallback(f"CUDA module not loaded ({_native.CUDA.reason})")
    if m == 0 or n == 0 or k == 0:
        return fallback("empty operand")
    cc = compute_capability(device)
    if k % 16 or n % 16:
        return fallback(f"K={k} and N={n} must be multiples of 16 (16-byte rows for the kernels)")

    # --- FP8 weights: cuBLASLt W8A8 or the weight-only kernel -----------------------
    if wf in _FP8:
        block_k = {
            Granularity.PER_BLOCK: w.block[0] if w.block else 0,
            Granularity.TILE_2D: w.block[1] if len(w.block) == 2 else 0,
        }.get(wg, k)
        wo_ok, wo_why = True, ""
        if pre:
            wo_ok, wo_why = False, "x is already quantized"
        elif m > qp.WEIGHT_ONLY_MAX_M:
            wo_ok, wo_why = False, f"M={m} > {qp.WEIGHT_ONLY_MAX_M}"
        elif wg in (Granularity.PER_BLOCK, Granularity.TILE_2D) and block_k % 128:
            wo_ok, wo_why = False, f"weight block of {block_k} along K (needs a multiple of 128)"
        wo_plan = MatmulPlan(
            qp.WEIGHT_ONLY,
            "",
            config(qp.WEIGHT_ONLY, None, None),
        )
        if weight_only_requested:
            if wo_ok:
                return _with_reason(wo_plan, "weight-only requested (act_format bf16/fp16)")
            return fallback(f"weight-only requested but the W8A16 kernel cannot run: {wo_why}")

        a_fmt = act_format or QuantFormat.FP8_E4M3
        a_gran = act_granularity or default_gran
        w8a8_why = ""
        modes = None
        if not native_matmul(QuantFormat.FP8_E4M3, device):
            w8a8_why = native_matmul(QuantFormat.FP8_E4M3, device).reason
        elif a_fmt not in _FP8:
            w8a8_why = f"{a_fmt.value} activations with FP8 weights"
        else:
            modes, w8a8_why = _fp8_scale_modes(wg, w.block, a_gran)
        if modes is not None:
            why = _probe(
                _gpu_index(device),
                m,
                n,
                k,
                _CUDA_TYPE[wf],
                _CUDA_TYPE[a_fmt],
                modes[0],
                modes[1],
                _CUDA_OUT[out_dtype],
            )
            if why:
                pair = f"{_MODE_NAMES[modes[0]]} x {_MODE_NAMES[modes[1]]}"
                w8a8_why = f"cuBLASLt refuses {pair} {wf.value} x {a_fmt.value} at M={m}: {why}"
                modes = None
        w8a8 = None
        if modes is not None:
            w8a8 = MatmulPlan(
                qp.CUBLAS_FP8,
                "",
                config(qp.CUBLAS_FP8, a_fmt, a_gran),
                (_MODE_NAMES[modes[0]], _MODE_NAMES[modes[1]]),
            )
        explicit_act = act_format is not None or act_granularity is not None
        crossover = WEIGHT_ONLY_CROSSOVER_M[wg]
        no_model = ""
        if wo_ok and w8a8 is not None and not explicit_act:
            ranked, no_model = _rank_by_model(device, m, n, k, wf, wg, w8a8, wo_plan)
            if ranked is not None:
                return ranked
        if wo_ok and not explicit_act and m <= crossover:
            return _with_reason(
                wo_plan,
                f"M={m} <= {crossover} ({wg.value} weights): the weight-only kernel beats "
                f"quantizing activations for the FP8 GEMM (measured crossover{no_model})",
            )
        if no_model:
            w8a8 = _with_reason(w8a8, f"M={m} > {crossover} (measured crossover{no_model})")
        if w8a8 is not None:
            why = f"FP8 tensor cores ({cc[0]}.{cc[1]}); activations {a_fmt.value} {a_gran}"
            return _with_reason(w8a8, why + (f"; {w8a8.reason}" if w8a8.reason else ""))
        if wo_ok and not explicit_act:
            return _with_reason(wo_plan, f"W8A8 unavailable ({w8a8_why}); weights stay FP8")
        return fallback(
            f"W8A8 unavailable ({w8a8_why}); weight-only unavailable "
            f"({wo_why or 'explicit activation format requested'})"
        )

    # --- MXFP8 / NVFP4 weights: Blackwell cuBLASLt block-scaled GEMM -------------------
    native_why = ""
    if wf in _BLOCKFP:
        native_why = _blockfp_refusal(wf, wg, pre, act_format, m, n, k, out_dtype, device)
        if not native_why:
            mode = _VEC16 if wf is QuantFormat.NVFP4 else _VEC32
            return MatmulPlan(
                qp.CUBLAS_BLOCKFP,
                f"{wf.value} tensor cores (untested on hardware: no Blackwell was available)",
                config(qp.CUBLAS_BLOCKFP, wf, qp.ACT_BLOCKFP),
                (_MODE_NAMES[mode], _MODE_NAMES[mode]),
            )
    # --- FP4 weights without FP4 tensor cores: the W4A16 kernel -------------------------
    if wf in (QuantFormat.FP4, QuantFormat.NVFP4):
        why_native = native_why or native_matmul(wf, device).reason
        if pre or (act_format is not None and not weight_only_requested):
            return fallback(f"{why_native}; W4A16 takes plain activations")
        if m > qp.WEIGHT_ONLY_MAX_M:
            return fallback(f"{why_native}; M={m} > {qp.WEIGHT_ONLY_MAX_M} for the W4A16 kernel")
        if k % 32:
            return fallback(f"{why_native}; the W4A16 kernel needs K % 32 == 0 (K={k})")
        return MatmulPlan(
            qp.W4A16,
            f"{why_native}: FP4 weights widened to bf16 in registers (W4A16 kernel)",
            config(qp.W4A16, None, None),
        )
    return fallback(
        f"{native_why or 'no ' + wf.value + ' matmul kernel on this device'} "
        f"(dequantize + dot_general)"
    )


def _converted_shape(w: QuantizedTensor) -> QuantizedTensor:
    """The abstract result of ``fp4_to_fp8(w)`` (shapes only, for planning)."""
    spec = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), w)
    return jax.eval_shape(fp4_to_fp8, spec)


def _blockfp_refusal(wf, wg, pre, act_format, m, n, k, out_dtype, device) -> str:
    """Why the MXFP8/NVFP4 cuBLASLt GEMM cannot run, or "" if it can."""
    cap = native_matmul(wf, device)
    if not cap:
        return f"no {wf.value} tensor cores: {cap.reason}"
    if pre:
        return f"{wf.value} GEMM quantizes activations itself; x was pre-quantized"
    if (act_format or wf) is not wf:
        return f"{wf.value} weights need {wf.value} activations for cuBLASLt"
    if wg is not Granularity.PER_BLOCK:
        return f"{wf.value} weights must be per_block"
    mode = _VEC16 if wf is QuantFormat.NVFP4 else _VEC32
    why = _probe(
        _gpu_index(device),
        m,
        n,
        k,
        _CUDA_TYPE[wf],
        _CUDA_TYPE[wf],
        mode,
        mode,
        _CUDA_OUT[out_dtype],
    )
    if why:
        cc = compute_capability(device)
        return f"cuBLASLt refuses {_MODE_NAMES[mode]} on SM {cc[0]}.{cc[1]}: {why}"
    return ""


def _rank_by_model(device, m, n, k, wf, wg, w8a8: MatmulPlan, wo_plan: MatmulPlan):
    """The faster of W8A8 / W8A16 by the measured-profile roofline model.

    Returns ``(plan, "")``, or ``(None, why not)`` to keep the fixed crossover
    rule (no measured profile for this device: jax_bq.perf.planner).
    """
    from jax_bq.perf.planner import rank

    cands = (qp.CUBLAS_FP8, qp.WEIGHT_ONLY)
    r, why = rank(device, m, n, k, wf.value, wg.value, cands, w8a8.scale_modes)
    if r is None:
        return None, f"; no measured hardware profile, so the fixed rule: {why}"
    chosen = w8a8 if r.best == qp.CUBLAS_FP8 else wo_plan
    return _with_reason(chosen, f"fastest by the measured profile: {r.describe()}"), ""


def _with_reason(p: MatmulPlan, reason: str) -> MatmulPlan:
    return dataclasses.replace(p, reason=reason)


def _fp8_scale_modes(wg: Granularity, block: tuple[int, ...], a_gran: str):
    """The cuBLASLt (weight, activation) scale modes, or (None, why not)."""
    if wg in (Granularity.PER_TENSOR, Granularity.PER_CHANNEL):
        if a_gran == qp.ACT_BLOCK128:
            return None, "1x128 activations need 1x128 or 128x128 weight blocks"
        if wg is Granularity.PER_TENSOR and a_gran == qp.ACT_TENSOR:
            return (_SCALAR, _SCALAR), ""
        return (_OUTER, _OUTER), ""
    if a_gran != qp.ACT_BLOCK128:
        return None, f"block-scaled weights need 1x128 activation blocks, not {a_gran}"
    if wg is Granularity.PER_BLOCK:
        if block != (128,):
            return None, f"cuBLASLt weight blocks are 1x128, got 1x{block[0]}"
        return (_VEC128, _VEC128), ""
    if block != (128, 128):
        return None, f"cuBLASLt weight tiles are 128x128, got {block}"
    return (_BLK128, _VEC128), ""


def explain(x, w: QuantizedTensor, **kwargs) -> str:
    """One line saying which path ``qmatmul(x, w, **kwargs)`` takes and why."""
    return str(plan(x, w, **kwargs))


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

    The epilogue (:mod:`jax_bq.epilogue`) is fused into the cuBLASLt FP8 GEMM
    where cuBLASLt allows it (bias, tanh GELU, the residual through its C
    matrix, an FP8 output with its amax) and applied right after the GEMM
    otherwise; :func:`explain` says which part ran where.

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
    p = plan(
        x,
        w,
        out_dtype=out_dtype,
        act_format=act_format,
        act_granularity=act_granularity,
        epilogue=epi,
    )
    c = p.config
    ep.check_operands(epi, x.shape, c.n, out_dtype, bias, residual, out_scale)
    logger.debug("%s", p)
    if p.convert_fp4:
        w = fp4_to_fp8(w)
    lead = tuple(x.shape[:-1])
    x2, xs = _gemm_activations(x, c)
    ts = w.tensor_scale if w.tensor_scale is not None else jnp.ones((), jnp.float32)
    empty = jnp.zeros((0,), jnp.float32)
    b = bias.astype(c.epilogue_dtype) if bias is not None else None
    r = jnp.reshape(residual, (c.m, c.n)) if residual is not None else None
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
        y = ep.as_quantized(y, s_out, fmt_out, out_dtype)
    if not return_amax:
        return y
    return y, rest_amax if rest_amax is not None else jnp.reshape(amax, ())


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
