"""``dequantize_p``: (codes, scales, tensor_scale[G]) -> ``[G, P, a, b]`` float.

FFI target ``jax_bq_dequantize``; C++ handlers ``BqDequantizeCpu`` /
``BqDequantizeCuda``. Parameters: ``fmt``, ``ba``, ``bb``, ``pack_b`` as for
quantize, plus the logical extents ``a``/``b`` (packing loses the parity of
odd axes) and the output ``dtype``.
"""

from __future__ import annotations

import numpy as np
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import batching

from jax_bq import reference
from jax_bq._util import cdiv as _cdiv
from jax_bq.primitives.common import (
    def_jitted_impl,
    fold_batch_into_groups,
    layout_attrs,
    register_lowerings,
    split_groups,
)

dequantize_p = Primitive("jax_bq_dequantize")
def_jitted_impl(dequantize_p)


def _abstract_eval(data, scales, tensor_scale, *, fmt, ba, bb, pack_b, a, b, dtype):
    g, p = data.shape[:2]
    want_data = (g, p, a, b)
    if fmt.is_packed:
        want_data = (g, p, a, fmt.packed_extent(b)) if pack_b else (g, p, fmt.packed_extent(a), b)
    want_scales = (g, p, _cdiv(a, ba), _cdiv(b, bb))
    if data.shape != want_data or scales.shape != want_scales or tensor_scale.shape != (g,):
        raise ValueError(
            f"dequantize_p operands disagree: data {data.shape} (want {want_data}), scales "
            f"{scales.shape} (want {want_scales}), tensor_scale {tensor_scale.shape} "
            f"(want {(g,)})"
        )
    if np.dtype(data.dtype) != fmt.data_dtype or np.dtype(scales.dtype) != fmt.scale_dtype:
        raise ValueError(
            f"dequantize_p dtypes: data {data.dtype} (want {fmt.data_dtype}), scales "
            f"{scales.dtype} (want {fmt.scale_dtype})"
        )
    return ShapedArray((g, p, a, b), dtype)


dequantize_p.def_abstract_eval(_abstract_eval)


def _reference(data, scales, tensor_scale, *, fmt, ba, bb, pack_b, a, b, dtype):
    return reference.dequantize_view(data, scales, tensor_scale, fmt, ba, bb, pack_b, a, b, dtype)


register_lowerings(
    dequantize_p,
    "dequantize",
    "jax_bq_dequantize",
    _reference,
    layout_attrs,
    multiple_results=False,
)


def _batch(args, dims, **params):
    size = next(x.shape[d] for x, d in zip(args, dims, strict=True) if d is not None)
    folded = [fold_batch_into_groups(x, d, size) for x, d in zip(args, dims, strict=True)]
    return split_groups(dequantize_p.bind(*folded, **params), size), 0


batching.primitive_batchers[dequantize_p] = _batch
