"""fp4_to_fp8: the one-pass CUDA conversion writes the bytes of its definition.

The definition is quantize(dequantize(w4, float32), "fp8_e4m3", per_block,
block 128). On the CPU the primitive lowers to exactly that; on a GPU it is
one kernel (FFI target jax_bq_fp4_to_fp8), which must write the same codes
and scales as the definition run with the CPU kernels, for every 4-bit code
and for zero, subnormal, NaN and infinite scales, ragged last 128-blocks and
every FP4 block size.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import GPU_DEVICES

import jax_bq as bq
from jax_bq.convert import fp4_to_fp8
from jax_bq.formats import QUANTIZED_FORMATS

CPU = jax.devices("cpu")[0]

# (format, block) x (N, K): K = 160 and 2064 leave a partial last 128-block,
# K = 16 a single lane's worth.
# From the format registry: every 4-bit format, each free block size of the
# ones whose block is not fixed.
CASES = [
    (f.value, b)
    for f in QUANTIZED_FORMATS
    if f.bits == 4
    for b in ((None,) if f.fixed_block else (16, 32, 64, 256))
]
SHAPES = [(40, 160), (3, 16), (24, 2064), (64, 1024)]


def _hand_built(fmt, block, shape, seed):
    """Random codes (all 16 appear) and scales with zeros and non-finite values."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    q = bq.quantize(jax.device_put(jnp.asarray(x), CPU), fmt, block_size=block)
    data = rng.integers(0, 256, size=q.data.shape, dtype=np.uint8)
    s = np.asarray(q.scales).copy()
    flat = s.reshape(-1)
    if fmt == "fp4":
        flat[:] = np.exp2(rng.integers(-140, 120, size=flat.size)).astype(np.float32) * (
            1 + rng.random(flat.size).astype(np.float32)
        )
        specials = [0.0, np.inf, -np.inf, np.nan, -0.0, 1e-45]
    elif fmt == "nvfp4":
        codes = rng.integers(0, 0x7F, size=flat.size, dtype=np.uint8)  # E4M3, no NaN
        flat[:] = codes.view(ml_dtypes.float8_e4m3fn)
        specials = [0.0, np.nan, 2.0**-9, -1.0]
    else:  # E8M0: every exponent, 0xFF is NaN
        flat[:] = rng.integers(0, 256, size=flat.size, dtype=np.uint8).view(
            ml_dtypes.float8_e8m0fnu
        )
        specials = [np.nan, 2.0**-127]
    for i, v in enumerate(specials):
        flat[(i * 7919) % flat.size] = v
    ts = q.tensor_scale if q.tensor_scale is None else jnp.float32(0.37)
    return dataclasses.replace(q, data=jnp.asarray(data), scales=jnp.asarray(s), tensor_scale=ts)


def _definition(w):
    return bq.quantize(
        bq.dequantize(w, jnp.float32), "fp8_e4m3", granularity="per_block", block_size=128
    )


def _bytes(q):
    return [np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(q)]


@pytest.mark.parametrize("fmt,block", CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_its_definition(backend, fmt, block, shape):
    w = _hand_built(fmt, block, shape, seed=zlib.crc32(repr((fmt, block, shape)).encode()))
    want = jax.device_put(_definition(jax.device_put(w, CPU)), CPU)  # CPU kernels
    got = jax.jit(fp4_to_fp8)(w)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    assert _bytes(got) == _bytes(want)


def test_nan_tensor_scale_and_zero_rows(backend):
    w = _hand_built("nvfp4", None, (32, 256), seed=5)
    w = dataclasses.replace(w, data=w.data.at[3].set(0), tensor_scale=jnp.float32(np.nan))
    want = _definition(jax.device_put(w, CPU))
    assert _bytes(jax.jit(fp4_to_fp8)(w)) == _bytes(want)


def test_vmap_takes_the_definition(backend):
    ws = [_hand_built("fp4", 32, (16, 128), seed=s) for s in (1, 2)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ws)
    got = jax.vmap(fp4_to_fp8)(stacked)
    for i, w in enumerate(ws):
        member = jax.tree_util.tree_map(lambda a, i=i: a[i], got)
        assert _bytes(member) == _bytes(_definition(jax.device_put(w, CPU)))


@pytest.mark.gpu
def test_gpu_hlo_has_the_fused_custom_call():
    w = jax.device_put(_hand_built("nvfp4", None, (32, 256), seed=6), GPU_DEVICES[0])
    assert "jax_bq_fp4_to_fp8" in jax.jit(fp4_to_fp8).lower(w).compile().as_text()


def test_k_not_multiple_of_16_uses_the_definition(backend):
    w = _hand_built("fp4", 16, (8, 40), seed=7)  # K = 40
    assert _bytes(jax.jit(fp4_to_fp8)(w)) == _bytes(_definition(jax.device_put(w, CPU)))
