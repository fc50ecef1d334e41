"""The qmatmul ladder as data: a request, a device snapshot, and ordered rungs.

:func:`walk` tries the rungs of :data:`RUNGS` in order. Each rung names the
path it yields and answers, for one :class:`Case` (the validated request plus
the :class:`~jax_bq.capabilities.DeviceCaps` of its device), either ``""`` (it
applies: the walk stops there) or why it does not. The first rung that
applies makes the :class:`MatmulPlan`; the plan keeps the walk (every rung
tried, with its verdict) for :func:`jax_bq.explain`. The last rungs are
fallbacks that always apply, so every walk ends on a plan.

Facts several rungs share (the cuBLASLt scale modes and its answer, the
weight-only kernel's limits, the performance model's ranking) are computed
once per case, lazily, so cuBLASLt is only asked what the walk needs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from jax_bq import _native
from jax_bq import epilogue as ep
from jax_bq.capabilities import Capability, DeviceCaps, device_caps
from jax_bq.config import ENV_FORCE_FALLBACK, forced_fallback
from jax_bq.convert import FP4_FORMATS, fp4_to_fp8
from jax_bq.formats import FLOAT_DTYPES, Granularity, QuantFormat
from jax_bq.primitives import qmatmul as qp
from jax_bq.primitives import qmatmul_abi as abi
from jax_bq.qtensor import QuantizedTensor

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
#: Below it, W4A16 (M <= 64) or the fallback. From it, with a measured
#: hardware profile, the performance model decides between the conversion and
#: dequantize + dot (:func:`fp4_model_rank`; at the E5-large GEMMs, 4096 x 1024
#: x 1024, dequantize + dot measured 15.7 us against 22.5 us). Pass
#: ``act_format="bf16"`` to keep weight-only numerics.
FP4_CONVERT_MIN_M = 256

_FP8 = (QuantFormat.FP8_E4M3, QuantFormat.FP8_E5M2)
_BLOCKFP = (QuantFormat.MXFP8, QuantFormat.NVFP4)
_W4A16_FORMATS = (QuantFormat.FP4, QuantFormat.NVFP4)
_ACT_GRANULARITIES = (qp.ACT_TENSOR, qp.ACT_TOKEN, qp.ACT_BLOCK128)
_CUBLAS_PATHS = (qp.CUBLAS_FP8, FP4_VIA_FP8, qp.CUBLAS_BLOCKFP)
# The activation granularity a weight granularity pairs with by default, and
# the one a pre-quantized x has.
_DEFAULT_ACT = {
    Granularity.PER_TENSOR: qp.ACT_TENSOR,
    Granularity.PER_CHANNEL: qp.ACT_TOKEN,
    Granularity.PER_BLOCK: qp.ACT_BLOCK128,
    Granularity.TILE_2D: qp.ACT_BLOCK128,
}


@dataclass(frozen=True)
class Step:
    """One rung the walk tried: taken, or why not; ``inner`` is a nested walk."""

    rung: str
    taken: bool
    why: str
    inner: tuple[Step, ...] = ()

    def lines(self, indent: str = "  ") -> list[str]:
        """The step and its nested walk, one line each."""
        mark = "taken" if self.taken else "no"
        out = [f"{indent}{mark:5s} {self.rung}: {self.why}"]
        for s in self.inner:
            out += s.lines(indent + "    ")
        return out


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
        epilogue: what follows the product, if anything.
        epilogue_reason: which part of it the GEMM call fuses, and why.
        walk: the rungs of the ladder tried for this plan, in order.
    """

    path: str
    reason: str
    config: qp.QmmConfig
    scale_modes: tuple[str, str] | None = None
    convert_fp4: bool = False
    epilogue: ep.Epilogue | None = None
    epilogue_reason: str = ""
    walk: tuple[Step, ...] = field(default=(), compare=False, repr=False)

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

    def describe_walk(self) -> str:
        """The ladder walk, one line per rung tried (nested walks indented)."""
        return "\n".join(line for s in self.walk for line in s.lines())


# --- the request ----------------------------------------------------------------------


def check_weights(w) -> None:
    """Raises ValueError unless ``w`` is a valid ``[N, K]`` QuantizedTensor blocked along K."""
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


def _check_quantized_activations(x: QuantizedTensor) -> None:
    x.validate()
    if x.stack_shape:
        raise ValueError(f"qmatmul activations cannot have stack dims, got {x.shape}")
    if x.format not in _FP8:
        raise ValueError(f"pre-quantized activations must be FP8 (E4M3/E5M2), got {x.format.value}")
    if x.axis != -1 or x.granularity is Granularity.TILE_2D:
        raise ValueError(
            f"pre-quantized activations must be scaled per tensor, per token "
            f"(per_channel, axis=-1) or per 1x128 block; got {x.granularity.value} "
            f"axis {x.axis}"
        )
    if x.granularity is Granularity.PER_BLOCK and x.block != (128,):
        raise ValueError(f"activation blocks must be 1x128, got {x.block}")


def check_activations(x, k: int) -> None:
    """Raises ValueError unless ``x`` is a float ``[..., K]`` array or an FP8 QuantizedTensor."""
    if isinstance(x, QuantizedTensor):
        _check_quantized_activations(x)
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


def _activation_request(x, act_format, act_granularity):
    """``(act_format, act_granularity, weight_only_requested)``, normalized and checked."""
    pre = isinstance(x, QuantizedTensor)
    weight_only = False
    if act_format is not None:
        act_format = QuantFormat.parse(act_format)
        if act_format in (QuantFormat.BF16, QuantFormat.FP16):
            weight_only, act_format = True, None
    if pre:
        if act_format is not None and act_format is not x.format:
            raise ValueError(
                f"act_format={act_format.value} disagrees with the quantized x ({x.format.value})"
            )
        if weight_only:
            raise ValueError("weight-only (16-bit activations) needs a plain array x")
        act_format = x.format
        act_granularity = _DEFAULT_ACT[x.granularity]
    elif act_granularity is not None and act_granularity not in _ACT_GRANULARITIES:
        raise ValueError(
            f"act_granularity must be one of {_ACT_GRANULARITIES}, got {act_granularity!r}"
        )
    if act_format is not None and act_format not in _FP8 + _BLOCKFP:
        raise ValueError(
            f"act_format must be fp8_e4m3, fp8_e5m2, mxfp8, nvfp4 or bf16/fp16 (weight-only), "
            f"got {act_format.value}"
        )
    return act_format, act_granularity, weight_only


def default_device(x) -> jax.Device:
    """The device ``x`` lives on if it is a concrete array, else JAX's default device.

    Tracers are not asked: ``Tracer.devices()`` raises a ConcretizationTypeError
    whose message walks the whole jaxpr traced so far, which made tracing a
    program with many qmatmuls quadratic (minutes for a 24-layer training step).
    """
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        try:
            devs = x.devices()
            if len(devs) == 1:
                return next(iter(devs))
        except Exception:  # e.g. a deleted array: fall back to the default device
            pass
    d = jax.config.jax_default_device
    if d is None:
        return jax.devices()[0]
    return jax.devices(d)[0] if isinstance(d, str) else d


@functools.lru_cache(maxsize=1024)
def probe(
    device_id: int, m, n, k, a_type, b_type, a_mode, b_mode, d_type, epilogue=0, c_type=None
) -> str:
    """CuBLASLt's answer for one GEMM spec ("" = it has an algorithm, now cached)."""
    c_type = d_type if c_type is None else c_type
    args = (device_id, m, n, k, a_type, b_type, a_mode, b_mode, d_type, epilogue, c_type, c_type)
    return _native.CUDA.module.cublaslt_probe(*(int(a) for a in args))


class Case:
    """One validated qmatmul request on one device, with the facts the rungs share.

    Attributes:
        x, w: the operands (arrays or shape structs).
        m, n, k: the GEMM shape (leading dims of ``x`` fold into M).
        out_dtype, pre (x is a QuantizedTensor), act_format (None: none asked
        for or weight-only), act_granularity, weight_only (16-bit activations
        requested), device, caps, forced (``JAX_BQ_FORCE_FALLBACK`` names
        qmatmul).
    """

    def __init__(self, x, w, *, out_dtype, act_format, act_granularity, device):
        check_weights(w)
        self.n, self.k = w.shape
        check_activations(x, self.k)
        self.out_dtype = np.dtype(out_dtype)
        if self.out_dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"out_dtype must be float32, bfloat16 or float16, got {self.out_dtype}"
            )
        self.x, self.w = x, w
        self.m = math.prod(x.shape[:-1])
        self.pre = isinstance(x, QuantizedTensor)
        self.act_format, self.act_granularity, self.weight_only = _activation_request(
            x, act_format, act_granularity
        )
        self.device = device or default_device(x)
        self.caps: DeviceCaps = device_caps(self.device)
        self.forced = forced_fallback("qmatmul")

    def derived(self, w=None, act_format=None, act_granularity=None) -> Case:
        """The same request with other weights / activation options (re-validated)."""
        return Case(
            self.x,
            self.w if w is None else w,
            out_dtype=self.out_dtype,
            act_format=act_format,
            act_granularity=act_granularity,
            device=self.device,
        )

    @property
    def wf(self) -> QuantFormat:
        """The weight format."""
        return self.w.format

    @property
    def wg(self) -> Granularity:
        """The weight granularity."""
        return self.w.granularity

    @property
    def explicit_act(self) -> bool:
        """An activation format or granularity was given (no automatic choice)."""
        return self.act_format is not None or self.act_granularity is not None

    def native(self, fmt: QuantFormat) -> Capability:
        """Tensor cores for ``fmt`` on this device, unless the fallback is forced."""
        if self.forced:
            return Capability(False, f"forced off by {ENV_FORCE_FALLBACK}")
        return self.caps.native(fmt)

    @functools.cached_property
    def fp8_act(self) -> tuple[QuantFormat, str]:
        """Activation format and granularity of the FP8 GEMM (requested or default)."""
        return self.act_format or QuantFormat.FP8_E4M3, (
            self.act_granularity or _DEFAULT_ACT[self.wg]
        )

    @functools.cached_property
    def fallback_act(self) -> tuple[QuantFormat | None, str | None]:
        """The activation numerics the fallback reproduces.

        The requested (or default) activation format; MXFP8/NVFP4 weights pair
        with their own activation format only where that GEMM is native;
        elsewhere (and for FP4/MXFP4 weights) the default is weight-only.
        """
        wf = self.wf
        if self.weight_only:
            return None, None
        if wf in _BLOCKFP and self.act_format is None:
            native = bool(self.native(wf)) and not self.pre
            return (wf, qp.ACT_BLOCKFP) if native else (None, None)
        if wf in _FP8 + _BLOCKFP or self.act_format is not None:
            fmt = self.act_format or QuantFormat.FP8_E4M3
            return fmt, self.act_granularity or (
                qp.ACT_BLOCKFP if fmt in _BLOCKFP else _DEFAULT_ACT[self.wg]
            )
        return None, None

    @functools.cached_property
    def w8a16_refusal(self) -> str:
        """Why the W8A16 kernel cannot take this call ("" if it can)."""
        w, wg = self.w, self.wg
        block_k = {
            Granularity.PER_BLOCK: w.block[0] if w.block else 0,
            Granularity.TILE_2D: w.block[1] if len(w.block) == 2 else 0,
        }.get(wg, self.k)
        if self.pre:
            return "x is already quantized"
        if self.m > qp.WEIGHT_ONLY_MAX_M:
            return f"M={self.m} > {qp.WEIGHT_ONLY_MAX_M}"
        if wg in (Granularity.PER_BLOCK, Granularity.TILE_2D) and block_k % 128:
            return f"weight block of {block_k} along K (needs a multiple of 128)"
        return ""

    @functools.cached_property
    def w8a8(self) -> tuple[tuple[abi.ScaleMode, abi.ScaleMode] | None, str]:
        """The FP8 GEMM's cuBLASLt ``(weight, activation)`` scale modes, or ``(None, why)``."""
        a_fmt, a_gran = self.fp8_act
        fp8 = self.native(QuantFormat.FP8_E4M3)
        if not fp8:
            return None, fp8.reason
        if a_fmt not in _FP8:
            return None, f"{a_fmt.value} activations with FP8 weights"
        modes, why = fp8_scale_modes(self.wg, self.w.block, a_gran)
        if modes is None:
            return None, why
        refusal = self._probe(abi.CUDA_TYPE[self.wf], abi.CUDA_TYPE[a_fmt], modes)
        if refusal:
            pair = f"{modes[0].name} x {modes[1].name}"
            return None, (
                f"cuBLASLt refuses {pair} {self.wf.value} x {a_fmt.value} at M={self.m}: {refusal}"
            )
        return modes, ""

    @functools.cached_property
    def ranking(self):
        """The performance model's ranking of W8A8 vs W8A16, or ``(None, why not)``."""
        modes = tuple(m.name for m in self.w8a8[0])
        return model_rank(self.device, self.m, self.n, self.k, self.wf, self.wg, modes)

    @property
    def no_model(self) -> str:
        """Why the fixed crossover rule decides ("" when the model was not consulted)."""
        if "ranking" not in self.__dict__ or self.ranking[0] is not None:
            return ""
        return f"; no measured hardware profile, so the fixed rule: {self.ranking[1]}"

    @functools.cached_property
    def blockfp_refusal(self) -> str:
        """Why the MXFP8/NVFP4 cuBLASLt GEMM cannot run ("" if it can)."""
        wf = self.wf
        cap = self.native(wf)
        if not cap:
            return f"no {wf.value} tensor cores: {cap.reason}"
        if self.pre:
            return f"{wf.value} GEMM quantizes activations itself; x was pre-quantized"
        if (self.act_format or wf) is not wf:
            return f"{wf.value} weights need {wf.value} activations for cuBLASLt"
        if self.wg is not Granularity.PER_BLOCK:
            return f"{wf.value} weights must be per_block"
        mode = blockfp_mode(wf)
        refusal = self._probe(abi.CUDA_TYPE[wf], abi.CUDA_TYPE[wf], (mode, mode))
        if refusal:
            cc = self.caps.compute_capability
            return f"cuBLASLt refuses {mode.name} on SM {cc[0]}.{cc[1]}: {refusal}"
        return ""

    @property
    def why_not_native(self) -> str:
        """Why the weights' own tensor cores are not used (blockfp refusal or capability)."""
        native_why = self.blockfp_refusal if self.wf in _BLOCKFP else ""
        return native_why or self.native(self.wf).reason

    @functools.cached_property
    def w4a16_refusal(self) -> str:
        """Why the W4A16 kernel cannot take this call ("" if it can)."""
        if self.pre or (self.act_format is not None and not self.weight_only):
            return "W4A16 takes plain activations"
        if self.m > qp.WEIGHT_ONLY_MAX_M:
            return f"M={self.m} > {qp.WEIGHT_ONLY_MAX_M} for the W4A16 kernel"
        if self.k % 32:
            return f"the W4A16 kernel needs K % 32 == 0 (K={self.k})"
        return ""

    def _probe(self, w_type, a_type, modes) -> str:
        d_type = abi.CUDA_OUT[self.out_dtype]
        return probe(self.caps.index, self.m, self.n, self.k, w_type, a_type, *modes, d_type)

    def config(self, path: str, act_format, act_granularity) -> qp.QmmConfig:
        """The primitive's static configuration for ``path``."""
        x, pre = self.x, self.pre
        return qp.QmmConfig(
            path=path,
            m=self.m,
            n=self.n,
            k=self.k,
            w_format=self.wf,
            w_granularity=self.wg,
            w_block=self.w.block,
            act_dynamic=not pre,
            act_format=act_format,
            act_granularity=act_granularity,
            act_block=x.block if pre else (),
            act_qgranularity=x.granularity if pre else None,
            out_dtype=self.out_dtype,
        )


def model_rank(device, m, n, k, wf: QuantFormat, wg: Granularity, scale_modes):
    """:func:`jax_bq.perf.planner.rank` of W8A8 vs W8A16: ``(Ranking, "")`` or ``(None, why)``."""
    from jax_bq.perf.planner import rank  # the model reads profiles: only when asked

    cands = (qp.CUBLAS_FP8, qp.WEIGHT_ONLY)
    return rank(device, m, n, k, wf.value, wg.value, cands, scale_modes)


def rank_by_model(device, m, n, k, wf, wg, w8a8: MatmulPlan, wo_plan: MatmulPlan):
    """The faster of the plans ``w8a8`` / ``wo_plan`` by the measured-profile model.

    Returns ``(plan, "")``, or ``(None, why not)`` when the device has no
    measured profile (the ladder then keeps the fixed crossover rule).
    """
    r, why = model_rank(device, m, n, k, wf, wg, w8a8.scale_modes)
    if r is None:
        return None, f"; no measured hardware profile, so the fixed rule: {why}"
    chosen = w8a8 if r.best == qp.CUBLAS_FP8 else wo_plan
    return dataclasses.replace(
        chosen, reason=f"fastest by the measured profile: {r.describe()}"
    ), ""


def blockfp_mode(wf: QuantFormat) -> abi.ScaleMode:
    """The cuBLASLt scale mode of an MXFP8 / NVFP4 operand."""
    return abi.ScaleMode.VEC16_UE4M3 if wf is QuantFormat.NVFP4 else abi.ScaleMode.VEC32_UE8M0


def fp8_scale_modes(wg: Granularity, block: tuple[int, ...], a_gran: str):
    """The cuBLASLt FP8 (weight, activation) scale modes, or (None, why not)."""
    mode = abi.ScaleMode
    if wg in (Granularity.PER_TENSOR, Granularity.PER_CHANNEL):
        if a_gran == qp.ACT_BLOCK128:
            return None, "1x128 activations need 1x128 or 128x128 weight blocks"
        if wg is Granularity.PER_TENSOR and a_gran == qp.ACT_TENSOR:
            return (mode.SCALAR_32F, mode.SCALAR_32F), ""
        return (mode.OUTER_VEC_32F, mode.OUTER_VEC_32F), ""
    if a_gran != qp.ACT_BLOCK128:
        return None, f"block-scaled weights need 1x128 activation blocks, not {a_gran}"
    if wg is Granularity.PER_BLOCK:
        if block != (128,):
            return None, f"cuBLASLt weight blocks are 1x128, got 1x{block[0]}"
        return (mode.VEC128_32F, mode.VEC128_32F), ""
    if block != (128, 128):
        return None, f"cuBLASLt weight tiles are 128x128, got {block}"
    return (mode.BLK128x128_32F, mode.VEC128_32F), ""


# --- the rungs --------------------------------------------------------------------------


@dataclass(frozen=True)
class Rung:
    """One rung of the ladder.

    Attributes:
        name: what :func:`jax_bq.explain` calls it.
        path: the path it yields when taken.
        weights: the weight formats it concerns (others skip it silently).
        why_not: ``""`` when the rung applies to the case, else why not.
        reason: why, when it is taken (the plan's ``reason``).
        build: makes the plan; None: the standard plan for ``path``.
    """

    name: str
    path: str
    weights: tuple[QuantFormat, ...] | None
    why_not: Callable[[Case], str]
    reason: Callable[[Case], str]
    build: Callable[[Case, str], MatmulPlan] | None = None


def _standard_plan(case: Case, path: str, reason: str) -> MatmulPlan:
    if path == qp.FALLBACK:
        return MatmulPlan(path, reason, case.config(path, *case.fallback_act))
    if path in (qp.WEIGHT_ONLY, qp.W4A16):
        return MatmulPlan(path, reason, case.config(path, None, None))
    if path == qp.CUBLAS_FP8:
        modes = tuple(m.name for m in case.w8a8[0])
        return MatmulPlan(path, reason, case.config(path, *case.fp8_act), modes)
    mode = blockfp_mode(case.wf).name
    return MatmulPlan(path, reason, case.config(path, case.wf, qp.ACT_BLOCKFP), (mode, mode))


def _converted_shape(w: QuantizedTensor) -> QuantizedTensor:
    """The abstract result of ``fp4_to_fp8(w)`` (shapes only, for planning)."""
    spec = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), w)
    return jax.eval_shape(fp4_to_fp8, spec)


def _plan_converted(case: Case, reason: str) -> MatmulPlan:
    """FP4 weights with FP8 activations: the plan of the FP8-converted weights."""
    inner = walk(
        case.derived(
            _converted_shape(case.w),
            case.act_format,
            case.act_granularity or qp.ACT_BLOCK128,
        )
    )
    path = FP4_VIA_FP8 if inner.path == qp.CUBLAS_FP8 else inner.path
    why = f"{case.wf.value} weights with {case.act_format.value} activations: weights converted to "
    why += f"FP8 E4M3 1x128 ({inner.reason})"
    return dataclasses.replace(inner, path=path, reason=why, convert_fp4=True)


def _auto_fp4_refusal(case: Case) -> str:
    if case.weight_only:
        return "weight-only requested"
    if case.act_format is not None or case.pre:
        return "activations given or requested: the rung below decides"
    if case.m < FP4_CONVERT_MIN_M:
        return f"M={case.m} < {FP4_CONVERT_MIN_M} (FP4_CONVERT_MIN_M)"
    fp8 = case.native(QuantFormat.FP8_E4M3)
    if not fp8:
        return f"no FP8 GEMM: {fp8.reason}"
    if case.native(case.wf):
        return f"{case.wf.value} is native here"
    auto = _auto_fp4_plan(case)
    if auto.path != FP4_VIA_FP8:
        return f"the converted weights would take {auto.path}"
    r, _ = fp4_model_rank(case)
    if r is not None and r.best != FP4_VIA_FP8:
        return f"dequantize + dot_general is faster by the measured profile: {r.describe()}"
    return ""


def fp4_model_rank(case: Case):
    """The model's ranking of ``fp4_via_fp8`` vs ``dequant_dot`` (plain activations).

    Returns ``(Ranking, "")``, or ``(None, why)`` without a measured profile.
    """
    from jax_bq.perf.planner import rank  # the model reads profiles: only when asked

    cands = (FP4_VIA_FP8, qp.FALLBACK)
    return rank(case.device, case.m, case.n, case.k, case.wf.value, case.wg.value, cands)


def _auto_fp4_plan(case: Case) -> MatmulPlan:
    if "_auto_fp4" not in case.__dict__:
        fp8_case = case.derived(None, QuantFormat.FP8_E4M3, case.act_granularity)
        case.__dict__["_auto_fp4"] = walk(fp8_case)
    return case.__dict__["_auto_fp4"]


def _build_auto_fp4(case: Case, reason: str) -> MatmulPlan:
    return dataclasses.replace(_auto_fp4_plan(case), reason=reason)


def _auto_fp4_reason(case: Case) -> str:
    r, _ = fp4_model_rank(case)
    why = (
        f"fastest by the measured profile: {r.describe()}"
        if r is not None
        else f"M={case.m} >= {FP4_CONVERT_MIN_M} (measured crossover, FP4_CONVERT_MIN_M)"
    )
    return f"{why}: {_auto_fp4_plan(case).reason}; act_format='bf16' keeps weight-only numerics"


def _gate(condition: Callable[[Case], bool], otherwise: str) -> Callable[[Case], str]:
    """A fallback gate: applies when ``condition`` holds."""
    return lambda c: "" if condition(c) else otherwise


def _all(*checks: Callable[[Case], str]) -> Callable[[Case], str]:
    """The first refusal among ``checks`` ("" if none refuses)."""

    def why_not(case: Case) -> str:
        for check in checks:
            why = check(case)
            if why:
                return why
        return ""

    return why_not


def _w8a16_ok(c: Case) -> str:
    return f"W8A16 unavailable: {c.w8a16_refusal}" if c.w8a16_refusal else ""


def _w8a8_ok(c: Case) -> str:
    return f"W8A8 unavailable: {c.w8a8[1]}" if c.w8a8[0] is None else ""


def _automatic_act(c: Case) -> str:
    return "activation format or granularity given" if c.explicit_act else ""


def _ranked_first(path: str) -> Callable[[Case], str]:
    def why_not(c: Case) -> str:
        r, why = c.ranking
        if r is None:
            return f"no measured hardware profile: {why}"
        return "" if r.best == path else f"the measured profile ranks {r.best} first"

    return why_not


def _ranked_reason(c: Case) -> str:
    return f"fastest by the measured profile: {c.ranking[0].describe()}"


def _below_crossover(c: Case) -> str:
    crossover = WEIGHT_ONLY_CROSSOVER_M[c.wg]
    return "" if c.m <= crossover else f"M={c.m} > {crossover} ({c.wg.value} weights)"


def _below_crossover_reason(c: Case) -> str:
    crossover = WEIGHT_ONLY_CROSSOVER_M[c.wg]
    return (
        f"M={c.m} <= {crossover} ({c.wg.value} weights): the weight-only kernel beats "
        f"quantizing activations for the FP8 GEMM (measured crossover{c.no_model})"
    )


def _w8a8_reason(c: Case) -> str:
    cc = c.caps.compute_capability
    a_fmt, a_gran = c.fp8_act
    why = f"FP8 tensor cores ({cc[0]}.{cc[1]}); activations {a_fmt.value} {a_gran}"
    if c.no_model:
        why += f"; M={c.m} > {WEIGHT_ONLY_CROSSOVER_M[c.wg]} (measured crossover{c.no_model})"
    return why


def _fp8_fallback_reason(c: Case) -> str:
    return (
        f"W8A8 unavailable ({c.w8a8[1]}); weight-only unavailable "
        f"({c.w8a16_refusal or 'explicit activation format requested'})"
    )


def _last_fallback_reason(c: Case) -> str:
    native_why = c.blockfp_refusal if c.wf in _BLOCKFP else ""
    why = native_why or f"no {c.wf.value} matmul kernel on this device"
    return f"{why} (dequantize + dot_general)"


def _empty(c: Case) -> bool:
    return c.m == 0 or c.n == 0 or c.k == 0


_FB = qp.FALLBACK
_W4A16_WHY = "FP4 weights widened to bf16 in registers (W4A16 kernel)"

#: The ladder, tried in order; the first rung that applies decides.
RUNGS: tuple[Rung, ...] = (
    # FP4 weights, FP8 GEMM: converted in the call (fp4_to_fp8), then the ladder again.
    Rung(
        "fp4_via_fp8 (automatic, large M)",
        FP4_VIA_FP8,
        FP4_FORMATS,
        _auto_fp4_refusal,
        _auto_fp4_reason,
        _build_auto_fp4,
    ),
    Rung(
        "fp4_via_fp8 (FP8 activations requested)",
        FP4_VIA_FP8,
        FP4_FORMATS,
        lambda c: "" if c.act_format in _FP8 else "no FP8 activations requested",
        lambda c: "",
        _plan_converted,
    ),
    # Gates: no kernel can run.
    Rung(
        "dequant_dot (forced)",
        _FB,
        None,
        _gate(lambda c: c.forced, f"{ENV_FORCE_FALLBACK} does not name qmatmul"),
        lambda c: f"forced by {ENV_FORCE_FALLBACK}",
    ),
    Rung(
        "dequant_dot (not a GPU)",
        _FB,
        None,
        _gate(lambda c: c.caps.platform != "gpu", "the device is a GPU"),
        lambda c: f"{c.caps.platform} has no jax_bq matmul kernels",
    ),
    Rung(
        "dequant_dot (no CUDA module)",
        _FB,
        None,
        _gate(lambda c: not c.caps.cuda_module, "the CUDA module is loaded"),
        lambda c: f"CUDA module not loaded ({c.caps.cuda_module.reason})",
    ),
    Rung(
        "dequant_dot (empty operand)",
        _FB,
        None,
        _gate(_empty, "no empty operand"),
        lambda c: "empty operand",
    ),
    Rung(
        "dequant_dot (unaligned)",
        _FB,
        None,
        _gate(lambda c: bool(c.k % 16 or c.n % 16), "K and N are multiples of 16"),
        lambda c: f"K={c.k} and N={c.n} must be multiples of 16 (16-byte rows for the kernels)",
    ),
    # FP8 weights: cuBLASLt W8A8 or the weight-only kernel.
    Rung(
        "w8a16 (requested)",
        qp.WEIGHT_ONLY,
        _FP8,
        _all(_gate(lambda c: c.weight_only, "weight-only not requested"), _w8a16_ok),
        lambda c: "weight-only requested (act_format bf16/fp16)",
    ),
    Rung(
        "dequant_dot (W8A16 requested, unavailable)",
        _FB,
        _FP8,
        _gate(lambda c: c.weight_only, "weight-only not requested"),
        lambda c: f"weight-only requested but the W8A16 kernel cannot run: {c.w8a16_refusal}",
    ),
    Rung(
        "cublaslt_fp8 (measured profile)",
        qp.CUBLAS_FP8,
        _FP8,
        _all(_w8a16_ok, _w8a8_ok, _automatic_act, _ranked_first(qp.CUBLAS_FP8)),
        _ranked_reason,
    ),
    Rung(
        "w8a16 (measured profile)",
        qp.WEIGHT_ONLY,
        _FP8,
        _all(_w8a16_ok, _w8a8_ok, _automatic_act, _ranked_first(qp.WEIGHT_ONLY)),
        _ranked_reason,
    ),
    Rung(
        "w8a16 (below the measured crossover)",
        qp.WEIGHT_ONLY,
        _FP8,
        _all(_w8a16_ok, _automatic_act, _below_crossover),
        _below_crossover_reason,
    ),
    Rung("cublaslt_fp8", qp.CUBLAS_FP8, _FP8, _w8a8_ok, _w8a8_reason),
    Rung(
        "w8a16 (W8A8 unavailable)",
        qp.WEIGHT_ONLY,
        _FP8,
        _all(_w8a16_ok, _automatic_act),
        lambda c: f"W8A8 unavailable ({c.w8a8[1]}); weights stay FP8",
    ),
    Rung("dequant_dot (FP8 weights)", _FB, _FP8, lambda c: "", _fp8_fallback_reason),
    # MXFP8 / NVFP4 weights: Blackwell's block-scaled cuBLASLt GEMM.
    Rung(
        "cublaslt_blockfp",
        qp.CUBLAS_BLOCKFP,
        _BLOCKFP,
        lambda c: c.blockfp_refusal,
        lambda c: f"{c.wf.value} tensor cores (untested on hardware: no Blackwell was available)",
    ),
    # FP4 weights without FP4 tensor cores: the W4A16 kernel.
    Rung(
        "w4a16",
        qp.W4A16,
        _W4A16_FORMATS,
        lambda c: c.w4a16_refusal,
        lambda c: f"{c.why_not_native}: {_W4A16_WHY}",
    ),
    Rung(
        "dequant_dot (FP4 weights)",
        _FB,
        _W4A16_FORMATS,
        lambda c: "",
        lambda c: f"{c.why_not_native}; {c.w4a16_refusal}",
    ),
    Rung("dequant_dot", _FB, None, lambda c: "", _last_fallback_reason),
)


def walk(case: Case, rungs: tuple[Rung, ...] = RUNGS) -> MatmulPlan:
    """The plan of the first rung that applies to ``case``, with the walk that found it."""
    steps: list[Step] = []
    for rung in rungs:
        if rung.weights is not None and case.wf not in rung.weights:
            continue
        why_not = rung.why_not(case)
        if why_not:
            steps.append(Step(rung.name, False, why_not))
            continue
        reason = rung.reason(case)
        p = (rung.build or _standard_plan_for(rung.path))(case, reason)
        steps.append(Step(rung.name, True, p.reason, p.walk))
        return dataclasses.replace(p, walk=tuple(steps))
    raise AssertionError("the ladder ends with a rung that always applies")


def _standard_plan_for(path: str) -> Callable[[Case, str], MatmulPlan]:
    return lambda case, reason: _standard_plan(case, path, reason)


# --- the epilogue -----------------------------------------------------------------------


def plan_epilogue(p: MatmulPlan, epi: ep.Epilogue, device) -> MatmulPlan:
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
        bits, fp8, why = _cublas_epilogue(p, epi, bits, fp8, device)
    cfg = ep.replace_bits(c, bits, epi.out_format if fp8 else None)
    return dataclasses.replace(p, config=cfg, epilogue=epi, epilogue_reason=why)


def _cublas_epilogue(p: MatmulPlan, epi: ep.Epilogue, bits: int, fp8: bool, device):
    """``(bits, fp8, why)``: what cuBLASLt fuses of ``epi``, after asking it."""
    c = p.config
    bf16 = abi.CUDA_OUT[np.dtype(jnp.bfloat16)]
    out = epi.out_format if fp8 else None
    d_type = abi.CUDA_TYPE[out] if out else abi.CUDA_OUT[np.dtype(c.out_dtype)]
    c_type = bf16 if out else d_type
    gemm_bits = bits
    if bits & ep.EPI_GELU_ERF:  # the GEMM itself, with the bias, into the workspace
        gemm_bits = bits & qp.EPI_BIAS
    a_mode, b_mode = (abi.ScaleMode[m] for m in p.scale_modes)
    w_type = abi.CUDA_TYPE.get(c.w_format, abi.CudaType.R_8F_E4M3)
    refusal = probe(
        device_caps(device).index,
        c.m,
        c.n,
        c.k,
        w_type,
        abi.CUDA_TYPE[c.act_format],
        a_mode,
        b_mode,
        d_type,
        gemm_bits,
        c_type,
    )
    modes = f"{p.scale_modes[0]} x {p.scale_modes[1]}"
    if refusal:
        why = (
            f"cuBLASLt refuses the epilogue with {modes} ({refusal}): XLA applies it after the GEMM"
        )
        return 0, False, why
    why = f"fused into the cuBLASLt GEMM ({modes})"
    if epi.activation == "gelu":
        why += (
            "; exact (erf) GELU by jax_bq's epilogue kernel in the same call (cuBLASLt's "
            "GELU is the tanh form: activation='gelu_tanh' fuses it into the GEMM)"
        )
    return bits, fp8, why
