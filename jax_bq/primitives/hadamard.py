"""``hadamard_p``: ``[R, D]`` float -> ``scale * H_n`` on each block of ``n`` along D.

FFI target ``jax_bq_hadamard``; C++ handlers ``BqHadamardCpu`` /
``BqHadamardCuda``; jnp twin :func:`fwht_reference`. Parameters: ``block``
(``n``, a power of two in [2, 8192] dividing D) and ``scale`` (a float32
multiplier applied once at the end). The output has the input's dtype.

Summation order (pinned, ``ffi/include/jax_bq/hadamard_math.h``): float32
values (bf16/f16 widened exactly), butterfly stages ``h = 1, 2, ..., n/2``
each replacing ``(v[i], v[i+h])`` by ``(v[i] + v[i+h], v[i] - v[i+h])`` for
``(i // h)`` even, then ``y = v * scale`` rounded once to the output dtype.
Kernels and twin perform the same IEEE operations, so they agree bit for bit
(on CPU both run under XLA:CPU's flush-to-zero mode; on GPU both are IEEE).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import batching

from jax_bq.formats import FLOAT_DTYPES
from jax_bq.primitives.common import def_jitted_impl, register_lowerings

__all__ = ["MAX_HADAMARD_BLOCK", "fwht_reference", "hadamard_p"]

#: Largest transform (8192 float32 values fill 32 KiB of a CUDA block's shared memory).
MAX_HADAMARD_BLOCK = 8192

hadamard_p = Primitive("jax_bq_hadamard")
def_jitted_impl(hadamard_p)


def _abstract_eval(x, *, block, scale):
    if x.ndim != 2:
        raise ValueError(f"hadamard_p expects the [rows, d] view, got {x.shape}")
    if np.dtype(x.dtype) not in FLOAT_DTYPES:
        raise ValueError(f"hadamard_p input must be f32/bf16/f16, got {x.dtype}")
    if block < 2 or block > MAX_HADAMARD_BLOCK or block & (block - 1) or x.shape[1] % block:
        raise ValueError(
            f"hadamard_p block {block} must be a power of two in [2, {MAX_HADAMARD_BLOCK}] "
            f"dividing d = {x.shape[1]}"
        )
    return ShapedArray(x.shape, x.dtype)


hadamard_p.def_abstract_eval(_abstract_eval)


def fwht_reference(x, block: int, scale: float):
    """The kernels' jnp twin: the pinned butterfly order (module docstring)."""
    r, d = x.shape
    v = x.astype(jnp.float32).reshape(r, d // block, block)
    h = 1
    while h < block:
        v = v.reshape(r, d // block, block // (2 * h), 2, h)
        a, b = v[..., 0, :], v[..., 1, :]
        v = jnp.stack([a + b, a - b], axis=-2).reshape(r, d // block, block)
        h *= 2
    return (v * np.float32(scale)).reshape(r, d).astype(x.dtype)


def _reference(x, *, block, scale):
    return fwht_reference(x, block, scale)


def _attrs(params: dict) -> dict:
    return {"block": np.int64(params["block"]), "scale": np.float32(params["scale"])}


register_lowerings(
    hadamard_p, "hadamard", "jax_bq_hadamard", _reference, _attrs, multiple_results=False
)


def _batch(args, dims, **params):
    (x,), (bdim,) = args, dims
    x = jnp.moveaxis(x, bdim, 0)
    n, r, d = x.shape
    return hadamard_p.bind(x.reshape(n * r, d), **params).reshape(n, r, d), 0


batching.primitive_batchers[hadamard_p] = _batch
