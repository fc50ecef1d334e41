"""``quantize_dequantize_p``: ``[G, P, A, B]`` float -> fake-quantized ``[G, P, A, B]``.

The round trip ``dequantize(quantize(x))`` as one primitive, so that it can
carry the straight-through estimator (see :mod:`jax_bq.primitives.autodiff`).
Its value is, bit for bit, ``quantize_p`` followed by ``dequantize_p`` with the
same parameters: every lowering binds those two primitives (so the CPU and
CUDA kernels run), and there is no separate FFI target. Parameters: ``fmt``,
``ba``, ``bb``, ``pack_b`` as for quantize, and the output ``dtype``.
"""

from __future__ import annotations

import numpy as np
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from jax_bq.formats import FLOAT_DTYPES
from jax_bq.primitives.common import def_jitted_impl, fold_batch_into_groups, split_groups
from jax_bq.primitives.dequantize import dequantize_p
from jax_bq.primitives.quantize import quantize_p

quantize_dequantize_p = Primitive("jax_bq_quantize_dequantize")
def_jitted_impl(quantize_dequantize_p)


def _abstract_eval(x, *, fmt, ba, bb, pack_b, dtype):
    if x.ndim != 4 or np.dtype(x.dtype) not in FLOAT_DTYPES:
        raise ValueError(
            f"quantize_dequantize_p expects a float [G, P, A, B] view, got {x.dtype} {x.shape}"
        )
    return ShapedArray(x.shape, dtype)


quantize_dequantize_p.def_abstract_eval(_abstract_eval)


def round_trip(x, *, fmt, ba, bb, pack_b, dtype):
    """``(codes, scales, tensor_scale, y)``: quantize_p then dequantize_p on the view."""
    data, scales, ts, _ = quantize_p.bind(x, fmt=fmt, ba=ba, bb=bb, pack_b=pack_b)
    _, _, a, b = x.shape
    y = dequantize_p.bind(
        data, scales, ts, fmt=fmt, ba=ba, bb=bb, pack_b=pack_b, a=a, b=b, dtype=dtype
    )
    return data, scales, ts, y


def _lower(x, **params):
    return round_trip(x, **params)[3]


mlir.register_lowering(quantize_dequantize_p, mlir.lower_fun(_lower, multiple_results=False))


def _batch(args, dims, **params):
    (x,), (bdim,) = args, dims
    size = x.shape[bdim]
    y = quantize_dequantize_p.bind(fold_batch_into_groups(x, bdim, size), **params)
    return split_groups(y, size), 0


batching.primitive_batchers[quantize_dequantize_p] = _batch
