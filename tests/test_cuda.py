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
from conftest import GPU_DEVICES, GPU_REASON

pytestmark = pytest.mark.skipif(not GPU_DEVICES, reason="no GPU visible to JAX")


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


def test_cuda_graph_replay_identical():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=FUSION,"
        "CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
    ).strip()
    r = subprocess.run(
        [sys.executable, "-c", GRAPH_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and "GRAPH OK" in r.stdout, r.stdout + r.stderr
