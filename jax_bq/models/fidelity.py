"""Fidelity of quantized sentence encoders against their float32 selves.

For each :class:`Variant` (weight rules + activation handling) the encoder's
dense kernels are quantized, every text is embedded, and compared with the
float32 embeddings ``a`` (quantized ``b``):

* ``cosine``: mean over texts of ``a.b / (|a| |b|)``;
* ``pearson``: mean per-text Pearson correlation (the semantic-alignment check
  of :func:`jax_bq.validate_semantic_alignment`, threshold 0.99);
* ``sim_pearson``: Pearson correlation, over all (query, corpus text) pairs,
  between the float32 and the quantized cosine similarities (what a
  retrieval or STS score sees);
* ``top10``: for each query, ``|top10_a ∩ top10_b| / 10`` where ``top10`` are
  the 10 corpus texts of highest cosine similarity, averaged over queries;
* weight bytes of the dense kernels (codes + scales) against float32.

A variant with ``static_margin`` runs FP8 W8A8 with static per-tensor
activation scales (:func:`jax_bq.flax.calibrate_activation_scales`, powers of
two with that margin over the amax) calibrated on the *planning* texts, so
the evaluation texts were not seen by the calibration.

A variant with ``mixed`` keeps some kernels out of its format, chosen by
:func:`jax_bq.flax.plan_mixed_precision` on *planning* texts (docstrings of
other modules than the evaluation corpus) for a planning target set above
the reported one (0.9992 for cosine 0.999; 0.992 for Pearson 0.99), so that
the plan still holds on texts it has not seen.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np

from jax_bq.flax.mixed_precision import plan_mixed_precision
from jax_bq.flax.rules import WeightQuant, param_bytes
from jax_bq.flax.static_scales import calibrate_activation_scales
from jax_bq.models.loading import SentenceEncoder
from jax_bq.semantic import alignment

__all__ = [
    "Mixed",
    "Variant",
    "FidelityRow",
    "VARIANTS",
    "DEMO_VARIANTS",
    "embedding_fidelity",
    "evaluate",
    "markdown_table",
]


@dataclass(frozen=True)
class Mixed:
    """Mixed precision for a variant: plan for ``metric >= target`` on planning texts.

    ``fallback`` is what the kernels kept out of the variant's format get
    (``None``: they stay float32; ``"bf16"``; or a quantized spec).
    ``candidates``: a regular expression (``re.search`` on the param path)
    limiting which kernels may be kept; ``None``: every rank-2 kernel.
    """

    target: float
    metric: str = "cosine"
    fallback: WeightQuant | str | None = None
    candidates: str | None = None


@dataclass(frozen=True)
class Variant:
    """One way of quantizing an encoder: kernel spec + activation handling."""

    name: str
    weights: WeightQuant
    act_format: str | None = None
    act_granularity: str | None = None
    mixed: Mixed | None = None
    static_margin: float | None = None  # static activation scales, calibrated with this margin
    fused_gelu: str | None = None  # run BertEncoder(fused=True, gelu=...) ("exact" / "tanh")
    keep: tuple[str, ...] = ()  # kernels (param paths) left in float, by a fixed choice


_BF16 = "bf16"  # weight-only: activations stay 16-bit
VARIANTS = (
    Variant("FP8 W8A8 per-tensor", WeightQuant("fp8_e4m3", "per_tensor"), "fp8_e4m3", "per_tensor"),
    Variant("FP8 W8A8 per-channel x per-token", WeightQuant("fp8_e4m3"), "fp8_e4m3", "per_token"),
    Variant(
        "FP8 W8A8 128x128 x 1x128", WeightQuant("fp8_e4m3", "tile_2d"), "fp8_e4m3", "block_1x128"
    ),
    Variant(
        "FP8 W8A8 1x128 calibrated",
        WeightQuant("fp8_e4m3", "per_block", 128, calibrate=True),
        "fp8_e4m3",
        "block_1x128",
    ),
    Variant("FP8 W8A8 static per-tensor", WeightQuant("fp8_e4m3", "per_tensor"), static_margin=2.0),
    Variant("FP8 weight-only per-channel", WeightQuant("fp8_e4m3"), _BF16),
    Variant("MXFP8 weight-only", WeightQuant("mxfp8"), _BF16),
    Variant("FP4 weight-only b32", WeightQuant("fp4", block_size=32), _BF16),
    Variant(
        "FP4 weight-only b32 calibrated", WeightQuant("fp4", block_size=32, calibrate=True), _BF16
    ),
    Variant("NVFP4 weight-only", WeightQuant("nvfp4"), _BF16),
    Variant("NVFP4 weight-only calibrated", WeightQuant("nvfp4", calibrate=True), _BF16),
    Variant("MXFP4 weight-only", WeightQuant("mxfp4"), _BF16),
    Variant(
        "FP8 W8A8 1x128 calibrated, mixed",
        WeightQuant("fp8_e4m3", "per_block", 128, calibrate=True),
        "fp8_e4m3",
        "block_1x128",
        Mixed(0.9992, "cosine", "bf16"),
    ),
    Variant(
        "NVFP4 weight-only calibrated, mixed",
        WeightQuant("nvfp4", calibrate=True),
        _BF16,
        mixed=Mixed(0.992, "pearson", WeightQuant("fp8_e4m3")),
    ),
)
#: The kernels the sensitivity plan of "FP8 W8A8 1x128 calibrated, mixed" kept in
#: bf16 (results/fidelity_minilm_cpu.json): reused as a fixed choice by the fused
#: variants, whose own planning would take the CPU minutes per candidate.
MINILM_FP8_KEPT = (
    "layer_5/attention_output/kernel",
    "layer_5/value/kernel",
    "layer_5/key/kernel",
    "layer_4/intermediate/kernel",
    "layer_4/value/kernel",
    "layer_5/output/kernel",
    "layer_1/intermediate/kernel",
    "layer_0/intermediate/kernel",
    "layer_5/intermediate/kernel",
    "layer_4/output/kernel",
)
_PT = WeightQuant("fp8_e4m3", "per_tensor")
#: The fused inference block (static FP8 activations, epilogues, fused attention).
FUSED_VARIANTS = (
    Variant("FP8 fused static, tanh GELU", _PT, static_margin=2.0, fused_gelu="tanh"),
    Variant("FP8 fused static, exact GELU", _PT, static_margin=2.0, fused_gelu="exact"),
    Variant(
        "FP8 fused static, tanh GELU, 10/36 kernels bf16",
        _PT,
        static_margin=2.0,
        fused_gelu="tanh",
        keep=MINILM_FP8_KEPT,
    ),
    Variant(
        "FP8 fused static, exact GELU, 10/36 kernels bf16",
        _PT,
        static_margin=2.0,
        fused_gelu="exact",
        keep=MINILM_FP8_KEPT,
    ),
)

#: The subset ``jax-bq demo`` runs (one of each family, a calibrated one).
DEMO_VARIANTS = tuple(
    v
    for v in VARIANTS
    if v.name
    in (
        "FP8 W8A8 per-tensor",
        "FP8 W8A8 128x128 x 1x128",
        "FP8 weight-only per-channel",
        "FP4 weight-only b32",
        "NVFP4 weight-only",
        "NVFP4 weight-only calibrated",
    )
)


@dataclass
class FidelityRow:
    """Measured fidelity of one variant."""

    name: str  # a mixed variant's name says how many kernels were kept out
    cosine: float
    min_cosine: float
    pearson: float
    sim_pearson: float
    top10: float
    kernel_bytes: int
    kernel_bytes_fp32: int
    seconds: float

    @property
    def saved(self) -> float:
        """Fraction of dense-kernel bytes saved against float32."""
        return 1.0 - self.kernel_bytes / self.kernel_bytes_fp32


def _topk(emb: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    sims = queries @ emb.T
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def _is_kernel(name: str) -> bool:
    return name.endswith("kernel")


def embedding_fidelity(ref: np.ndarray, emb: np.ndarray, n_corpus: int) -> dict[str, float]:
    """The module docstring's metrics of embeddings ``emb`` against ``ref``.

    Rows ``[:n_corpus]`` are the corpus, the rest the queries (at least 10
    corpus texts for ``top10``).

    Returns:
        ``cosine``, ``min_cosine``, ``pearson``, ``sim_pearson``, ``top10``.
    """
    ref, emb = np.asarray(ref, np.float32), np.asarray(emb, np.float32)
    if ref.shape != emb.shape or not 10 <= n_corpus < len(ref):
        raise ValueError(
            f"embedding_fidelity needs equal shapes and 10 <= n_corpus < rows, got "
            f"{ref.shape}, {emb.shape}, n_corpus={n_corpus}"
        )
    rep = alignment(ref, emb)
    cos = np.sum(ref * emb, axis=1) / (
        np.linalg.norm(ref, axis=1) * np.linalg.norm(emb, axis=1) + 1e-30
    )
    ref_c, ref_q, emb_c, emb_q = ref[:n_corpus], ref[n_corpus:], emb[:n_corpus], emb[n_corpus:]
    top_a, top_b = _topk(ref_c, ref_q, 10), _topk(emb_c, emb_q, 10)
    sim_r = np.corrcoef((ref_q @ ref_c.T).ravel(), (emb_q @ emb_c.T).ravel())[0, 1]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top_a, top_b, strict=True)])
    return {
        "cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "pearson": float(rep.pearson),
        "sim_pearson": float(sim_r),
        "top10": float(overlap),
    }


def evaluate(
    encoder: SentenceEncoder,
    corpus: Sequence[str],
    queries: Sequence[str],
    variants: Sequence[Variant] = VARIANTS,
    progress=None,
    planning_texts: Sequence[str] | None = None,
) -> tuple[list[FidelityRow], dict]:
    """Embeds ``corpus`` and ``queries`` with ``encoder`` and each variant.

    ``planning_texts`` are needed by variants with ``mixed`` or
    ``static_margin`` (and only used for planning and calibration); keep them
    apart from ``corpus`` and ``queries``.

    Returns:
        ``(rows, info)``: one :class:`FidelityRow` per variant and a dict with
        the counts and the float32 timing.
    """
    texts = list(corpus) + list(queries)
    t0 = time.perf_counter()
    ref = encoder.embed(texts)
    t_ref = time.perf_counter() - t0
    fp32_bytes = param_bytes(encoder.params, _is_kernel)
    rows, plans = [], {}
    for v in variants:
        if progress:
            progress(v.name)
        t0 = time.perf_counter()
        rules, name = [("kernel$", v.weights)], v.name
        if v.keep:
            rules = [("^(" + "|".join(re.escape(k) for k in v.keep) + ")$", None), *rules]
        if v.mixed is not None:
            rules, name, plans[v.name] = _mixed_rules(encoder, v, planning_texts)
        qenc = encoder.quantize(rules, act_format=v.act_format, act_granularity=v.act_granularity)
        if v.static_margin is not None:
            qenc = _with_static_scales(qenc, v, planning_texts)
        if v.fused_gelu is not None:
            qenc = dataclasses.replace(qenc, fused=True, gelu=v.fused_gelu)
        emb = qenc.embed(texts)
        dt = time.perf_counter() - t0
        m = embedding_fidelity(ref, emb, len(corpus))
        rows.append(
            FidelityRow(
                name,
                m["cosine"],
                m["min_cosine"],
                m["pearson"],
                m["sim_pearson"],
                m["top10"],
                param_bytes(qenc.params, _is_kernel),
                fp32_bytes,
                dt,
            )
        )
    info = {
        "corpus": len(corpus),
        "queries": len(queries),
        "fp32_seconds": t_ref,
        "backend": jax.default_backend(),
    }
    if plans:
        info["mixed_plans"] = plans
        info["planning_texts"] = len(planning_texts)
    return rows, info


def _with_static_scales(enc: SentenceEncoder, v: Variant, planning_texts) -> SentenceEncoder:
    if not planning_texts:
        raise ValueError(f"variant {v.name!r} calibrates activation scales: pass planning_texts")
    texts = sorted(planning_texts, key=len)  # similar lengths share a batch (less padding)
    batches = [enc.tokenize(texts[i : i + 64]) for i in range(0, len(texts), 64)]
    params, _ = calibrate_activation_scales(enc.module, enc.params, batches, margin=v.static_margin)
    return SentenceEncoder(enc.config, params, enc.tokenizer, enc.dtype)


def _mixed_rules(encoder: SentenceEncoder, v: Variant, planning_texts):
    if not planning_texts:
        raise ValueError(f"variant {v.name!r} plans mixed precision: pass planning_texts")
    texts = list(planning_texts)

    def run(params):
        enc = SentenceEncoder(
            encoder.config, params, encoder.tokenizer, encoder.dtype,
            v.act_format, v.act_granularity,
        )  # fmt: skip
        return enc.embed(texts)

    select = None
    if v.mixed.candidates is not None:
        pattern = re.compile(v.mixed.candidates)
        select = lambda name: bool(pattern.search(name)) and name.endswith("kernel")  # noqa: E731
    plan = plan_mixed_precision(
        encoder.params, run, v.weights, v.mixed.target,
        fallback=v.mixed.fallback, metric=v.mixed.metric, select=select,
    )  # fmt: skip
    # Kernels that were not candidates get the variant's format too.
    rules = plan.rules + ([("kernel$", v.weights)] if select is not None else [])
    fb = v.mixed.fallback
    fb = "float32" if fb is None else (fb if isinstance(fb, str) else fb.resolved().format.value)
    summary = {
        "kept": plan.kept,
        "kept_as": fb,
        "planning_target": plan.target,
        "metric": plan.metric,
        "planning_measured": plan.measured,
        "planning_all_quantized": plan.all_quantized,
        "planning_estimate": plan.estimate,
    }
    name = f"{v.name} ({len(plan.kept)}/{len(plan.sensitivities)} kernels {fb})"
    return rules, name, summary


def markdown_table(rows: Sequence[FidelityRow]) -> str:
    """The fidelity table as markdown."""
    lines = [
        "| variant | mean cosine | min cosine | Pearson (embedding) | Pearson (similarities) "
        "| top-10 overlap | kernel MB | saved |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.cosine:.6f} | {r.min_cosine:.5f} | {r.pearson:.6f} | "
            f"{r.sim_pearson:.6f} | "
            f"{r.top10:.3f} | {r.kernel_bytes / 1e6:.2f} (fp32 {r.kernel_bytes_fp32 / 1e6:.2f}) | "
            f"{100 * r.saved:.1f}% |"
        )
    return "\n".join(lines)
