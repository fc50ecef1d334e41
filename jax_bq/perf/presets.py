"""Whole-model quantization presets priced by the performance models.

A minimal, self-contained set (one name per row of the project's measured
fidelity table). The mixed-precision config types of ``jax_bq.strategies``
(issue 21) are meant to replace these names; until they land, this module is
the single place they are defined for :mod:`jax_bq.perf`.

Fidelity numbers are **measured**: all-MiniLM-L6-v2 (float32 reference), 1171
Python docstrings, 100 queries, CPU (``benchmarks/results/fidelity_minilm_cpu.md``).
A preset without a measured row says so (``fidelity=None``).
"""

from __future__ import annotations

from dataclasses import dataclass

FIDELITY_SOURCE = "benchmarks/results/fidelity_minilm_cpu.md (all-MiniLM-L6-v2, CPU)"


@dataclass(frozen=True)
class Fidelity:
    """Measured embedding fidelity vs the float32 model (MiniLM).

    Attributes:
        mean_cosine: mean cosine similarity of embeddings.
        min_cosine: worst text.
        top10_overlap: retrieval top-10 overlap with the reference.
        row: the table row it was read from.
    """

    mean_cosine: float
    min_cosine: float
    top10_overlap: float
    row: str


@dataclass(frozen=True)
class Preset:
    """How every dense layer runs.

    Attributes:
        name: preset id.
        w_format: weight format (``bf16`` = unquantized).
        w_granularity: FP8 weight scaling (``per_tensor``, ``per_channel``, ``tile_2d``).
        act: ``"dynamic"`` (quantized per call), ``"static"`` (pre-quantized by the
            previous op with calibrated scales), ``"bf16"`` (weight-only).
        act_granularity: FP8 activation scaling.
        w_block: FP4 block size.
        needs: capability required (``"fp8"``, ``"fp4"``) or ``""``.
        fidelity: measured fidelity, or None (not measured).
        description: one line.
    """

    name: str
    w_format: str
    w_granularity: str
    act: str
    act_granularity: str | None
    w_block: int
    needs: str
    fidelity: Fidelity | None
    description: str

    @property
    def weight_only(self) -> bool:
        """Activations stay 16-bit."""
        return self.act == "bf16"


def _f(mean, mn, top, row):
    return Fidelity(mean, mn, top, row)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "bf16",
            "bf16",
            "",
            "bf16",
            None,
            0,
            "",
            None,
            "no quantization: the baseline (its own fidelity vs float32 was not measured)",
        ),
        Preset(
            "fp8_w8a8_tensor",
            "fp8_e4m3",
            "per_tensor",
            "dynamic",
            "per_tensor",
            0,
            "fp8",
            _f(0.997578, 0.99024, 0.962, "FP8 W8A8 per-tensor"),
            "FP8 weights and activations, per-tensor scales, activations quantized per call",
        ),
        Preset(
            "fp8_w8a8_channel",
            "fp8_e4m3",
            "per_channel",
            "dynamic",
            "per_token",
            0,
            "fp8",
            _f(0.997691, 0.99513, 0.956, "FP8 W8A8 per-channel x per-token"),
            "FP8 per-channel weights x per-token activations",
        ),
        Preset(
            "fp8_w8a8_block",
            "fp8_e4m3",
            "tile_2d",
            "dynamic",
            "block_1x128",
            0,
            "fp8",
            _f(0.997702, 0.99427, 0.964, "FP8 W8A8 128x128 x 1x128"),
            "FP8 128x128 weight tiles x 1x128 activation blocks (DeepSeek recipe)",
        ),
        Preset(
            "fp8_static_tensor",
            "fp8_e4m3",
            "per_tensor",
            "static",
            "per_tensor",
            0,
            "fp8",
            None,
            "FP8 per-tensor, activations quantized with calibrated static scales in the "
            "preceding fusion (fidelity not measured on MiniLM for this exact recipe)",
        ),
        Preset(
            "fp8_weight_only",
            "fp8_e4m3",
            "per_channel",
            "bf16",
            None,
            0,
            "",
            _f(0.998473, 0.99698, 0.960, "FP8 weight-only per-channel"),
            "FP8 weights, bf16 activations (W8A16 kernel at small M, dequantize + dot otherwise)",
        ),
        Preset(
            "nvfp4_weight_only",
            "nvfp4",
            "per_block",
            "bf16",
            None,
            16,
            "",
            _f(0.974337, 0.95049, 0.907, "NVFP4 weight-only"),
            "NVFP4 weights, bf16 activations (W4A16 at small M)",
        ),
        Preset(
            "fp4_weight_only",
            "fp4",
            "per_block",
            "bf16",
            None,
            32,
            "",
            _f(0.972029, 0.94580, 0.899, "FP4 weight-only b32"),
            "FP4 E2M1 weights with f32 scales per 32, bf16 activations",
        ),
        Preset(
            "nvfp4_w4a4",
            "nvfp4",
            "per_block",
            "dynamic",
            None,
            16,
            "fp4",
            None,
            "NVFP4 weights and activations on FP4 tensor cores (Blackwell; not measured)",
        ),
    )
}


def preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises:
        ValueError: unknown name.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (one of {sorted(PRESETS)})")
    return PRESETS[name]
