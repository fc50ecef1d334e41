"""Loads the compiled FFI modules and registers their targets with XLA.

The CPU module is always built; the CUDA module only where CUDA was found at
build time. A module that fails to load is recorded with the reason, which
``jax-bq info`` and :mod:`jax_bq.capabilities` report; the primitives then
lower to the jnp twin and log why.

XLA refuses FFI handlers compiled against a newer FFI API than its own (the
error it gives is "No FFI handler registered"), so the jaxlib version the
module was compiled against is compared with the one running it here, and a
mismatch raises an ImportError that says how to rebuild.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from types import ModuleType

import jax
import jaxlib.version

logger = logging.getLogger("jax_bq")

REBUILD_HINT = (
    "Rebuild jax_bq against the installed jaxlib: "
    "pip install --no-build-isolation --force-reinstall --no-deps -e <jax_bq checkout> "
    "(needs scikit-build-core, nanobind, cmake and ninja installed)"
)


@dataclass(frozen=True)
class NativeModule:
    """Outcome of loading one compiled module."""

    name: str
    module: ModuleType | None
    reason: str  # why it is missing, or what it was built against

    @property
    def loaded(self) -> bool:
        """True if the module imported and its targets were registered."""
        return self.module is not None


def _version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for piece in v.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _check_built_against(mod: ModuleType) -> None:
    built = getattr(mod, "built_with_jaxlib", "unknown")
    running = jaxlib.version.__version__
    if built != "unknown" and _version_tuple(built) > _version_tuple(running):
        major, minor = mod.ffi_api_version()
        raise ImportError(
            f"jax_bq's {mod.__name__} was compiled against jaxlib {built} (XLA FFI API "
            f"{major}.{minor}) but jaxlib {running} is running; XLA refuses FFI handlers "
            f"newer than itself. {REBUILD_HINT}"
        )


def _load(name: str, platform: str) -> NativeModule:
    try:
        mod = importlib.import_module(f"jax_bq.{name}")
    except ImportError as e:
        return NativeModule(name, None, f"not importable: {e}")
    _check_built_against(mod)
    for target, capsule in mod.registrations().items():
        jax.ffi.register_ffi_target(target, capsule, platform=platform)
    major, minor = mod.ffi_api_version()
    return NativeModule(
        name, mod, f"built against jaxlib {mod.built_with_jaxlib}, XLA FFI API {major}.{minor}"
    )


CPU = _load("_jax_bq_cpu", "cpu")
CUDA = _load("_jax_bq_cuda", "CUDA")

if not CPU.loaded:
    logger.warning("jax_bq CPU kernels unavailable (%s); using the jnp twin", CPU.reason)
