"""Sharding rules for jax_bq's primitives: they partition like XLA's own ops.

Without rules, a custom call under a sharded ``jit`` is opaque to XLA's SPMD
partitioner: it all-gathers every operand to every device and runs the whole
op everywhere, which throws away both the memory saving and the speed. With
them, ``quantize``, ``dequantize``, ``qmatmul`` and ``calibrate`` run on the
shard each device holds, and XLA inserts only the collectives the math needs.

Mechanism, and why this one
---------------------------
JAX 0.10/0.11 offer two ways to teach the partitioner about a custom call:

* ``jax.ffi.register_ffi_target_as_batch_partitionable``: XLA splits the
  *leading batch dimensions* of every operand (a ``num_batch_dims`` frontend
  attribute) and nothing else. Our ops need more: the rows of a GEMM, its
  columns (tensor parallel) and its contraction (with a reduction after),
  block-aligned splits of a blocked axis, and a cross-shard amax for the
  per-tensor and NVFP4 scales. It also covers only the FFI custom call, not
  the jnp-twin lowering every other platform (and the fallback) takes.
* ``jax.experimental.custom_partitioning`` with a Shardy ``sharding_rule``
  (einsum-like factors, compound factors, reduction and need-replication
  factors) plus a ``partition`` callback that returns the per-shard program.
  Shardy is JAX's default partitioner (``jax_use_shardy_partitioner``), and
  the ``sharding_rule`` form is the one JAX's documentation asks new code to
  provide (the GSPMD callbacks are the legacy path). This is what we use.

How it is wired: each primitive's lowering rule is wrapped by
:func:`sharding_aware`. When the module is partitioned automatically over
several devices (a sharded ``jit``), the op is lowered as a
``custom_partitioning`` call whose rule is built from the operand shapes and
the op's static parameters; otherwise (one device, inside ``shard_map``, and
inside the per-shard program itself) the original lowering runs unchanged.
Shape rules, batching and eager execution are untouched.

Rules (``[G, P, A, B]`` is the kernels' view, see :mod:`jax_bq.layout`)
-----------------------------------------------------------------------
* Blocks stay whole. A blocked axis whose length is a multiple of its block
  is the compound factor ``(blocks, within)``; only ``blocks`` may be sharded,
  so a shard boundary is always a block boundary and the scales are sharded
  alongside. A ragged blocked axis cannot be split at block boundaries into
  equal shards: it is replicated (re-sharded) and a warning says so.
* An axis covered by one block (per-tensor, per-channel, a single block) may
  be sharded: each shard computes its local block amax, and a ``pmax`` over
  the sharding mesh axes makes it global before the scales are formed
  (deterministic, exact: max is associative). NVFP4's tensor amax is made
  global the same way over every axis but G. Those shards then take the jnp
  twin (bit-identical to the kernels), since the kernels compute their scales
  internally. 4-bit codes packed along such an axis are not split.
* ``qmatmul`` ``out[M, N] = x[M, K] . w[N, K]^T``: M (rows, data parallel) and
  N (columns, column-parallel tensor parallel) pass through; K (row-parallel)
  is a reduction factor: each shard multiplies its K slice in float32 and one
  ``psum`` sums them before the epilogue (bias, GELU, residual, FP8 output)
  runs once on the sum. K splits only at a multiple of every block along K
  (weight block, activation block, two codes per byte). Dynamic per-tensor
  or per-token activation scales that span shards are formed from a ``pmax``
  of the local amax, x is quantized per shard with them (jnp twin, bitwise)
  and the GEMM takes it pre-quantized. The ``amax`` output is ``pmax``-ed.
* ``calibrate``: G and P pass through, A splits at block boundaries; NVFP4
  (whose search depends on the tensor scale) keeps P and A whole.

The workspace outputs (scratch the callers drop) are replicated zeros.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field, replace

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import mlir
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_bq import _compat

logger = logging.getLogger("jax_bq")

__all__ = ["sharding_aware", "factor_layout"]


# ---------------------------------------------------------------- layouts ----
@dataclass
class Layout:
    """Factors of every operand and result dimension (major factor first).

    Attributes:
        operands, results: per array, per dimension, a tuple of factor names
            (a compound dimension has several; only the first may be sharded).
        sizes: every factor's size.
        need_replication: factors that must never be sharded.
        reduction: factors that appear in operands only (summed over).
        kinds: per shardable factor, "pass" (independent slices), "tiled"
            (whole blocks), "whole" (inside one block: needs a cross-shard
            amax) or "reduce" (a contraction).
    """

    operands: list = field(default_factory=list)
    results: list = field(default_factory=list)
    sizes: dict = field(default_factory=dict)
    need_replication: set = field(default_factory=set)
    reduction: set = field(default_factory=set)
    kinds: dict = field(default_factory=dict)
    _fresh: int = 0

    def fresh(self, size: int) -> tuple[str, ...]:
        """A factor of its own for a dimension nothing else shares (never sharded)."""
        self._fresh += 1
        name = f"z{self._fresh}"
        self.sizes[name] = size
        self.need_replication.add(name)
        return (name,)

    def rule(self) -> tuple[str, dict]:
        """The einsum-like Shardy rule and its keyword arguments."""

        def dim(factors):
            return factors[0] if len(factors) == 1 else "(" + " ".join(factors) + ")"

        def arr(dims):
            return " ".join(dim(d) for d in dims) if dims else ""

        lhs = ", ".join(arr(o) for o in self.operands)
        rhs = ", ".join(arr(r) for r in self.results)
        order = list(
            dict.fromkeys(f for a in (*self.operands, *self.results) for d in a for f in d)
        )
        standalone = {d[0] for a in (*self.operands, *self.results) for d in a if len(d) == 1}
        kwargs = {f: self.sizes[f] for f in order if f not in standalone}
        # Shardy wants the special factors in order of appearance.
        kwargs["need_replication_factors"] = tuple(f for f in order if f in self.need_replication)
        kwargs["reduction_factors"] = tuple(f for f in order if f in self.reduction)
        return f"{lhs} -> {rhs}", kwargs


def _blocked_dim(lay: Layout, name: str, n: int, blk: int, packing, whole_ok: bool):
    """(x dim, codes dim, scales dim) factors of one axis of ``n`` in blocks of ``blk``.

    ``packing``: the format whose codes are packed along this axis, or None.
    """
    packed = packing is not None
    if blk == 1 and not packed:
        lay.sizes[name] = n
        lay.kinds[name] = "pass"
        return (name,), (name,), (name,)
    nb = -(-n // blk)
    if n % blk == 0 and nb >= 2:
        lay.sizes[name] = nb
        lay.kinds[name] = "tiled"
        inner = f"{name}_in"
        lay.sizes[inner] = blk
        lay.need_replication.add(inner)
        xd = (name, inner)
        cd = xd
        if packed:
            half = f"{name}_half"
            lay.sizes[half] = packing.packed_extent(blk)
            lay.need_replication.add(half)
            cd = (name, half)
        return xd, cd, (name,)
    lay.sizes[name] = n
    if n <= blk and whole_ok and not packed:
        lay.kinds[name] = "whole"
        return (name,), (name,), lay.fresh(nb)
    # Ragged blocks, packed codes inside one block, or no cross-shard rule.
    lay.need_replication.add(name)
    lay.kinds[name] = "fixed"
    cd = lay.fresh(packing.packed_extent(n)) if packed else (name,)
    return (name,), cd, lay.fresh(nb)


def _view_layout(shape, fmt, ba, bb, pack_b, whole_ok=True):
    lay = Layout()
    g, p, a, b = shape
    lay.sizes.update(g=g, p=p)
    lay.kinds.update(g="pass", p="pass")
    packing = fmt if fmt.is_packed else None
    xa, ca, sa = _blocked_dim(lay, "a", a, ba, None if pack_b else packing, whole_ok)
    xb, cb, sb = _blocked_dim(lay, "b", b, bb, packing if pack_b else None, whole_ok)
    return lay, (("g",), ("p",), xa, xb), (("g",), ("p",), ca, cb), (("g",), ("p",), sa, sb)


def factor_layout(prim_name: str, params: dict, in_shapes, out_shapes) -> Layout | None:
    """The factor layout of one call, or ``None`` when it is not partitioned (empty)."""
    if any(0 in s for s in in_shapes if len(s) >= 2) or any(
        0 in s for s in out_shapes[:1] if len(s) >= 2
    ):
        return None
    if prim_name not in _LAYOUTS:
        return None
    return _LAYOUTS[prim_name](params, in_shapes, out_shapes)


def _quantize_layout(params, in_shapes, out_shapes):
    lay, x, c, s = _view_layout(
        in_shapes[0], params["fmt"], params["ba"], params["bb"], params["pack_b"]
    )
    lay.operands = [x]
    lay.results = [c, s, (("g",),), [lay.fresh(out_shapes[3][0])]]
    return lay


def _dequantize_layout(params, in_shapes, out_shapes):
    lay, x, c, s = _view_layout(
        out_shapes[0], params["fmt"], params["ba"], params["bb"], params["pack_b"]
    )
    for f, k in list(lay.kinds.items()):
        if k == "whole":  # dequantizing inside one block needs no amax
            lay.kinds[f] = "pass"
    lay.operands = [c, s, (("g",),)]
    lay.results = [x]
    return lay


def _calibrate_layout(params, in_shapes, out_shapes):
    fmt = params["fmt"]
    lay, x, c, s = _view_layout(in_shapes[0], fmt, params["ba"], 1, False, whole_ok=False)
    if fmt.has_tensor_scale:  # the MSE search depends on the tensor scale
        for f in ("p", "a"):
            lay.need_replication.add(f)
            lay.kinds[f] = "fixed"
    lay.operands = [x]
    lay.results = [c, s, (("g",),), s, s, s, [lay.fresh(out_shapes[-1][0])]]
    return lay


def _lcm(*xs: int) -> int:
    out = 1
    for v in xs:
        out = out * v // math.gcd(out, v)
    return out


def _qmatmul_k_blocks(cfg) -> tuple[int, int, int]:
    """``(weight block along K, activation block along K, K unit)``.

    A K shard must hold whole blocks of every operand (and whole packed
    bytes): the unit is the least common multiple of the blocks.
    """
    from jax_bq.formats import Granularity
    from jax_bq.primitives import qmatmul as qp

    wg = cfg.w_granularity
    k_blocks = [cfg.w_format.elements_per_unit]  # packed codes: whole units
    if wg is Granularity.TILE_2D:
        w_bk = cfg.w_block[1]
    elif wg is Granularity.PER_BLOCK:
        w_bk = cfg.w_block[0]
    else:
        w_bk = 1
    k_blocks.append(w_bk)
    x_bk = 1
    if cfg.act_dynamic and cfg.act_format is not None:
        if cfg.act_granularity in (qp.ACT_TENSOR, qp.ACT_TOKEN):
            pass  # one amax over x / per row: made global by a pmax (_lower_qmatmul)
        elif cfg.act_granularity == qp.ACT_BLOCK128:
            x_bk = 128
        else:
            x_bk = cfg.act_format.fixed_block or 32
    elif not cfg.act_dynamic and cfg.act_qgranularity is Granularity.PER_BLOCK:
        x_bk = cfg.act_block[0]
    k_blocks.append(x_bk)
    return w_bk, x_bk, _lcm(*k_blocks)


def _qmatmul_n_dims(lay: Layout, cfg, n_unit: int, n_ok: bool, n_scales: int):
    """Sizes and kinds of N; ``(dims of N, dims of the weight scales' N)``.

    N is compound ``(n, n_in)`` for 128-row weight tiles.
    """
    from jax_bq.formats import Granularity

    tiled = cfg.w_granularity is Granularity.TILE_2D
    if n_unit > 1 and n_ok:
        lay.sizes.update(n=cfg.n // n_unit, n_in=n_unit)
        lay.need_replication.add("n_in")
        nd = ("n", "n_in")
        n_scale = ("n",)
    else:
        lay.sizes["n"] = cfg.n
        nd = ("n",)
        n_scale = ("n",) if not tiled else lay.fresh(n_scales)
        if tiled:
            lay.need_replication.add("n")
    lay.kinds["n"] = "pass" if "n" not in lay.need_replication else "fixed"
    return nd, n_scale


def _qmatmul_k_sizes(lay: Layout, k: int, unit: int, k_ok: bool) -> None:
    if k_ok:
        lay.sizes["k"] = k // unit
        lay.kinds["k"] = "reduce"
        lay.reduction.add("k")
    else:
        lay.sizes["k"] = k
        lay.kinds["k"] = "fixed"
        lay.need_replication.add("k")


def _k_dims(lay: Layout, k: int, unit: int, k_ok: bool, width_elems: int):
    """The K dims of an operand with one entry per ``width_elems`` elements of K."""
    if k_ok:
        width = unit // width_elems  # entries per K unit
        inner = f"k_{width}"
        lay.sizes[inner] = width
        lay.need_replication.add(inner)
        return ("k", inner) if width > 1 else ("k",)
    return ("k",) if width_elems == 1 else lay.fresh(-(-k // width_elems))


def _weight_k_dims(lay: Layout, cfg, unit: int, k_ok: bool, kfull):
    """The K dims of the weight codes: ``bytes_per_unit`` bytes per ``elements_per_unit`` of K."""
    wf = cfg.w_format
    if not wf.is_packed:
        return kfull(1)
    if not k_ok:
        return lay.fresh(wf.packed_extent(cfg.k))
    per_unit = unit // wf.elements_per_unit * wf.bytes_per_unit
    inner = f"k_{per_unit}"
    lay.sizes[inner] = per_unit
    lay.need_replication.add(inner)
    return ("k", inner) if per_unit > 1 else ("k",)


def _act_scale_dims(lay: Layout, cfg, xs_shape, kfull, x_bk: int):
    """Dims of the activation scales (empty when the kernel quantizes x itself)."""
    from jax_bq.formats import Granularity

    if cfg.act_dynamic:
        return [lay.fresh(xs_shape[0])]
    if cfg.act_qgranularity is Granularity.PER_BLOCK:
        return [("m",), kfull(x_bk)]
    if cfg.act_qgranularity is Granularity.PER_CHANNEL:
        return [("m",), lay.fresh(xs_shape[1])]
    return [lay.fresh(d) for d in xs_shape]


def _weight_scale_dims(lay: Layout, cfg, ws_shape, kfull, w_bk: int, nd, n_scale, n_split: bool):
    """Dims of the weight scales."""
    from jax_bq.formats import Granularity

    wg = cfg.w_granularity
    if wg is Granularity.PER_BLOCK:
        ws_dims = [("n",), kfull(w_bk)]
    elif wg is Granularity.TILE_2D:
        ws_dims = [n_scale, kfull(w_bk)]
    elif wg is Granularity.PER_CHANNEL:
        ws_dims = [("n",), lay.fresh(ws_shape[1])]
    else:
        ws_dims = [lay.fresh(d) for d in ws_shape]
    if n_split and wg is Granularity.PER_BLOCK:
        ws_dims[0] = nd
    return ws_dims


def _qmatmul_layout(params, in_shapes, out_shapes):
    from jax_bq.formats import Granularity

    cfg = params["cfg"]
    lay = Layout()
    w_bk, x_bk, unit = _qmatmul_k_blocks(cfg)
    k_ok = not (cfg.k % unit or cfg.k // unit < 2)
    n_unit = cfg.w_block[0] if cfg.w_granularity is Granularity.TILE_2D else 1
    n_ok = cfg.n % n_unit == 0 and cfg.n // n_unit >= 2
    lay.sizes.update(m=cfg.m)
    lay.kinds["m"] = "pass"
    nd, n_scale = _qmatmul_n_dims(lay, cfg, n_unit, n_ok, in_shapes[3][0])
    _qmatmul_k_sizes(lay, cfg.k, unit, k_ok)

    def kfull(width_elems: int):
        return _k_dims(lay, cfg.k, unit, k_ok, width_elems)

    x_dims = [("m",), kfull(1)]
    xs_dims = _act_scale_dims(lay, cfg, in_shapes[1], kfull, x_bk)
    w_dims = [nd, _weight_k_dims(lay, cfg, unit, k_ok, kfull)]
    n_split = n_unit > 1 and n_ok
    ws_dims = _weight_scale_dims(lay, cfg, in_shapes[3], kfull, w_bk, nd, n_scale, n_split)
    bias = [nd] if in_shapes[5][0] == cfg.n and cfg.n else [lay.fresh(in_shapes[5][0])]
    resid = [("m",), nd] if len(in_shapes[6]) == 2 else [lay.fresh(in_shapes[6][0])]
    lay.operands = [
        x_dims,
        xs_dims,
        w_dims,
        ws_dims,
        [lay.fresh(in_shapes[4][0])],
        bias,
        resid,
        [lay.fresh(in_shapes[7][0])],
    ]
    lay.results = [[("m",), nd], [lay.fresh(out_shapes[1][0])], [lay.fresh(out_shapes[2][0])]]
    return lay


def _fp4_to_fp8_layout(params, in_shapes, out_shapes):
    """Rows pass through; K splits at multiples of 128 (the FP8 block, 64 packed bytes)."""
    lay = Layout()
    n, k = out_shapes[0]
    lay.sizes["n"] = n
    lay.kinds["n"] = "pass"
    blk = params["block"]
    if k % 128 == 0 and k // 128 >= 2 and 128 % blk == 0:
        lay.sizes.update(k=k // 128, k_64=64, k_128=128, k_sc=128 // blk)
        lay.need_replication |= {"k_64", "k_128", "k_sc"}
        lay.kinds["k"] = "tiled"
        data, scales, out, out_scales = ("k", "k_64"), ("k", "k_sc"), ("k", "k_128"), ("k",)
        if blk == 128:
            scales = ("k",)
    else:
        data = lay.fresh(in_shapes[0][1])
        scales = lay.fresh(in_shapes[1][1])
        out, out_scales = lay.fresh(k), lay.fresh(out_shapes[1][1])
    lay.operands = [[("n",), data], [("n",), scales], [lay.fresh(1)]]
    lay.results = [[("n",), out], [("n",), out_scales]]
    return lay


_LAYOUTS = {
    "jax_bq_fp4_to_fp8": _fp4_to_fp8_layout,
    "jax_bq_quantize": _quantize_layout,
    "jax_bq_dequantize": _dequantize_layout,
    "jax_bq_calibrate": _calibrate_layout,
    "jax_bq_qmatmul": _qmatmul_layout,
}


# ------------------------------------------------------------- partition ----
def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _factor_axes(lay: Layout, arg_shardings, mesh) -> dict[str, tuple[str, ...]]:
    """Mesh axes per factor, read from the operands' shardings, checked against the rules."""
    out: dict[str, tuple[str, ...]] = {}
    for dims, sh in zip(lay.operands, arg_shardings, strict=True):
        spec = _compat.partition_spec_of(sh, mesh, len(dims))
        if spec is None:
            logger.warning(
                "jax_bq.sharding: operand sharding %s is not expressible over mesh axes %s "
                "(a sub-axis split of a small factor); that operand is replicated",
                sh,
                dict(mesh.shape),
            )
            spec = ()
        spec = tuple(spec)
        for i, d in enumerate(dims):
            axes = _axes(spec[i]) if i < len(spec) else ()
            if axes and d[0] not in out:
                out[d[0]] = axes
    used: set[str] = set()
    for f in list(out):
        axes = out[f]
        size = math.prod(mesh.shape[a] for a in axes)
        why = None
        if f in lay.need_replication or lay.kinds.get(f) == "fixed":
            why = "its blocks or scales cannot be split there"
        elif lay.sizes[f] % size:
            unit = "blocks" if lay.kinds.get(f) in ("tiled", "reduce") else "elements"
            why = f"{lay.sizes[f]} {unit} do not split evenly over {size} shards"
        elif used & set(axes):
            why = f"mesh axes {axes} already shard another dimension"
        if why:
            logger.warning(
                "jax_bq.sharding: factor %r (size %d) re-sharded from mesh axes %s to "
                "replicated: %s",
                f,
                lay.sizes[f],
                axes,
                why,
            )
            del out[f]
        else:
            used |= set(axes)
    return out


def _spec(dims, fax) -> P:
    return P(*(fax.get(d[0]) if d[0] in fax else None for d in dims))


def _local(dims, shape, fax, mesh) -> tuple[int, ...]:
    return tuple(
        s // math.prod(mesh.shape[a] for a in fax.get(d[0], ()))
        for d, s in zip(dims, shape, strict=True)
    )


def _pmax_over(axes):
    if not axes:
        return None
    return lambda v: jax.lax.pmax(v, tuple(axes))


def _lower_quantize(params, lay, fax, mesh, global_out):
    from jax_bq import reference
    from jax_bq.primitives import quantize_p

    fmt, ba, bb, pack_b = params["fmt"], params["ba"], params["bb"], params["pack_b"]
    whole = [f for f in ("a", "b") if lay.kinds.get(f) == "whole" and f in fax]
    block_axes = tuple(a for f in whole for a in fax[f])
    tensor_axes = ()
    if fmt.has_tensor_scale:
        tensor_axes = tuple(a for f in ("p", "a", "b") for a in fax.get(f, ()))
    ws_shape = global_out[3].shape

    def lower(x):
        if block_axes or tensor_axes:
            logger.debug(
                "jax_bq.quantize sharded: jnp twin per shard with pmax over %s",
                block_axes + tensor_axes,
            )
            _, _, a_l, b_l = x.shape
            data, scales, ts = reference.quantize_view(
                x,
                fmt,
                a_l if "a" in whole else ba,
                b_l if "b" in whole else bb,
                pack_b,
                block_cross_shard=_pmax_over(block_axes),
                tensor_cross_shard=_pmax_over(tensor_axes),
            )
        else:
            data, scales, ts, _ = quantize_p.bind(x, fmt=fmt, ba=ba, bb=bb, pack_b=pack_b)
        return data, scales, ts, jnp.zeros(ws_shape, jnp.uint8)

    return lower


def _lower_dequantize(params, lay, fax, mesh, global_out):
    from jax_bq.primitives import dequantize_p

    def lower(data, scales, ts):
        g, p, a_l, b_l = _local(lay.results[0], global_out[0].shape, fax, mesh)
        ba = params["ba"] if lay.kinds.get("a") == "tiled" else min(params["ba"], max(a_l, 1))
        bb = params["bb"] if lay.kinds.get("b") == "tiled" else min(params["bb"], max(b_l, 1))
        if lay.kinds.get("b") == "pass":
            bb = params["bb"]
        new = dict(params, a=a_l, b=b_l, ba=ba, bb=bb)
        return dequantize_p.bind(data, scales, ts, **new)

    return lower


def _lower_calibrate(params, lay, fax, mesh, global_out):
    from jax_bq.primitives import calibrate_p

    ws_shape = global_out[-1].shape

    def lower(x):
        *outs, _ = calibrate_p.bind(x, **params)
        return (*outs, jnp.zeros(ws_shape, jnp.uint8))

    return lower


def _lower_qmatmul(params, lay, fax, mesh, global_out):
    from jax_bq.primitives import qmatmul as qp

    cfg = params["cfg"]
    m_l = cfg.m // math.prod(mesh.shape[a] for a in fax.get("m", ()))
    n_l = cfg.n // math.prod(mesh.shape[a] for a in fax.get("n", ()))
    k_axes = fax.get("k", ())
    k_l = cfg.k // math.prod(mesh.shape[a] for a in k_axes)
    local = replace(cfg, m=m_l, n=n_l, k=k_l)
    mn_axes = fax.get("m", ()) + fax.get("n", ())
    ws_shape = global_out[1].shape

    # Dynamic per-tensor / per-token activation scales span shards: quantize x
    # here with the amax made global by a pmax (the jnp twin, bit-identical),
    # and hand the GEMM pre-quantized activations.
    cross = ()
    if cfg.act_dynamic and cfg.act_format is not None:
        if cfg.act_granularity == qp.ACT_TENSOR:
            cross = fax.get("m", ()) + k_axes
        elif cfg.act_granularity == qp.ACT_TOKEN:
            cross = k_axes
    if cross:
        from jax_bq import reference
        from jax_bq.formats import Granularity

        per_tensor = cfg.act_granularity == qp.ACT_TENSOR
        local = replace(
            local,
            act_dynamic=False,
            act_qgranularity=Granularity.PER_TENSOR if per_tensor else Granularity.PER_CHANNEL,
            act_block=(),
        )

    def quantize_x(x):
        view = (1, 1, m_l, k_l) if per_tensor else (1, m_l, k_l, 1)
        ba, bb = (m_l, k_l) if per_tensor else (k_l, 1)
        data, scales, _ = reference.quantize_view(
            x.reshape(view), cfg.act_format, ba, bb, False, block_cross_shard=_pmax_over(cross)
        )
        return data.reshape(m_l, k_l), scales.reshape((1, 1) if per_tensor else (m_l, 1))

    def lower(x, xs, wd, wsc, wts, bias, res, dsc):
        if cross:
            x, xs = quantize_x(x)
        if k_axes:
            # Row-parallel: float32 partial products, one psum, then the epilogue once.
            raw = replace(local, epilogue=0, out_format=None, out_dtype=np.dtype(np.float32))
            empty = jnp.zeros((0,), jnp.float32)
            part, _, _ = qp.qmatmul_p.bind(x, xs, wd, wsc, wts, empty, empty, empty, cfg=raw)
            y = jax.lax.psum(part, tuple(k_axes))
            out, amax = qp.apply_epilogue(y, bias, res, dsc, local)
        else:
            out, _, amax = qp.qmatmul_p.bind(x, xs, wd, wsc, wts, bias, res, dsc, cfg=local)
        if amax.size and mn_axes:
            amax = jax.lax.pmax(amax, tuple(mn_axes))
        return out, jnp.zeros(ws_shape, jnp.uint8), amax

    return lower


def _lower_fp4_to_fp8(params, lay, fax, mesh, global_out):
    from jax_bq.primitives import fp4_to_fp8_p

    k_l = params["k"] // math.prod(mesh.shape[a] for a in fax.get("k", ()))

    def lower(data, scales, ts):
        return tuple(fp4_to_fp8_p.bind(data, scales, ts, **dict(params, k=k_l)))

    return lower


_LOWERS = {
    "jax_bq_fp4_to_fp8": _lower_fp4_to_fp8,
    "jax_bq_quantize": _lower_quantize,
    "jax_bq_dequantize": _lower_dequantize,
    "jax_bq_calibrate": _lower_calibrate,
    "jax_bq_qmatmul": _lower_qmatmul,
}


# ------------------------------------------------------------------ hook ----
def _freeze(params: dict) -> tuple:
    return tuple(sorted(params.items()))


@functools.lru_cache(maxsize=512)
def _partitioned(prim, frozen, in_shapes, out_shapes):
    params = dict(frozen)
    lay = factor_layout(prim.name, params, in_shapes, out_shapes)
    if lay is None:
        return None
    single = not prim.multiple_results

    @custom_partitioning
    def op(*args):
        out = prim.bind(*args, **params)
        return out if single else tuple(out)

    def partition(mesh, arg_shapes, result_shape):
        arg_shardings = [a.sharding for a in arg_shapes]
        fax = _factor_axes(lay, arg_shardings, mesh)
        results = [result_shape] if single else list(result_shape)
        lower = _LOWERS[prim.name](params, lay, fax, mesh, results)
        arg_out = tuple(NamedSharding(mesh, _spec(d, fax)) for d in lay.operands)
        res_out = [NamedSharding(mesh, _spec(d, fax)) for d in lay.results]
        logger.debug("jax_bq.%s partitioned: factors %s", prim.name, fax)
        return mesh, lower, (res_out[0] if single else tuple(res_out)), arg_out

    rule, kwargs = lay.rule()
    op.def_partition(partition=partition, sharding_rule=rule, decode_shardings=False, **kwargs)
    return op


def sharding_aware(prim, base_rule):
    """Wraps a lowering rule of ``prim`` so that sharded ``jit`` partitions it by the rules.

    Args:
        prim: one of jax_bq's primitives.
        base_rule: its lowering rule (``mlir.register_lowering`` signature).

    Returns:
        A lowering rule: ``base_rule`` on one device or per shard, a
        ``custom_partitioning`` call when XLA partitions the module.
    """
    _compat.require_devices_during_lowering(prim)

    def rule(ctx, *args, **params):
        if not _compat.auto_partitioned(ctx):
            return base_rule(ctx, *args, **params)
        in_shapes = tuple(tuple(a.shape) for a in ctx.avals_in)
        out_shapes = tuple(tuple(a.shape) for a in ctx.avals_out)
        op = _partitioned(prim, _freeze(params), in_shapes, out_shapes)
        if op is None:
            return base_rule(ctx, *args, **params)
        return mlir.lower_fun(lambda *a: op(*a), multiple_results=prim.multiple_results)(ctx, *args)

    return rule


# ------------------------------------------------------- QuantizedTensor ----
def quantized_sharding(q, mesh, spec) -> object:
    """Shardings for the arrays of a :class:`QuantizedTensor`, from one logical spec.

    ``spec`` partitions the *logical* dimensions of ``q`` (stack dimensions
    included). The codes take it as is (a packed axis must keep whole bytes
    per shard), the scales take it on every dimension they share with the
    codes and on a blocked dimension when each shard holds whole blocks, and
    are replicated along a dimension that one block spans. The result is a
    ``QuantizedTensor`` whose array fields are ``NamedSharding``s: a pytree
    prefix for ``jax.device_put``, ``jit``'s ``in_shardings``/``out_shardings``
    and ``jax.lax.with_sharding_constraint``, and the target layout to restore
    a checkpoint into.

    Raises:
        ValueError: when ``spec`` would split a block, a packed byte, or a
            dimension unevenly; the message names the dimension and sizes.
    """
    from jax_bq.qtensor import QuantizedTensor

    if not isinstance(q, QuantizedTensor):
        raise ValueError(f"quantized_sharding expects a QuantizedTensor, got {type(q).__name__}")
    spec = tuple(spec) + (None,) * (q.ndim - len(tuple(spec)))
    if len(spec) != q.ndim:
        raise ValueError(f"spec {spec} has more entries than {q.format.value} rank {q.ndim}")

    def size(entry) -> int:
        return math.prod(mesh.shape[a] for a in _axes(entry))

    data_shape, scale_shape = tuple(q.data.shape), tuple(q.scales.shape)
    scale_spec = []
    for i, (entry, n, ns, nd) in enumerate(
        zip(spec, q.shape, scale_shape, data_shape, strict=True)
    ):
        k = size(entry)
        if k == 1:
            scale_spec.append(None)
            continue
        if nd % k:
            raise ValueError(
                f"dimension {i} of {q.format.value} codes {data_shape} (logical {q.shape}) does "
                f"not split evenly over mesh axes {entry} ({k} shards)"
            )
        if ns == n:  # one scale per element along this dimension
            scale_spec.append(entry)
        elif ns == 1:  # one block spans the dimension: scales replicated along it
            scale_spec.append(None)
        elif ns % k == 0 and (n // k) % (-(-n // ns)) == 0:
            scale_spec.append(entry)
        else:
            raise ValueError(
                f"sharding dimension {i} (length {n}, {ns} blocks) over {k} shards would split "
                f"a scale block of {q.format.value} {q.granularity.value} {q.block}: use a "
                f"number of shards that divides the {ns} blocks"
            )
    stack = len(q.stack_shape)
    ts = None
    if q.tensor_scale is not None:
        ts = NamedSharding(mesh, P(*spec[:stack]))
    return QuantizedTensor(
        NamedSharding(mesh, P(*spec)),
        NamedSharding(mesh, P(*scale_spec)),
        ts,
        q.format,
        q.granularity,
        q.block,
        q.axis,
        q.axis_len,
        q.rank,
        q.dtype,
    )


def shard_quantized(q, mesh, spec):
    """``jax.device_put(q, quantized_sharding(q, mesh, spec))``: places every array of ``q``."""
    return jax.device_put(q, quantized_sharding(q, mesh, spec))
