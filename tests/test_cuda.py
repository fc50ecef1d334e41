"""GPU-only checks: the CUDA module is there, and the handlers replay in CUDA graphs.

The handlers are registered command-buffer compatible and XLA is asked to put
custom calls into command buffers (CUDA graphs); replays must give identical
bytes, equal to eager execution. XLA 0.11 forms command buffers on its thunk
sequence, after the HLO that jax can print, so the test cannot show from the
HLO text that a graph was formed; it checks the replayed results.
"""

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import GPU_REASON

pytestmark = pytest.mark.gpu


def test_cuda_module_loaded():
    assert GPU_REASON is None, GPU_REASON


GRAPH_SCRIPT = textwrap.dedent(r"""
    import numpy as np, jax, jax.numpy as jnp, jax_bq
    x = jnp.asarray(np.random.default_rng(0).standard_normal((512, 1024)), jnp.bfloat16)
    f = jax.jit(lambda a: [jax_bq.dequantize(jax_bq.quantize(a * s, fmt), jnp.float32)
                           for s in (1.0, 2.0) for fmt in ("fp8_e4m3", "nvfp4", "mxfp4")])
    hlo = f.lower(x).compile().as_text()
    assert "jax_bq_quantize" in hlo and "jax_bq_dequantize" in hlo
    runs = [[np.asarray(o).tobytes() for o in f(x)] for _ in range(3)]
    assert runs[0] == runs[1] == runs[2], "graph replays differ"
    eager = [np.asarray(jax_bq.dequantize(jax_bq.quantize(x * s, fmt), jnp.float32)).tobytes()
             for s in (1.0, 2.0) for fmt in ("fp8_e4m3", "nvfp4", "mxfp4")]
    assert runs[0] == eager, "graph result differs from eager"
    print("GRAPH OK")
""")


def _run_with_command_buffers(script: str, marker: str) -> None:
    """Runs ``script`` in a fresh process with custom calls in CUDA graphs."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=FUSION,"
        "CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
    ).strip()
    r = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and marker in r.stdout, r.stdout + r.stderr


def test_cuda_graph_replay_identical():
    _run_with_command_buffers(GRAPH_SCRIPT, "GRAPH OK")


QMM_GRAPH_SCRIPT = textwrap.dedent(r"""
    import numpy as np, jax, jax.numpy as jnp, jax_bq
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((512, 1024)), jnp.float32)
    ws = {g: jax_bq.quantize(w, "fp8_e4m3", granularity=g)
          for g in ("per_tensor", "per_channel", "tile_2d")}
    xs = [jnp.asarray(rng.standard_normal((m, 1024)), jnp.bfloat16) for m in (4, 256)]
    cases = [(i, g, act) for i in range(2) for g in ws for act in ("bf16", "fp8_e4m3")]
    # Only jax_bq's own paths: a fallback's XLA dot may be autotuned differently
    # in two programs, so it is not expected to match eager bit for bit.
    paths = {c: jax_bq.plan(xs[c[0]], ws[c[1]], act_format=c[2]).path for c in cases}
    cases = [c for c in cases if paths[c] in ("w8a16", "cublaslt_fp8")]
    assert {"w8a16", "cublaslt_fp8"} <= set(paths.values()), paths
    f = jax.jit(lambda xs, ws: [jax_bq.qmatmul(xs[i], ws[g], act_format=act)
                                for i, g, act in cases])
    runs = [[np.asarray(o).tobytes() for o in f(xs, ws)] for _ in range(3)]
    assert runs[0] == runs[1] == runs[2], "graph replays differ"
    eager = [np.asarray(jax_bq.qmatmul(xs[i], ws[g], act_format=act)).tobytes()
             for i, g, act in cases]
    assert runs[0] == eager, "graph result differs from eager"
    print("QMM GRAPH OK")
""")


def test_qmatmul_cuda_graph_replay_identical():
    _run_with_command_buffers(QMM_GRAPH_SCRIPT, "QMM GRAPH OK")


CACHE_SCRIPT = textwrap.dedent(r"""
    import os, numpy as np, jax, jax.numpy as jnp, jax_bq
    from jax_bq import _native
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((512, 1024)), jnp.float32)
    ws = {g: jax_bq.quantize(w, "fp8_e4m3", granularity=g)
          for g in ("per_tensor", "per_channel", "tile_2d")}
    b = jnp.asarray(rng.standard_normal((512,)), jnp.bfloat16)
    xs = [jnp.asarray(rng.standard_normal((256, 1024)), jnp.bfloat16) for _ in range(2)]
    def calls(x):
        return [jax_bq.qmatmul(x, ws["per_tensor"], act_format="fp8_e4m3", bias=b,
                               activation="gelu", out_dtype=jnp.float32),
                jax_bq.qmatmul(x, ws["per_channel"], act_format="fp8_e4m3"),
                jax_bq.qmatmul(x, ws["tile_2d"], act_format="fp8_e4m3", bias=b)]
    f = jax.jit(calls)
    # each input three times, interleaved: first sight runs directly, the
    # second captures, the third replays; every result must be the same bytes
    runs = [[np.asarray(o).tobytes() for o in f(xs[i % 2])] for i in range(6)]
    for i in range(2, 6):
        assert runs[i] == runs[i % 2], f"call {i} differs from its input's first call"
    stats = _native.CUDA.module.graph_cache_stats()
    print("STATS", stats)
    if os.environ.get("JAX_BQ_GRAPH_CACHE") == "0":
        assert stats["launches"] == stats["captures"] == 0, stats
    elif "CUSTOM_CALL" in os.environ["XLA_FLAGS"]:  # XLA's command buffers trace the calls
        assert stats["refused"] == 0 and stats["traced"] > 0, stats
    else:
        assert stats["refused"] == 0, stats
        assert stats["captures"] > 0 and stats["launches"] > 0, stats
    np.save(os.environ["OUT_NPY"], np.frombuffer(b"".join(runs[0] + runs[1]), np.uint8))
    print("CACHE OK")
""")


@pytest.mark.parametrize("command_buffers", ["FUSION", "FUSION,CUSTOM_CALL"])
def test_qmatmul_graph_cache_replays_the_direct_bytes(command_buffers, tmp_path):
    """qmatmul's CUDA graph cache (ffi/cuda/graph_cache.h) gives the bytes of direct launches.

    Once with custom calls outside XLA's command buffers (the cache launches
    its own executable graphs) and once inside them (XLA traces the calls; the
    cache steps aside); each against the same program with the cache off
    (``JAX_BQ_GRAPH_CACHE=0``).
    """
    outs = {}
    for cache in ("1", "0"):
        env = dict(os.environ, JAX_BQ_GRAPH_CACHE=cache, OUT_NPY=str(tmp_path / f"{cache}.npy"))
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + f" --xla_gpu_enable_command_buffer={command_buffers}"
            " --xla_gpu_graph_min_graph_size=1"
        ).strip()
        r = subprocess.run(
            [sys.executable, "-c", CACHE_SCRIPT],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0 and "CACHE OK" in r.stdout, r.stdout + r.stderr
        outs[cache] = (tmp_path / f"{cache}.npy").read_bytes()
    assert outs["1"] == outs["0"], "the graph cache changed the results"
