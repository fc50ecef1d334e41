"""The one place where jax_bq reaches into ``jax._src`` (STYLE.md, rule 6).

:mod:`jax_bq.sharding` needs to know, inside a lowering rule, whether the
module being lowered is partitioned automatically over several devices (a
sharded ``jit``), in which case an op must be lowered through
``custom_partitioning``, or is already per device (one device, or every mesh
axis manual as inside ``shard_map`` and inside a partition callback). JAX has
no public accessor for the lowering context's axis context.
"""

from __future__ import annotations

import logging

try:
    from jax._src import sharding_impls
except ImportError:  # a JAX that moved it: auto_partitioned() then says so
    sharding_impls = None


def auto_partitioned(ctx) -> bool:
    """Whether ``ctx`` lowers a module that XLA will partition over > 1 device."""
    axis_context = getattr(ctx.module_context, "axis_context", None)
    if sharding_impls is None or not hasattr(sharding_impls, "ShardingContext"):  # moved
        logging.getLogger("jax_bq").warning(
            "jax_bq.sharding: this JAX has no ShardingContext; jax_bq ops stay opaque "
            "to the partitioner (operands gathered)"
        )
        return False
    if isinstance(axis_context, sharding_impls.ShardingContext):
        return axis_context.num_devices > 1
    if isinstance(axis_context, sharding_impls.SPMDAxisContext):
        # Partly manual shard_map: leave the op to XLA's default handling.
        return False
    return False


def require_devices_during_lowering(prim) -> None:
    """Asks ``jit`` to pass the device assignment when it lowers ``prim``.

    ``custom_partitioning`` needs the devices at lowering time, and ``jit``
    decides whether to provide them from the primitives in the jaxpr, which
    hold jax_bq's primitives, not yet the ``custom_partitioning`` they lower to.
    """
    try:
        from jax._src import dispatch

        dispatch.prim_requires_devices_during_lowering.add(prim)
    except (ImportError, AttributeError) as e:  # a JAX that moved it: say so, stay usable
        logging.getLogger("jax_bq").warning(
            "jax_bq.sharding: cannot ask jit for devices at lowering (%s); sharded jit of "
            "%s may fail, unsharded use is unaffected",
            e,
            prim.name,
        )


def partition_spec_of(sharding, mesh, ndim: int):
    """The ``PartitionSpec`` of a sharding handed to a partition callback, or ``None``.

    ``None`` when the sharding cannot be written over ``mesh``'s named axes
    (Shardy may split a mesh axis into sub-axes to fit a small factor).
    """
    from jax.sharding import NamedSharding, PartitionSpec

    if isinstance(sharding, NamedSharding):
        return sharding.spec
    try:
        hlo = sharding._to_xla_hlo_sharding(ndim)
        spec = sharding_impls.parse_flatten_op_sharding(hlo, mesh)[0]
    except Exception:  # noqa: BLE001 - any undecodable sharding is handled the same way
        return None
    return PartitionSpec(*spec, *((None,) * (ndim - len(spec))))
