"""Large blocks: multi-chunk reductions of the two-pass path, against the oracle.

On CUDA, per-tensor, per-channel, tiles and blocked axes that are not last run
chunked partial maxima -> block keys -> encode; these shapes make every block
span several 8192-element chunks."""

import jax.numpy as jnp
import numpy as np
import oracle
import pytest

import jax_bq
from jax_bq import Granularity, QuantFormat

CASES = [
    ("fp8_e4m3", (1000, 3000), Granularity.PER_TENSOR, (), -1),
    ("fp4", (999, 3001), Granularity.PER_TENSOR, (), -1),
    ("fp8_e5m2", (20000, 3), Granularity.PER_CHANNEL, (), 0),
    ("fp4", (3, 20001), Granularity.PER_CHANNEL, (), -1),
    ("fp8_e4m3", (1000, 1000), Granularity.TILE_2D, (128, 128), -1),
    ("fp4", (2, 300, 260), Granularity.TILE_2D, (256, 256), -1),
    ("fp8_e4m3", (300, 7, 50), Granularity.PER_BLOCK, (256,), 0),
    ("nvfp4", (3000, 1040), Granularity.PER_BLOCK, (16,), -1),
    ("nvfp4", (2, 64, 48), Granularity.PER_BLOCK, (16,), 1),
    ("mxfp4", (70, 5, 64), Granularity.PER_BLOCK, (32,), 0),
]


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}-{c[2].value}-ax{c[4]}"
)
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_large_blocks_match_oracle(case, dtype, backend):
    name, shape, gran, block, axis = case
    fmt = QuantFormat.parse(name)
    rng = np.random.default_rng(len(shape) * 1000 + shape[0])
    x = (rng.standard_normal(shape) * np.exp(rng.uniform(-3, 3, shape))).astype(np.float32)
    x[tuple(s // 2 for s in shape)] = 250.0  # one outlier somewhere in the middle
    x = np.asarray(jnp.asarray(x, dtype))
    kw = {"granularity": gran, "axis": axis}
    if block:
        kw["block_size"] = block if gran is Granularity.TILE_2D else block[0]
    q = jax_bq.quantize(jnp.asarray(x), fmt, **kw)
    ref = oracle.oracle_quantize(np.asarray(x, np.float32), fmt, gran, block, axis)
    np.testing.assert_array_equal(oracle.as_bytes(q.data), oracle.as_bytes(ref[0]))
    np.testing.assert_array_equal(oracle.as_bytes(q.scales), oracle.as_bytes(ref[1]))
    if ref[2] is not None:
        np.testing.assert_array_equal(oracle.as_bytes(q.tensor_scale), oracle.as_bytes(ref[2]))
    out = jax_bq.dequantize(q, jnp.float32)
    want = oracle.oracle_dequantize_like(q, ref, np.float32)
    np.testing.assert_array_equal(oracle.as_bytes(out), oracle.as_bytes(want))


def test_nan_outputs_are_canonical(backend):
    x = np.ones((4, 128), np.float32)
    x[1, 3] = -np.nan
    out = np.asarray(jax_bq.quantize_dequantize(jnp.asarray(x), "fp8_e4m3"))
    np.testing.assert_array_equal(out[1].view(np.uint32), 0x7FC00000)
    out16 = np.asarray(jax_bq.quantize_dequantize(jnp.asarray(x, jnp.bfloat16), "mxfp4"))
    np.testing.assert_array_equal(out16[1, :32].view(np.uint16), 0x7FC0)
