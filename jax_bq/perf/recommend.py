r"""``recommend``: the fastest strategy that meets a fidelity target, with the evidence.

The candidates are the presets of :data:`jax_bq.strategies.PRESETS` (their one
definition; :mod:`jax_bq.perf.presets` translates them per layer). For each,
the whole-model time on the local device is predicted (:mod:`jax_bq.perf.models`)
with the paths ``qmatmul``'s capability ladder gives there: a layer whose
native GEMM the device lacks (FP8 activations without FP8 tensor cores) is
priced on its fallback rung, and the alternatives table says so.
Strategies whose **measured** fidelity is below ``min_cosine`` -- or was never
measured, unless ``allow_unmeasured`` -- are excluded; the fastest remaining
one is the recommendation (ties: the smaller weights), unless it is predicted
less than ``min_gain`` faster than the 16-bit baseline -- then the baseline,
since the models' error is larger.
Speed-up and times are relative to the bf16 model on the same device; the
reference precision of the specification ("FP16") is bf16 here, same bytes and
tensor-core rate. bf16 itself is always eligible (the baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

from jax_bq import strategies as st
from jax_bq.perf import attention as att
from jax_bq.perf import models as mdl
from jax_bq.perf import roofline as rl
from jax_bq.perf.hardware import effective
from jax_bq.perf.presets import BENCHMARK_RECIPES, BF16, Strategy, as_strategy
from jax_bq.strategies import OperatorType as Op

PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class OperatorBottleneck:
    """One operator's share of the predicted time."""

    operator: str
    time_us: float
    share: float
    bound: str
    path: str


@dataclass(frozen=True)
class QuantizationRecommendation:
    """What :func:`recommend` returns.

    Attributes:
        strategy: strategy (preset) name.
        per_operator_precision: dense layer -> ``"weights/activations via path"``.
        fa_config: attention plan: the JAX implementation priced, plus the
            FlashAttention-model estimate of the best FA version on this device.
        predicted_time_ms: predicted forward time (one decode step for decode).
        baseline_time_ms: the bf16 model's predicted time.
        predicted_speedup: ``baseline / predicted``.
        memory_savings: fraction of dense-weight bytes saved vs bf16.
        weight_bytes: dense-weight bytes under the strategy.
        kv_cache_bytes: KV cache bytes (decoders; 0 for encoders).
        expected_quality_loss: ``1 - mean cosine`` measured on MiniLM, or None.
        quality_source: where the quality figure comes from, or why there is none.
        confidence: ``"measured-profile"`` (fitted factors) or ``"datasheet"``.
        reason: one paragraph: why this preset, what was excluded and why.
        bottlenecks: per operator, largest first.
        alternatives: every preset considered: (name, predicted ms or None, note).
        hardware: device name and where its figures came from.
    """

    strategy: str
    per_operator_precision: dict
    fa_config: dict
    predicted_time_ms: float
    baseline_time_ms: float
    predicted_speedup: float
    memory_savings: float
    weight_bytes: float
    kv_cache_bytes: float
    expected_quality_loss: float | None
    quality_source: str
    confidence: str
    reason: str
    bottlenecks: tuple[OperatorBottleneck, ...]
    alternatives: tuple
    hardware: str

    def table(self) -> str:
        """Human-readable summary with the per-operator bottleneck table."""
        q = (
            f"{self.expected_quality_loss:.4f} (1 - mean cosine; {self.quality_source})"
            if self.expected_quality_loss is not None
            else self.quality_source
        )
        lines = [
            f"strategy             {self.strategy}",
            f"hardware             {self.hardware}",
            f"predicted time       {self.predicted_time_ms:.3f} ms "
            f"(bf16 {self.baseline_time_ms:.3f} ms, {self.predicted_speedup:.2f}x)",
            f"weights              {self.weight_bytes / 1e6:.1f} MB "
            f"({self.memory_savings:.0%} saved vs bf16)",
            f"KV cache             {self.kv_cache_bytes / 1e6:.1f} MB",
            f"expected quality loss {q}",
            f"confidence           {self.confidence}",
            f"attention            {self.fa_config}",
            f"why                  {self.reason}",
            "",
            f"{'operator':14s} {'precision / path':44s} {'time us':>10s} {'share':>6s} bound",
        ]
        for b in self.bottlenecks:
            prec = self.per_operator_precision.get(b.operator, b.path)
            lines.append(f"{b.operator:14s} {prec:44s} {b.time_us:10.1f} {b.share:6.1%} {b.bound}")
        lines += ["", "alternatives:"]
        for name, ms, note in self.alternatives:
            t = f"{ms:.3f} ms" if ms is not None else "-"
            lines.append(f"  {name:20s} {t:>12s}  {note}")
        return "\n".join(lines)


def _ladder_note(strategy: Strategy, spec) -> str:
    """Empty, or which native GEMMs the device lacks (those layers run a lower rung)."""
    missing = [n for n in sorted(strategy.needs) if not getattr(spec, n)]
    if not missing:
        return ""
    return f" (no {'/'.join(missing).upper()} tensor cores on {spec.name}: fallback rungs priced)"


def _weight_bytes(cfg, strategy: Strategy) -> float:
    """Dense-weight bytes of ``cfg`` under ``strategy`` (per layer and operator)."""
    h, f = cfg.hidden, cfg.intermediate
    if isinstance(cfg, mdl.EncoderConfig):
        shapes = {Op.Q_PROJ: (h, h), Op.K_PROJ: (h, h), Op.V_PROJ: (h, h), Op.O_PROJ: (h, h)}
        shapes |= {Op.FFN_UP: (f, h), Op.FFN_DOWN: (h, f)}
    else:
        kvd = cfg.kv_heads * cfg.head_dim
        shapes = {Op.Q_PROJ: (h, h), Op.O_PROJ: (h, h), Op.K_PROJ: (kvd, h), Op.V_PROJ: (kvd, h)}
        shapes |= {Op.FFN_GATE: (f, h), Op.FFN_UP: (f, h), Op.FFN_DOWN: (h, f)}

    def wb(r, n, k):
        return rl.weight_bytes(r.w_format, n, k, r.w_granularity or "per_channel", r.w_block)

    total = sum(
        wb(strategy.recipe(op, i), n, k) for i in range(cfg.layers) for op, (n, k) in shapes.items()
    )
    if isinstance(cfg, mdl.DecoderConfig):
        total += wb(strategy.recipe(Op.FFN_DOWN, cfg.layers - 1), cfg.vocab, h)
    return total


def _is_baseline(strategy: Strategy) -> bool:
    return strategy.recipes() == {BF16}


def _check_args(cfg, phase, seq_len, batch):
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if not isinstance(seq_len, int) or seq_len <= 0 or not isinstance(batch, int) or batch <= 0:
        raise ValueError(f"seq_len and batch must be positive ints, got {seq_len}, {batch}")
    if isinstance(cfg, mdl.EncoderConfig) and phase == "decode":
        raise ValueError("encoders have no decode phase (use phase='prefill')")


def recommend(
    model,
    phase: str = "prefill",
    seq_len: int = 128,
    batch: int = 1,
    *,
    device="h200",
    presets: tuple | None = None,
    min_cosine: float = 0.99,
    allow_unmeasured: bool = False,
    min_gain: float = 0.05,
    kv_format: str = "bf16",
    context: int | None = None,
    profile="auto",
) -> QuantizationRecommendation:
    """Recommend a quantization strategy for ``model`` on ``device``.

    Args:
        model: name (``"e5-large"``, ``"minilm-l6"``, ``"bge-large"``,
            ``"llama-3-8b"``), an Encoder/DecoderConfig or a ``BertConfig``.
        phase: ``"prefill"`` (encoders: the forward pass) or ``"decode"``
            (decoders only: one token per sequence against ``context`` cached tokens).
        seq_len: tokens per sequence (prefill) / cached tokens (decode, unless ``context``).
        batch: sequences.
        device: registry key, ``device_kind`` string or ``jax.Device``.
        presets: strategies to consider: names of :data:`jax_bq.strategies.PRESETS`
            (the default: all of them) or of
            :data:`~jax_bq.perf.presets.BENCHMARK_RECIPES`, ``MixedPrecisionConfig``
            objects or :class:`~jax_bq.perf.presets.Strategy` objects.
        min_cosine: fidelity floor on the measured mean cosine.
        allow_unmeasured: also consider strategies without a fidelity measurement.
        min_gain: a quantized strategy must be predicted this much faster than
            the 16-bit baseline to be recommended for speed (the validated model
            error is ~5-10%); otherwise the baseline is, and the reason says so.
        context: decode: tokens in the KV cache (default ``seq_len``).
        kv_format: KV-cache precision for decoders (``bf16``, ``fp8``, ``nvfp4``).
        profile: ``"auto"`` (measured profile if any), a HardwareProfile, or None (datasheet).

    Raises:
        ValueError: unknown model/strategy/phase, non-positive sizes, decode for an
            encoder, or no strategy meeting the constraints.
    """
    cfg = mdl.model_config(model)
    _check_args(cfg, phase, seq_len, batch)
    eff = effective(device, profile)
    encoder = isinstance(cfg, mdl.EncoderConfig)
    kw = {} if encoder else {"phase": phase, "context": context, "kv_format": kv_format}
    strategies = [as_strategy(p, cfg.layers) for p in (presets or tuple(st.PRESETS))]

    def run(s: Strategy):
        return mdl.estimate(cfg, batch, seq_len, s, eff, **kw)

    base = run(BENCHMARK_RECIPES["bf16"])
    considered, alternatives = _screen(strategies, run, eff.spec, cfg, min_cosine, allow_unmeasured)
    chosen, margin_note = _pick(considered, min_gain)
    t, wbytes, strategy, est = chosen
    reason = _reason(considered, alternatives, min_cosine, margin_note)
    kv = 0.0 if encoder else mdl.kv_cache_bytes(cfg, batch, context or seq_len, kv_format)
    return QuantizationRecommendation(
        strategy=strategy.name,
        per_operator_precision=_precisions(strategy, est, cfg.layers),
        fa_config=_fa_config(cfg, batch, seq_len, phase, eff, encoder),
        predicted_time_ms=est.time_s * 1e3,
        baseline_time_ms=base.time_s * 1e3,
        predicted_speedup=base.time_s / est.time_s,
        memory_savings=1 - wbytes / _weight_bytes(cfg, BENCHMARK_RECIPES["bf16"]),
        weight_bytes=wbytes,
        kv_cache_bytes=kv,
        expected_quality_loss=(1 - strategy.fidelity.mean_cosine) if strategy.fidelity else None,
        quality_source=_quality_source(strategy),
        confidence="measured-profile" if eff.measured else "datasheet (no measured profile)",
        reason=reason,
        bottlenecks=_bottlenecks(est),
        alternatives=tuple(alternatives),
        hardware=f"{eff.spec.name}: {eff.origin}",
    )


def _screen(strategies, run, spec, cfg, min_cosine, allow_unmeasured):
    """(eligible ``(time, weight bytes, strategy, estimate)``, every ``(name, ms, note)``)."""
    considered, alternatives = [], []
    for s in strategies:
        est = run(s)
        ms = est.time_s * 1e3
        fid = s.fidelity
        if fid is None and not allow_unmeasured and not _is_baseline(s):
            alternatives.append((s.name, ms, "excluded: fidelity not measured"))
        elif fid is not None and fid.mean_cosine < min_cosine:
            note = f"excluded: mean cosine {fid.mean_cosine:.4f} < {min_cosine}"
            alternatives.append((s.name, ms, note))
        else:
            considered.append((est.time_s, _weight_bytes(cfg, s), s, est))
            alternatives.append((s.name, ms, "eligible" + _ladder_note(s, spec)))
    if not considered:
        raise ValueError(f"no strategy meets min_cosine={min_cosine} on {spec.name}")
    return considered, alternatives


def _pick(considered, min_gain):
    """The fastest (ties: smaller weights); the 16-bit baseline if the gain is < min_gain."""
    considered.sort(key=lambda c: (round(c[0], 9), c[1], c[2].name))
    best = considered[0]
    base = next((c for c in considered if _is_baseline(c[2])), None)
    if base is None or _is_baseline(best[2]) or best[0] <= base[0] / (1 + min_gain):
        return best, ""
    note = (
        f"; {best[2].name} is predicted only {base[0] / best[0]:.3f}x {base[2].name}, inside "
        f"the min_gain={min_gain:.0%} margin (the models' error), so {base[2].name}"
    )
    return base, note


def _reason(considered, alternatives, min_cosine, margin_note) -> str:
    excluded = [f"{n} ({note})" for n, _, note in alternatives if not note.startswith("eligible")]
    return (
        f"fastest predicted of {len(considered)} eligible strategies "
        f"({', '.join(c[2].name for c in considered)}) with measured mean cosine >= "
        f"{min_cosine}" + margin_note + (f"; not chosen: {'; '.join(excluded)}" if excluded else "")
    )


def _precisions(strategy: Strategy, est, layers: int) -> dict:
    """Model GEMM -> ``"recipe(s) via path"``."""
    out = {}
    for name, path in est.paths.items():
        ops = mdl.GEMM_OPERATORS.get(name, (Op.FFN_DOWN,))
        recipes = [r.describe() for r, _ in strategy.layer_groups(ops, layers)]
        out[name] = f"{' / '.join(recipes)} via {path}"
    return out


def _bottlenecks(est) -> tuple:
    total = est.time_s
    rows = (
        OperatorBottleneck(op, s * 1e6, s / total, bound, est.paths.get(op, op))
        for op, (s, bound) in est.by_operator().items()
    )
    return tuple(sorted(rows, key=lambda b: -b.time_us))


def _quality_source(strategy: Strategy) -> str:
    fid = strategy.fidelity
    if fid:
        return f"measured: {fid.source}, row '{fid.row}'"
    if _is_baseline(strategy):
        return "the 16-bit baseline (not measured against float32)"
    return "not measured"


def _fa_config(cfg, batch, seq, phase, eff, encoder) -> dict:
    """Attention: what JAX runs here, and the FA model's best version for this device."""
    if phase == "decode":
        return {"kernel": "KV-cache streaming (memory-bound)", "model": "kv_read"}
    heads = cfg.heads
    kvh = None if encoder else cfg.kv_heads
    s = att.AttentionShape(batch, heads, seq, seq, cfg.head_dim, kvh, causal=not encoder)
    best = None
    for (v, prec), _ in att.FA_UTILIZATION.items():
        if prec == "fp4" or (v == "fa4" and eff.spec.compute_capability[0] < 10):
            continue
        if v == "fa3" and eff.spec.compute_capability[0] != 9:
            continue
        try:
            t, bound = att.flash_attention_time(s, eff, v, prec)
        except ValueError:
            continue
        if best is None or t < best[0]:
            best = (t, v, prec, bound)
    out = {
        "jax_impl": "xla" if encoder else "cudnn",
        "priced_as": "attention:xla (scores in HBM)" if encoder else "attention:cudnn",
    }
    if best:
        out["fa_model_best"] = (
            f"{best[1]} {best[2]} ({best[0] * 1e6:.1f} us/layer, {best[3]}-bound)"
        )
        out["note"] = "FA numbers are models of the published algorithms, not jax_bq kernels"
    return out
