"""Turning a trained Flax param tree into quantized weights.

A Flax ``Dense`` kernel is stored ``[K, N]`` (inputs x outputs);
:func:`jax_bq.qmatmul` wants ``[N, K]`` blocked along K. The conversion
transposes each selected kernel once, at quantization time, so inference never
transposes. Kernels of ``DenseGeneral`` (rank > 2) are flattened to
``[prod(out dims), prod(in dims)]``; how many leading dims are contracted is
the rule's ``in_dims``.

Which leaves are quantized:

* ``quantize_model_weights(params, "fp8_e4m3")``: every leaf named ``kernel``
  of rank 2 with the format's default granularity (see :class:`WeightQuant`);
  embeddings, norms and biases stay as they are.
* ``quantize_model_weights(params, rules)``: ``rules`` is a sequence of
  ``(pattern, spec)``; a leaf's path (keys joined by ``/``, e.g.
  ``encoder/layer_0/attention/query/kernel``) is matched with
  :func:`re.search` against each pattern in order; the first match decides:
  ``spec`` (a :class:`WeightQuant` or a format name) quantizes, ``"bf16"``
  or ``"fp16"`` stores the leaf in that dtype (not quantized), ``None``
  keeps the leaf. Leaves no rule matches are kept. A rule that matches no
  leaf is an error (a typo would otherwise silently quantize nothing).
  Non-kernel leaves (an embedding table ``[V, D]``) are quantized along their
  last axis without transposing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jax_bq.formats import Granularity, QuantFormat
from jax_bq.ops import quantize
from jax_bq.qtensor import QuantizedTensor

__all__ = [
    "WeightQuant",
    "cast_float_params",
    "kernel_to_nk",
    "named_leaves",
    "param_bytes",
    "path_name",
    "quantize_kernel",
    "quantize_model_weights",
]

_FP8 = (QuantFormat.FP8_E4M3, QuantFormat.FP8_E5M2)


@dataclass(frozen=True)
class WeightQuant:
    """How one weight is quantized.

    Attributes:
        format: storage format (``"fp8_e4m3"``, ``"nvfp4"``, ...).
        granularity: ``None`` picks the default for the format: FP8 ->
            ``per_channel`` (one scale per output row of ``[N, K]``), FP4 ->
            ``per_block`` of 32, NVFP4/MX -> their fixed blocks.
            ``"tile_2d"`` gives the 128x128 tiles of DeepSeek-style FP8.
        block_size: block along K for ``per_block`` (16..256, power of two).
        calibrate: MSE-optimal block scales (:func:`jax_bq.calibrate`)
            instead of absmax; per-block granularities and NVFP4/MX only.
        in_dims: leading kernel dims that are contracted (``DenseGeneral``
            kernels ``[*in, *out]``); 1 for ``Dense``.
    """

    format: QuantFormat | str
    granularity: Granularity | str | None = None
    block_size: int | tuple[int, int] | None = None
    calibrate: bool = False
    in_dims: int = 1

    def resolved(self) -> WeightQuant:
        """Returns a copy with the format and granularity parsed and defaulted."""
        fmt = QuantFormat.parse(self.format)
        if fmt in (QuantFormat.FP16, QuantFormat.BF16):
            raise ValueError(f"WeightQuant format must be a quantized format, got {fmt.value}")
        gran = self.granularity
        if gran is None:
            if fmt in _FP8:
                gran = Granularity.PER_CHANNEL if self.block_size is None else Granularity.PER_BLOCK
            else:
                gran = Granularity.PER_BLOCK
        gran = Granularity(gran) if not isinstance(gran, Granularity) else gran
        if self.calibrate and gran is not Granularity.PER_BLOCK:
            raise ValueError(
                f"calibrate=True needs per-block scales, got granularity={gran.value} "
                f"for {fmt.value}"
            )
        if self.in_dims < 1:
            raise ValueError(f"in_dims must be >= 1, got {self.in_dims}")
        return WeightQuant(fmt, gran, self.block_size, self.calibrate, self.in_dims)


Rules = Sequence[tuple[str, "WeightQuant | str | None"]]


def path_name(path) -> str:
    """``/``-joined key path of a pytree leaf (dict keys, attributes, indices)."""
    parts = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                parts.append(str(getattr(p, attr)))
                break
        else:
            parts.append(str(p))
    return "/".join(parts)


def named_leaves(params) -> list[tuple[str, object]]:
    """``(path_name, leaf)`` of every leaf of ``params``, a QuantizedTensor counting as one leaf."""
    leaves = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, QuantizedTensor)
    )[0]
    return [(path_name(path), leaf) for path, leaf in leaves]


@dataclass(frozen=True)
class _Cast:
    """Rule spec ``"bf16"``/``"fp16"``: the leaf is stored in ``dtype``, not quantized."""

    name: str
    dtype: object


_CASTS = {
    QuantFormat.BF16: _Cast("bf16", jnp.bfloat16),
    QuantFormat.FP16: _Cast("fp16", jnp.float16),
}
Spec = WeightQuant | _Cast | None


def _as_spec(spec) -> Spec:
    if spec is None or isinstance(spec, _Cast):
        return spec
    if isinstance(spec, str | QuantFormat):
        fmt = QuantFormat.parse(spec)
        if fmt in _CASTS:
            return _CASTS[fmt]
        spec = WeightQuant(spec)
    if not isinstance(spec, WeightQuant):
        raise ValueError(
            f"a rule's spec must be a WeightQuant, a format name or None, got {type(spec).__name__}"
        )
    return spec.resolved()


def _compile_rules(
    rules, default_pattern: str = r"(^|/)kernel$", default_label: str = "<default: rank-2 kernels>"
) -> list[tuple[re.Pattern, Spec, str]]:
    """``(pattern, spec, source)`` triples; a lone format/spec applies to ``default_pattern``."""
    if isinstance(rules, str | QuantFormat | WeightQuant):
        return [(re.compile(default_pattern), _as_spec(rules), default_label)]
    if not isinstance(rules, Sequence):
        raise ValueError(
            "rules must be a format, a WeightQuant, or a sequence of (pattern, spec) pairs; "
            f"got {type(rules).__name__}"
        )
    out = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, tuple | list) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ValueError(f"rule {i} must be a (pattern: str, spec) pair, got {rule!r}")
        try:
            pat = re.compile(rule[0])
        except re.error as e:
            raise ValueError(f"rule {i}: bad regular expression {rule[0]!r}: {e}") from None
        out.append((pat, _as_spec(rule[1]), rule[0]))
    return out


def _store_leaf(name: str, leaf, spec: Spec, is_kernel: bool = True):
    """``leaf`` as ``spec`` says: unchanged (None), cast (bf16/fp16) or quantized."""
    if spec is None:
        return leaf
    if isinstance(leaf, QuantizedTensor):
        raise ValueError(f"{name} is already quantized ({leaf.format.value})")
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        raise ValueError(f"{name}: expected an array leaf, got {type(leaf).__name__}")
    dt = np.dtype(leaf.dtype)
    if dt not in (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16)):
        raise ValueError(f"{name}: cannot quantize dtype {dt} (float32, bfloat16, float16 only)")
    if isinstance(spec, _Cast):
        return jnp.asarray(leaf, spec.dtype)
    return _quantize_leaf(name, leaf, spec, is_kernel)


def _quantize_leaf(name: str, leaf, spec: WeightQuant, is_kernel: bool) -> QuantizedTensor:
    if leaf.ndim < 2:
        raise ValueError(
            f"{name}: cannot quantize a rank-{leaf.ndim} leaf of shape {tuple(leaf.shape)} "
            "(biases and norms stay in high precision; quantize matrices only)"
        )
    if is_kernel:
        return quantize_kernel(leaf, spec, name=name)
    return _quantize_nk(jnp.asarray(leaf), spec, name)


def kernel_to_nk(kernel, in_dims: int = 1, name: str = "kernel") -> jax.Array:
    """Flax kernel ``[*in, *out]`` -> ``[prod(out), prod(in)]`` (qmatmul's ``[N, K]``)."""
    if in_dims >= kernel.ndim:
        raise ValueError(
            f"{name}: in_dims={in_dims} leaves no output dims in shape {tuple(kernel.shape)}"
        )
    k = int(np.prod(kernel.shape[:in_dims]))
    return jnp.reshape(jnp.asarray(kernel), (k, -1)).T


def quantize_kernel(kernel, spec: WeightQuant | str, name: str = "kernel") -> QuantizedTensor:
    """Transposes a Flax kernel to ``[N, K]`` once and quantizes it by ``spec``."""
    spec = _as_spec(spec)
    if not isinstance(spec, WeightQuant):
        raise ValueError(f"{name}: quantize_kernel needs a quantized format, got {spec!r}")
    return _quantize_nk(kernel_to_nk(kernel, spec.in_dims, name), spec, name)


def _quantize_nk(w, spec: WeightQuant, name: str) -> QuantizedTensor:
    if spec.calibrate:
        from jax_bq.calibration import CalibrationConfig, calibrate_tensor

        fixed = spec.format.fixed_block
        blocks = (fixed,) if fixed else ((spec.block_size or 32),)
        cfg = CalibrationConfig(format=spec.format, block_sizes=blocks, progress=False)
        return calibrate_tensor(w, cfg, name=name).quantized
    return quantize(w, spec.format, block_size=spec.block_size, granularity=spec.granularity)


def quantize_model_weights(
    params,
    rules: QuantFormat | str | WeightQuant | Rules,
    *,
    is_kernel: Callable[[str], bool] | None = None,
):
    """Returns ``params`` with the selected weights replaced by QuantizedTensors.

    Kernels become ``[N, K]`` QuantizedTensors that :class:`jax_bq.flax.QDense`
    (and :func:`jax_bq.qmatmul`) consume directly; everything else is returned
    unchanged (same tree structure, same leaves).

    Args:
        params: a Flax param tree (nested dicts of arrays), e.g.
            ``variables["params"]``.
        rules: a format name / :class:`WeightQuant` (all rank-2 ``kernel``
            leaves), or ``(pattern, spec)`` pairs, first match wins (module
            docstring).
        is_kernel: decides from the path whether a leaf is a ``[*in, *out]``
            kernel to transpose (default: its last key is ``kernel``).

    Raises:
        ValueError: bad rules, a rule that matches nothing, or a matched leaf
            that cannot be quantized (rank < 2, integer dtype, already
            quantized), naming the leaf, its shape and dtype.
    """
    compiled = _compile_rules(rules)
    default = not isinstance(rules, Sequence) or isinstance(rules, str)
    is_kernel = is_kernel or (lambda name: name.rsplit("/", 1)[-1] == "kernel")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, QuantizedTensor)
    )
    if not leaves:
        raise ValueError("params has no leaves")
    used = [False] * len(compiled)
    out = []
    for path, leaf in leaves:
        name = path_name(path)
        spec, hit = None, None
        for i, (pat, s, _) in enumerate(compiled):
            if pat.search(name):
                hit, spec = i, s
                break
        if hit is None:
            out.append(leaf)
            continue
        if default and getattr(leaf, "ndim", 0) != 2:
            out.append(leaf)  # the default rule: rank-2 kernels only
            continue
        used[hit] = True
        out.append(_store_leaf(name, leaf, spec, is_kernel(name)))
    unused = [src for (_, _, src), u in zip(compiled, used, strict=True) if not u]
    if unused and not default:
        raise ValueError(f"rules matched no parameter: {unused}")
    if default and not any(used):
        raise ValueError(
            "no rank-2 'kernel' leaf in params: nothing to quantize (DenseGeneral kernels of "
            "rank > 2 need a rule: [('kernel', WeightQuant(fmt, in_dims=n))])"
        )
    return jax.tree_util.tree_unflatten(treedef, out)


def cast_float_params(params, dtype):
    """Casts every leaf that is not a QuantizedTensor to ``dtype`` (e.g. bf16 serving).

    Static activation scales (``act_scale`` leaves) stay float32: they are
    part of the quantization, not weights.
    """

    def cast(path, x):
        if isinstance(x, QuantizedTensor) or path_name(path).endswith("act_scale"):
            return x
        return jnp.asarray(x, dtype)

    return jax.tree_util.tree_map_with_path(
        cast, params, is_leaf=lambda x: isinstance(x, QuantizedTensor)
    )


def param_bytes(params, select: Callable[[str], bool] | None = None) -> int:
    """Bytes of the leaves (QuantizedTensors count codes + scales).

    ``select`` keeps only leaves whose ``/``-joined path it accepts (e.g.
    ``lambda name: name.endswith("kernel")``).
    """
    total = 0
    for name, leaf in named_leaves(params):
        if select is not None and not select(name):
            continue
        if isinstance(leaf, QuantizedTensor):
            total += leaf.nbytes
        else:
            total += int(np.prod(np.shape(leaf))) * np.dtype(leaf.dtype).itemsize
    return total
