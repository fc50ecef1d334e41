"""Accuracy transforms for quantization: SmoothQuant, Hadamard rotations, GPTQ.

Each is a function of a Flax param tree (plus calibration statistics from
:func:`collect_layer_stats`) that returns a new tree; :mod:`jax_bq.recipes`
chains them with quantization and a fidelity report.
"""

from jax_bq.transforms.gptq import GptqResult, gptq_model, gptq_quantize, layer_error
from jax_bq.transforms.hadamard import (
    block_rotation,
    fold_value_rotation,
    fwht,
    hadamard_matrix,
    random_signs,
    rotate_ffn_output,
)
from jax_bq.transforms.stats import LayerStats, collect_layer_stats

__all__ = [
    "GptqResult",
    "LayerStats",
    "block_rotation",
    "collect_layer_stats",
    "fold_value_rotation",
    "fwht",
    "gptq_model",
    "gptq_quantize",
    "hadamard_matrix",
    "layer_error",
    "random_signs",
    "rotate_ffn_output",
]
