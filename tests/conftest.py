"""Backends under test: the CPU always; the GPU where JAX sees one and the jax_bq
CUDA module loaded. The same tests run on each (CPU kernels, CUDA kernels)."""

from __future__ import annotations

import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.dirname(__file__))

from jax_bq import _native  # noqa: E402


def _gpu_devices():
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


GPU_DEVICES = _gpu_devices()
GPU_REASON = (
    "no GPU visible to JAX"
    if not GPU_DEVICES
    else (None if _native.CUDA.loaded else f"CUDA module not loaded: {_native.CUDA.reason}")
)
BACKENDS = ["cpu"] + (["gpu"] if GPU_DEVICES else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs the test with jax's default device set to each backend."""
    if request.param == "gpu":
        if GPU_REASON:
            pytest.fail(f"GPU present but {GPU_REASON}")
        device = GPU_DEVICES[0]
    else:
        device = jax.devices("cpu")[0]
    with jax.default_device(device):
        yield request.param


def sweep(values, core, ids=None):
    """Parametrize values: those in ``core`` run in every run, the rest carry the
    ``exhaustive`` marker (``-m "not exhaustive"`` leaves them out)."""
    return [
        pytest.param(
            v,
            id=None if ids is None else ids(v),
            marks=() if v in core else pytest.mark.exhaustive,
        )
        for v in values
    ]


# The bitwise sweeps' cost is mostly the XLA compile of each case's jitted jnp
# twin (2-4 s on a 2-core CPU; the twin then runs in milliseconds). On CPU the
# twin's numerics are its HLO's: XLA's CPU backend never enables fast-math, so
# LLVM's optimization level changes speed, not bits (every case still compares
# the result with the oracle bit for bit). compile_cpu_twin compiles at -O0,
# 40-60% less compile time. Elsewhere (a GPU backend's code generation may
# contract FMAs by level) the default compile is kept.
CPU_TWIN_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def compile_cpu_twin(fn, *args):
    """``jax.jit(fn)`` compiled for ``args``: at LLVM -O0 on CPU, the default elsewhere."""
    lowered = jax.jit(fn).lower(*args)
    platforms = {d.platform for a in args for d in getattr(a, "devices", lambda: ())()}
    if platforms == {"cpu"}:
        return lowered.compile(compiler_options=CPU_TWIN_COMPILER_OPTIONS)
    return lowered.compile()


def on(backend_name: str):
    return jax.devices("cpu")[0] if backend_name == "cpu" else GPU_DEVICES[0]


def pytest_collection_modifyitems(config, items):
    """The ``gpu`` marker: set on every GPU case of ``backend``, skipped without a GPU.

    ``-m gpu`` selects what needs the H200, ``-m "not gpu"`` the rest. A test
    marked ``gpu`` (explicitly, or as the GPU case of ``backend``) is skipped,
    with the reason, only when JAX sees no GPU; a GPU without the jax_bq CUDA
    module fails loudly instead (``backend``, ``pytest_runtest_setup``). GPU-only
    tests use the marker, never their own ``skipif``.
    """
    skip = pytest.mark.skip(reason="gpu marker: no GPU visible to JAX")
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == "gpu":
            item.add_marker(pytest.mark.gpu)
        if not GPU_DEVICES and item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def pytest_runtest_setup(item):
    """A ``gpu`` test on a machine with a GPU but without the CUDA module fails, never skips."""
    if GPU_DEVICES and GPU_REASON and item.get_closest_marker("gpu") is not None:
        pytest.fail(f"gpu test, GPU present but {GPU_REASON}")
