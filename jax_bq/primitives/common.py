"""Shared machinery of the primitives: eager impl, lowering choice, batching."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import jax
import numpy as np
from jax.interpreters import mlir

from jax_bq import _native
from jax_bq.config import ENV_FORCE_FALLBACK, forced_fallback
from jax_bq.sharding import sharding_aware

logger = logging.getLogger("jax_bq")


def _freeze(params: dict) -> tuple:
    return tuple(sorted(params.items()))


def def_jitted_impl(prim) -> None:
    """Eager calls run the primitive under a cached ``jit``, like built-in ops."""

    @functools.lru_cache(maxsize=256)
    def compiled(frozen):
        return jax.jit(functools.partial(prim.bind, **dict(frozen)))

    def impl(*args, **params):
        return compiled(_freeze(params))(*args)

    prim.def_impl(impl)


def register_lowerings(
    prim,
    op: str,
    target: str,
    reference: Callable,
    ffi_attrs: Callable[[dict], dict],
    *,
    multiple_results: bool,
    platforms: tuple[str, ...] = ("cpu", "cuda"),
) -> None:
    """Registers the jnp-twin default lowering and the FFI lowering per platform.

    ``platforms``: where an FFI handler exists (the others take the default).
    The FFI lowering consults ``JAX_BQ_FORCE_FALLBACK`` at lowering time and
    logs (at DEBUG) which path each lowering took.
    """
    default = mlir.lower_fun(reference, multiple_results=multiple_results)
    mlir.register_lowering(prim, sharding_aware(prim, default))
    ffi_rule = jax.ffi.ffi_lowering(target)

    def make_rule(platform: str):
        def rule(ctx, *args, **params):
            if forced_fallback(op):
                logger.debug(
                    "jax_bq.%s on %s: jnp twin (forced by %s)", op, platform, ENV_FORCE_FALLBACK
                )
                return default(ctx, *args, **params)
            logger.debug("jax_bq.%s on %s: FFI target %s", op, platform, target)
            return ffi_rule(ctx, *args, **ffi_attrs(params))

        return rule

    for platform, native in (("cpu", _native.CPU), ("cuda", _native.CUDA)):
        if platform not in platforms:
            continue
        if native.loaded:
            mlir.register_lowering(
                prim, sharding_aware(prim, make_rule(platform)), platform=platform
            )
        else:
            logger.debug("jax_bq.%s on %s: jnp twin (%s)", op, platform, native.reason)


def layout_attrs(params: dict) -> dict:
    """FFI attributes shared by quantize and dequantize, with exact C++ types."""
    return {
        "format": np.int32(params["fmt"].ffi_id),
        "block_a": np.int64(params["ba"]),
        "block_b": np.int64(params["bb"]),
        "pack_b": np.int32(1 if params["pack_b"] else 0),
    }


def fold_batch_into_groups(x, bdim: int, size: int):
    """Moves the vmapped dim to the front and merges it with G: [N*G, P, A, B]."""
    if bdim is None:
        x = jax.numpy.broadcast_to(x, (size, *x.shape))
    else:
        x = jax.numpy.moveaxis(x, bdim, 0)
    return x.reshape((x.shape[0] * x.shape[1], *x.shape[2:]))


def split_groups(y, size: int):
    """Inverse of fold_batch_into_groups for an output: [N, G, ...]."""
    return y.reshape((size, y.shape[0] // size, *y.shape[1:]))
