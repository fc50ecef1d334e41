"""jit, vmap, scan, pytrees, HLO custom call, determinism and thread safety."""

import concurrent.futures as cf
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest

import jax_bq
from jax_bq import Granularity, QuantFormat, QuantizedTensor
from jax_bq.formats import QUANTIZED_FORMATS

FMT_IDS = lambda f: f.value  # noqa: E731


def rand(shape, seed=0, dtype=np.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def same(a, b):
    np.testing.assert_array_equal(oracle.as_bytes(a), oracle.as_bytes(b))


def same_q(q1, q2):
    same(q1.data, q2.data)
    same(q1.scales, q2.scales)
    if q1.tensor_scale is not None:
        same(q1.tensor_scale, q2.tensor_scale)


@pytest.mark.parametrize("fmt", QUANTIZED_FORMATS, ids=FMT_IDS)
def test_jit_equals_eager(fmt, backend):
    x = rand((8, 256))
    same_q(jax_bq.quantize(x, fmt), jax.jit(lambda a: jax_bq.quantize(a, fmt))(x))


@pytest.mark.parametrize("fmt", QUANTIZED_FORMATS, ids=FMT_IDS)
def test_hlo_contains_custom_call(fmt, backend):
    x = rand((8, 256))
    hlo = jax.jit(lambda a: jax_bq.dequantize(jax_bq.quantize(a, fmt))).lower(x).as_text()
    assert "jax_bq_quantize" in hlo and "jax_bq_dequantize" in hlo


def test_forced_fallback_has_no_custom_call_and_same_bytes(monkeypatch, backend):
    x = rand((8, 256))
    f = lambda a: jax_bq.quantize(a, "fp8_e4m3")  # noqa: E731
    fast = jax.jit(f)(x)
    monkeypatch.setenv("JAX_BQ_FORCE_FALLBACK", "quantize")
    jax.clear_caches()
    hlo = jax.jit(f).lower(x).as_text()
    assert "jax_bq_quantize" not in hlo
    same_q(fast, jax.jit(f)(x))
    monkeypatch.delenv("JAX_BQ_FORCE_FALLBACK")
    jax.clear_caches()


VMAP_CASES = [
    (f, g)
    for f in QUANTIZED_FORMATS
    for g in (Granularity.PER_BLOCK, Granularity.PER_TENSOR)
    if g in f.allowed_granularities
]


@pytest.mark.parametrize(
    "fmt,gran", VMAP_CASES, ids=[f"{f.value}-{g.value}" for f, g in VMAP_CASES]
)
def test_vmap_quantizes_each_member_independently(fmt, gran, backend):
    x = rand((3, 8, 64), seed=1) * jnp.asarray([1.0, 100.0, 0.01])[:, None, None]
    qv = jax.vmap(lambda a: jax_bq.quantize(a, fmt, granularity=gran))(x)
    qv.validate()
    assert qv.stack_shape == (3,) and qv.member_shape == (8, 64)
    for i in range(3):
        qi = jax_bq.quantize(x[i], fmt, granularity=gran)
        same(qv.data[i], qi.data)
        same(qv.scales[i], qi.scales)
        if fmt.has_tensor_scale:
            same(qv.tensor_scale[i], qi.tensor_scale)
    # Dequantize of the stacked tensor, and vmap of dequantize, agree.
    out = jax_bq.dequantize(qv)
    same(out, jax.vmap(jax_bq.dequantize)(qv))
    same(out[1], jax_bq.dequantize(jax_bq.quantize(x[1], fmt, granularity=gran)))


def test_vmap_nonzero_axis_and_nested(backend):
    x = rand((8, 4, 2, 64), seed=2)
    fmt = QuantFormat.NVFP4
    q = jax.vmap(jax.vmap(lambda a: jax_bq.quantize(a, fmt), in_axes=1), in_axes=1)(x)
    assert q.stack_shape == (4, 2)  # outer vmap (over axis 1 of x) first
    same(q.data[3, 1], jax_bq.quantize(x[:, 3, 1], fmt).data)
    same(q.tensor_scale[3, 1], jax_bq.quantize(x[:, 3, 1], fmt).tensor_scale)


def test_inside_scan(backend):
    xs = rand((5, 16, 64), seed=3)

    def step(carry, x):
        q = jax_bq.quantize(x, "mxfp8")
        y = jax_bq.dequantize(q, jnp.float32)
        return carry + jnp.sum(y), q

    total, qs = jax.jit(lambda v: jax.lax.scan(step, 0.0, v))(xs)
    assert qs.stack_shape == (5,)
    same(qs.data[4], jax_bq.quantize(xs[4], "mxfp8").data)
    np.testing.assert_allclose(
        total, sum(float(jnp.sum(jax_bq.quantize_dequantize(x, "mxfp8"))) for x in xs), rtol=1e-5
    )


def test_pytree_roundtrips(backend):
    q = jax_bq.quantize(rand((16, 64)), "nvfp4")
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 3
    q2 = jax.tree_util.tree_unflatten(treedef, leaves)
    same_q(q, q2)
    q3 = jax.tree_util.tree_map(lambda a: a, q)
    assert isinstance(q3, QuantizedTensor)
    q4 = jax.device_put(q, jax.devices("cpu")[0])
    same_q(q, q4.validate())
    f = jax.checkpoint(lambda qq: jax_bq.dequantize(qq, jnp.float32).sum())
    np.testing.assert_allclose(jax.jit(f)(q), jax_bq.dequantize(q, jnp.float32).sum())
    q5 = jax_bq.quantize(rand((16, 64)), "fp8_e4m3")
    assert jax.tree_util.tree_leaves(q5)[2:] == []  # tensor_scale None is not a leaf


@pytest.mark.parametrize("fmt", [QuantFormat.FP8_E4M3, QuantFormat.NVFP4], ids=FMT_IDS)
def test_repeated_runs_identical(fmt, backend):
    x = rand((64, 512), seed=4)
    f = jax.jit(lambda a: jax_bq.quantize(a, fmt))
    first = f(x)
    for _ in range(20):
        same_q(first, f(x))


@pytest.mark.parametrize(
    "fmt", [QuantFormat.FP8_E4M3, QuantFormat.NVFP4, QuantFormat.MXFP4], ids=FMT_IDS
)
def test_eight_threads_identical_bytes(fmt, backend):
    x = rand((256, 1024), seed=5)
    f = jax.jit(lambda a: jax_bq.quantize(a, fmt))
    ref = f(x)
    device = jax.config.jax_default_device

    def work(_):
        with jax.default_device(device):
            return [f(x) for _ in range(5)]

    with cf.ThreadPoolExecutor(8) as pool:
        for results in pool.map(work, range(8)):
            for r in results:
                same_q(ref, r)


def test_large_input_uses_many_cpu_threads_deterministically():
    # Big enough for the CPU kernel to split work across threads.
    with jax.default_device(jax.devices("cpu")[0]):
        x = rand((1024, 4096), seed=6)
        q1 = jax_bq.quantize(x, "fp8_e4m3")
    ref = oracle.oracle_quantize(
        np.asarray(x), QuantFormat.FP8_E4M3, Granularity.PER_BLOCK, (128,), -1
    )
    same(q1.data, ref[0])
    same(q1.scales, ref[1])


# Outputs of >= 4 MiB get transparent-huge-page advice before the first write
# (AdviseHugePages in ffi/cpu/cpu_module.cc). The bytes must not depend on it:
# the same large quantize/dequantize with the advice and without it
# (JAX_BQ_CPU_HUGEPAGES=0), each in a fresh process (the switch is read once),
# both match the oracle.
HUGE_SCRIPT = textwrap.dedent(r"""
    import sys
    import jax
    jax.config.update("jax_platforms", "cpu")
    import numpy as np, jax.numpy as jnp, jax_bq
    sys.path.insert(0, sys.argv[1])
    import oracle
    from jax_bq import Granularity
    x = np.random.default_rng(7).standard_normal((1024, 4096)).astype(np.float32)
    x[3, 130] = np.nan  # one non-finite block among the huge pages
    for fmt in ("fp8_e4m3", "nvfp4"):
        q = jax_bq.quantize(jnp.asarray(x), fmt)
        ref = oracle.oracle_quantize(x, q.format, Granularity.PER_BLOCK, q.block, -1)
        assert (oracle.as_bytes(q.data) == oracle.as_bytes(ref[0])).all(), fmt
        assert (oracle.as_bytes(q.scales) == oracle.as_bytes(ref[1])).all(), fmt
        out = jax_bq.dequantize(q, jnp.float32)
        want = oracle.oracle_dequantize_like(q, ref, np.float32)
        assert (oracle.as_bytes(out) == oracle.as_bytes(want)).all(), fmt
    print("HUGE OK")
""")


@pytest.mark.parametrize("advice", ["1", "0"])
def test_large_outputs_identical_with_and_without_huge_page_advice(advice):
    env = dict(os.environ, JAX_BQ_CPU_HUGEPAGES=advice)
    r = subprocess.run(
        [sys.executable, "-c", HUGE_SCRIPT, os.path.dirname(__file__)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and "HUGE OK" in r.stdout, r.stdout + r.stderr
