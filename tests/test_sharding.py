"""Sharding rules and parallel patterns on 8 virtual CPU devices (meshes 1x8, 2x4, 8x1).

The checks live in ``tests/sharding_worker.py`` and run in one subprocess,
because ``--xla_force_host_platform_device_count=8`` must be set before JAX
initializes (this interpreter's JAX keeps its single CPU device). What they
assert:

* quantize / dequantize / calibrate under a sharded ``jit``: bitwise equal to
  the unsharded result (NaN, Inf and all-zero blocks included), outputs stay
  sharded, and no all-gather of a float array in the compiled HLO (per-tensor
  and NVFP4 scales use a cross-shard pmax, an all-reduce);
* a shard boundary inside a block is re-sharded with a warning (same bits),
  and :func:`jax_bq.sharding.quantized_sharding` rejects it with a ValueError;
* QuantizedTensor shardings survive ``device_put``, ``jit`` and a checkpoint
  round trip;
* qmatmul data parallel, column-parallel, row-parallel (exactly one
  all-reduce) and both: close to the unsharded product, amax exact;
* the BERT encoder under DP (no collectives), Megatron TP (one all-reduce per
  column/row pair, no all-gather), FSDP (quantized weights gathered as codes,
  never a float weight or a full activation).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

#: group -> check-name prefixes and the least number of checks it must report.
GROUPS = {
    "quantize": (("quantize_",), 3 * (5 + 2)),
    "reshard": (("reshard_", "quantized_sharding_", "explicit_"), 3),
    "calibrate": (("calibrate_",), 3),
    "qtensor": (("qtensor_",), 2),
    "qmatmul": (("qmatmul_",), 8 * 3),
    "bert": (("bert_", "fsdp_"), 4 * 2 + 1),
}


@pytest.fixture(scope="module")
def checks():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "sharding_worker.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[r["name"]] = r
    if proc.returncode != 0 or not results:
        pytest.fail(f"sharding worker failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return results


@pytest.mark.parametrize("group", list(GROUPS))
def test_sharded_group(checks, group):
    prefixes, least = GROUPS[group]
    done = checks.get(f"group[{group}]")
    assert done is not None, f"group {group} did not report"
    assert done["ok"], done["detail"]
    mine = {k: v for k, v in checks.items() if k.startswith(prefixes)}
    assert len(mine) >= least, f"{group}: {len(mine)} checks reported, want >= {least}"
    failed = {k: v["detail"] for k, v in mine.items() if not v["ok"]}
    assert not failed, failed
