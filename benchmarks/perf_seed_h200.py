"""The H200 measurements already in the repo as fitting workloads for jax_bq.perf.

Reads benchmarks/results/{qmatmul,qmatmul_crossover,gpu_quantize}.json,
fp8_gemm_shapes_h200.txt and e2e_kernels_h200.txt and pairs each measured time
with the operators the models say it runs. Writes
results/perf_seed_h200.json. ``--extended`` also reads the later device-time
runs (fp4_large_m_device.json: XLA bf16 / FP4->FP8 / cuBLASLt FP8 block at
M = 1024-8192; gpu_w4a16_kernels.json: the current W4A16 kernels and the
FP4->FP8 conversion kernel) and leaves out qmatmul.json's W4A16 rows, which
timed the W4A16 kernel as it was before its rewrite (2026-11-22; the kernels
of 11-23 and 12-01 are 1.5x faster), into results/perf_seed_h200_ext.json.
Then::

    jax-bq bench validate_perf --fit benchmarks/results/perf_seed_h200.json \\
        --profile jax_bq/perf/data/h200.json

fits the profile shipped for the H200. Caveat recorded per row ("timing"):
the qmatmul tables are per-call slopes of host time over long executables
(close to, not equal to, profiler device time); gpu_quantize, the cuBLASLt
shape probe and the encoder kernel sums are device time.
"""

from __future__ import annotations

import dataclasses
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


Row = dict


def _add(rows, name, group, ops, us, source, timing, meta=None):
    w = ft.workload(name, group, ops, us)
    w.update(source=source, timing=timing, meta=meta or {})
    rows.append(w)


def qmatmul_rows(rows, skip_w4a16: bool) -> None:
    """qmatmul.json (host slope): every path at decode and prefill shapes."""
    for r in json.loads((R / "qmatmul.json").read_text())["rows"]:
        if r["impl"] not in IMPL or not r.get("time_us"):
            continue
        wcfg, path, over = IMPL[r["impl"]]
        if skip_w4a16 and path == "w4a16":
            continue
        m, n, k = (int(v) for v in r["shape"].split("x"))
        tag = " pre" if over else ""
        meta = {"m": m, "n": n, "k": k, "weights": wcfg, "path": path} if not over else {}
        name = f"qmatmul {r['shape']} {wcfg} {path}{tag}"
        ops = gemm(m, n, k, wcfg, path, **over)
        _add(rows, name, f"gemm:{path}", ops, r["time_us"], "qmatmul.json", "host slope", meta)


def crossover_rows(rows) -> None:
    """qmatmul_crossover.json (host slope): W8A16 vs cuBLASLt FP8 at M = 2..64."""
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
                meta = {"m": m, "n": 8192, "k": 8192, "weights": wcfg, "path": path}
                name = f"qmatmul {m}x8192x8192 {wcfg} {path}"
                ops = gemm(m, 8192, 8192, wcfg, path)
                src = "qmatmul_crossover.json"
                _add(rows, name, f"gemm:{path}", ops, us, src, "host slope", meta)


def quantize_rows(rows) -> None:
    """gpu_quantize.json (device time): quantize / dequantize of bf16 arrays."""
    for r in json.loads((R / "gpu_quantize.json").read_text())["rows"]:
        if "plain" in r["op"] or r["input"] != "bfloat16":
            continue
        rr, cc = (int(v) for v in r["shape"].split("x"))
        op = (
            rl.quantize_cost(rr, cc, r["format"])
            if r["op"] == "quantize"
            else rl.dequantize_cost(rr, cc, r["format"])
        )
        name = f"{r['op']} {r['shape']} bf16 {r['format']}"
        _add(
            rows,
            name,
            f"{r['op']}:{r['format']}",
            [(op, 1)],
            r["us"],
            "gpu_quantize.json",
            "device",
        )


def probe_rows(rows) -> None:
    """fp8_gemm_shapes_h200.txt (device time): cuBLASLt's first heuristic candidate."""
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
        _add(rows, name, group, ops, float(mt.group(5)), "fp8_gemm_shapes_h200.txt", "device")


def encoder_rows(rows) -> None:
    """e2e_kernels_h200.txt (device time, kernel sum): E5-large 32x128, bf16 and FP8 static."""
    eff = hw.effective("h200", None)
    text = (R / "e2e_kernels_h200.txt").read_text()
    for label, pname in (("bf16", "bf16"), ("fp8 static per-tensor", "fp8_static_tensor")):
        mt = re.search(rf"## {re.escape(label)}: \d+ kernels, (\d+) us of kernels per call", text)
        est = encoder_ops(model_config("e5-large"), 32, 128, preset(pname, 24), eff)
        meta = {"batch": 32, "seq": 128, "preset": pname}
        name = f"encoder e5-large 32x128 {pname}"
        src = "e2e_kernels_h200.txt"
        _add(
            rows,
            name,
            "encoder",
            list(est.ops),
            float(mt.group(1)),
            src,
            "device (kernel sum)",
            meta,
        )


#: fp4_large_m_device.json impl -> (weights, path)
LARGE_M = {
    "xla_bf16": ("bf16", "xla_bf16"),
    "fp4_via_fp8": ("nvfp4", "fp4_via_fp8"),
    "fp8_preconverted": ("fp8_tile", "cublaslt_fp8"),
}


def large_m_rows(rows) -> None:
    """fp4_large_m_device.json (device time): M = 1024-8192 at 8192 and 28672 x 8192."""
    for r in json.loads((R / "fp4_large_m_device.json").read_text())["rows"]:
        wcfg, path = LARGE_M[r["impl"]]
        m, n, k = (int(v) for v in r["shape"].split("x"))
        name = f"large-M {r['shape']} {wcfg} {path}"
        meta = {"m": m, "n": n, "k": k, "weights": wcfg, "path": path}
        ops = gemm(m, n, k, wcfg, path)
        _add(
            rows, name, f"gemm:{path}", ops, r["time_us"], "fp4_large_m_device.json", "device", meta
        )


def w4a16_rows(rows) -> None:
    """gpu_w4a16_kernels.json (device time): W4A16NvKernel (NVFP4, what qmatmul runs), the
    byte-permute W4A16Kernel on NVFP4 bytes (FP4 weights' kernel), FP4->FP8 conversion."""
    for r in json.loads((R / "gpu_w4a16_kernels.json").read_text())["rows"]:
        kern = r["kernel"]
        if "L2-resident" in kern:
            continue  # weights from L2, not DRAM: not what the model prices
        n, k = r["n"], r["k"]
        if kern == "Fp4ToFp8Kernel":
            conv = rl.weight_bytes("nvfp4", n, k) + rl.weight_bytes("fp8_e4m3", n, k, "per_block")
            op = rl.OpCost("convert", "convert_fp4", 0.0, conv)
            name, group = f"fp4->fp8 {n}x{k} nvfp4 (probe)", "convert_fp4"
            _add(rows, name, group, [(op, 1)], r["us"], "gpu_w4a16_kernels.json", "device")
            continue
        ((op, _),) = gemm(r["m"], n, k, "nvfp4", "w4a16")
        if not kern.startswith("W4A16NvKernel"):
            op = dataclasses.replace(op, key="gemm:w4a16")  # the generic kernel
        tag = " rotated" if "rotated" in kern else ""
        name = f"{kern.split()[0]} {r['shape']} nvfp4{tag} (probe)"
        _add(rows, name, "gemm:w4a16", [(op, 1)], r["us"], "gpu_w4a16_kernels.json", "device")


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--extended", action="store_true", help="add the later device-time runs")
    args = ap.parse_args()
    rows: list[Row] = []
    qmatmul_rows(rows, skip_w4a16=args.extended)
    crossover_rows(rows)
    quantize_rows(rows)
    probe_rows(rows)
    encoder_rows(rows)
    if args.extended:
        large_m_rows(rows)
        w4a16_rows(rows)
    meta = {
        "device": "NVIDIA H200",
        "device_key": "h200",
        "copy_tbps": 4.24,
        "source": "repo results (seed" + (", extended)" if args.extended else ")"),
    }
    out = R / ("perf_seed_h200_ext.json" if args.extended else "perf_seed_h200.json")
    out.write_text(json.dumps({"meta": meta, "workloads": rows}, indent=1))
    print(f"{len(rows)} workloads -> {out}")


if __name__ == "__main__":
    main()
