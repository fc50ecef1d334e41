"""Tensor layouts of a quantized Linear weight in compressed-tensors and ModelOpt files.

One :class:`QuantizedTensor` ``[N, K]`` (the torch ``Linear.weight`` orientation,
blocked along K) becomes tensors named after its module ``m``; docs/checkpoints.md
has the full table with shapes, dtypes and sources. In short:

* compressed-tensors: FP8 E4M3 ``m.weight`` + F32 ``m.weight_scale`` ([1] tensor,
  [N, 1] channel, [N/bn, K/bk] block, [N, K/g] group); NVFP4 ``m.weight_packed``
  U8 [N, K/2] + E4M3 ``m.weight_scale`` [N, K/16] + F32 ``m.weight_global_scale``
  [1] = 1 / ts; MXFP4 ``m.weight_packed`` + U8 (E8M0 bits) ``m.weight_scale``
  [N, K/32]; static activation scale ``m.input_scale`` F32 [1].
* ModelOpt: FP8 ``m.weight`` + F32 ``m.weight_scale`` ([] for ``FP8``, [N] for
  ``FP8_PER_CHANNEL_PER_TOKEN``); NVFP4 ``m.weight`` U8 [N, K/2] + E4M3
  ``m.weight_scale`` [N, K/16] + F32 ``m.weight_scale_2`` [] = ts; MXFP8
  ``m.weight`` E4M3 + U8 ``m.weight_scale`` [N, K/32]; ``m.input_scale`` F32 [].

``ts`` is jax_bq's NVFP4 tensor scale ``amax / 2688``; compressed-tensors stores
its reciprocal (``2688 / amax``, a divisor). Both pack two E2M1 codes per
byte, the first (even) element in the low nibble, as jax_bq does, so codes are
copied byte for byte.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from jax_bq.formats import Granularity, QuantFormat
from jax_bq.qtensor import QuantizedTensor

__all__ = ["CT", "MODELOPT", "LAYOUTS", "encode_weight", "decode_weight", "scheme_key"]

JAX_BQ = "jax_bq"
CT = "compressed-tensors"
MODELOPT = "modelopt"
LAYOUTS = (JAX_BQ, CT, MODELOPT)

_F32 = np.dtype(np.float32)
_U8 = np.dtype(np.uint8)
_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
_E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)


def scheme_key(q: QuantizedTensor) -> tuple:
    """What distinguishes two weights' quantization schemes."""
    return (q.format, q.granularity, tuple(q.block))


def _unsupported(q: QuantizedTensor, layout: str, name: str) -> ValueError:
    what = f"{q.format.value} {q.granularity.value}" + (f" block {q.block}" if q.block else "")
    can = {
        CT: "FP8 E4M3 per-tensor/per-channel/tiles/1xg blocks, NVFP4, MXFP4",
        MODELOPT: "FP8 E4M3 per-tensor/per-channel, NVFP4, MXFP8",
    }[layout]
    return ValueError(
        f"{name}: {what} has no {layout} layout (it holds {can}); save with layout='jax_bq'"
    )


def _check_2d(q: QuantizedTensor, layout: str, name: str) -> None:
    if q.rank != 2 or q.stack_shape or q.axis != -1:
        raise ValueError(
            f"{name}: {layout} stores [N, K] weights blocked along K; got logical shape "
            f"{q.shape} (member rank {q.rank}, axis {q.axis})"
        )
    if q.granularity in (Granularity.PER_BLOCK, Granularity.TILE_2D):
        b = q.block[-1]
        if q.shape[-1] % b:
            raise ValueError(
                f"{name}: K={q.shape[-1]} is not a multiple of the block {b}; {layout} has no "
                "ragged blocks (save with layout='jax_bq')"
            )


def encode_weight(q: QuantizedTensor, layout: str, module: str) -> tuple[dict, dict]:
    """``(tensors, scheme)`` of one quantized weight in ``layout``.

    ``scheme`` is the layout's description of the weight quantization
    (compressed-tensors ``QuantizationArgs`` fields, or ModelOpt's
    ``quant_algo``/``group_size``).

    Raises:
        ValueError: the format/granularity has no representation in ``layout``.
    """
    _check_2d(q, layout, module)
    f, g = q.format, q.granularity
    data, scales = np.asarray(q.data), np.asarray(q.scales)
    n = q.shape[0]
    t = {}
    if layout == CT:
        if f is QuantFormat.FP8_E4M3:
            t[f"{module}.weight"] = data
            args = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
            if g is Granularity.PER_TENSOR:
                t[f"{module}.weight_scale"] = scales.reshape(1)
                args["strategy"] = "tensor"
            elif g is Granularity.PER_CHANNEL:
                t[f"{module}.weight_scale"] = scales.reshape(n, 1)
                args["strategy"] = "channel"
            elif g is Granularity.TILE_2D:
                t[f"{module}.weight_scale"] = scales
                args.update(strategy="block", block_structure=list(q.block))
            else:
                t[f"{module}.weight_scale"] = scales
                args.update(strategy="group", group_size=q.block[0])
            return t, {"format": "float-quantized", "weights": args}
        if f is QuantFormat.NVFP4:
            ts = np.asarray(q.tensor_scale, _F32).reshape(1)
            t[f"{module}.weight_packed"] = data
            t[f"{module}.weight_scale"] = scales
            t[f"{module}.weight_global_scale"] = (np.float32(1.0) / ts).astype(_F32)
            args = {
                "num_bits": 4, "type": "float", "symmetric": True, "dynamic": False,
                "strategy": "tensor_group", "group_size": 16,
                "scale_dtype": "torch.float8_e4m3fn",
            }  # fmt: skip
            return t, {"format": "nvfp4-pack-quantized", "weights": args}
        if f is QuantFormat.MXFP4:
            t[f"{module}.weight_packed"] = data
            t[f"{module}.weight_scale"] = scales.view(_U8)
            args = {
                "num_bits": 4, "type": "float", "symmetric": True, "dynamic": False,
                "strategy": "group", "group_size": 32, "scale_dtype": "torch.uint8",
            }  # fmt: skip
            return t, {"format": "mxfp4-pack-quantized", "weights": args}
        raise _unsupported(q, layout, module)
    if layout == MODELOPT:
        if f is QuantFormat.FP8_E4M3 and g is Granularity.PER_TENSOR:
            t[f"{module}.weight"] = data
            t[f"{module}.weight_scale"] = scales.reshape(())
            return t, {"quant_algo": "FP8"}
        if f is QuantFormat.FP8_E4M3 and g is Granularity.PER_CHANNEL:
            t[f"{module}.weight"] = data
            t[f"{module}.weight_scale"] = scales.reshape(n)
            return t, {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"}
        if f is QuantFormat.NVFP4:
            t[f"{module}.weight"] = data
            t[f"{module}.weight_scale"] = scales
            t[f"{module}.weight_scale_2"] = np.asarray(q.tensor_scale, _F32).reshape(())
            return t, {"quant_algo": "NVFP4", "group_size": 16}
        if f is QuantFormat.MXFP8:
            t[f"{module}.weight"] = data
            t[f"{module}.weight_scale"] = scales.view(_U8)
            return t, {"quant_algo": "MXFP8", "group_size": 32}
        raise _unsupported(q, layout, module)
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def _qt(data, scales, ts, fmt, gran, block, k, dtype) -> QuantizedTensor:
    import jax.numpy as jnp

    return QuantizedTensor(
        jnp.asarray(data),
        jnp.asarray(scales),
        None if ts is None else jnp.asarray(ts),
        fmt,
        gran,
        tuple(block),
        -1,
        k,
        2,
        np.dtype(dtype),
    ).validate()


def decode_weight(
    tensors: dict[str, np.ndarray],
    layout: str,
    module: str,
    args: dict | None = None,
    dtype=np.float32,
    tensor_scale_bits: int | None = None,
) -> QuantizedTensor:
    """The :class:`QuantizedTensor` of ``module``'s weight tensors in ``layout``.

    ``args`` is the compressed-tensors ``weights`` entry of the module's
    config group (needed for FP8 blocks: ``block_structure``/``group_size``).
    ``tensor_scale_bits`` (from a jax_bq-written file) restores the exact
    NVFP4 tensor scale that a compressed-tensors reciprocal cannot always give
    back; it must agree with the stored reciprocal.

    Raises:
        ValueError: missing tensors, or dtypes/shapes that fit no format.
    """
    args = args or {}

    def get(leaf):
        name = f"{module}.{leaf}"
        if name not in tensors:
            raise ValueError(f"{layout} checkpoint has no tensor {name!r}")
        return tensors[name]

    packed = f"{module}.weight_packed" in tensors
    w = get("weight_packed" if packed else "weight")
    s = get("weight_scale")
    n = w.shape[0]
    if w.ndim != 2:
        raise ValueError(f"{module}: weight of shape {w.shape} is not [N, K]")
    if layout == CT and packed:
        k = w.shape[1] * 2
        if f"{module}.weight_global_scale" in tensors:
            gs = np.asarray(get("weight_global_scale"), _F32).reshape(())
            ts = (np.float32(1.0) / gs).astype(_F32)
            if tensor_scale_bits is not None:
                exact = np.asarray(tensor_scale_bits, np.uint32).view(_F32).reshape(())
                if (np.float32(1.0) / exact).astype(_F32).view(np.uint32) != gs.view(np.uint32):
                    raise ValueError(
                        f"{module}: recorded NVFP4 tensor scale {exact} disagrees with "
                        f"weight_global_scale {gs}"
                    )
                ts = exact
            return _qt(w, s.view(_E4M3), ts, QuantFormat.NVFP4, Granularity.PER_BLOCK, (16,), k,
                       dtype)  # fmt: skip
        return _qt(w, s.view(_E8M0), None, QuantFormat.MXFP4, Granularity.PER_BLOCK, (32,), k,
                   dtype)  # fmt: skip
    if layout == MODELOPT and w.dtype == _U8:
        ts = np.asarray(get("weight_scale_2"), _F32).reshape(())
        return _qt(w, s.view(_E4M3), ts, QuantFormat.NVFP4, Granularity.PER_BLOCK, (16,),
                   w.shape[1] * 2, dtype)  # fmt: skip
    if w.dtype != _E4M3:
        raise ValueError(f"{module}: weight dtype {w.dtype} is not float8_e4m3fn or packed uint8")
    k = w.shape[1]
    if s.dtype == _U8:  # ModelOpt MXFP8: E8M0 bits per 32
        return _qt(w, s.view(_E8M0), None, QuantFormat.MXFP8, Granularity.PER_BLOCK, (32,), k,
                   dtype)  # fmt: skip
    s = np.asarray(s, _F32)
    strategy = args.get("strategy")
    if s.size == 1 and strategy in (None, "tensor"):
        return _qt(w, s.reshape(1, 1), None, QuantFormat.FP8_E4M3, Granularity.PER_TENSOR, (), k,
                   dtype)  # fmt: skip
    if s.size == n and strategy in (None, "channel"):
        return _qt(w, s.reshape(n, 1), None, QuantFormat.FP8_E4M3, Granularity.PER_CHANNEL, (), k,
                   dtype)  # fmt: skip
    if strategy == "block":
        return _qt(w, s, None, QuantFormat.FP8_E4M3, Granularity.TILE_2D,
                   tuple(args["block_structure"]), k, dtype)  # fmt: skip
    if strategy == "group":
        return _qt(w, s, None, QuantFormat.FP8_E4M3, Granularity.PER_BLOCK,
                   (int(args["group_size"]),), k, dtype)  # fmt: skip
    raise ValueError(
        f"{module}: weight_scale of shape {s.shape} fits no FP8 scheme for weight {w.shape} "
        f"(strategy {strategy!r})"
    )
