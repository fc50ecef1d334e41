r"""Attention cost models: what JAX runs (XLA, cuDNN) and models of FlashAttention 1-4.

Two different things live here, and are named so:

* :func:`attention_cost` prices the attention JAX actually runs
  (``jax.nn.dot_product_attention`` with ``implementation="xla"`` or
  ``"cudnn"``); its efficiency factors are fitted from profiler measurements.
* :func:`flash_traffic` / :func:`flash_attention_time` are **models of the
  published FlashAttention algorithms** (FA1: Dao et al. 2022, FA2: Dao 2023,
  FA3: Shah et al. 2024, FA4: Blackwell), used for what-if estimates and the
  recommendation's FA configuration. jax_bq does not ship these kernels; the
  numbers are predictions of those algorithms, not measurements.

Notation per (batch, head): ``N`` query rows, ``L`` key rows, head dim ``d``,
``e`` bytes per Q/K/V/O element, on-chip SRAM ``Ms`` bytes per SM. FLOPs of the
two products: ``4 N L d`` (half of that for causal attention).

HBM traffic (elements read + written), per (batch, head)::

    standard (scores in HBM):   e(N d + 2 L d + N d) + (4 + 4 + 2 + 2) N L
    FA1 (outer loop over K/V blocks of Bc = Ms / (4 d e) rows):
                                e(2 L d + Tc (N d + 2 N d)) ,  Tc = ceil(L / Bc)
    FA2/FA3/FA4 (outer loop over Q blocks of Br rows):
                                e(2 N d + Tr 2 L d) ,          Tr = ceil(N / Br)

FA3 adds FP8 operands (``e = 1``, FP8 tensor-core rate); FA4 adds block
sparsity: with a fraction ``density`` of (Q, K) blocks kept, FLOPs and the
K/V re-reads scale by ``density``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from jax_bq.perf.hardware import Effective
from jax_bq.perf.roofline import OpCost, predict

#: Published utilisation of each algorithm's forward pass (fraction of the
#: dense 16-bit peak), used as its compute efficiency in the models:
#: FA1 ~ 124 TFLOPS on A100 = 40% of 312 (Dao et al. 2022, arXiv:2205.14135, Fig. / §4);
#: FA2 up to 73% on A100 and ~35% on H100 (Dao 2023, arXiv:2307.08691; FA3 paper §1);
#: FA3 FP16 740 TFLOPS = 75% of H100, FP8 "close to 1.2 PFLOPS" = 61% of 1979
#: (Shah et al. 2024, arXiv:2407.08608, abstract);
#: FA4 (Blackwell, tcgen05 + TMEM): assumed 70% of the dense 16-bit peak, no measured
#: figure recorded here -- a model parameter, not a citation.
FA_UTILIZATION = {
    ("fa1", "bf16"): 0.40,
    ("fa2", "bf16"): 0.35,
    ("fa3", "bf16"): 0.75,
    ("fa3", "fp8"): 0.61,
    ("fa4", "bf16"): 0.70,
    ("fa4", "fp8"): 0.70,
    ("fa4", "fp4"): 0.70,
}
FA_VERSIONS = ("fa1", "fa2", "fa3", "fa4")
_ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "fp4": 0.5}
#: Shared memory per SM available to one block (Hopper/Blackwell: 227 KB, A100: 163 KB).
SRAM_BYTES = 227 * 1024
#: Query blocks in flight at once (one per SM on a 132-SM Hopper), for the L2-reuse variant.
SMS_PER_WAVE = 132


@dataclass(frozen=True)
class AttentionShape:
    """``batch x heads x N x d`` queries against ``L`` keys with ``kv_heads`` K/V heads."""

    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    kv_heads: int | None = None
    causal: bool = False

    def __post_init__(self):
        for f in ("batch", "heads", "q_len", "kv_len", "head_dim"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"attention {f} must be a positive int, got {v!r}")
        kv = self.kv_heads if self.kv_heads is not None else self.heads
        if kv <= 0 or self.heads % kv:
            raise ValueError(f"heads={self.heads} must be a multiple of kv_heads={kv}")

    @property
    def kvh(self) -> int:
        """K/V heads (``heads`` when not grouped)."""
        return self.kv_heads if self.kv_heads is not None else self.heads

    @property
    def flops(self) -> float:
        """``4 B H N L d`` (QK^T and PV), halved when causal."""
        f = 4.0 * self.batch * self.heads * self.q_len * self.kv_len * self.head_dim
        return f / 2 if self.causal else f


def standard_traffic(s: AttentionShape, elem_bytes: float = 2) -> float:
    """HBM bytes of attention with the scores materialized (f32 logits, bf16 probabilities)."""
    bh, n, kv_len, d = s.batch * s.heads, s.q_len, s.kv_len, s.head_dim
    qo = 2 * s.batch * s.heads * n * d * elem_bytes
    kv = 2 * s.batch * s.kvh * kv_len * d * elem_bytes
    return qo + kv + bh * n * kv_len * (4 + 4 + 2 + 2)


def flash_traffic(
    s: AttentionShape,
    version: str,
    elem_bytes: float = 2,
    sram: int = SRAM_BYTES,
    density=1.0,
    l2_bytes: float | None = None,
) -> float:
    """HBM bytes of FlashAttention ``version`` (module docstring formulas).

    ``density`` (FA4 block sparsity) scales the K/V re-reads; 1.0 = dense.
    ``l2_bytes``: with an L2 of that size, FA2-4's K/V re-reads are served from L2
    when the K/V of the heads in flight fit (the Q blocks of one head run in the
    same wave), so DRAM sees each K/V once; None = the algorithm's IO count only.
    """
    if version not in FA_VERSIONS:
        raise ValueError(f"unknown FlashAttention version {version!r} (one of {FA_VERSIONS})")
    if not 0 < density <= 1:
        raise ValueError(f"block density must be in (0, 1], got {density}")
    if density != 1.0 and version != "fa4":
        raise ValueError("block sparsity is modelled for FA4 only")
    n, lk, d, e = s.q_len, s.kv_len, s.head_dim, elem_bytes
    bh = s.batch * s.heads
    if version == "fa1":
        bc = max(1, sram // (4 * d * e))
        tc = math.ceil(lk / bc)
        return bh * e * (2 * lk * d + tc * 3 * n * d)
    br = 128 if d <= 128 else 64
    tr = math.ceil(n / br)
    if l2_bytes is not None:
        heads_in_flight = max(1, math.ceil(SMS_PER_WAVE / tr))
        if heads_in_flight * 2 * lk * d * e <= l2_bytes:
            tr = 1
    # K/V are shared by the heads of a GQA group; each Q head still streams them.
    return bh * e * (2 * n * d + density * tr * 2 * lk * d)


def flash_attention_time(
    s: AttentionShape,
    eff: Effective,
    version: str,
    precision: str = "bf16",
    density: float = 1.0,
) -> tuple[float, str]:
    """Model time (s) and bound of FlashAttention ``version`` on ``eff``'s device.

    ``t = launch + max(FLOPs * density / (peak_prec * u), traffic / BW)`` with
    ``u`` the published utilisation (:data:`FA_UTILIZATION`).

    Raises:
        ValueError: a version/precision pair the algorithm does not have
            (FP8 needs FA3/FA4 and FP8 tensor cores; FP4 needs FA4 and FP4 ones).
    """
    if (version, precision) not in FA_UTILIZATION:
        raise ValueError(f"{version} has no {precision} variant")
    peak = eff.peak.get(precision)
    if peak is None:
        raise ValueError(f"{eff.spec.name} has no {precision} tensor cores for {version}")
    u = FA_UTILIZATION[(version, precision)]
    t_c = s.flops * density / (peak * u)
    l2 = eff.spec.l2_mb * 1e6
    t_m = flash_traffic(s, version, _ELEM_BYTES[precision], density=density, l2_bytes=l2) / eff.bw
    bound = "compute" if t_c >= t_m else "memory"
    return eff.launch_s + max(t_c, t_m), bound


def attention_cost(s: AttentionShape, impl: str = "xla", elem_bytes: float = 2) -> OpCost:
    """The attention JAX runs: ``impl="xla"`` materializes the scores, ``"cudnn"`` is fused."""
    if impl == "xla":
        b = standard_traffic(s, elem_bytes)
        kernels = 6
    elif impl == "cudnn":
        b = flash_traffic(s, "fa2", elem_bytes)
        kernels = 1
    else:
        raise ValueError(f"attention impl must be 'xla' or 'cudnn', got {impl!r}")
    return OpCost("attention", f"attention:{impl}", s.flops, b, "bf16", kernels)


def decode_kv_read_cost(
    batch: int, ctx: int, kv_heads: int, head_dim: int, kv_bytes: float, name="kv_read"
) -> OpCost:
    """One decode step of one layer's attention: stream the K and V caches.

    ``2 * batch * ctx * kv_heads * head_dim`` elements of ``kv_bytes`` each.
    """
    for f, v in (("batch", batch), ("ctx", ctx), ("kv_heads", kv_heads), ("head_dim", head_dim)):
        if v <= 0:
            raise ValueError(f"decode attention {f} must be positive, got {v}")
    return OpCost(name, "kv_read", 0.0, 2.0 * batch * ctx * kv_heads * head_dim * kv_bytes)


def attention_time(s: AttentionShape, eff: Effective, impl="xla") -> float:
    """Predicted device time of the JAX attention ``impl`` (fitted factors when profiled)."""
    return predict(attention_cost(s, impl), eff).time_s
