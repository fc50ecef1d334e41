"""Run-time switches read from the environment.

``JAX_BQ_FORCE_FALLBACK`` forces the pure-jnp path (dequantize +
``dot_general`` for matmuls) for debugging and benchmarking. Values: ``1`` or
``all`` for every op, or a comma-separated list of op names (``quantize``,
``dequantize``, ``qmatmul``). It is read when an op is lowered, so set it
before the first call, or call ``jax.clear_caches()`` after changing it.
"""

from __future__ import annotations

import os

ENV_FORCE_FALLBACK = "JAX_BQ_FORCE_FALLBACK"
_TRUE = {"1", "true", "yes", "on", "all"}


def forced_fallback(op: str) -> bool:
    """True when ``JAX_BQ_FORCE_FALLBACK`` forces the jnp path for ``op``."""
    raw = os.environ.get(ENV_FORCE_FALLBACK, "").strip().lower()
    if not raw or raw in {"0", "false", "no", "off"}:
        return False
    if raw in _TRUE:
        return True
    return op in {item.strip() for item in raw.split(",")}
