"""``fp4_to_fp8_p``: FP4/NVFP4/MXFP4 ``[N, K]`` -> FP8 E4M3 codes and 1x128 scales.

Operands: 4-bit codes ``[N, K/2]`` (uint8), their scales ``[N, ceil(K/block)]``
and a 1-element float32 tensor scale (NVFP4's, else 1). Results: FP8 E4M3 codes
``[N, K]`` and float32 scales ``[N, ceil(K/128)]``. Parameters: ``fmt``,
``block`` (the 4-bit format's block along K), ``k`` and ``dtype`` (the 4-bit
tensor's original dtype, metadata only).

The definition is ``quantize(dequantize(w4, float32), "fp8_e4m3", per_block,
block 128)``, which is also the default lowering (every platform but CUDA).
On CUDA the FFI target ``jax_bq_fp4_to_fp8`` (handler ``BqFp4ToFp8Cuda``) does
it in one pass without the float32 intermediate and writes the same bytes
(tests/ops/test_fp4_to_fp8.py compares them on the GPU, every code and scale).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import batching

from jax_bq._util import cdiv as _cdiv
from jax_bq.formats import Granularity, QuantFormat
from jax_bq.primitives.codec import decode, encode_rows
from jax_bq.primitives.common import def_jitted_impl, register_lowerings
from jax_bq.qtensor import QuantizedTensor

fp4_to_fp8_p = Primitive("jax_bq_fp4_to_fp8")
fp4_to_fp8_p.multiple_results = True
def_jitted_impl(fp4_to_fp8_p)


def _abstract_eval(data, scales, tensor_scale, *, fmt, block, k, dtype):
    n = data.shape[0]
    want = {"data": (n, _cdiv(k, 2)), "scales": (n, _cdiv(k, block)), "tensor_scale": (1,)}
    got = {"data": data.shape, "scales": scales.shape, "tensor_scale": tensor_scale.shape}
    if got != want or not fmt.is_packed:
        raise ValueError(f"fp4_to_fp8_p operands for {fmt.value}, K={k}: got {got}, want {want}")
    if np.dtype(data.dtype) != fmt.data_dtype or np.dtype(scales.dtype) != fmt.scale_dtype:
        raise ValueError(
            f"fp4_to_fp8_p dtypes: data {data.dtype} (want {fmt.data_dtype}), scales "
            f"{scales.dtype} (want {fmt.scale_dtype})"
        )
    return (
        ShapedArray((n, k), QuantFormat.FP8_E4M3.data_dtype),
        ShapedArray((n, _cdiv(k, 128)), np.dtype(np.float32)),
    )


fp4_to_fp8_p.def_abstract_eval(_abstract_eval)


def _definition(data, scales, tensor_scale, *, fmt, block, k, dtype):
    w = QuantizedTensor(
        data=data,
        scales=scales,
        tensor_scale=tensor_scale[0] if fmt is QuantFormat.NVFP4 else None,
        format=fmt,
        granularity=Granularity.PER_BLOCK,
        block=(block,),
        axis=-1,
        axis_len=k,
        rank=2,
        dtype=dtype,
    )
    q = encode_rows(decode(w, jnp.float32), QuantFormat.FP8_E4M3, Granularity.PER_BLOCK, 128)
    return [q.data, q.scales]


def _attrs(params: dict) -> dict:
    return {
        "format": np.int32(params["fmt"].ffi_id),
        "block": np.int64(params["block"]),
        "k": np.int64(params["k"]),
    }


register_lowerings(
    fp4_to_fp8_p,
    "fp4_to_fp8",
    "jax_bq_fp4_to_fp8",
    _definition,
    _attrs,
    multiple_results=True,
    platforms=("cuda",),
)


def _batch(args, dims, **params):
    # vmapped conversions take the definition (one fused launch per member
    # would need a batched kernel; stacked weights are rare here).
    out = jax.vmap(functools.partial(_definition, **params), in_axes=dims)(*args)
    return out, [0, 0]


batching.primitive_batchers[fp4_to_fp8_p] = _batch
