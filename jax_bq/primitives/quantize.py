"""``quantize_p``: ``[G, P, A, B]`` float -> (codes, scales, tensor_scale[G], workspace).

FFI target ``jax_bq_quantize``; C++ handlers ``BqQuantizeCpu`` /
``BqQuantizeCuda``. Parameters: ``fmt`` (QuantFormat), ``ba``/``bb`` (block
extents along A and B) and ``pack_b`` (FP4 packing axis). Shape rules live in
the abstract evaluation below and nowhere else. ``workspace`` is scratch
memory for the CUDA two-pass path, taken from XLA as an extra output so that
the handler never allocates (callers drop it).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import batching

from jax_bq import reference
from jax_bq._util import cdiv as _cdiv
from jax_bq.formats import FLOAT_DTYPES
from jax_bq.layout import View, quantize_workspace_bytes
from jax_bq.primitives.common import (
    def_jitted_impl,
    fold_batch_into_groups,
    layout_attrs,
    register_lowerings,
    split_groups,
)

quantize_p = Primitive("jax_bq_quantize")
quantize_p.multiple_results = True
def_jitted_impl(quantize_p)


def _abstract_eval(x, *, fmt, ba, bb, pack_b):
    if x.ndim != 4:
        raise ValueError(f"quantize_p expects the rank-4 [G, P, A, B] view, got {x.shape}")
    if np.dtype(x.dtype) not in FLOAT_DTYPES:
        raise ValueError(f"quantize_p input must be f32/bf16/f16, got {x.dtype}")
    g, p, a, b = x.shape
    view = View((), -1, g, p, a, b, ba, bb, pack_b)
    data_shape = view.data_dims(fmt)
    return (
        ShapedArray(data_shape, fmt.data_dtype),
        ShapedArray((g, p, _cdiv(a, ba), _cdiv(b, bb)), fmt.scale_dtype),
        ShapedArray((g,), jnp.float32),
        ShapedArray((quantize_workspace_bytes(view, fmt),), jnp.uint8),
    )


quantize_p.def_abstract_eval(_abstract_eval)


def _reference(x, *, fmt, ba, bb, pack_b):
    workspace = _abstract_eval(x, fmt=fmt, ba=ba, bb=bb, pack_b=pack_b)[3]
    return (*reference.quantize_view(x, fmt, ba, bb, pack_b), jnp.zeros(workspace.shape, jnp.uint8))


register_lowerings(
    quantize_p, "quantize", "jax_bq_quantize", _reference, layout_attrs, multiple_results=True
)


def _batch(args, dims, **params):
    (x,), (bdim,) = args, dims
    size = x.shape[bdim]
    *outs, workspace = quantize_p.bind(fold_batch_into_groups(x, bdim, size), **params)
    return [*(split_groups(o, size) for o in outs), workspace], [
        0,
        0,
        0,
        None,
    ]  # workspace is not per member


batching.primitive_batchers[quantize_p] = _batch
