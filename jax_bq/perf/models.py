r"""Whole-model estimates: BERT-family encoders and Llama-style decoders.

A model is the list of its operators' :class:`~jax_bq.perf.roofline.OpCost`
(one entry per distinct operator with its count), priced by
:func:`~jax_bq.perf.roofline.predict`; the time is the sum (kernels run back to
back on one stream). Which GEMM path a dense layer takes follows jax_bq's
ladder (:func:`gemm_candidates`) and, among the candidates, the fastest
predicted one -- what ``qmatmul``'s plan does with a measured profile.

Per encoder block (``M = batch * seq`` tokens, hidden ``H``, FFN ``F``):
Q, K, V, O projections ``M x H x H``, FFN ``M x F x H`` and ``M x H x F``,
attention ``batch x heads x seq x seq``, two residual LayerNorms, bias+GELU on
``M x F`` and ``MISC_PASSES`` passes over ``M x H`` (bias adds, head
transposes). Decoder blocks (GQA): Q/O ``H x H``, K/V ``H x (Hkv d)``, gate and
up ``F x H``, down ``H x F``, two RMSNorms; prefill runs causal attention,
decode streams the KV cache in its precision.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

from jax_bq.perf import attention as att
from jax_bq.perf import roofline as rl
from jax_bq.perf.hardware import Effective
from jax_bq.perf.presets import LayerRecipe, Strategy
from jax_bq.strategies import OperatorType as Op

#: Elementwise passes over ``M x H`` bf16 per encoder block besides LayerNorm and GELU
#: (bias adds of Q/K/V/O, head split/merge transposes): counted from the XLA
#: fusions of benchmarks/results/e2e_kernels_h200.txt (bias adds, 4 transposes).
MISC_PASSES = 8


class _ModelShape:
    """What encoder and decoder configs share: every field a positive int, heads dividing hidden."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(
                    f"{type(self).__name__}.{f.name} must be a positive int, got {v!r}"
                )
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not a multiple of heads={self.heads}")

    @property
    def head_dim(self) -> int:
        """``hidden // heads``."""
        return self.hidden // self.heads


@dataclass(frozen=True)
class EncoderConfig(_ModelShape):
    """BERT-family encoder shape."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int = 30522

    @property
    def dense_params(self) -> int:
        """Parameters of the dense layers (the quantized ones)."""
        return self.layers * (4 * self.hidden**2 + 2 * self.hidden * self.intermediate)


@dataclass(frozen=True)
class DecoderConfig(_ModelShape):
    """Llama-style decoder shape (GQA, gated FFN)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 128256

    def __post_init__(self):
        super().__post_init__()
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} is not a multiple of kv_heads={self.kv_heads}")

    @property
    def dense_params(self) -> int:
        """Parameters of the dense layers and the LM head."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        block = 2 * h * h + 2 * h * kv + 3 * h * self.intermediate
        return self.layers * block + self.vocab * h


#: The project's encoder configs (jax_bq.models) and a Llama-3-8B-like decoder.
MODELS: dict[str, EncoderConfig | DecoderConfig] = {
    "minilm-l6": EncoderConfig(384, 6, 12, 1536),
    "e5-large": EncoderConfig(1024, 24, 16, 4096),
    "bge-large": EncoderConfig(1024, 24, 16, 4096),
    "llama-3-8b": DecoderConfig(4096, 32, 32, 8, 14336),
}


def model_config(model) -> EncoderConfig | DecoderConfig:
    """A config from a name in :data:`MODELS`, a config, or a ``jax_bq.models.BertConfig``.

    Raises:
        ValueError: unknown name or an object that is not a model config.
    """
    if isinstance(model, (EncoderConfig, DecoderConfig)):
        return model
    if isinstance(model, str):
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r} (one of {sorted(MODELS)})")
        return MODELS[model]
    fields = ("hidden_size", "num_layers", "num_heads", "intermediate_size")
    if all(hasattr(model, f) for f in fields):
        return EncoderConfig(
            model.hidden_size,
            model.num_layers,
            model.num_heads,
            model.intermediate_size,
            getattr(model, "vocab_size", 30522),
        )
    raise ValueError(f"not a model config: {type(model).__name__}")


def gemm_candidates(m: int, n: int, k: int, r: LayerRecipe, spec) -> list[tuple[str, dict]]:
    """jax_bq's paths for one dense layer with recipe ``r`` on device ``spec``.

    Mirrors the ladder of ``jax_bq.matmul`` (DESIGN §5): cuBLASLt FP8 with FP8
    tensor cores; W8A16 / W4A16 for ``M <= 64``; cuBLASLt block-scaled formats
    on FP4/MX tensor cores; FP4 weights converted to FP8 from ``M >= 256`` when
    activations are left to the plan; dequantize + bf16 dot otherwise.
    Returns ``(path, gemm_costs kwargs)`` pairs.
    """
    if r.w_format == "bf16":
        return [("xla_bf16", {})]
    kw = dict(w_format=r.w_format, w_granularity=r.w_granularity, w_block=r.w_block)
    fp8_w, fp4_w = r.w_format.startswith("fp8"), r.w_format in ("fp4", "nvfp4")
    native_blockfp = (r.w_format == "nvfp4" and spec.fp4) or (r.w_format == "mxfp8" and spec.mx)
    out = []
    if fp8_w and r.act in ("dynamic", "static", "auto") and spec.fp8:
        block = r.w_granularity in ("per_block", "tile_2d")
        if not (block and m < 4):  # cuBLASLt refuses block scales at M = 1, 2 on Hopper
            act = "pre" if r.act == "static" else "dynamic"
            out.append(("cublaslt_fp8", {**kw, "act": act, "act_granularity": r.act_granularity}))
    if fp8_w and m <= 64 and r.act != "static":
        out.append(("w8a16", kw))
    if native_blockfp and r.act in ("dynamic", "auto"):
        out.append(("cublaslt_blockfp", kw))
    if fp4_w and r.act in ("bf16", "auto") and m <= 64 and k % 32 == 0:
        out.append(("w4a16", kw))
    if fp4_w and r.act == "auto" and m >= 256 and spec.fp8 and not native_blockfp:
        out.append(("fp4_via_fp8", kw))
    if not out or (r.act in ("bf16", "auto") and m > 64 and not native_blockfp):
        act = "dynamic" if (fp8_w and r.act != "bf16") else "bf16"
        out.append(("dequant_dot", {**kw, "act": act}))
    return out


def best_gemm(m, n, k, r: LayerRecipe, eff: Effective, name: str) -> tuple[str, list[rl.OpCost]]:
    """(path, ops) of the fastest predicted candidate; ties go to the earlier ladder rung."""
    best = None
    for path, kw in gemm_candidates(m, n, k, r, eff.spec):
        ops = rl.gemm_costs(m, n, k, path, name=name, **kw)
        t = rl.total_s(ops, eff)
        if best is None or t < best[0]:
            best = (t, path, ops)
    return best[1], best[2]


#: Model GEMM name -> the strategy operators it stands for (fused ones agree per layer).
GEMM_OPERATORS = {
    "qkv": (Op.Q_PROJ, Op.K_PROJ, Op.V_PROJ),
    "attn_out": (Op.O_PROJ,),
    "ffn_in": (Op.FFN_UP,),
    "ffn_out": (Op.FFN_DOWN,),
    "q_o": (Op.Q_PROJ, Op.O_PROJ),
    "k_v": (Op.K_PROJ, Op.V_PROJ),
    "gate_up": (Op.FFN_GATE, Op.FFN_UP),
    "down": (Op.FFN_DOWN,),
    "lm_head": (Op.FFN_DOWN,),
}


def _dense_layers(gemms, strategy: Strategy, layers: int, eff) -> tuple[Counter, dict]:
    """Operator counts and paths of the model GEMMs ``(name, N, K, M, per-layer count)``.

    Each GEMM's recipe is looked up through its operators in
    :data:`GEMM_OPERATORS`. Layers whose recipes differ (per-layer overrides)
    are priced separately; ``paths[name]`` lists the path of each group.
    """
    c: Counter = Counter()
    paths: dict = {}
    for name, n, k, m, count in gemms:
        got = []
        for recipe, nl in strategy.layer_groups(GEMM_OPERATORS[name], layers):
            path, ops = best_gemm(m, n, k, recipe, eff, name)
            got.append(path)
            for o in ops:
                c[o] += nl * count
        paths[name] = "/".join(dict.fromkeys(got))
    return c, paths


@dataclass(frozen=True)
class ModelEstimate:
    """Predicted time of a whole forward pass, per operator."""

    ops: tuple  # ((OpCost, count), ...)
    estimates: tuple  # (Estimate, ...) aligned with ops
    paths: dict  # dense layer name -> GEMM path

    @property
    def time_s(self) -> float:
        """Predicted seconds of the whole pass."""
        return sum(e.time_s * c for e, (_, c) in zip(self.estimates, self.ops, strict=True))

    def by_operator(self) -> dict[str, tuple[float, str]]:
        """Operator name -> (total seconds, bound of its largest kernel)."""
        out: dict[str, list] = {}
        for e, (op, c) in zip(self.estimates, self.ops, strict=True):
            base = op.name.split(":")[0]
            t, b, tb = out.get(base, (0.0, "", 0.0))
            if e.time_s * c > tb:
                b, tb = e.bound, e.time_s * c
            out[base] = (t + e.time_s * c, b, tb)
        return {k: (v[0], v[1]) for k, v in out.items()}


def _finish(counter: Counter, eff: Effective, paths) -> ModelEstimate:
    ops = tuple(counter.items())
    return ModelEstimate(ops, tuple(rl.predict(o, eff) for o, _ in ops), paths)


def encoder_ops(
    cfg: EncoderConfig,
    batch: int,
    seq: int,
    strategy: Strategy,
    eff: Effective,
    attention_impl="xla",
) -> ModelEstimate:
    """Operators of one encoder forward pass (``batch x seq`` tokens) under ``strategy``."""
    if batch <= 0 or seq <= 0:
        raise ValueError(f"batch and seq must be positive, got {batch} x {seq}")
    m, h, f = batch * seq, cfg.hidden, cfg.intermediate
    gemms = (
        ("qkv", h, h, m, 3),
        ("attn_out", h, h, m, 1),
        ("ffn_in", f, h, m, 1),
        ("ffn_out", h, f, m, 1),
    )
    c, paths = _dense_layers(gemms, strategy, cfg.layers, eff)
    s = att.AttentionShape(batch, cfg.heads, seq, seq, cfg.head_dim)
    c[att.attention_cost(s, attention_impl)] += cfg.layers
    static = any(r.act == "static" for r in strategy.recipes())
    ln_out = 2 + (1 if static else 0)  # static FP8: LN also writes the codes
    c[rl.layernorm_cost(m, h, 2, ln_out)] += 2 * cfg.layers
    c[rl.elementwise_cost("bias_gelu", m * f, 2 + ln_out)] += cfg.layers
    c[rl.elementwise_cost("misc", m * h, 4 * MISC_PASSES)] += cfg.layers
    c[rl.elementwise_cost("embed_pool", m * h, 8)] += 1
    return _finish(c, eff, paths)


def decoder_ops(
    cfg: DecoderConfig,
    batch: int,
    seq: int,
    strategy: Strategy,
    eff: Effective,
    phase: str = "prefill",
    context: int | None = None,
    kv_format: str = "bf16",
) -> ModelEstimate:
    """Operators of a decoder in ``phase``: prefill of ``seq`` tokens, or one decode step.

    ``context`` (decode): tokens already in the KV cache (default ``seq``);
    ``kv_format``: ``bf16``, ``fp8`` or ``nvfp4`` KV cache.
    """
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    if batch <= 0 or seq <= 0:
        raise ValueError(f"batch and seq must be positive, got {batch} x {seq}")
    kv_bytes = kv_element_bytes(kv_format)
    m = batch * seq if phase == "prefill" else batch
    h, f, d = cfg.hidden, cfg.intermediate, cfg.head_dim
    kvd = cfg.kv_heads * d
    gemms = (
        ("q_o", h, h, m, 2),
        ("k_v", kvd, h, m, 2),
        ("gate_up", f, h, m, 2),
        ("down", h, f, m, 1),
    )
    c, paths = _dense_layers(gemms, strategy, cfg.layers, eff)
    # the LM head (last token only) follows the FFN's recipe of the last layer
    head = strategy.recipe(Op.FFN_DOWN, cfg.layers - 1)
    path, ops = best_gemm(batch, cfg.vocab, h, head, eff, "lm_head")
    paths["lm_head"] = path
    for o in ops:
        c[o] += 1
    if phase == "prefill":
        s = att.AttentionShape(batch, cfg.heads, seq, seq, d, cfg.kv_heads, causal=True)
        c[att.attention_cost(s, "cudnn")] += cfg.layers
        c[rl.elementwise_cost("kv_write", batch * seq * 2 * kvd, 2 + kv_bytes)] += cfg.layers
    else:
        ctx = context if context is not None else seq
        c[att.decode_kv_read_cost(batch, ctx, cfg.kv_heads, d, kv_bytes)] += cfg.layers
    c[rl.layernorm_cost(m, h, 2, 2)] += 2 * cfg.layers
    c[rl.elementwise_cost("swiglu", m * f, 6)] += cfg.layers
    c[rl.elementwise_cost("rope_misc", m * h, 12)] += cfg.layers
    return _finish(c, eff, paths)


_KV_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "nvfp4": 0.5 + 1 / 16}


def kv_element_bytes(kv_format: str) -> float:
    """Bytes per cached K/V element (NVFP4: 4-bit code + one E4M3 scale per 16)."""
    if kv_format not in _KV_BYTES:
        raise ValueError(f"kv_format must be one of {sorted(_KV_BYTES)}, got {kv_format!r}")
    return _KV_BYTES[kv_format]


def kv_cache_bytes(cfg: DecoderConfig, batch: int, context: int, kv_format: str = "bf16") -> float:
    """``2 * layers * batch * context * kv_heads * head_dim * bytes`` (K and V)."""
    return (
        2.0
        * cfg.layers
        * batch
        * context
        * cfg.kv_heads
        * cfg.head_dim
        * kv_element_bytes(kv_format)
    )


def estimate(model, batch: int, seq: int, strategy, eff: Effective, **kw) -> ModelEstimate:
    """Whole-model estimate for an encoder (``kw``: attention_impl) or decoder (phase, ...).

    ``strategy``: a :class:`~jax_bq.perf.presets.Strategy`, a preset name or a
    ``jax_bq.strategies.MixedPrecisionConfig``.
    """
    from jax_bq.perf.presets import as_strategy

    cfg = model_config(model)
    strategy = as_strategy(strategy, cfg.layers)
    if isinstance(cfg, EncoderConfig):
        return encoder_ops(cfg, batch, seq, strategy, eff, **kw)
    return decoder_ops(cfg, batch, seq, strategy, eff, **kw)
