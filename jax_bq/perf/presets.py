"""The quantization strategies the performance models price, read from :mod:`jax_bq.strategies`.

The presets are defined once, in :data:`jax_bq.strategies.PRESETS`
(:class:`~jax_bq.strategies.MixedPrecisionConfig`: per operator and per layer).
This module only translates a config into what the roofline models need per
dense layer -- a :class:`LayerRecipe` (weight format and scaling, activation
handling) -- and attaches the **measured** fidelity of each preset.

Besides the presets, :data:`BENCHMARK_RECIPES` names the uniform recipes the
H200 measurements ran (``benchmarks/validate_perf.py``, ``e2e_kernels_h200.txt``)
so that their predictions can be checked; they are configurations of
measurements, not presets, and :func:`jax_bq.perf.recommend` only offers them
when asked to by name. FP8 with *static* activation scales has no
``MixedPrecisionConfig`` spelling (strategies' activations are dynamic or
weight-only), so it exists here only as a benchmark recipe.

Fidelity: all-MiniLM-L6-v2 against its float32 model on CPU, presets from
``benchmarks/results/dynamic_fidelity_minilm_cpu.md`` (``preset:<name>`` rows, 80
texts), benchmark recipes from ``fidelity_minilm_cpu.md`` (1171 texts). A
strategy without a measured row says so (``fidelity=None``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from jax_bq import strategies as st

PRESET_FIDELITY_SOURCE = "benchmarks/results/dynamic_fidelity_minilm_cpu.md (all-MiniLM-L6-v2)"
RECIPE_FIDELITY_SOURCE = "benchmarks/results/fidelity_minilm_cpu.md (all-MiniLM-L6-v2, CPU)"


@dataclass(frozen=True)
class Fidelity:
    """Measured embedding fidelity vs the float32 model (MiniLM).

    Attributes:
        mean_cosine: mean cosine similarity of embeddings.
        min_cosine: worst text.
        top10_overlap: retrieval top-10 overlap with the reference.
        row: the table row it was read from.
        source: the results file.
    """

    mean_cosine: float
    min_cosine: float
    top10_overlap: float
    row: str
    source: str


@dataclass(frozen=True)
class LayerRecipe:
    """How one dense layer runs.

    Attributes:
        w_format: weight format (``bf16`` = unquantized 16-bit).
        w_granularity: weight scaling (``per_tensor``, ``per_channel``, ``per_block``, ``tile_2d``).
        act: ``"dynamic"`` (quantized per call), ``"static"`` (codes written by the
            previous op with calibrated scales), ``"bf16"`` (weight-only) or
            ``"auto"`` (the module default: the native low-precision GEMM where the
            device has it, else weight-only -- as ``qmatmul``'s ladder decides).
        act_granularity: activation scaling of the dynamic/static FP8 GEMM.
        w_block: FP4 block size (0: the format's own).
    """

    w_format: str = "bf16"
    w_granularity: str = ""
    act: str = "bf16"
    act_granularity: str | None = None
    w_block: int = 0

    @property
    def needs(self) -> str:
        """Tensor-core capability the W8A8/W4A4 GEMM needs (``fp8``, ``fp4``) or ``""``."""
        if self.act not in ("dynamic", "static"):
            return ""
        return "fp8" if self.w_format.startswith("fp8") else "fp4"

    def describe(self) -> str:
        """``fp8_e4m3/per_channel x dynamic per_token``."""
        g = f"/{self.w_granularity}" if self.w_granularity else ""
        a = self.act + (f" {self.act_granularity}" if self.act_granularity else "")
        return f"{self.w_format}{g} x {a}"


BF16 = LayerRecipe()


@dataclass(frozen=True)
class Strategy:
    """A whole-model strategy as the models see it.

    Attributes:
        name: preset or recipe name.
        operators: :class:`~jax_bq.strategies.OperatorType` -> :class:`LayerRecipe`
            (operators not listed run in bf16).
        layers: layer index -> {OperatorType: LayerRecipe} overrides.
        fidelity: measured fidelity, or None.
        description: one line.
    """

    name: str
    operators: dict = field(default_factory=dict)
    layers: dict = field(default_factory=dict)
    fidelity: Fidelity | None = None
    description: str = ""

    def recipe(self, op: st.OperatorType, layer: int | None = None) -> LayerRecipe:
        """The recipe of ``op`` in ``layer`` (layer override, else the table, else bf16)."""
        if layer is not None and op in self.layers.get(layer, {}):
            return self.layers[layer][op]
        return self.operators.get(op, BF16)

    def layer_groups(self, ops: tuple, num_layers: int) -> list[tuple[LayerRecipe, int]]:
        """``[(recipe, layers using it)]`` of operator ``ops[0]`` over the stack.

        ``ops`` are the strategy operators one model GEMM stands for (the fused
        ``q_o`` of a decoder is Q_PROJ and O_PROJ); they must agree per layer.

        Raises:
            ValueError: the operators of one fused GEMM have different recipes.
        """
        c: Counter = Counter()
        for i in range(num_layers):
            rs = {self.recipe(op, i) for op in ops}
            if len(rs) > 1:
                names = ", ".join(op.value for op in ops)
                raise ValueError(f"{self.name}: {names} differ in layer {i}; the model fuses them")
            c[rs.pop()] += 1
        return list(c.items())

    def recipes(self) -> set[LayerRecipe]:
        """Every recipe the strategy uses."""
        out = set(self.operators.values())
        for t in self.layers.values():
            out |= set(t.values())
        return out or {BF16}

    @property
    def needs(self) -> set[str]:
        """Tensor-core capabilities some layer's W8A8/W4A4 GEMM needs."""
        return {r.needs for r in self.recipes()} - {""}


def recipe_of(prec: st.OperatorPrecision) -> LayerRecipe:
    """The :class:`LayerRecipe` of a strategies ``OperatorPrecision``.

    Weights ``None`` (kept), ``"bf16"``/``"fp16"`` are priced as 16-bit; a format
    name or ``WeightQuant`` as that format with its resolved granularity.
    Activations: ``DynamicQuantConfig`` -> dynamic (its granularity; the outlier
    test of ``fallback_to_fp16`` is not priced), ``WeightOnly`` -> weight-only,
    ``None`` -> ``auto``.
    """
    from jax_bq.dynamic import DynamicQuantConfig, WeightOnly
    from jax_bq.flax.rules import WeightQuant

    w = prec.weight
    if w is None or (isinstance(w, str) and w in ("bf16", "fp16")):
        return BF16
    spec = (WeightQuant(w) if isinstance(w, str) else w).resolved()
    fmt = getattr(spec.format, "value", spec.format)
    gran = getattr(spec.granularity, "value", spec.granularity) or ""
    block = spec.block_size if isinstance(spec.block_size, int) else 0
    act, agran = "auto", None
    if isinstance(prec.act, DynamicQuantConfig):
        act, agran = "dynamic", prec.act.granularity
    elif isinstance(prec.act, WeightOnly):
        act = "bf16"
    return LayerRecipe(fmt, gran, act, agran, block)


def from_config(
    cfg: st.MixedPrecisionConfig, fidelity: Fidelity | None = None, num_layers: int = 0
) -> Strategy:
    """A :class:`Strategy` of a strategies config (per-layer overrides kept).

    A config that sets FFN_UP but not FFN_GATE (the presets are written for
    BERT, which has no gate) gives the gate of a decoder's gated FFN the up
    projection's recipe: same shape, and fused with it in the model.
    """

    def table(t):
        out = {op: recipe_of(p) for op, p in t.items() if op in _DENSE}
        if st.OperatorType.FFN_UP in out:
            out.setdefault(st.OperatorType.FFN_GATE, out[st.OperatorType.FFN_UP])
        return out

    layers = {i: table(t) for i, t in cfg.layers.items() if not num_layers or i < num_layers}
    return Strategy(cfg.name, table(cfg.operators), layers, fidelity, cfg.description)


_DENSE = (
    st.OperatorType.Q_PROJ,
    st.OperatorType.K_PROJ,
    st.OperatorType.V_PROJ,
    st.OperatorType.O_PROJ,
    st.OperatorType.FFN_GATE,
    st.OperatorType.FFN_UP,
    st.OperatorType.FFN_DOWN,
)


def _f(mean, mn, top, row, source=PRESET_FIDELITY_SOURCE):
    return Fidelity(mean, mn, top, row, source)


#: Measured fidelity of every jax_bq.strategies preset (``preset:<name>`` rows).
PRESET_FIDELITY = {
    "fp16_baseline": _f(1.000000, 1.000000, 1.000, "preset:fp16_baseline"),
    "fp8_balanced": _f(0.997751, 0.996634, 0.969, "preset:fp8_balanced"),
    "w4a16_aggressive": _f(0.968855, 0.946442, 0.881, "preset:w4a16_aggressive"),
    "nvfp4_blackwell": _f(0.973847, 0.956908, 0.894, "preset:nvfp4_blackwell"),
    "hybrid_long_context": _f(0.984612, 0.974410, 0.912, "preset:hybrid_long_context"),
    "layerwise_gradient": _f(0.995242, 0.992485, 0.956, "preset:layerwise_gradient"),
}


def _uniform(name, recipe, fidelity, description) -> Strategy:
    return Strategy(name, dict.fromkeys(_DENSE, recipe), {}, fidelity, description)


def _r(mean, mn, top, row):
    return Fidelity(mean, mn, top, row, RECIPE_FIDELITY_SOURCE)


#: Uniform recipes of the H200 measurements (not presets; see the module docstring).
BENCHMARK_RECIPES = {
    s.name: s
    for s in (
        _uniform("bf16", BF16, None, "no quantization (the baseline of the measurements)"),
        _uniform(
            "fp8_w8a8_tensor",
            LayerRecipe("fp8_e4m3", "per_tensor", "dynamic", "per_tensor"),
            _r(0.997578, 0.99024, 0.962, "FP8 W8A8 per-tensor"),
            "FP8 weights and activations, per-tensor scales, activations quantized per call",
        ),
        _uniform(
            "fp8_static_tensor",
            LayerRecipe("fp8_e4m3", "per_tensor", "static", "per_tensor"),
            None,
            "FP8 per-tensor with calibrated static activation scales (fidelity not measured)",
        ),
    )
}


def preset(name: str, num_layers: int = 24) -> Strategy:
    """The strategy called ``name``.

    A :data:`jax_bq.strategies.PRESETS` preset (built for ``num_layers``) or a
    :data:`BENCHMARK_RECIPES` entry.

    Raises:
        ValueError: unknown name.
    """
    if name in st.PRESETS:
        return from_config(st.preset(name, num_layers), PRESET_FIDELITY.get(name), num_layers)
    if name in BENCHMARK_RECIPES:
        return BENCHMARK_RECIPES[name]
    raise ValueError(
        f"unknown strategy {name!r}: presets {sorted(st.PRESETS)}, "
        f"benchmark recipes {sorted(BENCHMARK_RECIPES)}"
    )


def as_strategy(p, num_layers: int = 24) -> Strategy:
    """A Strategy from a name, a Strategy, or a ``MixedPrecisionConfig``."""
    if isinstance(p, Strategy):
        return p
    if isinstance(p, st.MixedPrecisionConfig):
        return from_config(p, PRESET_FIDELITY.get(p.name), num_layers)
    if isinstance(p, str):
        return preset(p, num_layers)
    raise ValueError(f"not a strategy: {type(p).__name__}")
