"""Per-operator mixed-precision strategies and runtime-adaptive precision.

A :class:`MixedPrecisionConfig` says, per :class:`OperatorType` (and
optionally per layer), how an operator's weights are stored and how its
activations are handled. It is applied through the existing rules machinery:
:func:`apply_strategy` resolves every kernel path to its spec and calls
:func:`jax_bq.flax.quantize_model_weights` with exact ``(pattern, spec)``
rules, then stores each operator's activation spec next to its kernel
(``act_quant``, read by :class:`~jax_bq.flax.QDense`; NNX:
:func:`apply_strategy_nnx`). There is no second quantization path.

Sources of a config: the presets (:data:`PRESETS`), hand-written configs,
and :meth:`MixedPrecisionConfig.from_plan` (the measured-sensitivity
:func:`jax_bq.flax.plan_mixed_precision`), whose exact-path rules take
precedence over the operator table.

Which operators exist in the BERT-family encoders of
:mod:`jax_bq.models.bert`: the six dense layers per block (Q/K/V/O
projections, FFN up = ``intermediate``, FFN down = ``output``) and the word
embeddings. Attention's QK and SV products and the softmax run in the
activation dtype there, and an encoder has no KV cache or gated FFN;
:func:`explain_strategy` says so for any such operator a config sets.

On a device without a preset's format, :func:`jax_bq.qmatmul`'s capability
ladder applies (native GEMM -> weight-only -> dequantize + dot) and
:func:`explain_strategy` prints, per operator, the plan and its reason.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_bq.dynamic import DynamicQuantConfig, WeightOnly, outlier_ratio
from jax_bq.formats import Granularity, QuantFormat

__all__ = [
    "BERT_OPERATORS",
    "PRESETS",
    "AdaptivePrecisionSelector",
    "MixedPrecisionConfig",
    "OperatorPrecision",
    "OperatorType",
    "SelectorContext",
    "apply_strategy",
    "apply_strategy_nnx",
    "explain_strategy",
    "preset",
]


class OperatorType(enum.Enum):
    """The operators a strategy can address."""

    Q_PROJ = "q_proj"
    K_PROJ = "k_proj"
    V_PROJ = "v_proj"
    O_PROJ = "o_proj"
    QK_MATMUL = "qk_matmul"
    SV_MATMUL = "sv_matmul"
    SOFTMAX = "softmax"
    FFN_GATE = "ffn_gate"
    FFN_UP = "ffn_up"
    FFN_DOWN = "ffn_down"
    KV_CACHE = "kv_cache"
    NORM = "norm"
    EMBEDDING = "embedding"

    @classmethod
    def parse(cls, v) -> OperatorType:
        """From an OperatorType or its name/value (``"q_proj"``, ``"Q_PROJ"``)."""
        if isinstance(v, OperatorType):
            return v
        if isinstance(v, str):
            for op in cls:
                if v.lower() in (op.value, op.name.lower()):
                    return op
        names = ", ".join(op.value for op in cls)
        raise ValueError(f"unknown operator {v!r}; expected one of: {names}")


#: Dense operators of jax_bq.models.bert blocks: param path ``layer_<i>/<name>/kernel``.
BERT_OPERATORS = {
    OperatorType.Q_PROJ: "query",
    OperatorType.K_PROJ: "key",
    OperatorType.V_PROJ: "value",
    OperatorType.O_PROJ: "attention_output",
    OperatorType.FFN_UP: "intermediate",
    OperatorType.FFN_DOWN: "output",
}
_EMBEDDING_PATH = "word_embeddings/embedding"
_NOT_IN_ENCODER = {
    OperatorType.QK_MATMUL: "runs in the activation dtype (jax.nn.dot_product_attention)",
    OperatorType.SV_MATMUL: "runs in the activation dtype (jax.nn.dot_product_attention)",
    OperatorType.SOFTMAX: "runs in the activation dtype (jax.nn.dot_product_attention)",
    OperatorType.KV_CACHE: "an encoder has no KV cache",
    OperatorType.FFN_GATE: "BERT's FFN has no gate",
    OperatorType.NORM: "LayerNorms stay in the activation dtype",
}
_CASTS = ("bf16", "fp16")


@dataclass(frozen=True)
class OperatorPrecision:
    """Weights and activations of one operator.

    Attributes:
        weight: a format name or :class:`~jax_bq.flax.WeightQuant` (quantized),
            ``"bf16"``/``"fp16"`` (stored in that dtype), or ``None`` (kept).
        act: ``None`` (the module's ``act_format``/``act_granularity``), a
            :class:`~jax_bq.dynamic.DynamicQuantConfig`, or ``"bf16"``/``"fp16"``
            (weight-only; becomes :class:`~jax_bq.dynamic.WeightOnly`).
            Needs a quantized ``weight``.
    """

    weight: object = None
    act: object = None

    def __post_init__(self):
        from jax_bq.flax.rules import _as_spec

        spec = _as_spec(self.weight)  # validates (ValueError on an unknown format)
        act = self.act
        if isinstance(act, str):
            act = WeightOnly(QuantFormat.parse(act).value)
            object.__setattr__(self, "act", act)
        if act is not None and not isinstance(act, DynamicQuantConfig | WeightOnly):
            raise ValueError(
                f"act must be None, a DynamicQuantConfig or 'bf16'/'fp16', got {act!r}"
            )
        if act is not None and not self.quantized(spec):
            raise ValueError(
                f"an activation spec ({act.describe()}) needs quantized weights, "
                f"got weight={self.weight!r}"
            )

    @staticmethod
    def quantized(spec) -> bool:
        """Whether a resolved rule spec quantizes (a WeightQuant)."""
        from jax_bq.flax.rules import WeightQuant

        return isinstance(spec, WeightQuant)

    def describe(self) -> str:
        """``weights <format>, activations <spec>``."""
        w = self.weight
        w = "kept" if w is None else (w if isinstance(w, str) else _weight_name(w))
        a = "module default" if self.act is None else self.act.describe()
        return f"weights {w}, activations {a}"


def _weight_name(w) -> str:
    fmt = QuantFormat.parse(w.format).value
    extra = f" b{w.block_size}" if w.block_size else ""
    return f"{fmt}{extra}" + (" calibrated" if w.calibrate else "")


def _as_table(table, where: str) -> dict[OperatorType, OperatorPrecision]:
    out = {}
    for k, v in dict(table).items():
        op = OperatorType.parse(k)
        if not isinstance(v, OperatorPrecision):
            raise ValueError(f"{where}[{op.value}] must be an OperatorPrecision, got {v!r}")
        out[op] = v
    return out


@dataclass(frozen=True)
class MixedPrecisionConfig:
    """A per-operator (and per-layer) precision strategy.

    Attributes:
        name: label for tables and ``explain``.
        operators: ``{OperatorType or name: OperatorPrecision}`` for every layer.
        layers: ``{layer index: {operator: OperatorPrecision}}`` overrides
            (layerwise / progressive schedules).
        rules: exact ``(pattern, spec)`` weight rules that come first (e.g.
            a :class:`~jax_bq.flax.MixedPrecisionPlan`'s), first match wins.
        description: one line on intent.
    """

    name: str
    operators: Mapping = field(default_factory=dict)
    layers: Mapping = field(default_factory=dict)
    rules: tuple = ()
    description: str = ""

    def __post_init__(self):
        object.__setattr__(self, "operators", _as_table(self.operators, "operators"))
        layers = {}
        for i, table in dict(self.layers).items():
            if not isinstance(i, int) or i < 0:
                raise ValueError(f"layers keys must be layer indices >= 0, got {i!r}")
            layers[i] = _as_table(table, f"layers[{i}]")
        object.__setattr__(self, "layers", layers)
        from jax_bq.flax.rules import _compile_rules

        _compile_rules(list(self.rules))  # ValueError on a malformed rule
        object.__setattr__(self, "rules", tuple(tuple(r) for r in self.rules))

    def precision_for(self, op, layer: int | None = None) -> OperatorPrecision:
        """What ``op`` gets in ``layer`` (layer override, else the table, else kept)."""
        op = OperatorType.parse(op)
        if layer is not None and op in self.layers.get(layer, {}):
            return self.layers[layer][op]
        return self.operators.get(op, OperatorPrecision())

    @classmethod
    def from_plan(cls, plan, base: MixedPrecisionConfig | None = None, name: str | None = None):
        """A config whose weights follow a measured :class:`~jax_bq.flax.MixedPrecisionPlan`.

        The plan's exact-path rules come first; ``base`` (e.g. a preset) gives
        the activation specs and anything the plan does not cover.
        """
        base = base or MixedPrecisionConfig("base")
        return cls(
            name or f"plan({plan.metric} >= {plan.target:g}, {len(plan.kept)} kept)",
            base.operators,
            base.layers,
            tuple(plan.rules) + tuple(base.rules),
            f"measured sensitivity plan over {base.name}",
        )


def _layer_index(path: str) -> int | None:
    m = re.match(r"^layer_(\d+)/", path)
    return int(m.group(1)) if m else None


def _operator_of(path: str, operators: Mapping[OperatorType, str]) -> OperatorType | None:
    if path == _EMBEDDING_PATH:
        return OperatorType.EMBEDDING
    m = re.match(r"^layer_\d+/([^/]+)/kernel$", path)
    if m:
        for op, name in operators.items():
            if name == m.group(1):
                return op
    return None


def _resolve(cfg: MixedPrecisionConfig, params, operators):
    """``{path: (weight spec, act spec, operator, layer)}`` for every addressed leaf."""
    from jax_bq.flax.rules import _compile_rules, named_leaves

    extra = _compile_rules(list(cfg.rules)) if cfg.rules else []
    out, used = {}, set()
    for path, _ in named_leaves(params):
        op = _operator_of(path, operators)
        if op is None:
            continue
        layer = _layer_index(path)
        prec = cfg.precision_for(op, layer)
        weight = prec.weight
        for pat, _spec, src in extra:
            if pat.search(path):
                used.add(src)
                weight = dict(cfg.rules)[src]
                break
        out[path] = (weight, prec.act, op, layer)
    missing = [src for _, _, src in extra if src not in used]
    if missing:
        raise ValueError(f"strategy {cfg.name!r}: rules matched no operator: {missing}")
    for i in cfg.layers:
        if not any(v[3] == i for v in out.values()):
            raise ValueError(f"strategy {cfg.name!r}: layer {i} is not in the model")
    return out


def apply_strategy(params, cfg: MixedPrecisionConfig, *, operators=None):
    """Params of a BERT-family encoder (:mod:`jax_bq.models.bert`) stored as ``cfg`` says.

    Weights go through :func:`jax_bq.flax.quantize_model_weights` with one
    exact rule per addressed leaf; each dense operator with an activation
    spec gets ``act_quant`` next to its kernel (read by
    :class:`~jax_bq.flax.QDense`), and a spec with
    ``fallback_weight="fp16"`` also a float16 copy of the kernel,
    ``fallback_kernel`` (its FP16 branch's weight). A ``per_token`` or
    ``per_tensor`` spec with ``block_gemm=True`` (the default) gets its FP8
    per-tensor/per-channel kernel re-expressed blocked by 128 along K
    (:func:`jax_bq.dynamic.block_weight`: same codes, same values), so that
    the product runs as the block-scaled GEMM with 1x128 activation scales.

    Args:
        params: float params (``variables["params"]``).
        cfg: the strategy.
        operators: ``{OperatorType: dense layer name}`` (default
            :data:`BERT_OPERATORS`).

    Raises:
        ValueError: an activation spec on a kept/cast weight, rules or layers
            that match nothing, and everything ``quantize_model_weights`` rejects.
    """
    from jax_bq.dynamic import block_weight
    from jax_bq.flax.dynamic_dense import needs_fallback_copy
    from jax_bq.flax.rules import quantize_model_weights

    operators = operators or BERT_OPERATORS
    resolved = _resolve(cfg, params, operators)
    rules = [(f"^{re.escape(p)}$", w) for p, (w, _, _, _) in resolved.items()]
    out = quantize_model_weights(params, rules) if rules else params
    out = jax.tree_util.tree_map(lambda x: x, out)  # fresh dict containers
    for path, (_, act, _, _) in resolved.items():
        if act is None:
            continue
        node, src = out, params
        for key in path.split("/")[:-1]:
            node, src = node[key], src[key]
        node["act_quant"] = act
        leaf = path.split("/")[-1]
        if _wants_block_weight(act, node[leaf]):  # once, here: the block-scaled GEMM's weight
            node[leaf] = block_weight(node[leaf])
        if needs_fallback_copy(act):  # the FP16 branch's weight (DynamicQuantConfig)
            node["fallback_kernel"] = jnp.asarray(src[path.split("/")[-1]], jnp.float16)
    return out


def _wants_block_weight(act, leaf) -> bool:
    """Whether apply_strategy stores ``leaf`` blocked by 128 for ``act`` (block_gemm)."""
    from jax_bq.dynamic import is_block_weight
    from jax_bq.qtensor import QuantizedTensor

    return (
        isinstance(act, DynamicQuantConfig)
        and act.block_gemm
        and act.granularity != "per_channel"
        and isinstance(leaf, QuantizedTensor)
        and leaf.format in (QuantFormat.FP8_E4M3, QuantFormat.FP8_E5M2)
        and leaf.ndim == 2
        and leaf.axis == -1
        and leaf.granularity in (Granularity.PER_TENSOR, Granularity.PER_CHANNEL)
        and not is_block_weight(leaf)
    )


def apply_strategy_nnx(model, cfg: MixedPrecisionConfig, *, operators=None):
    """The NNX form: quantizes ``QLinear``/``nnx.Linear`` layers by ``cfg`` in place.

    Layers are addressed by their attribute path ``.../<layer name>`` with a
    ``layer_<i>`` (or ``layers/<i>``) component for the layer index; weights
    go through :func:`jax_bq.flax.quantize_nnx_model`, activation specs
    through :func:`jax_bq.flax.dynamic_dense.attach_nnx_spec` (and
    ``block_gemm`` kernels through :func:`jax_bq.dynamic.block_weight`, as in
    :func:`apply_strategy`).
    """
    from flax import nnx

    from jax_bq.dynamic import block_weight
    from jax_bq.flax.dynamic_dense import attach_nnx_spec, needs_fallback_copy
    from jax_bq.flax.nnx import QLinear, _value, quantize_nnx_model
    from jax_bq.qtensor import QuantizedTensor

    operators = operators or BERT_OPERATORS
    names = {v: k for k, v in operators.items()}
    rules, acts = [], []
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, QLinear | nnx.Linear) or not path:
            continue
        parts = [str(p) for p in path]
        op = names.get(parts[-1])
        if op is None:
            continue
        layer = None
        for a, b in zip(parts, parts[1:], strict=False):
            if a == "layers" and b.isdigit():
                layer = int(b)
        for p in parts:
            if re.fullmatch(r"layer_\d+", p):
                layer = int(p[6:])
        prec = cfg.precision_for(op, layer)
        name = "/".join(parts)
        if prec.weight in _CASTS:
            raise ValueError(
                f"{name}: NNX layers take quantized formats or None, not {prec.weight}"
            )
        rules.append((f"^{re.escape(name)}$", prec.weight))
        if prec.act is not None:
            kernel = _value(node.kernel) if needs_fallback_copy(prec.act) else None
            kernel = None if isinstance(kernel, QuantizedTensor) else kernel  # -> ValueError
            acts.append((path, kernel))
    if not rules:
        raise ValueError(f"strategy {cfg.name!r}: no linear layer named {sorted(names)}")
    quantize_nnx_model(model, rules)
    for path, kernel in acts:
        node = model
        for p in path:
            node = node[p] if isinstance(p, int) else getattr(node, p)
        parts = [str(p) for p in path]
        layer = next((int(p[6:]) for p in parts if re.fullmatch(r"layer_\d+", p)), None)
        act = cfg.precision_for(names[parts[-1]], layer).act
        attach_nnx_spec(node, act, kernel)
        if _wants_block_weight(act, _value(node.kernel)):  # as apply_strategy does
            node.kernel = nnx.Param(block_weight(_value(node.kernel)))
    return model


def explain_strategy(
    cfg: MixedPrecisionConfig,
    params,
    *,
    tokens: int = 32 * 128,
    dtype=jnp.bfloat16,
    device=None,
    operators=None,
) -> str:
    """Per operator: what ``cfg`` asks, what runs on ``device`` and why.

    ``params`` are the output of :func:`apply_strategy`. For each quantized
    dense operator the line carries :func:`jax_bq.plan`'s path and reason for
    ``tokens`` rows (the capability ladder: native GEMM, weight-only, or
    dequantize + dot, with why) and whether the weight format is native here.
    """
    from jax_bq.capabilities import native_matmul
    from jax_bq.dynamic import is_block_weight
    from jax_bq.flax.rules import named_leaves
    from jax_bq.matmul import plan
    from jax_bq.qtensor import QuantizedTensor

    operators = operators or BERT_OPERATORS
    dev = device or jax.devices()[0]
    lines = [f"strategy {cfg.name}: {cfg.description}".rstrip(": ")]
    for path, leaf in named_leaves(params):
        op = _operator_of(path, operators)
        if op is None:
            continue
        head = f"  {path:40s} {op.value:9s}"
        if not isinstance(leaf, QuantizedTensor):
            lines.append(f"{head} weights {np.dtype(leaf.dtype).name} (not quantized)")
            continue
        cap = native_matmul(leaf.format, dev)
        native = "native" if cap.ok else "NOT native"
        if op is OperatorType.EMBEDDING:
            lines.append(f"{head} {leaf.format.value} table, rows dequantized after the gather")
            continue
        act = _act_spec_at(params, path)
        kw = {}
        what = "module default"
        if isinstance(act, WeightOnly):
            kw, what = {"act_format": act.dtype}, act.describe()
        elif isinstance(act, DynamicQuantConfig):
            what = act.describe()
            if act.granularity == "per_channel":
                kw = {"act_format": "bf16"}
                what += " (simulated: x quantize-dequantized, then weight-only)"
            else:
                kw = {"act_format": act.precision, "act_granularity": act.granularity}
                if is_block_weight(leaf):  # pre-quantized 1x128 blocks (jax_bq.dynamic)
                    kw["act_granularity"] = "block_1x128"
                    what += " (as 1x128 block scales: block-scaled GEMM)"
        x = jax.ShapeDtypeStruct((tokens, leaf.shape[1]), dtype)
        try:
            pl = str(plan(x, leaf, device=dev, **kw))
        except ValueError as e:
            pl = f"no plan: {e}"
        lines.append(
            f"{head} weights {leaf.format.value} ({native} on this device: {cap.reason}); "
            f"activations {what}; {pl}"
        )
    for op in cfg.operators:
        if op in _NOT_IN_ENCODER and cfg.operators[op] != OperatorPrecision():
            lines.append(f"  {op.value}: set but not applied: {_NOT_IN_ENCODER[op]}")
    return "\n".join(lines)


def _act_spec_at(params, kernel_path: str):
    node = params
    for key in kernel_path.split("/")[:-1]:
        node = node[key]
    return node.get("act_quant") if hasattr(node, "get") else None


# ---------------------------------------------------------------- presets


def _dense(prec: OperatorPrecision, ops=tuple(BERT_OPERATORS)) -> dict:
    return {op: prec for op in ops}


_FP8_W = "fp8_e4m3"
_ATTN = (OperatorType.Q_PROJ, OperatorType.K_PROJ, OperatorType.V_PROJ, OperatorType.O_PROJ)
_FFN = (OperatorType.FFN_UP, OperatorType.FFN_DOWN)


def fp16_baseline(num_layers: int = 6) -> MixedPrecisionConfig:
    """Every dense kernel stored in float16; nothing quantized."""
    del num_layers
    return MixedPrecisionConfig(
        "fp16_baseline", _dense(OperatorPrecision("fp16")), description="FP16 weights, FP16 math"
    )


def fp8_balanced(num_layers: int = 6) -> MixedPrecisionConfig:
    """FP8 E4M3 per-channel weights, dynamic per-token FP8 activations with the FP16 fallback."""
    del num_layers
    act = DynamicQuantConfig(granularity="per_token", calibration_mode="absmax")
    return MixedPrecisionConfig(
        "fp8_balanced",
        _dense(OperatorPrecision(_FP8_W, act)),
        description="W8A8 per-channel x per-token, outlier fallback to FP16",
    )


def w4a16_aggressive(num_layers: int = 6) -> MixedPrecisionConfig:
    """FP4 (E2M1, FP32 scale per 32) weights, 16-bit activations (weight-only)."""
    del num_layers
    from jax_bq.flax.rules import WeightQuant

    return MixedPrecisionConfig(
        "w4a16_aggressive",
        _dense(OperatorPrecision(WeightQuant("fp4", block_size=32), "bf16")),
        description="4-bit weights, bf16 activations",
    )


def nvfp4_blackwell(num_layers: int = 6) -> MixedPrecisionConfig:
    """NVFP4 weights, activations as qmatmul decides (NVFP4 GEMM on Blackwell)."""
    del num_layers
    return MixedPrecisionConfig(
        "nvfp4_blackwell",
        _dense(OperatorPrecision("nvfp4")),
        description="NVFP4 weights; native only on SM 10.x/12.x",
    )


def hybrid_long_context(num_layers: int = 6) -> MixedPrecisionConfig:
    """Attention projections in FP8 W8A8 (dynamic, fallback), FFN in NVFP4 weights.

    The attention products, softmax and a KV cache would stay high precision
    (FP8 for a KV cache); the encoders have none of those as quantizable
    operators, which :func:`explain_strategy` reports.
    """
    del num_layers
    act = DynamicQuantConfig(granularity="per_token", calibration_mode="absmax")
    ops = _dense(OperatorPrecision(_FP8_W, act), _ATTN)
    ops |= _dense(OperatorPrecision("nvfp4"), _FFN)
    ops[OperatorType.KV_CACHE] = OperatorPrecision(_FP8_W)
    return MixedPrecisionConfig(
        "hybrid_long_context", ops, description="FP8 attention, NVFP4 FFN, FP8 KV cache"
    )


def layerwise_gradient(num_layers: int = 6) -> MixedPrecisionConfig:
    """Precision falls toward the middle of the stack.

    First and last layer: FP16. Next-to-first/last: FP8 W8A8. The rest: FP8
    attention, FP4 weight-only FFN.
    """
    from jax_bq.flax.rules import WeightQuant

    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    act = DynamicQuantConfig(granularity="per_token")
    fp8 = OperatorPrecision(_FP8_W, act)
    ops = _dense(fp8, _ATTN) | _dense(
        OperatorPrecision(WeightQuant("fp4", block_size=32), "bf16"), _FFN
    )
    layers = {}
    for i in range(num_layers):
        edge = min(i, num_layers - 1 - i)
        if edge == 0:
            layers[i] = _dense(OperatorPrecision("fp16"))
        elif edge == 1:
            layers[i] = _dense(fp8)
    return MixedPrecisionConfig(
        "layerwise_gradient", ops, layers, description="FP16 edges, FP8 next, FP4 FFN inside"
    )


#: name -> ``f(num_layers) -> MixedPrecisionConfig``.
PRESETS: dict[str, Callable[[int], MixedPrecisionConfig]] = {
    "fp16_baseline": fp16_baseline,
    "fp8_balanced": fp8_balanced,
    "w4a16_aggressive": w4a16_aggressive,
    "nvfp4_blackwell": nvfp4_blackwell,
    "hybrid_long_context": hybrid_long_context,
    "layerwise_gradient": layerwise_gradient,
}


def preset(name: str, num_layers: int = 6) -> MixedPrecisionConfig:
    """A preset by name (:data:`PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of: {', '.join(PRESETS)}")
    return PRESETS[name](num_layers)


# ------------------------------------------------------- adaptive selection


@dataclass(frozen=True, kw_only=True)
class SelectorContext:
    """Static context of a selection.

    Attributes:
        phase: ``"prefill"`` / ``"encode"`` (many tokens) or ``"decode"``.
        seq_len: tokens per sequence.
        is_kv_cache: the tensor is a KV cache entry (never below FP8).
    """

    phase: str = "encode"
    seq_len: int = 128
    is_kv_cache: bool = False

    def __post_init__(self):
        if self.phase not in ("prefill", "encode", "decode"):
            raise ValueError(f"phase must be 'prefill', 'encode' or 'decode', got {self.phase!r}")
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")


_RANK = {  # more bits -> higher rank
    QuantFormat.FP4: 0,
    QuantFormat.NVFP4: 1,
    QuantFormat.MXFP4: 1,
    QuantFormat.FP8_E5M2: 2,
    QuantFormat.MXFP8: 3,
    QuantFormat.FP8_E4M3: 3,
    QuantFormat.BF16: 4,
    QuantFormat.FP16: 5,
}


@dataclass(frozen=True, kw_only=True)
class AdaptivePrecisionSelector:
    r"""Chooses a precision per call from the activation's outlier ratio, inside ``jit``.

    With ``r = log10(outlier_ratio(x))`` (:func:`jax_bq.dynamic.outlier_ratio`)
    and thresholds ``low < medium < high`` (decades):

    ============================  =================================================
    ``r >= high``                 16-bit (the widest candidate)
    ``medium <= r < high``        FP8
    ``low <= r < medium``         4-bit for prefill/encode with ``seq_len >= 512``
                                  (compute-bound, where 4-bit GEMMs pay), else FP8
    ``r < low``                   4-bit
    ============================  =================================================

    A KV cache never goes below FP8. Each wish maps (at trace time) to the
    candidate with the fewest bits at or above it (the widest candidate if
    none is). :meth:`select` returns the candidate's index as an int32 array;
    :meth:`apply` runs the chosen branch with ``lax.switch`` (every branch
    compiled once).

    Attributes:
        candidates: formats, e.g. ``("nvfp4", "fp8_e4m3", "fp16")``.
        low, medium, high: thresholds on ``log10(outlier_ratio)``, increasing.
    """

    candidates: tuple = ("nvfp4", "fp8_e4m3", "fp16")
    low: float = 0.8
    medium: float = 1.2
    high: float = 1.7

    def __post_init__(self):
        cands = tuple(QuantFormat.parse(c) for c in self.candidates)
        if not cands or len(set(cands)) != len(cands):
            raise ValueError(f"candidates must be distinct formats, got {self.candidates}")
        object.__setattr__(self, "candidates", cands)
        if not self.low < self.medium < self.high:
            raise ValueError(
                f"thresholds must satisfy low < medium < high, got {self.low}, {self.medium}, "
                f"{self.high}"
            )

    def _pick(self, wish: int) -> int:
        ranks = [_RANK[c] for c in self.candidates]
        ok = [i for i, r in enumerate(ranks) if r >= wish]
        if not ok:
            return int(np.argmax(ranks))
        return min(ok, key=lambda i: ranks[i])

    def table(self, context: SelectorContext | None = None) -> tuple[int, int, int, int]:
        """Candidate index per band of r: below low, [low, medium), [medium, high), above."""
        ctx = context or SelectorContext()
        four, eight, wide = _RANK[QuantFormat.NVFP4], _RANK[QuantFormat.FP8_E4M3], 4
        long_prefill = ctx.phase != "decode" and ctx.seq_len >= 512
        wishes = [four, four if long_prefill else eight, eight, wide]
        if ctx.is_kv_cache:
            wishes = [max(w, eight) for w in wishes]
        return tuple(self._pick(w) for w in wishes)

    def select(self, x_or_ratio, context: SelectorContext | None = None) -> jax.Array:
        """Int32 index into ``candidates`` for an activation ``[..., K]`` (or a ratio scalar)."""
        a = jnp.asarray(x_or_ratio) if not hasattr(x_or_ratio, "shape") else x_or_ratio
        ratio = outlier_ratio(a) if a.ndim >= 2 else a.astype(jnp.float32)
        r = jnp.log10(jnp.maximum(ratio, np.float32(1e-30)))
        th = jnp.asarray([self.low, self.medium, self.high], jnp.float32)
        band = jnp.sum(r >= th).astype(jnp.int32)
        return jnp.asarray(self.table(context), jnp.int32)[band]

    def apply(self, x: jax.Array, index: jax.Array) -> jax.Array:
        """``x`` quantize-dequantized in ``candidates[index]`` (``lax.switch``), in ``x.dtype``."""
        return lax.switch(index, [_qdq_branch(c) for c in self.candidates], x)

    def decode(self, index) -> str:
        """Format name of a concrete index."""
        return self.candidates[int(np.asarray(index))].value


def _qdq_branch(fmt: QuantFormat):
    from jax_bq.ops import quantize_dequantize

    if fmt in (QuantFormat.FP16, QuantFormat.BF16):
        dt = jnp.float16 if fmt is QuantFormat.FP16 else jnp.bfloat16
        return lambda x: x.astype(dt).astype(x.dtype)
    if fmt in (QuantFormat.FP8_E4M3, QuantFormat.FP8_E5M2):
        return lambda x: quantize_dequantize(x, fmt, granularity="per_channel")
    if fmt is QuantFormat.FP4:
        return lambda x: quantize_dequantize(x, fmt, block_size=16)
    return lambda x: quantize_dequantize(x, fmt)
