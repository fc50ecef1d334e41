r"""``recommend``: the fastest preset that meets a fidelity target, with the evidence.

For each preset the local device can run (capability ladder:
FP8 presets need FP8 tensor cores for W8A8, ``nvfp4_w4a4`` needs FP4 ones;
weight-only presets run everywhere), the whole-model time is predicted
(:mod:`jax_bq.perf.models`). Presets whose **measured** fidelity
(:mod:`jax_bq.perf.presets`) is below ``min_cosine`` -- or was never measured,
unless ``allow_unmeasured`` -- are excluded; the fastest remaining one is the
recommendation (ties: the smaller weights), unless it is predicted less than
``min_gain`` faster than bf16 -- then bf16, since the models' error is larger.
Speed-up and times are relative to the bf16 model on the same device; the
reference precision of the specification ("FP16") is bf16 here, same bytes and
tensor-core rate. bf16 itself is always eligible (the baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

from jax_bq.perf import attention as att
from jax_bq.perf import models as mdl
from jax_bq.perf import roofline as rl
from jax_bq.perf.hardware import effective
from jax_bq.perf.presets import FIDELITY_SOURCE, PRESETS, Preset, preset

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
        strategy: preset name.
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


def _available(p: Preset, spec) -> tuple[bool, str]:
    if p.needs == "fp8" and not spec.fp8:
        return False, f"{spec.name} has no FP8 tensor cores"
    if p.needs == "fp4" and not spec.fp4:
        return False, f"{spec.name} has no FP4 tensor cores"
    return True, ""


def _weight_bytes(cfg, p: Preset) -> float:
    if isinstance(cfg, mdl.EncoderConfig):
        h, f = cfg.hidden, cfg.intermediate
        shapes = [(h, h)] * 4 + [(f, h), (h, f)]
        per = sum(rl.weight_bytes(p.w_format, n, k, p.w_granularity, p.w_block) for n, k in shapes)
        return per * cfg.layers
    h, f, kvd = cfg.hidden, cfg.intermediate, cfg.kv_heads * cfg.head_dim
    shapes = [(h, h)] * 2 + [(kvd, h)] * 2 + [(f, h)] * 2 + [(h, f)]
    per = sum(rl.weight_bytes(p.w_format, n, k, p.w_granularity, p.w_block) for n, k in shapes)
    return per * cfg.layers + rl.weight_bytes(p.w_format, cfg.vocab, h, p.w_granularity, p.w_block)


def recommend(
    model,
    phase: str = "prefill",
    seq_len: int = 128,
    batch: int = 1,
    *,
    device="h200",
    presets: tuple[str, ...] | None = None,
    min_cosine: float = 0.99,
    allow_unmeasured: bool = False,
    min_gain: float = 0.05,
    kv_format: str = "bf16",
    context: int | None = None,
    profile="auto",
) -> QuantizationRecommendation:
    """Recommend a quantization preset for ``model`` on ``device``.

    Args:
        model: name (``"e5-large"``, ``"minilm-l6"``, ``"bge-large"``,
            ``"llama-3-8b"``), an Encoder/DecoderConfig or a ``BertConfig``.
        phase: ``"prefill"`` (encoders: the forward pass) or ``"decode"``
            (decoders only: one token per sequence against ``context`` cached tokens).
        seq_len: tokens per sequence (prefill) / cached tokens (decode, unless ``context``).
        batch: sequences.
        device: registry key, ``device_kind`` string or ``jax.Device``.
        presets: names to consider (default: all of :data:`~jax_bq.perf.presets.PRESETS`).
        min_cosine: fidelity floor on the measured mean cosine.
        allow_unmeasured: also consider presets without a fidelity measurement.
        min_gain: a quantized preset must be predicted this much faster than bf16
            to be recommended for speed (the validated model error is ~5-10%);
            otherwise bf16 is, and the reason says so.
        context: decode: tokens in the KV cache (default ``seq_len``).
        kv_format: KV-cache precision for decoders (``bf16``, ``fp8``, ``nvfp4``).
        profile: ``"auto"`` (measured profile if any), a HardwareProfile, or None (datasheet).

    Raises:
        ValueError: unknown model/preset/phase, non-positive sizes, decode for an encoder,
            or no preset meeting the constraints.
    """
    cfg = mdl.model_config(model)
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if not isinstance(seq_len, int) or seq_len <= 0 or not isinstance(batch, int) or batch <= 0:
        raise ValueError(f"seq_len and batch must be positive ints, got {seq_len}, {batch}")
    encoder = isinstance(cfg, mdl.EncoderConfig)
    if encoder and phase == "decode":
        raise ValueError("encoders have no decode phase (use phase='prefill')")
    eff = effective(device, profile)
    names = presets or tuple(PRESETS)
    kw = {} if encoder else {"phase": phase, "context": context, "kv_format": kv_format}

    def run(p):
        return mdl.estimate(cfg, batch, seq_len, p, eff, **kw)

    base = run(preset("bf16"))
    considered, alternatives = [], []
    for name in names:
        p = preset(name)
        ok, why = _available(p, eff.spec)
        if not ok:
            alternatives.append((name, None, f"unavailable: {why}"))
            continue
        est = run(p)
        ms = est.time_s * 1e3
        if p.fidelity is None and not allow_unmeasured and name != "bf16":
            alternatives.append((name, ms, "excluded: fidelity not measured"))
            continue
        if p.fidelity is not None and p.fidelity.mean_cosine < min_cosine:
            alternatives.append(
                (name, ms, f"excluded: mean cosine {p.fidelity.mean_cosine:.4f} < {min_cosine}")
            )
            continue
        considered.append((est.time_s, _weight_bytes(cfg, p), name, est))
        alternatives.append((name, ms, "eligible"))
    if not considered:
        raise ValueError(f"no preset meets min_cosine={min_cosine} on {eff.spec.name}")
    considered.sort(key=lambda t: (round(t[0], 9), t[1]))
    t, wbytes, name, est = considered[0]
    margin_note = ""
    bf16_row = next((c for c in considered if c[2] == "bf16"), None)
    if name != "bf16" and bf16_row is not None and t > bf16_row[0] / (1 + min_gain):
        margin_note = (
            f"; {name} is predicted only {bf16_row[0] / t:.3f}x bf16, inside the "
            f"min_gain={min_gain:.0%} margin (the models' error), so bf16"
        )
        t, wbytes, name, est = bf16_row
    p = preset(name)
    total = est.time_s
    ops = est.by_operator()
    bottlenecks = tuple(
        sorted(
            (
                OperatorBottleneck(op, s * 1e6, s / total, bound, est.paths.get(op, op))
                for op, (s, bound) in ops.items()
            ),
            key=lambda b: -b.time_us,
        )
    )
    act = {"dynamic": p.w_format if p.needs else "bf16", "static": "fp8 (static)", "bf16": "bf16"}
    wo_paths = ("w8a16", "w4a16", "xla_bf16")

    def _prec(path):
        a = "bf16" if path in wo_paths or p.w_format == "bf16" else act[p.act]
        g = "/" + p.w_granularity if p.w_granularity else ""
        return f"{p.w_format}{g} x {a} via {path}"

    prec = {layer: _prec(path) for layer, path in est.paths.items()}
    fa = _fa_config(cfg, batch, seq_len, phase, eff, encoder)
    kv = 0.0 if encoder else mdl.kv_cache_bytes(cfg, batch, context or seq_len, kv_format)
    bf16_bytes = _weight_bytes(cfg, preset("bf16"))
    fid = p.fidelity
    excluded = [f"{n} ({note})" for n, _, note in alternatives if note != "eligible"]
    reason = (
        f"fastest predicted of {len(considered)} eligible presets "
        f"({', '.join(c[2] for c in considered)}) with measured mean cosine >= {min_cosine}"
        + margin_note
        + (f"; not chosen: {'; '.join(excluded)}" if excluded else "")
    )
    return QuantizationRecommendation(
        strategy=name,
        per_operator_precision=prec,
        fa_config=fa,
        predicted_time_ms=total * 1e3,
        baseline_time_ms=base.time_s * 1e3,
        predicted_speedup=base.time_s / total,
        memory_savings=1 - wbytes / bf16_bytes,
        weight_bytes=wbytes,
        kv_cache_bytes=kv,
        expected_quality_loss=(1 - fid.mean_cosine) if fid else None,
        quality_source=(
            f"measured: {FIDELITY_SOURCE}, row '{fid.row}'"
            if fid
            else "the bf16 baseline (not measured against float32)"
            if name == "bf16"
            else "not measured"
        ),
        confidence="measured-profile" if eff.measured else "datasheet (no measured profile)",
        reason=reason,
        bottlenecks=bottlenecks,
        alternatives=tuple(alternatives),
        hardware=f"{eff.spec.name}: {eff.origin}",
    )


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
