"""Parallel patterns for quantized encoders and ``qmatmul``, and what XLA made of them.

Three patterns over a ``Mesh`` with a data axis and a model axis (either may
have size 1), all through ``jit`` + ``NamedSharding`` and the sharding rules
of :mod:`jax_bq.sharding` (so the partitioner, not hand-written collectives,
decides the communication):

* **data parallel** (``"dp"``): the batch is split over ``data``, every
  weight is replicated. No collective in the forward pass.
* **tensor parallel** (``"tp"``, Megatron): the Q/K/V and FFN1 weights
  ``[N, K]`` are split along N over ``model`` (column-parallel: each device
  owns whole heads and a slice of the FFN), the attention-output and FFN2
  weights along K (row-parallel). Each column/row pair costs exactly one
  all-reduce (of the row-parallel GEMM's float32 partial products, before its
  bias); no weight moves. The batch is split over ``data`` as in ``"dp"``.
* **FSDP** (``"fsdp"``): every quantized weight is stored split along N over
  ``data`` (1/devices of the codes and scales per device); in the layer, the
  weight is all-gathered **in its quantized form** (codes + scales: NVFP4 is
  about 4x fewer bytes than bf16) right before its GEMM, while the batch
  stays split over ``data``.

:func:`collectives` lists the collectives in compiled HLO text and
:func:`explain_collectives` compiles a function and says what XLA inserted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_bq.qtensor import QuantizedTensor
from jax_bq.sharding import quantized_sharding

__all__ = [
    "PATTERNS",
    "Collective",
    "batch_sharding",
    "collectives",
    "encoder_param_shardings",
    "explain_collectives",
    "fsdp_gather",
]

PATTERNS = ("dp", "tp", "fsdp")

#: BERT block dense layers by role (jax_bq.models.bert names).
COLUMN_PARALLEL = ("query", "key", "value", "intermediate")
ROW_PARALLEL = ("attention_output", "output")

_COLLECTIVE_OPS = (
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
    "collective-broadcast",
)
_OP_RE = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.+?)\s+"
    r"(?P<op>" + "|".join(_COLLECTIVE_OPS) + r")(?:-start)?\("
)
_ARRAY_RE = re.compile(r"\b(?P<dtype>[a-z][a-z0-9]*)\[(?P<dims>[0-9,]*)\]")
_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "f8e8m0fnu": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
}


@dataclass(frozen=True)
class Collective:
    """One collective of a compiled HLO module (per-device shapes).

    Attributes:
        op: ``all-gather``, ``all-reduce``, ``reduce-scatter``, ``all-to-all``,
            ``collective-permute`` or ``collective-broadcast`` (async
            ``-start`` forms are reported under the same name).
        name: the HLO instruction name.
        arrays: ``(dtype, shape)`` of each result array.
    """

    op: str
    name: str
    arrays: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the result arrays (per device)."""
        return sum(_BYTES.get(d, 4) * math.prod(s) for d, s in self.arrays)

    def __str__(self) -> str:
        arrays = ", ".join(f"{d}{list(s)}" for d, s in self.arrays)
        return f"{self.op} {arrays} ({self.nbytes} B)"


def collectives(hlo_text: str) -> list[Collective]:
    """The collectives of compiled HLO text (``jit(f).lower(...).compile().as_text()``).

    An async pair (``all-gather-start``/``-done``) counts once; the shapes are
    those of the result (for a ``-start``, the tuple holds operand and result:
    both are listed).
    """
    out = []
    for line in hlo_text.splitlines():
        m = _OP_RE.match(line)
        if not m:
            continue
        arrays = tuple(
            (a["dtype"], tuple(int(v) for v in a["dims"].split(",") if v))
            for a in _ARRAY_RE.finditer(m["shape"])
        )
        out.append(Collective(m["op"], m["name"], arrays))
    return out


def explain_collectives(fn: Callable, *args, **jit_kwargs) -> str:
    """Compiles ``jax.jit(fn, **jit_kwargs)(*args)`` and lists the collectives XLA inserted.

    Returns:
        One line per collective (op, per-device dtype and shape, bytes), and
        a total per op; ``"no collectives"`` when there are none.
    """
    text = jax.jit(fn, **jit_kwargs).lower(*args).compile().as_text()
    found = collectives(text)
    if not found:
        return "no collectives"
    lines = [str(c) for c in found]
    totals: dict[str, tuple[int, int]] = {}
    for c in found:
        n, b = totals.get(c.op, (0, 0))
        totals[c.op] = (n + 1, b + c.nbytes)
    lines += [f"total {op}: {n} ({b} B per device)" for op, (n, b) in totals.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------- patterns ----
def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def _role(names: list[str]) -> str | None:
    for n in names:
        if n in COLUMN_PARALLEL:
            return "column"
        if n in ROW_PARALLEL:
            return "row"
    return None


def _axis(mesh, name: str | None):
    """``name`` if the mesh has it with size > 1, else None (replicated)."""
    return name if name is not None and mesh.shape.get(name, 1) > 1 else None


def encoder_param_shardings(
    params, mesh, pattern: str, *, data_axis: str = "data", model_axis: str = "model"
):
    """Shardings for a BERT-family encoder's params under one parallel pattern.

    Args:
        params: the param tree (``variables["params"]``), float or with
            QuantizedTensor kernels (:func:`jax_bq.flax.quantize_model_weights`).
        mesh: a ``jax.sharding.Mesh``.
        pattern: ``"dp"``, ``"tp"`` or ``"fsdp"`` (module docstring).
        data_axis: name of the mesh axis that splits the batch (and, for
            FSDP, the stored weights); missing or of size 1: unused.
        model_axis: name of the mesh axis that splits heads and FFN columns
            (tensor parallel); missing or of size 1: unused.

    Returns:
        A tree of ``NamedSharding`` with ``params``' structure (a
        QuantizedTensor leaf gets a QuantizedTensor of shardings, see
        :func:`jax_bq.sharding.quantized_sharding`), for ``jax.device_put``
        and ``jit``'s ``in_shardings``.

    Raises:
        ValueError: unknown pattern, or a weight whose blocks or heads the
            mesh would split (the message names the leaf).
    """
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    model = _axis(mesh, model_axis) if pattern == "tp" else None
    data = _axis(mesh, data_axis) if pattern == "fsdp" else None

    def one(path, leaf):
        names = _path_names(path)
        role = _role(names)
        leaf_name = names[-1] if names else ""
        quantized = isinstance(leaf, QuantizedTensor)
        ndim = leaf.ndim if quantized else np.ndim(leaf)
        spec = [None] * ndim
        if model is not None and role is not None and leaf_name == "kernel":
            # Stored [N, K] when quantized, Flax [K, N] when float.
            n_dim, k_dim = (0, 1) if quantized else (1, 0)
            spec[n_dim if role == "column" else k_dim] = model
        elif model is not None and role == "column" and leaf_name == "bias":
            spec[0] = model
        elif data is not None and ndim >= 2 and leaf_name in ("kernel", "embedding"):
            rows = leaf.shape[0]
            if quantized or rows % mesh.shape[data] == 0:
                spec[0] = data  # a float table that does not split evenly stays whole
        try:
            if quantized:
                return quantized_sharding(leaf, mesh, P(*spec))
            return NamedSharding(mesh, P(*spec))
        except ValueError as e:
            raise ValueError(f"{'/'.join(names)}: {e}") from e

    return jax.tree_util.tree_map_with_path(
        one, params, is_leaf=lambda x: isinstance(x, QuantizedTensor)
    )


def batch_sharding(mesh, pattern: str, ndim: int = 2, *, data_axis: str = "data"):
    """``NamedSharding`` of a batch-major input (``[B, S]`` ids and masks): B over data."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    return NamedSharding(mesh, P(_axis(mesh, data_axis), *([None] * (ndim - 1))))


def fsdp_gather(params, mesh):
    """Constrains every QuantizedTensor in ``params`` to be replicated, inside ``jit``.

    Under FSDP the stored weights are split over the data axis; calling this
    at the top of the jitted forward makes XLA all-gather each weight as
    codes + scales (the quantized bytes) instead of letting the partitioner
    choose, e.g., to gather activations or dequantized weights. Float leaves
    are left to the partitioner.
    """

    def one(leaf):
        if not isinstance(leaf, QuantizedTensor):
            return leaf
        return jax.lax.with_sharding_constraint(leaf, quantized_sharding(leaf, mesh, P()))

    return jax.tree_util.tree_map(one, params, is_leaf=lambda x: isinstance(x, QuantizedTensor))
