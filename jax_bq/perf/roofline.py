r"""Roofline models of jax_bq's operators: time = latency + max(compute, memory).

Every operator is an :class:`OpCost` (FLOPs, bytes moved through DRAM, the
precision of its tensor-core work, its efficiency key) and is priced by
:func:`predict` against an :class:`~jax_bq.perf.hardware.Effective` device::

    t_mem  = bytes / (BW * e_mem)
    t_l2   = l2_bytes / (BW * e_l2)                                        # L2 re-reads
    t_comp = min over tile shapes of
             waves * (tile_flops / (peak_prec / SMs * e_comp) + t_tile)    # tiled GEMMs
           = flops / (peak_prec * e_comp)                                  # otherwise
    t      = t_lat + max(t_comp, t_mem) + t_splitk   (tensor-core kernels, copies)
    t      = t_lat + max(t_mem + t_l2, t_chain) (software-decode kernels: W8A16, W4A16)

``waves = ceil(ceil(M/tm) * ceil(N/tn) / SMs)`` charges the last partial wave
of output tiles (wave quantization), ``t_tile`` the per-tile prologue and
epilogue; the library picks its tile shape per problem (cuBLAS heuristics, XLA
autotuning), so the model takes the best of :data:`TILE_SHAPES` (a 4096x1024
FP8 GEMM runs one wave of 128x256 tiles on 132 SMs, two of 128x128). With
fewer tiles than SMs (decode) K is split and the partial sums are reduced
after the main loop: ``t_splitk`` (fitted per key) is that pass, after the
overlapped compute/memory body. The weight-only kernels give each CTA ``R``
weight rows and all ``M x K`` activations, so the activations are read
``ceil(N / R)`` times, from L2 (:func:`weight_only_config` mirrors the
kernels' launch choice); ``e_l2`` (fitted) is that L2 read rate as a multiple
of the DRAM rate ``BW``. Their MMA work is issued by a few warps per SM, each
walking K in series, so instead of a FLOP rate they are priced by ``t_chain``
(:func:`chain_s`): waves of resident CTAs (registers and shared memory from
``ptxas``) times K steps times (``t_unit`` + MMA tiles x ``t_mma``).
``e_mem``, ``e_comp``, ``e_l2``, ``t_tile``, ``t_unit``, ``t_mma`` and ``t_lat`` are the efficiency
factors of the operator's key, **fitted from measurements**
(:mod:`jax_bq.perf.fit`); without a measured profile the defaults below are
used and every estimate says so (``Estimate.fitted``).

Byte counts are exact for the formats (codes plus scales, DESIGN.md §2): e.g.
a GEMV ``1 x N x K`` with FP8 per-tensor weights moves ``N*K + 4`` weight bytes,
``2K`` activation bytes and ``2N`` output bytes; a GEMM does ``2*M*N*K`` FLOPs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from jax_bq.perf.hardware import Effective

#: Bits per element and scale bytes per element of each weight format / granularity.
#: (code bits, scale bytes per code) -- DESIGN.md §2 / jax_bq.formats.
FP8_SCALE_BYTES = {
    "per_tensor": lambda n, k: 4,
    "per_channel": lambda n, k: 4 * n,
    "per_block": lambda n, k: 4 * n * math.ceil(k / 128),
    "tile_2d": lambda n, k: 4 * math.ceil(n / 128) * math.ceil(k / 128),
}


def weight_bytes(fmt: str, n: int, k: int, granularity: str = "per_channel", block: int = 0) -> int:
    """DRAM bytes of an ``[N, K]`` weight in ``fmt`` (codes + scales).

    ``fmt``: ``bf16``, ``fp16``, ``fp8_e4m3``/``fp8_e5m2`` (with ``granularity``),
    ``mxfp8`` (E8M0 scale per 32), ``nvfp4`` (E4M3 per 16 + f32 tensor scale),
    ``mxfp4`` (E8M0 per 32), ``fp4`` (f32 scale per ``block``, default 32).
    """
    if n <= 0 or k <= 0:
        raise ValueError(f"weight shape must be positive, got [{n}, {k}]")
    e = n * k
    if fmt in ("bf16", "fp16"):
        return 2 * e
    if fmt in ("fp8_e4m3", "fp8_e5m2"):
        if granularity not in FP8_SCALE_BYTES:
            raise ValueError(f"unknown FP8 granularity {granularity!r}")
        return e + FP8_SCALE_BYTES[granularity](n, k)
    if fmt == "mxfp8":
        return e + n * math.ceil(k / 32)
    if fmt == "nvfp4":
        return e // 2 + n * math.ceil(k / 16) + 4
    if fmt == "mxfp4":
        return e // 2 + n * math.ceil(k / 32)
    if fmt == "fp4":
        b = block or 32
        return e // 2 + 4 * n * math.ceil(k / b)
    raise ValueError(f"unknown weight format {fmt!r}")


@dataclass(frozen=True)
class OpCost:
    """The work of one operator (one or more kernels).

    Attributes:
        name: label (``"ffn_in"``).
        key: efficiency key (``"gemm:cublaslt_fp8:tensor"``), see :data:`DEFAULT_EFFICIENCY`.
        flops: arithmetic (2 per multiply-add), unpadded.
        bytes: DRAM bytes read + written.
        precision: tensor-core precision of the FLOPs (``"bf16"``, ``"fp8"``...).
        kernels: kernel launches.
        tile: ``(M, N, K)`` for tiled GEMMs (wave quantization), else None.
        combine: ``"max"`` (compute and memory overlap), ``"sum"``, or ``"chain"``
            (memory streams overlapped with :attr:`chain`, the weight-only kernels).
        l2_bytes: bytes re-read from L2 (not DRAM), e.g. the activations every CTA of
            a weight-only kernel reads; priced at ``e_l2`` times the DRAM rate.
        chain: ``(ctas, ctas_per_sm, units, mma_tiles)`` of a kernel whose warps each run
            a serial chain of ``units`` K steps of ``mma_tiles`` MMA tiles each (the
            weight-only kernels, :func:`chain_s`); ``combine`` is then ``"chain"``.
    """

    name: str
    key: str
    flops: float
    bytes: float
    precision: str = "bf16"
    kernels: int = 1
    tile: tuple | None = None
    combine: str = "max"
    l2_bytes: float = 0.0
    chain: tuple | None = None


@dataclass(frozen=True)
class Estimate:
    """Predicted time of one :class:`OpCost` and what bounds it."""

    op: OpCost
    t_compute: float
    t_memory: float
    t_latency: float
    time_s: float
    fitted: bool

    @property
    def bound(self) -> str:
        """``"compute"``, ``"memory"`` or ``"latency"`` (the largest term)."""
        terms = {"compute": self.t_compute, "memory": self.t_memory, "latency": self.t_latency}
        return max(terms, key=terms.get)

    @property
    def us(self) -> float:
        """Predicted microseconds."""
        return self.time_s * 1e6


def _e(mem, comp, tile_us, splitk_us, lat_us, l2=4.0, unit_us=1.0, mma_us=0.1) -> dict:
    return {
        "unit_us": unit_us,
        "mma_us": mma_us,
        "mem": mem,
        "comp": comp,
        "tile_us": tile_us,
        "splitk_us": splitk_us,
        "lat_us": lat_us,
        "l2": l2,
    }


#: Efficiency factors used when no fitted profile has the key: rough Hopper-class
#: values (cuBLAS reaches ~70% of the dense bf16 peak and ~55-75% of FP8 on large
#: GEMMs, DESIGN.md §6; streaming kernels ~90% of the copy rate, gpu_quantize.md).
#: They are starting points for the fit, never a result: estimates made with
#: them are flagged ``fitted=False``.
DEFAULT_EFFICIENCY: dict[str, dict] = {
    "gemm:xla_bf16": _e(0.9, 0.75, 0.5, 2.0, 3.0),
    "gemm:cublaslt_fp8:tensor": _e(0.9, 0.7, 0.5, 2.0, 4.0),
    "gemm:cublaslt_fp8:outer": _e(0.7, 0.7, 0.5, 2.0, 6.0),
    "gemm:cublaslt_fp8:block": _e(0.8, 0.6, 0.5, 2.0, 6.0),
    "gemm:cublaslt_blockfp": _e(0.8, 0.6, 0.5, 2.0, 6.0),
    "gemm:w8a16": _e(0.8, 0.15, 0.0, 2.0, 6.0),
    "gemm:w4a16": _e(0.6, 0.15, 0.0, 2.0, 6.0),
    "gemm:w4a16:nv": _e(0.6, 0.15, 0.0, 2.0, 6.0),
    "quantize:fp8": _e(0.95, 1.0, 0.0, 2.0, 2.0),
    "quantize:nvfp4": _e(0.5, 1.0, 0.0, 2.0, 4.0),
    "quantize:mx": _e(0.95, 1.0, 0.0, 2.0, 2.0),
    "dequantize": _e(0.9, 1.0, 0.0, 2.0, 2.0),
    "convert_fp4": _e(0.8, 1.0, 0.0, 2.0, 2.0),
    "layernorm": _e(0.8, 1.0, 0.0, 2.0, 2.0),
    "elementwise": _e(0.7, 1.0, 0.0, 2.0, 1.5),
    "attention:xla": _e(0.6, 0.4, 0.0, 2.0, 10.0),
    "attention:cudnn": _e(0.8, 0.6, 0.0, 2.0, 5.0),
    "kv_read": _e(0.85, 1.0, 0.0, 2.0, 3.0),
}
#: L2 read rate as a multiple of the DRAM rate, for keys without a fitted ``l2``
#: (Hopper's L2 serves several times HBM's rate; a starting point, fitted per key).
DEFAULT_L2 = 4.0
EFFICIENCY_FIELDS = ("mem", "comp", "tile_us", "splitk_us", "lat_us", "l2", "unit_us", "mma_us")


def efficiency(eff: Effective, key: str) -> tuple[dict, bool]:
    """(factors of ``key``, whether they were fitted)."""
    if key in eff.efficiency:
        return {**DEFAULT_EFFICIENCY.get(key, {}), **eff.efficiency[key]}, True
    if key not in DEFAULT_EFFICIENCY:
        raise ValueError(f"no efficiency factors for {key!r}")
    return DEFAULT_EFFICIENCY[key], False


def predict(op: OpCost, eff: Effective, factors: dict | None = None) -> Estimate:
    """Predicted device time of ``op`` on ``eff`` (see the module docstring).

    ``factors`` overrides the efficiency factors (used by the fit).
    """
    fitted = True
    if factors is None:
        factors, fitted = efficiency(eff, op.key)
    e_m, e_c = factors["mem"], factors["comp"]
    peak = eff.peak.get(op.precision)
    if peak is None and op.flops:
        raise ValueError(f"{eff.spec.name} has no {op.precision} rate for {op.name}")
    t_mem = op.bytes / (eff.bw * e_m)
    if op.l2_bytes:
        t_mem += op.l2_bytes / (eff.bw * factors.get("l2", DEFAULT_L2))
    t_split = 0.0
    if op.chain is not None:
        t_comp = float(chain_s(op.chain, eff.spec.num_sms, factors["unit_us"], factors["mma_us"]))
    elif not op.flops:
        t_comp = 0.0
    elif op.tile is not None:
        t_comp, t_split = tiled_compute_s(
            op.tile, peak, eff.spec.num_sms, e_c, factors["tile_us"], factors.get("splitk_us", 0)
        )
        t_comp, t_split = float(t_comp), float(t_split)
    else:
        t_comp = op.flops / (peak * e_c)
    t_lat = (
        factors["lat_us"] * 1e-6
        if fitted
        else max(factors["lat_us"] * 1e-6, op.kernels * eff.launch_s)
    )
    body = t_comp + t_mem if op.combine == "sum" else max(t_comp, t_mem)  # "max", "chain"
    return Estimate(op, t_comp, t_mem, t_lat + t_split, t_lat + t_split + body, fitted)


def chain_s(chain: tuple, sms: int, unit_us, mma_us):
    r"""Seconds of the serial K chains of a kernel's CTAs, wave by wave.

    ``chain = (ctas, ctas_per_sm, units, mma_tiles)``:

    .. math:: t = \lceil ctas / (SMs \cdot ctas\_per\_sm) \rceil \cdot units
              \cdot (t_{unit} + mma\_tiles \cdot t_{mma})

    Each warp walks ``units`` 128-wide K steps in order: one load round trip
    (``t_unit``, the latency the loads of a step share) and the MMAs of its
    ``mma_tiles`` = 8-token tiles x 16-row tiles (``t_mma`` each, issued in
    series); the CTAs that fit on the SMs at once (``ctas_per_sm``, from
    registers and shared memory) run together, the rest in later waves.
    ``unit_us`` / ``mma_us`` may be numpy arrays (the fit's grids).
    """
    ctas, per_sm, units, mma_tiles = chain
    waves = math.ceil(ctas / (sms * per_sm))
    return waves * units * (np.asarray(unit_us) + mma_tiles * np.asarray(mma_us)) * 1e-6


#: Output tile shapes (tm, tn) a GEMM library chooses among on Hopper-class GPUs.
TILE_SHAPES = ((64, 128), (128, 128), (128, 256), (256, 128))


def tile_waves(m: int, n: int, tm: int, tn: int, k: int, sms: int) -> tuple[int, int]:
    """(waves of output tiles, K per tile).

    ``waves = ceil(tiles / SMs)``; with fewer tiles than SMs, K is split (split-K /
    stream-K, as cuBLAS does) over up to ``SMs // tiles`` SMs, in chunks of >= 512.
    """
    tiles = math.ceil(m / tm) * math.ceil(n / tn)
    split = max(1, min(sms // tiles, k // 512))
    return math.ceil(tiles / sms), math.ceil(k / split)


def tiled_compute_s(tile: tuple, peak: float, sms: int, e_comp, tile_us, splitk_us=0.0):
    """(compute, split-K reduction) seconds of a tiled GEMM ``tile = (M, N, K)``.

    Per tile shape of :data:`TILE_SHAPES`:
    ``c = waves * (2 * tm * tn * K_t / (peak / SMs * e_comp) + tile_us)`` and
    ``s = splitk_us`` if K is split (the partial sums' reduction / fix-up pass),
    else 0; the shape with the least ``c + s`` is taken, as the library would.
    ``e_comp``, ``tile_us`` and ``splitk_us`` may be numpy arrays (the fit's grids).
    """
    m, n, k = tile[0], tile[1], tile[-1]
    best_c = best_s = None
    for tm, tn in TILE_SHAPES:
        waves, k_tile = tile_waves(m, n, tm, tn, k, sms)
        c = waves * (2.0 * tm * tn * k_tile / (peak / sms * e_comp) + np.asarray(tile_us) * 1e-6)
        s = np.asarray(splitk_us) * 1e-6 * (k_tile < k)
        if best_c is None:
            best_c, best_s = c + 0 * s, s + 0 * c
        else:
            better = c + s < best_c + best_s
            best_c, best_s = np.where(better, c, best_c), np.where(better, s, best_s)
    return best_c, best_s


# --------------------------------------------------------------------------- GEMM paths

#: The qmatmul paths (jax_bq.matmul) plus XLA's own bf16 dot.
GEMM_PATHS = (
    "xla_bf16",
    "cublaslt_fp8",
    "w8a16",
    "w4a16",
    "fp4_via_fp8",
    "cublaslt_blockfp",
    "dequant_dot",
)

_SCALE_CLASS = {
    "SCALAR_32F": "tensor",
    "OUTER_VEC_32F": "outer",
    "VEC128_32F": "block",
    "BLK128x128_32F": "block",
}


def scale_class(w_granularity: str, act_granularity: str | None = None) -> str:
    """The cuBLASLt FP8 scale-mode class: ``tensor``, ``outer`` or ``block`` (as jax_bq.matmul)."""
    if w_granularity in ("per_block", "tile_2d"):
        return "block"
    if w_granularity == "per_tensor" and act_granularity in (None, "per_tensor"):
        return "tensor"
    return "outer"


def _check_mnk(m, n, k):
    for name, v in (("M", m), ("N", n), ("K", k)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"GEMM {name} must be a positive int, got {v!r}")


def quantize_cost(
    rows: int, cols: int, fmt: str, in_bytes: int = 2, name: str = "quantize"
) -> OpCost:
    """Quantize a ``[rows, cols]`` array of ``in_bytes`` floats to ``fmt``: read once, write codes.

    NVFP4 also reads the input a second time (its tensor-amax pass).
    """
    e = rows * cols
    reads = e * in_bytes * (2 if fmt == "nvfp4" else 1)
    key = {"nvfp4": "quantize:nvfp4", "mxfp8": "quantize:mx", "mxfp4": "quantize:mx"}.get(
        fmt, "quantize:fp8"
    )
    kernels = 3 if fmt == "nvfp4" else 1
    return OpCost(
        name, key, 0.0, reads + weight_bytes(fmt, rows, cols, "per_block"), kernels=kernels
    )


def dequantize_cost(
    rows: int, cols: int, fmt: str, out_bytes: int = 2, granularity="per_block", name="dequantize"
) -> OpCost:
    """Dequantize ``[rows, cols]`` codes of ``fmt`` to ``out_bytes`` floats: read codes, write."""
    return OpCost(
        name,
        "dequantize",
        0.0,
        weight_bytes(fmt, rows, cols, granularity) + rows * cols * out_bytes,
    )


def gemm_costs(
    m: int,
    n: int,
    k: int,
    path: str,
    *,
    w_format: str = "fp8_e4m3",
    w_granularity: str = "per_channel",
    w_block: int = 0,
    act: str = "dynamic",
    act_granularity: str | None = None,
    out_bytes: int = 2,
    name: str = "gemm",
) -> list[OpCost]:
    """The kernels of one ``[M,K] x [N,K]^T`` product on ``path``.

    Args:
        m: rows of the activations (tokens).
        n: output features (rows of the ``[N, K]`` weight).
        k: contraction size.
        path: one of :data:`GEMM_PATHS`.
        w_format: weight format (see :func:`weight_bytes`).
        w_granularity: FP8 weight scaling.
        w_block: FP4 block size (0: 32).
        out_bytes: bytes per output element.
        name: operator label.
        act: ``"dynamic"`` (bf16 activations quantized in the call for W8A8),
            ``"pre"`` (FP8 codes given) or ``"bf16"``.
        act_granularity: activation scaling for cuBLASLt FP8 (default: matches weights).

    Returns:
        The list of :class:`OpCost` (quantize / convert / dequantize kernels, then the GEMM).

    Raises:
        ValueError: bad sizes or a path/format combination jax_bq does not have.
    """
    _check_mnk(m, n, k)
    if path not in GEMM_PATHS:
        raise ValueError(f"unknown GEMM path {path!r} (one of {GEMM_PATHS})")
    g = _Gemm(m, n, k, w_format, w_granularity, w_block, act, act_granularity, out_bytes, name)
    return _PATH_COSTS[path](g)


@dataclass(frozen=True)
class _Gemm:
    """The arguments of :func:`gemm_costs`, shared by the per-path builders."""

    m: int
    n: int
    k: int
    w_format: str
    w_granularity: str
    w_block: int
    act: str
    act_granularity: str | None
    out_bytes: int
    name: str

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k

    @property
    def tile(self) -> tuple:
        return (self.m, self.n, self.k)

    @property
    def io16(self) -> int:
        """bf16 activations in plus the output out."""
        return 2 * self.m * self.k + self.out_bytes * self.m * self.n


def _xla_bf16(g: _Gemm) -> list[OpCost]:
    b = weight_bytes("bf16", g.n, g.k) + g.io16
    return [OpCost(g.name, "gemm:xla_bf16", g.flops, b, "bf16", 1, g.tile)]


def _cublaslt_fp8(g: _Gemm, ops=None) -> list[OpCost]:
    ops = ops or []
    if g.w_format not in ("fp8_e4m3", "fp8_e5m2"):
        raise ValueError(f"cuBLASLt FP8 needs FP8 weights, got {g.w_format}")
    cls = scale_class(g.w_granularity, g.act_granularity)
    if g.act == "dynamic":
        ops.append(quantize_cost(g.m, g.k, "fp8_e4m3", 2, g.name + ":quantize_x"))
    elif g.act != "pre":
        raise ValueError(f"cuBLASLt FP8 takes act='dynamic' or 'pre', got {g.act!r}")
    b = weight_bytes("fp8_e4m3", g.n, g.k, g.w_granularity) + g.m * g.k + g.out_bytes * g.m * g.n
    ops.append(OpCost(g.name, f"gemm:cublaslt_fp8:{cls}", g.flops, b, "fp8", 1, g.tile))
    return ops


def _fp4_via_fp8(g: _Gemm) -> list[OpCost]:
    """FP4 weights converted to FP8 128x128 tiles (one kernel), then cuBLASLt FP8."""
    if g.w_format not in ("fp4", "nvfp4", "mxfp4"):
        raise ValueError(f"fp4_via_fp8 needs FP4 weights, got {g.w_format}")
    wb = weight_bytes(g.w_format, g.n, g.k, block=g.w_block)
    conv = wb + weight_bytes("fp8_e4m3", g.n, g.k, "per_block")
    ops = [OpCost(g.name + ":convert", "convert_fp4", 0.0, conv)]
    fp8 = dataclasses.replace(
        g, w_format="fp8_e4m3", w_granularity="per_block", act_granularity="block_1x128"
    )
    return _cublaslt_fp8(fp8, ops)


def _cublaslt_blockfp(g: _Gemm) -> list[OpCost]:
    if g.w_format not in ("mxfp8", "nvfp4"):
        raise ValueError(f"cublaslt_blockfp needs MXFP8/NVFP4 weights, got {g.w_format}")
    prec = "fp4" if g.w_format == "nvfp4" else "fp8"
    b = weight_bytes(g.w_format, g.n, g.k) + weight_bytes(g.w_format, g.m, g.k)
    b += g.out_bytes * g.m * g.n
    return [
        quantize_cost(g.m, g.k, g.w_format, 2, g.name + ":quantize_x"),
        OpCost(g.name, "gemm:cublaslt_blockfp", g.flops, b, prec, 1, g.tile),
    ]


def weight_only_config(key: str, m: int, n: int, k: int) -> tuple[int, int, int]:
    """``(m_tiles, warps, n_tiles)`` a weight-only kernel launches with (ffi/cuda/qmatmul*).

    W8A16 and the FP4 byte-permute W4A16 kernel: ``ceil(M / 8)`` 8-token tiles
    (1, 2, 4 or 8), 8 warps for one tile else 4, one 16-row tile per CTA. The
    NVFP4 kernel (``LaunchW4A16Nv``): one 8-token tile and one 16-row tile for
    M <= 4 (or M <= 8 with N < 16384; 4 warps with N >= 12288 and K <= 8192),
    else 8-token tiles / warps / 16-row tiles of (1, 8, 2) to M = 8, (2, 8, 2)
    to 16, (4, 4, 4) to 32 with N >= 16384, (4, 4, 2) to 32, (8, 4, 2) beyond.
    """
    if key != "gemm:w4a16:nv":
        t = next(t for t in (1, 2, 4, 8) if m <= 8 * t or t == 8)
        return t, (8 if t == 1 else 4), 1
    wide = n >= 16384
    if m <= 4 or (m <= 8 and not wide):
        return 1, (4 if n >= 12288 and k <= 8192 else 8), 1
    if m <= 8:
        return 1, 8, 2
    if m <= 16:
        return 2, 8, 2
    if m <= 32:
        return (4, 4, 4) if wide else (4, 4, 2)
    return 8, 4, 2


def weight_only_rows_per_cta(key: str, m: int, n: int, k: int) -> int:
    """Weight rows ``R`` one CTA of a weight-only kernel owns: 16 per 16-row tile."""
    return 16 * weight_only_config(key, m, n, k)[2]


#: (registers per thread, static shared memory bytes) of each weight-only kernel
#: configuration ``(key, m_tiles, warps, n_tiles)``, from ``ptxas -v`` for sm_90a
#: (ffi/cuda/w8a16_kernels.cuh and w4a16_kernels.cuh as of 2026-12-03; bf16
#: activations, E4M3 / NVFP4 weights). Recompile with ``-Xptxas -v`` after changing the kernels.
WEIGHT_ONLY_RESOURCES = {
    ("gemm:w8a16", 1, 8, 1): (64, 4096),
    ("gemm:w8a16", 2, 4, 1): (80, 4096),
    ("gemm:w8a16", 4, 4, 1): (112, 8192),
    ("gemm:w8a16", 8, 4, 1): (200, 16384),
    ("gemm:w4a16", 1, 8, 1): (57, 4096),
    ("gemm:w4a16", 2, 4, 1): (72, 4096),
    ("gemm:w4a16", 4, 4, 1): (86, 8192),
    ("gemm:w4a16", 8, 4, 1): (148, 16384),
    ("gemm:w4a16:nv", 1, 4, 1): (60, 18432),
    ("gemm:w4a16:nv", 1, 8, 1): (60, 36864),
    ("gemm:w4a16:nv", 1, 8, 2): (80, 69632),
    ("gemm:w4a16:nv", 2, 8, 2): (106, 73728),
    ("gemm:w4a16:nv", 4, 4, 2): (168, 40960),
    ("gemm:w4a16:nv", 4, 4, 4): (238, 73728),
    ("gemm:w4a16:nv", 8, 4, 2): (254, 49152),
}

#: Per-SM limits of compute capability 9.0 (CUDA C++ Programming Guide, "Technical
#: Specifications per Compute Capability"): 64K 32-bit registers allocated per warp in
#: units of 256, 64 warps, 32 CTAs, 228 KB shared memory with 1 KB reserved per CTA.
SM90_LIMITS = {"regs": 65536, "reg_unit": 256, "warps": 64, "ctas": 32, "smem": 233472}


def ctas_per_sm(regs: int, smem: int, warps: int) -> int:
    """CTAs resident per SM: the fewest the limits of :data:`SM90_LIMITS` allow.

    Registers are allocated per warp in units of 256; shared memory adds 1 KB per CTA.
    """
    lim = SM90_LIMITS
    per_warp = math.ceil(regs * 32 / lim["reg_unit"]) * lim["reg_unit"]
    return min(
        lim["regs"] // (per_warp * warps),
        lim["warps"] // warps,
        lim["ctas"],
        lim["smem"] // (smem + 1024),
    )


def _weight_only(g: _Gemm, key: str, formats: tuple, label: str) -> list[OpCost]:
    """W8A16 / W4A16: software decode; the MMA works on 8-row tiles of M.

    ``time = lat + max(DRAM + L2 streams, serial chains)``: every CTA reads all
    ``M x K`` bf16 activations for its ``R`` weight rows, ``ceil(N / R) * 2 * M * K``
    bytes from L2 (``l2_bytes``), and each warp walks ``ceil(K / 128 / warps)``
    K units in series (``chain``, :func:`chain_s`), wave by wave. ``flops`` stays
    the padded MMA work (reported, not priced).
    """
    if g.w_format not in formats:
        raise ValueError(f"{label} needs {'/'.join(formats)} weights, got {g.w_format}")
    b = weight_bytes(g.w_format, g.n, g.k, g.w_granularity, g.w_block) + g.io16
    padded = 2.0 * 8 * math.ceil(g.m / 8) * g.n * g.k
    cfg = weight_only_config(key, g.m, g.n, g.k)
    ctas = math.ceil(g.n / (16 * cfg[2]))
    l2 = float(ctas * 2 * g.m * g.k)
    regs, smem = WEIGHT_ONLY_RESOURCES[(key, *cfg)]
    units = math.ceil(g.k / 128 / cfg[1])
    chain = (ctas, ctas_per_sm(regs, smem, cfg[1]), units, cfg[0] * cfg[2])
    return [OpCost(g.name, key, padded, b, "bf16", 1, None, "chain", l2, chain)]


def _dequant_dot(g: _Gemm) -> list[OpCost]:
    """Dequantize the weights to bf16 (FP8 W8A8 numerics: also quantize-dequantize x), dot."""
    ops = []
    if g.w_format not in ("bf16", "fp16"):
        ops.append(
            dequantize_cost(g.n, g.k, g.w_format, 2, g.w_granularity, g.name + ":dequantize_w")
        )
    if g.act == "dynamic" and g.w_format in ("fp8_e4m3", "fp8_e5m2"):
        ops.append(quantize_cost(g.m, g.k, "fp8_e4m3", 2, g.name + ":quantize_x"))
        ops.append(dequantize_cost(g.m, g.k, "fp8_e4m3", 2, name=g.name + ":dequantize_x"))
    return ops + _xla_bf16(g)


_PATH_COSTS = {
    "xla_bf16": _xla_bf16,
    "cublaslt_fp8": _cublaslt_fp8,
    "fp4_via_fp8": _fp4_via_fp8,
    "cublaslt_blockfp": _cublaslt_blockfp,
    "w8a16": lambda g: _weight_only(g, "gemm:w8a16", ("fp8_e4m3", "fp8_e5m2"), "W8A16"),
    # NVFP4 weights run their own kernel (W4A16NvKernel), FP4 the byte-permute one
    "w4a16": lambda g: _weight_only(
        g, "gemm:w4a16:nv" if g.w_format == "nvfp4" else "gemm:w4a16", ("fp4", "nvfp4"), "W4A16"
    ),
    "dequant_dot": _dequant_dot,
}


def predict_all(ops: list[OpCost], eff: Effective) -> list[Estimate]:
    """:func:`predict` of each op."""
    return [predict(o, eff) for o in ops]


def total_s(ops: list[OpCost], eff: Effective) -> float:
    """Summed predicted time of ``ops`` (kernels run back to back)."""
    return sum(e.time_s for e in predict_all(ops, eff))


def layernorm_cost(rows: int, hidden: int, in_bytes=2, out_bytes=2, residual=True) -> OpCost:
    """LayerNorm (+ residual add) of ``[rows, hidden]``: read x (and r), write y; params ignored."""
    if rows <= 0 or hidden <= 0:
        raise ValueError(f"LayerNorm shape must be positive, got [{rows}, {hidden}]")
    reads = rows * hidden * in_bytes * (2 if residual else 1)
    return OpCost("layernorm", "layernorm", 0.0, reads + rows * hidden * out_bytes)


def elementwise_cost(name: str, elements: int, bytes_per_element: float) -> OpCost:
    """A fused elementwise pass (bias, GELU, casts, transposes): ``elements * bytes`` moved."""
    return OpCost(name, "elementwise", 0.0, float(elements) * bytes_per_element)
