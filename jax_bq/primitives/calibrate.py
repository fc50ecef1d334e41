"""``calibrate_p``: ``[G, P, A, 1]`` float -> MSE-optimal block quantization.

Outputs: (codes, scales, tensor_scale[G], mse_absmax, mse_best, clipped,
workspace); the three statistics have one value per block (the scales'
shape). FFI target ``jax_bq_calibrate``; C++ handlers ``BqCalibrateCpu`` /
``BqCalibrateCuda``; jnp twin :func:`jax_bq.reference_calibrate.calibrate_view`.
Parameters: ``fmt`` and ``ba`` (elements per block along A, at most 256).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import batching

from jax_bq import reference_calibrate
from jax_bq._util import cdiv as _cdiv
from jax_bq.formats import FLOAT_DTYPES
from jax_bq.layout import View, quantize_workspace_bytes
from jax_bq.primitives.common import (
    def_jitted_impl,
    fold_batch_into_groups,
    register_lowerings,
    split_groups,
)

calibrate_p = Primitive("jax_bq_calibrate")
calibrate_p.multiple_results = True
def_jitted_impl(calibrate_p)


def _abstract_eval(x, *, fmt, ba):
    if x.ndim != 4 or x.shape[3] != 1:
        raise ValueError(f"calibrate_p expects the [G, P, A, 1] view, got {x.shape}")
    if np.dtype(x.dtype) not in FLOAT_DTYPES:
        raise ValueError(f"calibrate_p input must be f32/bf16/f16, got {x.dtype}")
    g, p, a, _ = x.shape
    data_shape = (g, p, fmt.packed_extent(a), 1)
    stats = (g, p, _cdiv(a, ba), 1)
    view = View((), -1, g, p, a, 1, ba, 1, False)
    return (
        ShapedArray(data_shape, fmt.data_dtype),
        ShapedArray(stats, fmt.scale_dtype),
        ShapedArray((g,), jnp.float32),
        ShapedArray(stats, jnp.float32),
        ShapedArray(stats, jnp.float32),
        ShapedArray(stats, jnp.int32),
        ShapedArray((quantize_workspace_bytes(view, fmt),), jnp.uint8),
    )


calibrate_p.def_abstract_eval(_abstract_eval)


def _reference(x, *, fmt, ba):
    workspace = _abstract_eval(x, fmt=fmt, ba=ba)[-1]
    outs = reference_calibrate.calibrate_view(x, fmt, ba)
    return (*outs, jnp.zeros(workspace.shape, jnp.uint8))


def _attrs(params: dict) -> dict:
    return {"format": np.int32(params["fmt"].ffi_id), "block_a": np.int64(params["ba"])}


register_lowerings(
    calibrate_p, "calibrate", "jax_bq_calibrate", _reference, _attrs, multiple_results=True
)


def _batch(args, dims, **params):
    (x,), (bdim,) = args, dims
    size = x.shape[bdim]
    *outs, workspace = calibrate_p.bind(fold_batch_into_groups(x, bdim, size), **params)
    return [*(split_groups(o, size) for o in outs), workspace], [0] * len(outs) + [None]


batching.primitive_batchers[calibrate_p] = _batch
