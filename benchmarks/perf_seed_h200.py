"""The H200 measurements already in the repo as fitting workloads for jax_bq.perf.

Reads benchmarks/results/{qmatmul,qmatmul_crossover,gpu_quantize}.json,
fp8_gemm_shapes_h200.txt and e2e_kernels_h200.txt and pairs each measured time
with the operators the models say it runs. Writes
results/perf_seed_h200.json; then::

    python benchmarks/validate_perf.py --fit benchmarks/results/perf_seed_h200.json \\
        --profile jax_bq/perf/data/h200.json

fits the profile shipped for the H200. Caveat recorded per row ("timing"):
the qmatmul tables are per-call slopes of host time over long executables
(close to, not equal to, profiler device time); gpu_quantize, the cuBLASLt
shape probe and the encoder kernel sums are device time.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from jax_bq.perf import fit as ft
from jax_bq.perf import hardware as hw
from jax_bq.perf import roofline as rl
from jax_bq.perf import suite
from jax_bq.perf.models import encoder_ops, model_config
from jax_bq.perf.presets import preset

R = Path(__file__).resolve().parent / "results"
IMPL = {
    "xla_bf16": ("bf16", "xla_bf16", {}),
    "jax_bq W8A8 per_tensor (per_tensor)": ("fp8_tensor", "cublaslt_fp8", {}),
    "jax_bq W8A8 per_channel (per_token)": ("fp8_channel", "cublaslt_fp8", {}),
    "jax_bq W8A8 tile_128x128 (block_1x128)": ("fp8_tile", "cublaslt_fp8", {}),
    "jax_bq W8A8 per_tensor, x pre-quantized": ("fp8_tensor", "cublaslt_fp8", {"act": "pre"}),
    "jax_bq W8A16 per_tensor": ("fp8_tensor", "w8a16", {}),
    "jax_bq W8A16 per_channel": ("fp8_channel", "w8a16", {}),
    "jax_bq W8A16 tile_128x128": ("fp8_tile", "w8a16", {}),
    "jax_bq W4A16 nvfp4": ("nvfp4", "w4a16", {}),
}


def gemm(m, n, k, wcfg, path, **over):
    fmt, gran, _, agran = suite.WEIGHTS[wcfg]
    kw = dict(w_format=fmt, w_granularity=gran)
    if path == "cublaslt_fp8":
        kw.update(act="dynamic", act_granularity=agran)
    kw.update(over)
    return [(o, 1) for o in rl.gemm_costs(m, n, k, path, **kw)]


def main() -> None:
    rows = []

    def add(name, group, ops, us, source, timing, meta=None):
        w = ft.workload(name, group, ops, us)
        w.update(source=source, timing=timing, meta=meta or {})
        rows.append(w)

    for r in json.loads((R / "qmatmul.json").read_text())["rows"]:
        if r["impl"] not in IMPL or not r.get("time_us"):
            continue
        wcfg, path, over = IMPL[r["impl"]]
        m, n, k = (int(v) for v in r["shape"].split("x"))
        tag = " pre" if over else ""
        meta = {"m": m, "n": n, "k": k, "weights": wcfg, "path": path} if not over else {}
        add(
            f"qmatmul {r['shape']} {wcfg} {path}{tag}",
            f"gemm:{path}",
            gemm(m, n, k, wcfg, path, **over),
            r["time_us"],
            "qmatmul.json",
            "host slope",
            meta,
        )
    for r in json.loads((R / "qmatmul_crossover.json").read_text())["rows"]:
        wcfg = {"per_tensor": "fp8_tensor", "per_channel": "fp8_channel"}.get(
            r["weights"], "fp8_tile"
        )
        m = r["M"]
        if m in (1, 16):
            continue  # already in qmatmul.json
        for path, key in (("w8a16", "w8a16_us"), ("cublaslt_fp8", "w8a8_us")):
            us = r.get(key)
            if us and us == us and (path != "cublaslt_fp8" or r["w8a8_path"] == "cublaslt_fp8"):
                add(
                    f"qmatmul {m}x8192x8192 {wcfg} {path}",
                    f"gemm:{path}",
                    gemm(m, 8192, 8192, wcfg, path),
                    us,
                    "qmatmul_crossover.json",
                    "host slope",
                    {"m": m, "n": 8192, "k": 8192, "weights": wcfg, "path": path},
                )
    for r in json.loads((R / "gpu_quantize.json").read_text())["rows"]:
        if "plain" in r["op"] or r["input"] != "bfloat16":
            continue
        rr, cc = (int(v) for v in r["shape"].split("x"))
        op = (
            rl.quantize_cost(rr, cc, r["format"])
            if r["op"] == "quantize"
            else rl.dequantize_cost(rr, cc, r["format"])
        )
        add(
            f"{r['op']} {r['shape']} bf16 {r['format']}",
            f"{r['op']}:{r['format']}",
            [(op, 1)],
            r["us"],
            "gpu_quantize.json",
            "device",
        )
    pat = re.compile(r"M=\s*(\d+) N=\s*(\d+) K=\s*(\d+) (fp8|bf16)\s+cand 0/8:\s+([\d.]+) us")
    for line in (R / "fp8_gemm_shapes_h200.txt").read_text().splitlines():
        mt = pat.search(line)
        if not mt:
            continue
        m, n, k = (int(mt.group(i)) for i in (1, 2, 3))
        if mt.group(4) == "fp8":
            ops = gemm(m, n, k, "fp8_tensor", "cublaslt_fp8", act="pre")
            name, group = f"cublaslt fp8 {m}x{n}x{k} pre (probe)", "gemm:cublaslt_fp8"
        else:
            ops = gemm(m, n, k, "bf16", "xla_bf16")
            name, group = f"cublas bf16 {m}x{n}x{k} (probe)", "gemm:xla_bf16"
        add(name, group, ops, float(mt.group(5)), "fp8_gemm_shapes_h200.txt", "device")
    eff = hw.effective("h200", None)
    text = (R / "e2e_kernels_h200.txt").read_text()
    for label, pname in (("bf16", "bf16"), ("fp8 static per-tensor", "fp8_static_tensor")):
        mt = re.search(rf"## {re.escape(label)}: \d+ kernels, (\d+) us of kernels per call", text)
        est = encoder_ops(model_config("e5-large"), 32, 128, preset(pname, 24), eff)
        add(
            f"encoder e5-large 32x128 {pname}",
            "encoder",
            list(est.ops),
            float(mt.group(1)),
            "e2e_kernels_h200.txt",
            "device (kernel sum)",
            {"batch": 32, "seq": 128, "preset": pname},
        )
    meta = {
        "device": "NVIDIA H200",
        "device_key": "h200",
        "copy_tbps": 4.24,
        "source": "repo results (seed)",
    }
    out = R / "perf_seed_h200.json"
    out.write_text(json.dumps({"meta": meta, "workloads": rows}, indent=1))
    print(f"{len(rows)} workloads -> {out}")


if __name__ == "__main__":
    main()
