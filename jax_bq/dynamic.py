r"""Dynamic activation quantization: scales computed from each activation on device.

Everything here is plain jnp/lax that traces once and runs inside ``jit``,
``vmap`` and ``scan``: no host round trip, no Python branch on a traced value.

**Groups.** An activation ``x[..., K]`` (leading dims are tokens) is split
into groups that share a scale: ``per_tensor`` (one group), ``per_token``
(one group per row of ``K`` values; the layout ``qmatmul`` consumes as
per-token scales) or ``per_channel`` (one group per input channel ``k``, all
tokens; no GEMM can factor such scales out of the sum over ``K``, so these
activations are quantize-dequantized in float: a *simulated* mode).

**Clip statistic** ``c_g`` per group ``g`` (``calibration_mode``):

* ``absmax``: ``c_g = max_i |x_i|`` (no clipping; the scale of
  :func:`jax_bq.quantize`, bit for bit).
* ``percentile``: ``c_g = P_p(|x_i|)``, the ``p``-th percentile of the
  magnitudes with numpy's default linear interpolation. **Exact**: the
  ``n - floor(h)`` largest magnitudes are selected with ``lax.top_k``
  (``h = (n - 1) p / 100``), then ``a_(floor h) + (h - floor h) (a_(floor h
  + 1) - a_(floor h))`` on the ascending order. The cost is a top-k of
  ``~(1 - p/100) n + 1`` elements per group (2 per token of 1024 channels at
  p = 99.9; ~0.1 % of the tensor per tensor).
* ``mse_optimal``: ``c_g = r* max|x|`` with ``r*`` the ratio of a fixed grid
  (``mse_grid``, 1.0 included, so never worse than absmax in the group's
  squared error) that minimizes ``sum_i (x_i - dq(q(x_i; r max|x| / MAX)))^2``,
  or, when :func:`quantize_dynamic` has the weight and the groups are tokens
  or the tensor, the squared error of the operator's output
  ``sum_(t,n) (((x - x_hat) W^T)_(t,n))^2`` over the group (one extra
  ``[tokens, K] x [K, N]`` product per grid point; per-channel groups keep
  the activation error, which under independent errors only differs from
  the output error by a constant factor per channel);
  the grid is evaluated on device in chunks of ``lax.map`` (vectorized,
  memory ``chunk x |x|``) and ``argmin`` picks per group.

**Scale and codes** (FP8 E4M3/E5M2): ``s_g = c_g / MAX`` (``s = 1`` for
``c = 0``), ``q_i = RNE(clip(x_i / s_g, -MAX, MAX))``; values beyond ``c_g``
saturate. A NaN or ±Inf in a group gives that group a NaN scale and NaN codes.
``absmax`` per tensor or per token without EMA *is* :func:`jax_bq.quantize`
(``per_tensor`` / ``per_channel`` along the last axis): the same kernel, the
pinned numerics of DESIGN §2 bit for bit. The other modes compute
``x_i * (1 / s_g)`` in float32, which XLA fuses into one elementwise pass; it
can differ from the correctly rounded ``x_i / s_g`` in the last bit, so a
code can differ by one step at an exact rounding tie (these scales are not
the pinned absmax scales anyway).

**Outliers.** ``outlier_ratio`` (``DynamicMeta``, the fallback's predicate)
depends on ``outlier_measure``:

* ``"block"`` (the cheap measure for hot paths; ``"channel"`` below is the
  default): ``max_j a_j / exp(mean_(j: a_j > 0)
  log a_j)`` over the 1x128 block amaxes ``a_j = max_(k in block) |x[t, k]|``
  of all tokens (:func:`block_outlier_ratio`): the loudest block against the
  geometric mean of the live blocks. On the block-scaled GEMM path with
  per-token absmax the amaxes are read from the block scales the quantize
  kernel already wrote (``a = s MAX``, :func:`block_amax_of_scales`): one
  fused reduction over ``[tokens, K / 128]``, no pass over ``x``, no sort.
  Elsewhere one reduction of ``x`` into the block amaxes
  (:func:`block_amax`). It sees loud channels only against blocks that hold
  none: channels raised in *every* block (``K <= 128``, or a few channels
  spread over all ``K / 128`` blocks) leave it near its clean value (about 2
  for Gaussian activations). Within a 1x128 FP8 block a loud channel costs the
  block's other values little as long as they stay in E4M3's normal range
  (a gain below ``MAX / 2^-6 ~ 2.9e4``), which is why the block path needs
  the fallback less than per-token scales do.
* ``"channel"``: ``max_k A_k / median_k A_k`` with ``A_k = max_tokens |x[...,
  k]|`` the per-channel amax (:func:`outlier_ratio`, what LLM-style outliers
  are: a few *channels* far above the rest). One more reduction over ``x``
  and a median (a sort) of ``K`` numbers per call; the exact analysis
  version is also :attr:`ActivationStats.outlier_ratio`.

When ``fallback_to_fp16`` and ``log10(outlier_ratio) > outlier_threshold`` the
operator runs in FP16 instead: activations rounded to float16, times either
a float16 copy of the weight (``fallback_weight="fp16"``: a true FP16
operator, float32 accumulation) or the stored quantized weight dequantized
(``"quantized"``, the default: the weight-only rung, whose error is the
weight's quantization error, which outlier channels amplify: the real
all-MiniLM-L6-v2 with three operators' inputs given x100 channels keeps
0.9987 mean cosine with the quantized weight and 1.0000 with the copy,
``benchmarks/results/dynamic_fidelity_minilm_cpu.md``). The choice is ``lax.cond`` (default) or
a ``jnp.where`` select (``fallback_mode="select"``): both branches are traced
and compiled once; under ``vmap`` JAX turns the ``cond`` into a select too
(both computed), as it does for every ``cond`` with a batched predicate. With
``fallback_to_fp16=False`` there is no branch at all. The ``absmax``
per-tensor/per-token codes are computed before the branch (they also give the
reported scales), so a call that falls back has paid for them.

**The block-scaled GEMM** (the fast W8A8 path on FP8 tensor cores). cuBLASLt
multiplies per-token activation scales by per-channel weight scales through
its outer-vector scale mode, which on the H200 is 3-12x slower than a
per-tensor GEMM at encoder shapes (``benchmarks/results/qmatmul_encoder.md``);
its 1x128-activation x 128-blocked-weight mode (DeepSeek's) runs at
per-tensor speed. So when ``weight`` is an FP8 :class:`~jax_bq.QuantizedTensor`
blocked by 128 along K (:func:`is_block_weight`: 128x128 tiles or 1x128
blocks), ``per_token`` and ``per_tensor`` activations are handed to
:func:`jax_bq.qmatmul` as FP8 codes with **1x128 block scales**
``s[t, b]`` (``b`` = the 128-wide block of K):

* ``per_token`` ``absmax`` without EMA: true 1x128 blocks,
  ``s[t, b] = max_(k in b) |x[t, k]| / MAX`` (:func:`jax_bq.quantize` with
  ``block_size=128``, the pinned kernel, bit for bit). Since ``s[t, b] <=
  s_t`` (the token's scale), every element's rounding error is at most the
  per-token one, and a loud block no longer coarsens the token's other blocks.
* every other ``per_token`` mode (percentile, mse_optimal, EMA) and
  ``per_tensor``: the group's scale ``s_g`` as defined above, replicated over
  the group's blocks (``s[t, b] = s_g``): the same codes and the same product
  as without blocks.

:func:`block_weight` re-expresses a per-tensor or per-channel FP8 weight in
that layout without changing a code or a scale value (per-tensor -> 128x128
tiles, per-channel -> 1x128 blocks, the scale replicated);
:func:`jax_bq.strategies.apply_strategy` does it once, when the params are
prepared, for every operator whose spec has ``block_gemm=True`` (default).
``DynamicMeta.scale`` keeps its per-token / per-tensor definition, the
group's scale ``s_g``: for per-token absmax it is ``RN(amax_t / MAX)``, what
:func:`jax_bq.quantize` per channel gives, bit for bit, taken as the largest
of the token's block scales (``RN(a / MAX)`` is monotone in ``a``; all-zero
blocks, scale 1 by convention, are told apart with the token's amax
``clip`` and left out), not as ``clip / MAX``, which XLA may compute as a
product with ``1 / MAX`` (one ulp off); XLA drops it when nothing reads
it. ``DynamicMeta.block_scale`` holds the ``[..., ceil(K / 128)]`` scales
that ran. ``clip`` and ``outlier_ratio`` are unchanged. Which path a call
takes: :func:`explain_dynamic`.

**EMA** (``ema_decay = d``): a running value ``e_t = d e_(t-1) + (1 - d) v_t``
(``e_1 = v_1``) replaces the fresh statistic: for ``per_tensor`` and
``per_channel`` ``v`` is the clip value ``c`` itself (so ``s = e / MAX``); for
``per_token`` (each token has its own amax) ``v`` is the mean clip ratio
``mean_g c_g / max|x_g|`` and ``s_g = e max|x_g| / MAX``. The state is an
:class:`EmaState` pytree (value and step count), carried by the caller: the
Flax layers keep it in the ``quant_state`` collection (Linen) or an
:class:`~jax_bq.flax.nnx.QLinear` attribute of type ``QuantState`` (NNX).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_bq.formats import FLOAT_DTYPES, Granularity, QuantFormat
from jax_bq.qtensor import QuantizedTensor
from jax_bq.reference import _NAN_CODE

__all__ = [
    "CALIBRATION_MODES",
    "GRANULARITIES",
    "PRECISIONS",
    "ActivationStats",
    "DynamicMeta",
    "DynamicQuantConfig",
    "EmaState",
    "WeightOnly",
    "abs_percentile",
    "activation_stats",
    "block_amax",
    "block_amax_of_scales",
    "block_outlier_ratio",
    "block_weight",
    "clip_values",
    "decode_precision",
    "describe_meta",
    "explain_dynamic",
    "is_block_weight",
    "outlier_ratio",
    "precision_code",
    "quantize_dynamic",
]

GRANULARITIES = ("per_token", "per_tensor", "per_channel")
CALIBRATION_MODES = ("absmax", "percentile", "mse_optimal")
#: Precision codes (the int in :class:`DynamicMeta`): index into this tuple.
PRECISIONS = tuple(QuantFormat)
_ACT_FORMATS = (QuantFormat.FP8_E4M3, QuantFormat.FP8_E5M2)
_TINY = np.float32(np.finfo(np.float32).tiny)


def precision_code(fmt: QuantFormat | str) -> int:
    """The integer code of a format (its index in :data:`PRECISIONS`)."""
    return PRECISIONS.index(QuantFormat.parse(fmt))


def decode_precision(code) -> str:
    """Format name of a precision code (a Python int or a concrete array)."""
    c = int(np.asarray(code))
    if not 0 <= c < len(PRECISIONS):
        raise ValueError(f"precision code {c} is not in 0..{len(PRECISIONS) - 1}")
    return PRECISIONS[c].value


@dataclass(frozen=True, kw_only=True)
class DynamicQuantConfig:
    """How one operator's activations are quantized at run time.

    A static pytree (no leaves): it can sit in a Flax param tree next to the
    kernel it applies to (:func:`jax_bq.strategies.apply_strategy` puts it
    there) and passes through ``jit`` as part of the tree structure.

    Attributes:
        precision: ``"fp8_e4m3"`` (default) or ``"fp8_e5m2"``.
        granularity: ``"per_token"``, ``"per_tensor"`` or ``"per_channel"``
            (simulated; module docstring).
        calibration_mode: ``"absmax"``, ``"percentile"`` or ``"mse_optimal"``.
        percentile: ``p`` in (0, 100] for ``"percentile"``.
        fallback_to_fp16: run the operator in FP16 when the outlier test fires.
        outlier_threshold: decades: fall back when
            ``log10(outlier_ratio) > outlier_threshold``. The default 1.7
            (a channel ~50x the median channel amax) sits between what the
            real all-MiniLM-L6-v2 shows on stdlib docstrings (at most 24x,
            the input of ``layer_0/output``) and a channel injected at 100x.
        ema_decay: ``None`` (fresh scales every call) or ``d`` in [0, 1).
        fallback_mode: ``"cond"`` (``lax.cond``: only the chosen branch runs;
            XLA:GPU may read the predicate on the host to pick the branch,
            which ``benchmarks/bench_dynamic_overhead.py`` checks) or
            ``"select"`` (both branches run, ``jnp.where`` picks: no control
            flow, twice the work of the operator).
        fallback_weight: the weight of the FP16 branch: ``"quantized"`` (the
            stored quantized weight, dequantized: weight-only, no extra
            memory, but the weight's quantization error stays) or ``"fp16"``
            (a float16 copy of the weight, stored next to the quantized one
            by :func:`jax_bq.strategies.apply_strategy`: 2 more bytes per
            weight, and the fallback is a true FP16 operator).
        mse_grid: clip ratios searched by ``"mse_optimal"`` (must include 1.0).
        mse_chunk: grid points evaluated at once (memory: chunk x activation).
        outlier_measure: what ``outlier_ratio`` (the fallback's predicate)
            measures: ``"channel"`` (default): ``max_k A_k / median_k A_k``
            over the per-channel amaxes (one more pass over ``x`` and a
            median of ``K`` per call; :func:`outlier_ratio`); ``"block"``
            (the cheap one for hot paths): the loudest 1x128
            block amax over the geometric mean of the non-zero block amaxes,
            read from the block scales the quantize call already produced
            on the block-scaled GEMM path (a reduction over ``[tokens,
            K / 128]``), else from one reduction of ``x`` into those block
            amaxes; it misses loud channels present in every block (module
            docstring).
        block_gemm: ``per_token``/``per_tensor`` only: let
            :func:`jax_bq.strategies.apply_strategy` store this operator's FP8
            weight blocked by 128 along K (:func:`block_weight`, exact), so
            that the product is cuBLASLt's block-scaled GEMM with 1x128
            activation scales (module docstring). ``False`` keeps the weight
            as its spec says: per-channel weights then meet per-token scales
            in the outer-vector GEMM (3-12x slower on the H200).
    """

    precision: QuantFormat | str = "fp8_e4m3"
    granularity: str = "per_token"
    calibration_mode: str = "absmax"
    percentile: float = 99.9
    fallback_to_fp16: bool = True
    outlier_threshold: float = 1.7
    ema_decay: float | None = None
    fallback_mode: str = "cond"
    fallback_weight: str = "quantized"
    mse_grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
    mse_chunk: int = 4
    block_gemm: bool = True
    outlier_measure: str = "channel"

    def __post_init__(self):
        fmt = QuantFormat.parse(self.precision)
        if fmt not in _ACT_FORMATS:
            raise ValueError(
                f"DynamicQuantConfig precision must be fp8_e4m3 or fp8_e5m2, got {fmt.value} "
                "(4-bit activations: AdaptivePrecisionSelector, with the format's own blocks)"
            )
        object.__setattr__(self, "precision", fmt)
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        if self.calibration_mode not in CALIBRATION_MODES:
            raise ValueError(
                f"calibration_mode must be one of {CALIBRATION_MODES}, "
                f"got {self.calibration_mode!r}"
            )
        if not 0.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if not math.isfinite(self.outlier_threshold) or self.outlier_threshold < 0:
            raise ValueError(
                f"outlier_threshold must be finite and >= 0, got {self.outlier_threshold}"
            )
        if self.ema_decay is not None and not 0.0 <= float(self.ema_decay) < 1.0:
            raise ValueError(f"ema_decay must be None or in [0, 1), got {self.ema_decay}")
        grid = tuple(float(r) for r in self.mse_grid)
        if 1.0 not in grid or any(not 0.0 < r <= 1.0 for r in grid):
            raise ValueError(f"mse_grid must hold ratios in (0, 1] including 1.0, got {grid}")
        object.__setattr__(self, "mse_grid", grid)
        if self.fallback_mode not in ("cond", "select"):
            raise ValueError(
                f"fallback_mode must be 'cond' or 'select', got {self.fallback_mode!r}"
            )
        if self.fallback_weight not in ("quantized", "fp16"):
            raise ValueError(
                f"fallback_weight must be 'quantized' or 'fp16', got {self.fallback_weight!r}"
            )
        if self.outlier_measure not in ("block", "channel"):
            raise ValueError(
                f"outlier_measure must be 'block' or 'channel', got {self.outlier_measure!r}"
            )
        if self.mse_chunk < 1:
            raise ValueError(f"mse_chunk must be >= 1, got {self.mse_chunk}")

    def describe(self) -> str:
        """Short human-readable form, e.g. ``fp8_e4m3 per_token percentile(99.9)``."""
        mode = self.calibration_mode
        if mode == "percentile":
            mode += f"({self.percentile:g})"
        extra = (
            f", fp16 fallback ({self.fallback_weight} weight) above 10^{self.outlier_threshold:g}"
            if self.fallback_to_fp16
            else ""
        )
        ema = f", EMA {self.ema_decay:g}" if self.ema_decay is not None else ""
        return f"{self.precision.value} {self.granularity} {mode}{extra}{ema}"


@dataclass(frozen=True)
class WeightOnly:
    """Activation spec of an operator that keeps 16-bit activations (weight-only).

    Static pytree like :class:`DynamicQuantConfig`: ``qmatmul(x, w,
    act_format=dtype)``.
    """

    dtype: str = "bf16"

    def __post_init__(self):
        if self.dtype not in ("bf16", "fp16"):
            raise ValueError(f"WeightOnly dtype must be 'bf16' or 'fp16', got {self.dtype!r}")

    def describe(self) -> str:
        """Short human-readable form."""
        return f"weight-only ({self.dtype} activations)"


jax.tree_util.register_static(DynamicQuantConfig)
jax.tree_util.register_static(WeightOnly)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class EmaState:
    """Running EMA of a scale statistic (module docstring): ``value`` and ``count`` steps."""

    value: jax.Array
    count: jax.Array

    @classmethod
    def zeros(cls, shape=()) -> EmaState:
        """The state before the first step (the first update takes the fresh value)."""
        return cls(jnp.zeros(shape, jnp.float32), jnp.zeros((), jnp.int32))


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class DynamicMeta:
    """What :func:`quantize_dynamic` did, as arrays (a pytree).

    Attributes:
        scale: the scales used (``[]`` per tensor, ``[..., 1]`` per token,
            ``[K]`` per channel), float32.
        precision: int32 code of the precision that ran
            (:func:`decode_precision`): the FP8 format, or FP16 after a fallback.
        outlier_ratio: the block measure (default) or ``max_k A_k /
            median_k A_k`` (``outlier_measure``; module docstring).
        clip: the fresh clip statistic of this call (before any EMA).
        ema: the updated :class:`EmaState` (``None`` without ``ema_decay``).
        block_scale: the 1x128 block scales ``[..., ceil(K / 128)]`` the
            block-scaled GEMM ran with (module docstring), ``None`` off that path.
    """

    scale: jax.Array
    precision: jax.Array
    outlier_ratio: jax.Array
    clip: jax.Array
    ema: EmaState | None = None
    block_scale: jax.Array | None = None

    @property
    def fell_back(self) -> jax.Array:
        """Whether the FP16 fallback ran (bool array)."""
        return self.precision == precision_code(QuantFormat.FP16)


def describe_meta(meta: DynamicMeta, name: str = "activation") -> str:
    """One line for humans from a concrete :class:`DynamicMeta`."""
    s = np.asarray(meta.scale, np.float32)
    return (
        f"{name}: ran {decode_precision(meta.precision)}, outlier_ratio "
        f"{float(meta.outlier_ratio):.3g}, scale min {s.min():.3g} max {s.max():.3g} "
        f"({s.size} scale{'s' if s.size != 1 else ''})"
    )


# ----------------------------------------------------------------- statistics


def _check_activation(x, name: str = "activation") -> None:
    dt = getattr(x, "dtype", None)
    if dt is None or np.dtype(dt) not in FLOAT_DTYPES or len(x.shape) < 2:
        raise ValueError(
            f"{name}: expected a float32/bfloat16/float16 array of rank >= 2 ([..., tokens?, K]), "
            f"got {type(x).__name__} {getattr(x, 'shape', '')} {dt}"
        )


def abs_percentile(a: jax.Array, p: float) -> jax.Array:
    """Exact ``p``-th percentile of ``|a|`` along the last axis (numpy's linear rule).

    ``a[..., n] -> [...]`` in float32, selected with ``lax.top_k`` of the
    ``n - floor((n - 1) p / 100)`` largest magnitudes (``p`` is static).
    """
    if not 0.0 < p <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {p}")
    mag = jnp.abs(a.astype(jnp.float32))
    n = mag.shape[-1]
    h = (n - 1) * (p / 100.0)
    lo = math.floor(h)
    frac = np.float32(h - lo)
    k = n - lo  # the largest k hold ascending indices lo..n-1
    top, _ = lax.top_k(mag, k)  # descending: top[..., k - 1] is ascending index lo
    a_lo = top[..., k - 1]
    a_hi = top[..., k - 2] if k >= 2 else a_lo
    return a_lo + frac * (a_hi - a_lo)


def _groups(x: jax.Array, granularity: str) -> jax.Array:
    """``x`` as float32 ``[G, n]``: one row per group sharing a scale."""
    xf = x.astype(jnp.float32)
    k = x.shape[-1]
    if granularity == "per_tensor":
        return jnp.reshape(xf, (1, -1))
    if granularity == "per_token":
        return jnp.reshape(xf, (-1, k))
    return jnp.reshape(xf, (-1, k)).T  # per_channel: [K, tokens]


def _ungroup_scale(s: jax.Array, x_shape, granularity: str) -> jax.Array:
    """Group scales ``[G]`` -> the shape that broadcasts against ``x``."""
    if granularity == "per_tensor":
        return jnp.reshape(s, ())
    if granularity == "per_token":
        return jnp.reshape(s, (*x_shape[:-1], 1))
    return jnp.reshape(s, (x_shape[-1],))


def _qdq_groups(g: jax.Array, s: jax.Array, fmt: QuantFormat) -> jax.Array:
    """Float32 ``dq(q(g; s))`` for groups ``[G, n]`` and scales ``[G, 1]``."""
    v = jnp.clip(g * (1.0 / s), -fmt.max_value, fmt.max_value)
    return v.astype(fmt.element_dtype).astype(jnp.float32) * s


def _scale_of(clip: jax.Array, fmt: QuantFormat) -> jax.Array:
    s = clip / np.float32(fmt.max_value)
    s = jnp.where(clip > 0, s, np.float32(1.0))
    return jnp.where(jnp.isfinite(clip), s, np.float32(np.nan))


def _mse_clip(
    g: jax.Array, amax: jax.Array, cfg: DynamicQuantConfig, w_kn: jax.Array | None = None
) -> jax.Array:
    """Per-group clip ``r* amax`` minimizing the squared error over ``cfg.mse_grid``.

    The error is the activation's, or with ``w_kn`` (the dequantized weight
    ``[K, N]``, per-token and per-tensor groups) the operator output's.
    """
    fmt = cfg.precision
    ratios = jnp.asarray(cfg.mse_grid, jnp.float32)
    k = w_kn.shape[0] if w_kn is not None else None

    def err(r):
        s = _scale_of(r * amax, fmt)[:, None]
        e = g - _qdq_groups(g, s, fmt)
        if w_kn is None:
            return jnp.sum(jnp.square(e), axis=1)
        out = jnp.reshape(e, (-1, k)) @ w_kn  # [tokens, N]
        return jnp.sum(jnp.reshape(jnp.square(out), (g.shape[0], -1)), axis=1)

    errs = lax.map(err, ratios, batch_size=min(cfg.mse_chunk, len(cfg.mse_grid)))  # [R, G]
    best = jnp.argmin(errs, axis=0)  # ties -> the first ratio, i.e. 1.0 (absmax) first
    return ratios[best] * amax


def clip_values(x: jax.Array, cfg: DynamicQuantConfig, weight=None) -> jax.Array:
    """The per-group clip statistic ``c_g`` (module docstring), float32 ``[G]``.

    ``weight`` (``[N, K]``, QuantizedTensor or float) makes ``mse_optimal``
    minimize the output's error for per-token and per-tensor groups.
    """
    g = _groups(x, cfg.granularity)
    amax = jnp.max(jnp.abs(g), axis=1)
    if cfg.calibration_mode == "absmax":
        return amax
    if cfg.calibration_mode == "percentile":
        c = abs_percentile(g, float(cfg.percentile))
        return jnp.where(jnp.isfinite(amax), c, amax)  # a NaN/Inf group keeps its NaN scale
    w_kn = None
    if weight is not None and cfg.granularity != "per_channel":
        if isinstance(weight, QuantizedTensor):
            from jax_bq.ops import dequantize

            weight = dequantize(weight, jnp.float32)
        w_kn = jnp.asarray(weight, jnp.float32).T
    return _mse_clip(g, amax, cfg, w_kn)


def outlier_ratio(x: jax.Array) -> jax.Array:
    """``max_k A_k / median_k A_k`` with ``A_k`` the finite amax of channel ``k`` (float32).

    0 for an all-zero activation; channels whose median amax is 0 make it
    ``max / tiny`` (huge), which is what a few live channels among dead ones are.
    """
    a = jnp.abs(jnp.reshape(x.astype(jnp.float32), (-1, x.shape[-1])))
    ch = jnp.max(jnp.where(jnp.isfinite(a), a, 0.0), axis=0)
    med = jnp.median(ch)
    return jnp.max(ch) / jnp.maximum(med, _TINY)


def block_amax(x: jax.Array) -> jax.Array:
    """Finite amax of every 1x128 block along K: ``[..., K] -> [..., ceil(K / 128)]`` float32.

    ``a[..., b] = max_(k in b) |x[..., k]|`` over the finite elements (0 for
    a block with none; a ragged last block is padded with zeros). One
    reduction over ``x``.
    """
    k = int(x.shape[-1])
    nb = -(-k // BLOCK)
    a = jnp.abs(x.astype(jnp.float32))
    a = jnp.where(jnp.isfinite(a), a, np.float32(0.0))
    if nb * BLOCK != k:
        a = jnp.pad(a, [(0, 0)] * (x.ndim - 1) + [(0, nb * BLOCK - k)])
    return jnp.max(jnp.reshape(a, (*x.shape[:-1], nb, BLOCK)), axis=-1)


def block_amax_of_scales(block_scales: jax.Array, fmt: QuantFormat) -> jax.Array:
    """Block amaxes read back from the absmax 1x128 block scales of :func:`jax_bq.quantize`.

    ``s = RN(a / MAX)``, so ``s * MAX`` is ``a`` within one float32 rounding
    (relative error ``<= 2^-23``). Blocks whose scale is exactly 1 (the
    all-zero convention; a real block of amax ``MAX`` within that rounding
    is indistinguishable and is counted as zero) and NaN scales (a NaN/Inf in
    the block) give 0, as :func:`block_amax` does for all-zero and all-non-
    finite blocks. A tiny elementwise op on ``[..., K / 128]``.
    """
    s = block_scales.astype(jnp.float32)
    ok = (s != np.float32(1.0)) & jnp.isfinite(s)
    return jnp.where(ok, s * np.float32(fmt.max_value), np.float32(0.0))


def block_outlier_ratio(amax: jax.Array) -> jax.Array:
    r"""The hot-path outlier measure: ``max_j a_j / exp(mean_(j: a_j > 0) log a_j)``.

    ``a`` are the 1x128 block amaxes (:func:`block_amax`), all tokens and
    blocks together: how far the loudest block sits above the geometric mean
    of the live blocks. The geometric mean is the robust "typical" value: a
    fraction ``f`` of blocks raised by a gain ``G`` moves it by ``G^f`` only,
    so the ratio is ``~G^(1 - f)`` times the clean ratio (about 2 for Gaussian
    activations). It sees a loud channel only against blocks that do not hold
    one: outlier channels in every block (``K <= 128``, or a few channels
    spread over all blocks) leave it near its clean value; the exact
    per-channel measure is :func:`outlier_ratio` (``outlier_measure=
    "channel"``, :class:`ActivationStats`). 0 when every block is zero.
    One fused reduction over ``[..., K / 128]``.
    """
    a = jnp.reshape(amax.astype(jnp.float32), (-1,))
    live = a > 0
    logs = jnp.where(live, jnp.log(jnp.where(live, a, np.float32(1.0))), np.float32(0.0))
    zero = np.float32(0.0)

    def combine(p, q):  # one variadic reduce: (max, sum of logs, live count) in one kernel
        return lax.max(p[0], q[0]), p[1] + q[1], p[2] + q[2]

    top, logs, n = lax.reduce(
        (a, logs, live.astype(jnp.float32)), (zero, zero, zero), combine, (0,)
    )
    typical = jnp.exp(logs / jnp.maximum(n, np.float32(1.0)))
    return jnp.where(n > 0, top / typical, zero)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class ActivationStats:
    """Summary statistics of one activation, computed on device (:func:`activation_stats`).

    Attributes (float32 arrays): ``absmax`` (finite elements), ``mean``,
    ``std`` (of the finite elements, one fused pass of sum and sum of
    squares), ``p99`` and ``p999`` (exact percentiles of ``|x|``, top-k),
    ``channel_amax_max`` and ``channel_amax_median`` (over the per-channel
    amaxes ``A_k``); ``shape`` is static.
    """

    absmax: jax.Array
    mean: jax.Array
    std: jax.Array
    p99: jax.Array
    p999: jax.Array
    channel_amax_max: jax.Array
    channel_amax_median: jax.Array
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})

    @property
    def outlier_ratio(self) -> jax.Array:
        """``max_k A_k / median_k A_k``: how far the loudest channel sits above a typical one."""
        return self.channel_amax_max / jnp.maximum(self.channel_amax_median, _TINY)

    @property
    def dynamic_range(self) -> jax.Array:
        """``log2(absmax / p99)``: octaves between the bulk (99 % of |x|) and the peak."""
        return jnp.log2(jnp.maximum(self.absmax, _TINY) / jnp.maximum(self.p99, _TINY))

    def summary(self) -> str:
        """One line for humans (concrete stats only)."""
        return (
            f"shape {self.shape}: absmax {float(self.absmax):.4g}, mean {float(self.mean):.4g}, "
            f"std {float(self.std):.4g}, p99 {float(self.p99):.4g}, p99.9 {float(self.p999):.4g}, "
            f"outlier_ratio {float(self.outlier_ratio):.4g}, "
            f"dynamic_range {float(self.dynamic_range):.3g} octaves"
        )


def activation_stats(x: jax.Array) -> ActivationStats:
    """:class:`ActivationStats` of ``x[..., K]``, jit/vmap friendly."""
    _check_activation(x)
    xf = x.astype(jnp.float32)
    fin = jnp.isfinite(xf)
    a = jnp.where(fin, jnp.abs(xf), 0.0)
    z = jnp.where(fin, xf, 0.0)
    n = jnp.maximum(jnp.sum(fin, dtype=jnp.float32), 1.0)
    mean = jnp.sum(z) / n
    var = jnp.maximum(jnp.sum(z * z) / n - mean * mean, 0.0)
    flat = jnp.reshape(a, (-1,))
    ch = jnp.max(jnp.reshape(a, (-1, x.shape[-1])), axis=0)
    return ActivationStats(
        absmax=jnp.max(a),
        mean=mean,
        std=jnp.sqrt(var),
        p99=abs_percentile(flat, 99.0),
        p999=abs_percentile(flat, 99.9),
        channel_amax_max=jnp.max(ch),
        channel_amax_median=jnp.median(ch),
        shape=tuple(int(d) for d in x.shape),
    )


# ------------------------------------------------------------------ quantize


def _ema_update(ema: EmaState | None, v: jax.Array, decay: float) -> EmaState:
    if ema is None:
        ema = EmaState.zeros(v.shape)
    first = ema.count == 0
    new = jnp.where(first, v, decay * ema.value + (1.0 - decay) * v)
    return EmaState(new.astype(jnp.float32), ema.count + 1)


def _codes(x: jax.Array, s: jax.Array, fmt: QuantFormat) -> jax.Array:
    """FP8 codes ``RNE(clip(x * (1 / s), +-MAX))``; NaN code for non-finite x or s."""
    xf = x.astype(jnp.float32)
    v = jnp.clip(xf * (1.0 / s), -fmt.max_value, fmt.max_value)
    codes = lax.bitcast_convert_type(v.astype(fmt.element_dtype), jnp.uint8)
    ok = jnp.isfinite(xf) & jnp.isfinite(s)
    codes = jnp.where(ok, codes, jnp.uint8(_NAN_CODE[fmt]))
    return lax.bitcast_convert_type(codes, fmt.data_dtype)


def _as_qtensor(x, codes, scale, cfg: DynamicQuantConfig) -> QuantizedTensor:
    per_tensor = cfg.granularity == "per_tensor"
    scales = jnp.reshape(scale, (1,) * x.ndim) if per_tensor else scale
    return QuantizedTensor(
        data=codes,
        scales=scales.astype(jnp.float32),
        tensor_scale=None,
        format=cfg.precision,
        granularity=Granularity.PER_TENSOR if per_tensor else Granularity.PER_CHANNEL,
        block=(),
        axis=-1,
        axis_len=int(x.shape[-1]),
        rank=x.ndim,
        dtype=np.dtype(x.dtype),
    )


def _check_weight(weight, k: int, name: str) -> None:
    if isinstance(weight, QuantizedTensor):
        if weight.ndim != 2 or weight.shape[1] != k:
            raise ValueError(f"{name}: weight must be [N, K={k}], got {weight.shape}")
        return
    shape = getattr(weight, "shape", None)
    if shape is None or len(shape) != 2 or shape[1] != k:
        raise ValueError(
            f"{name}: weight must be a QuantizedTensor or float array [N, K={k}], got "
            f"{type(weight).__name__} {shape}"
        )


def _check_call(x, weight, fallback_weight, cfg, out_dtype, name: str) -> np.dtype:
    """Validates a :func:`quantize_dynamic` call; returns the output dtype."""
    if not isinstance(cfg, DynamicQuantConfig):
        raise ValueError(f"{name}: config must be a DynamicQuantConfig, got {cfg!r}")
    _check_activation(x, name)
    k = int(x.shape[-1])
    if weight is not None:
        _check_weight(weight, k, name)
    out_dtype = np.dtype(out_dtype or x.dtype)
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: out_dtype must be float32/bfloat16/float16, got {out_dtype}")
    if fallback_weight is not None:
        if weight is None or isinstance(fallback_weight, QuantizedTensor):
            raise ValueError(f"{name}: fallback_weight needs a weight and must be a float array")
        _check_weight(fallback_weight, k, name)
        if tuple(fallback_weight.shape) != tuple(weight.shape):
            raise ValueError(
                f"{name}: fallback_weight {fallback_weight.shape} != weight {weight.shape}"
            )
    needs_copy = cfg.fallback_to_fp16 and cfg.fallback_weight == "fp16"
    if needs_copy and isinstance(weight, QuantizedTensor) and fallback_weight is None:
        raise ValueError(
            f"{name}: config.fallback_weight='fp16' runs the FP16 branch on a float16 copy of "
            "the weight: pass fallback_weight (apply_strategy stores it as fallback_kernel)"
        )
    return out_dtype


def _clip_and_ema(x, cfg: DynamicQuantConfig, weight, ema):
    """The clip statistic ``[G]`` after EMA smoothing, and the new :class:`EmaState`."""
    clip = clip_values(x, cfg, weight)  # [G]
    if cfg.ema_decay is None:
        return clip, None
    decay = float(cfg.ema_decay)
    if cfg.granularity == "per_token":
        amax = jnp.max(jnp.abs(_groups(x, "per_token")), axis=1)
        ratio = jnp.mean(jnp.where(amax > 0, clip / jnp.maximum(amax, _TINY), 1.0))
        new_ema = _ema_update(ema, ratio, decay)
        return amax * new_ema.value, new_ema
    v = jnp.reshape(clip, ()) if cfg.granularity == "per_tensor" else clip
    new_ema = _ema_update(ema, v, decay)  # value: [] or [K]
    return jnp.where(jnp.isfinite(clip), jnp.reshape(new_ema.value, clip.shape), clip), new_ema


BLOCK = 128  #: K-extent of the block-scaled GEMM's activation and weight blocks


def is_block_weight(weight) -> bool:
    """Whether ``weight`` is an FP8 ``[N, K]`` QuantizedTensor blocked by 128 along K.

    Those are the weights of cuBLASLt's block-scaled FP8 GEMM: 128x128 tiles
    (``tile_2d``) or 1x128 blocks (``per_block`` of 128); a dynamic
    ``per_token``/``per_tensor`` call with one takes the 1x128 activation path.
    """
    if not isinstance(weight, QuantizedTensor) or weight.format not in _ACT_FORMATS:
        return False
    if weight.ndim != 2 or weight.axis != -1:
        return False
    g, b = weight.granularity, tuple(weight.block)
    return (g is Granularity.TILE_2D and b == (BLOCK, BLOCK)) or (
        g is Granularity.PER_BLOCK and b == (BLOCK,)
    )


def block_weight(weight: QuantizedTensor) -> QuantizedTensor:
    """An FP8 weight re-expressed blocked by 128 along K, every dequantized value unchanged.

    ``w[N, K]`` per tensor (scale ``s``) becomes 128x128 tiles whose scales
    are all ``s``; per channel (``s_n``) becomes 1x128 blocks with
    ``s[n, b] = s_n``. The codes are the same array, so ``dequantize`` gives
    the same values bit for bit; only the GEMM the weight can meet changes
    (:func:`is_block_weight`). Already-blocked weights are returned as is.

    Raises:
        ValueError: not an FP8 ``[N, K]`` weight scaled per tensor or per channel.
    """
    if is_block_weight(weight):
        return weight
    ok = (
        isinstance(weight, QuantizedTensor)
        and weight.format in _ACT_FORMATS
        and weight.ndim == 2
        and weight.axis == -1
        and weight.granularity in (Granularity.PER_TENSOR, Granularity.PER_CHANNEL)
    )
    if not ok:
        desc = (
            f"{weight.format.value} {weight.granularity.value} {weight.block} shape "
            f"{weight.shape} axis {weight.axis}"
            if isinstance(weight, QuantizedTensor)
            else f"{type(weight).__name__} {getattr(weight, 'shape', '')}"
        )
        raise ValueError(
            "block_weight needs an FP8 [N, K] QuantizedTensor (axis=-1) scaled per tensor "
            f"or per channel, got {desc}"
        )
    n, k = weight.shape
    nb = -(-k // BLOCK)
    s = weight.scales.astype(jnp.float32)
    if weight.granularity is Granularity.PER_TENSOR:
        scales = jnp.broadcast_to(jnp.reshape(s, (1, 1)), (-(-n // BLOCK), nb))
        gran, block = Granularity.TILE_2D, (BLOCK, BLOCK)
    else:
        scales = jnp.broadcast_to(jnp.reshape(s, (n, 1)), (n, nb))
        gran, block = Granularity.PER_BLOCK, (BLOCK,)
    return dataclasses.replace(weight, scales=scales, granularity=gran, block=block)


def _block_path(weight, cfg: DynamicQuantConfig) -> bool:
    return cfg.granularity != "per_channel" and is_block_weight(weight)


def _block_activation(x, scale, codes, fmt: QuantFormat, block_scales=None) -> QuantizedTensor:
    """FP8 codes of ``x`` with 1x128 block scales (given, or ``scale`` replicated)."""
    k = int(x.shape[-1])
    if block_scales is None:
        nb = -(-k // BLOCK)
        s = jnp.reshape(scale, (1,) * x.ndim) if jnp.ndim(scale) == 0 else scale
        block_scales = jnp.broadcast_to(s, (*x.shape[:-1], nb))
    return QuantizedTensor(
        data=codes,
        scales=block_scales.astype(jnp.float32),
        tensor_scale=None,
        format=fmt,
        granularity=Granularity.PER_BLOCK,
        block=(BLOCK,),
        axis=-1,
        axis_len=k,
        rank=x.ndim,
        dtype=np.dtype(x.dtype),
    )


def _token_scale_of_blocks(bs, like, clip, x_shape, fmt: QuantFormat) -> jax.Array:
    """The per-token scale ``RN(amax_t / MAX)`` from the row's 1x128 block scales ``bs``.

    ``RN(a / MAX)`` is monotone in ``a``, so the largest block scale is the
    token's scale bit for bit, except that an all-zero block has scale 1 by
    convention: when ``amax_t < MAX`` (``clip``) no real block reaches 1, so
    blocks with scale 1 are the zero blocks and are left out; an all-zero
    token keeps 1. A NaN block scale (a NaN/Inf in the block) makes the
    token's NaN, which XLA's max would not guarantee. The result has the
    shape of ``like`` (the per-token scale computed from ``clip``).
    """
    one = np.float32(1.0)
    c = jnp.reshape(clip, (*x_shape[:-1], 1))
    m_all = jnp.max(bs, axis=-1, keepdims=True)
    m_real = jnp.max(jnp.where(bs == one, np.float32(0.0), bs), axis=-1, keepdims=True)
    s = jnp.where(c >= np.float32(fmt.max_value), m_all, jnp.where(m_real > 0, m_real, one))
    bad = jnp.any(jnp.isnan(bs), axis=-1, keepdims=True)
    return jnp.reshape(jnp.where(bad, np.float32(np.nan), s), jnp.shape(like))


def _fp8_block_branch(x, clip, weight, cfg: DynamicQuantConfig, exact_ok: bool, out_dtype):
    """``(scale, block scales, branch)`` of the block-scaled GEMM path (module docstring)."""
    from jax_bq.matmul import qmatmul
    from jax_bq.ops import quantize

    fmt = cfg.precision
    scale = _ungroup_scale(_scale_of(clip, fmt), x.shape, cfg.granularity)
    absmax = exact_ok and cfg.calibration_mode == "absmax"
    if absmax and cfg.granularity == "per_token":
        qx = quantize(x, fmt, block_size=BLOCK)  # true 1x128 blocks, the pinned kernel
        scale = _token_scale_of_blocks(qx.scales, scale, clip, x.shape, fmt)
    elif absmax:  # per tensor: the pinned kernel's codes and scale, replicated over blocks
        q = quantize(x, fmt, granularity="per_tensor")
        scale = jnp.reshape(q.scales, ())
        qx = _block_activation(x, scale, q.data, fmt)
    else:
        qx = _block_activation(x, scale, _codes(x, scale, fmt), fmt)

    def branch(x):
        return qmatmul(qx, weight, out_dtype=out_dtype)

    return scale, qx.scales, absmax and cfg.granularity == "per_token", branch


def _fp8_branch(x, clip, weight, cfg: DynamicQuantConfig, exact_ok: bool, out_dtype):
    """``(scale, branch)``: the reported scales and ``x -> result`` of the FP8 path."""
    fmt = cfg.precision
    if exact_ok and cfg.calibration_mode == "absmax" and cfg.granularity != "per_channel":
        # The pinned numerics: jax_bq.quantize's kernel, bit for bit (its scales reported).
        from jax_bq.ops import quantize

        gran = "per_tensor" if cfg.granularity == "per_tensor" else "per_channel"
        exact = quantize(x, fmt, granularity=gran)
        scale = jnp.reshape(exact.scales, ()) if gran == "per_tensor" else exact.scales
    else:
        exact = None
        scale = _ungroup_scale(_scale_of(clip, fmt), x.shape, cfg.granularity)

    def branch(x):
        qx = exact
        if qx is None:
            codes = _codes(x, scale, fmt)
            if cfg.granularity == "per_channel" or not isinstance(weight, QuantizedTensor):
                x_hat = codes.astype(jnp.float32) * scale
                return _finish(x_hat.astype(x.dtype), weight, out_dtype, "bf16")
            qx = _as_qtensor(x, codes, scale, cfg)
        if isinstance(weight, QuantizedTensor):
            from jax_bq.matmul import qmatmul

            return qmatmul(qx, weight, out_dtype=out_dtype)
        from jax_bq.ops import dequantize

        return _finish(dequantize(qx, jnp.float32).astype(x.dtype), weight, out_dtype, "bf16")

    return scale, branch


def _fp16_branch(weight, fallback_weight, out_dtype):
    """``x -> result`` of the FP16 fallback (module docstring)."""
    if fallback_weight is None:  # weight-only rung on the stored (quantized) weight
        return lambda x: _finish(x.astype(jnp.float16), weight, out_dtype, "fp16")

    def branch(x):  # float16 operands, float32 accumulation
        w16 = fallback_weight.astype(jnp.float16)
        y = jnp.einsum(
            "...k,nk->...n", x.astype(jnp.float16), w16, preferred_element_type=jnp.float32
        )
        return y.astype(out_dtype)

    return branch


def quantize_dynamic(
    activation: jax.Array,
    weight=None,
    *,
    operator_name: str = "activation",
    config: DynamicQuantConfig | None = None,
    ema: EmaState | None = None,
    out_dtype=None,
    fallback_weight: jax.Array | None = None,
) -> tuple[jax.Array, DynamicMeta]:
    r"""Quantizes ``activation`` with scales computed now, optionally multiplying by ``weight``.

    With ``s`` from the clip statistic (module docstring) and ``MAX`` of the
    FP8 format, ``x_hat = decode(RNE(clip(x / s, -MAX, MAX))) * s``. Without
    ``weight`` the result is ``x_hat`` (in ``x.dtype``); with ``weight``
    ``[N, K]`` it is ``x_hat @ dq(W)^T`` in ``out_dtype``: per-token and
    per-tensor codes and scales go to :func:`jax_bq.qmatmul` as pre-quantized
    activations (the W8A8 GEMM where the device has one; with a weight
    blocked by 128 along K as 1x128 block scales, for the block-scaled GEMM:
    module docstring, :func:`explain_dynamic`), per-channel
    ``x_hat`` to the weight-only path; a float ``weight`` gives
    ``x_hat @ W^T`` in float32 (activation-only quantization).

    If ``config.fallback_to_fp16`` and ``log10(outlier_ratio) >
    config.outlier_threshold`` the FP16 branch runs instead (``lax.cond``):
    ``fp16(x) @ fp16(fallback_weight)^T`` with float32 accumulation when
    ``fallback_weight`` is given (``config.fallback_weight="fp16"``), else
    ``qmatmul(fp16(x), weight, act_format="fp16")`` (the weight-only rung).

    Args:
        activation: float array ``[..., K]`` of rank >= 2.
        weight: ``None``, a :class:`~jax_bq.QuantizedTensor` ``[N, K]`` or a
            float ``[N, K]`` array.
        operator_name: used in error messages.
        config: a :class:`DynamicQuantConfig` (default: FP8 E4M3 per token, absmax).
        ema: the :class:`EmaState` from the previous step when
            ``config.ema_decay`` is set (``None``: first step).
        out_dtype: result dtype with a weight (default ``activation.dtype``).
        fallback_weight: float ``[N, K]``, the 16-bit weight of the FP16 branch.

    Returns:
        ``(result, DynamicMeta)``.

    Raises:
        ValueError: bad shapes, dtypes or a missing ``fallback_weight``
            (naming ``operator_name``).
    """
    cfg = DynamicQuantConfig() if config is None else config
    x = activation
    out_dtype = _check_call(x, weight, fallback_weight, cfg, out_dtype, operator_name)
    clip, new_ema = _clip_and_ema(x, cfg, weight, ema)
    block_scale, true_blocks = None, False
    if _block_path(weight, cfg):
        scale, block_scale, true_blocks, fp8 = _fp8_block_branch(
            x, clip, weight, cfg, new_ema is None, out_dtype
        )
    else:
        scale, fp8 = _fp8_branch(x, clip, weight, cfg, new_ema is None, out_dtype)
    if cfg.outlier_measure == "channel":
        ratio = outlier_ratio(x)
    elif true_blocks:  # the 1x128 absmax scales of the quantize call: no pass over x
        ratio = block_outlier_ratio(block_amax_of_scales(block_scale, cfg.precision))
    else:
        ratio = block_outlier_ratio(block_amax(x))
    fire = ratio > np.float32(10.0**cfg.outlier_threshold)
    fp16 = _fp16_branch(weight, fallback_weight, out_dtype)
    if not cfg.fallback_to_fp16:
        result, fire = fp8(x), jnp.zeros((), bool)
    elif cfg.fallback_mode == "cond":
        result = lax.cond(fire, fp16, fp8, x)
    else:  # "select": both computed, no control flow
        result = jnp.where(fire, fp16(x), fp8(x))
    code = jnp.where(fire, precision_code(QuantFormat.FP16), precision_code(cfg.precision))
    clip = _ungroup_scale(clip, x.shape, cfg.granularity)
    meta = DynamicMeta(scale, code.astype(jnp.int32), ratio, clip, new_ema, block_scale)
    return result, meta


def _act_description(cfg: DynamicQuantConfig, block: bool) -> str:
    fmt = cfg.precision.value
    if not block:
        return f"{fmt} {cfg.granularity} scales"
    if cfg.granularity == "per_token" and cfg.calibration_mode == "absmax" and not cfg.ema_decay:
        return f"{fmt} 1x128 blocks (absmax per block)"
    return f"{fmt} {cfg.granularity} scales replicated over 1x128 blocks"


def explain_dynamic(
    activation,
    weight=None,
    *,
    config: DynamicQuantConfig | None = None,
    out_dtype=None,
    device=None,
) -> str:
    """Which path ``quantize_dynamic(activation, weight, config=config)`` takes, and why.

    One line per branch: the FP8 branch (how the activation is scaled and
    :func:`jax_bq.plan`'s GEMM path for those operands on ``device``: the
    block-scaled GEMM, the outer-vector one, or a fallback with its reason)
    and, when ``config.fallback_to_fp16``, the FP16 branch and how it is
    selected. ``activation`` may be an array or a ``jax.ShapeDtypeStruct``.

    Raises:
        ValueError: what :func:`quantize_dynamic` rejects for these operands.
    """
    from jax_bq.matmul import plan
    from jax_bq.ops import quantize

    cfg = DynamicQuantConfig() if config is None else config
    x = jax.ShapeDtypeStruct(tuple(activation.shape), activation.dtype)
    out_dtype = _check_call(
        x,
        weight,
        None,
        dataclasses.replace(cfg, fallback_weight="quantized"),
        out_dtype,
        "explain_dynamic",
    )
    kw = {"out_dtype": out_dtype, "device": device}
    head = f"dynamic {cfg.describe()}"
    if weight is None:
        return f"{head}: no weight, returns x_hat (quantize-dequantize in jnp)"
    if not isinstance(weight, QuantizedTensor):
        return f"{head}: float weight, x_hat @ W^T in float32 (activation-only quantization)"
    if cfg.granularity == "per_channel":
        fp8 = "fp8: per_channel activations are simulated (x_hat in float), then " + str(
            plan(x, weight, act_format="bf16", **kw)
        )
    else:
        block = _block_path(weight, cfg)
        if block:
            qx = jax.eval_shape(lambda a: quantize(a, cfg.precision, block_size=BLOCK), x)
        else:
            gran = "per_tensor" if cfg.granularity == "per_tensor" else "per_channel"
            qx = jax.eval_shape(lambda a: quantize(a, cfg.precision, granularity=gran), x)
        why = (
            "the weight is blocked by 128 along K"
            if block
            else (
                f"the weight is {weight.granularity.value}"
                + ("; jax_bq.dynamic.block_weight makes it blocked" if cfg.block_gemm else "")
            )
        )
        fp8 = f"fp8: activations {_act_description(cfg, block)} ({why}); {plan(qx, weight, **kw)}"
    lines = [head, "  " + fp8]
    if cfg.fallback_to_fp16:
        sel = "lax.cond" if cfg.fallback_mode == "cond" else "jnp.where select (both computed)"
        if cfg.fallback_weight == "fp16":
            fb = "fp16(x) @ fp16 weight copy^T, float32 accumulation (XLA dot)"
        else:
            fb = str(plan(x, weight, act_format="fp16", **kw))
        lines.append(
            f"  fp16 fallback when log10(outlier_ratio) > {cfg.outlier_threshold:g}, "
            f"chosen by {sel}: {fb}"
        )
    return "\n".join(lines)


def _finish(x_hat, weight, out_dtype, weight_only: str):
    """``x_hat`` (no weight), or its product with ``weight`` ``[N, K]``, in ``out_dtype``."""
    if weight is None:
        return x_hat.astype(out_dtype) if x_hat.dtype != out_dtype else x_hat
    if isinstance(weight, QuantizedTensor):
        from jax_bq.matmul import qmatmul

        return qmatmul(x_hat, weight, out_dtype=out_dtype, act_format=weight_only)
    y = jnp.einsum("...k,nk->...n", x_hat.astype(jnp.float32), weight.astype(jnp.float32))
    return y.astype(out_dtype)
