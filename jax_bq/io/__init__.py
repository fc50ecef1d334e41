"""Quantized checkpoints: safetensors files in jax_bq, compressed-tensors and ModelOpt layouts.

See :func:`save_quantized`, :func:`load_quantized` and docs/checkpoints.md.
"""

from jax_bq.io.checkpoint import Checkpoint, load_quantized, read_checkpoint, save_quantized
from jax_bq.io.layouts import LAYOUTS
from jax_bq.io.safetensors_file import CheckpointError

__all__ = [
    "LAYOUTS",
    "Checkpoint",
    "CheckpointError",
    "load_quantized",
    "read_checkpoint",
    "save_quantized",
]
