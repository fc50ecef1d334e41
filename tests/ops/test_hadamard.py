"""hadamard (the blocked fast Walsh-Hadamard transform, ``jax_bq.transforms.fwht``).

The CPU and CUDA kernels (FFI target ``jax_bq_hadamard``) against the jnp twin
``fwht_reference``, bit for bit, on zeros, -0, Inf and values over seven decades;
the transform against the explicit rotation matrix; bad input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GPU_DEVICES

from jax_bq import _native
from jax_bq.primitives.hadamard import fwht_reference
from jax_bq.transforms import block_rotation, fwht


def _bits(a):
    a = np.asarray(a)
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint16)


def _special(n, dtype):
    rng = np.random.default_rng(n)
    x = rng.standard_normal((5, n)).astype(np.float32) * 10.0 ** rng.integers(-3, 4, (5, n))
    x[1] = 0.0
    x[2, ::2] = -0.0
    x[3, 0] = np.inf
    return jnp.asarray(x, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("block", [2, 8, 64, 512])
def test_fwht_cpu_kernel_bitwise_vs_twin(dtype, block):
    if not _native.CPU.loaded:
        pytest.skip(f"CPU module: {_native.CPU.reason}")
    x = _special(1024, jnp.dtype(dtype))
    scale = np.float32(1 / np.sqrt(block))
    got = jax.jit(lambda v: fwht(v, block))(x)
    want = jax.jit(lambda v: fwht_reference(v, block, scale))(x)
    g, w = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.array_equal(np.isnan(g), np.isnan(w))
    ok = ~np.isnan(w)
    assert np.array_equal(_bits(got)[ok], _bits(want)[ok])
    assert "jax_bq_hadamard" in jax.jit(lambda v: fwht(v, block)).lower(x).as_text()


def test_fwht_matches_matrix_and_is_an_involution():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 7, 256)), jnp.float32)
    y = fwht(x, 64)
    np.testing.assert_allclose(y, np.asarray(x) @ block_rotation(256, 64), atol=1e-5)
    np.testing.assert_allclose(fwht(y, 64), x, atol=1e-5)
    assert jax.vmap(lambda v: fwht(v, 64))(x).shape == x.shape


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.zeros((4, 12), np.float32), 8), "does not divide"),
        ((np.zeros((4, 12), np.float32), 6), "power of two"),
        ((np.zeros((4, 16), np.int32), 8), "float32/bf16/f16"),
        ((np.zeros((4, 16384), np.float32), 16384), "power of two"),
    ],
)
def test_fwht_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        fwht(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("block", [2, 32, 64, 128, 256, 512, 1024, 4096, 8192])
def test_fwht_cuda_kernel_bitwise_vs_twin(dtype, block):
    if not _native.CUDA.loaded:
        pytest.fail(f"GPU visible but the CUDA module is not: {_native.CUDA.reason}")
    x = jax.device_put(_special(8192, jnp.dtype(dtype)), GPU_DEVICES[0])
    scale = np.float32(1 / np.sqrt(block))
    got = jax.jit(lambda v: fwht(v, block))(x)
    want = jax.jit(lambda v: fwht_reference(v, block, scale))(x)
    assert "jax_bq_hadamard" in jax.jit(lambda v: fwht(v, block)).lower(x).as_text()
    g, w = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.array_equal(np.isnan(g), np.isnan(w))
    ok = ~np.isnan(w)
    assert np.array_equal(_bits(got)[ok], _bits(want)[ok])
