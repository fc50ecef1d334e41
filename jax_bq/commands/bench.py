"""``jax-bq bench NAME [ARGS...]``: the project's benchmark scripts through one entry point.

Runs ``benchmarks/bench_NAME.py`` of a source checkout (the scripts are not
part of the installed package) as ``__main__`` with ``ARGS`` as its command
line, so each script's own ``main`` and argument parser run unchanged and its
results land in ``benchmarks/results/``. ``jax-bq bench`` alone lists them.
GPU-only benchmarks refuse to start without a CUDA device.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from jax_bq.commands.common import CommandError, emit

#: name -> (needs a GPU, what it measures)
BENCHMARKS = {
    "cpu_quantize": (False, "CPU quantize/dequantize kernels, GB/s per format"),
    "calibration": (False, "MSE calibration: error before/after per format"),
    "fidelity": (False, "all-MiniLM-L6-v2 fidelity of every variant (minutes on CPU)"),
    "e2e": (False, "end-to-end encoder throughput per variant (sized for a GPU)"),
    "qmatmul": (True, "qmatmul against XLA bf16 / FP8 per shape and path"),
    "fp4": (True, "NVFP4 / FP4 weight-only GEMMs against bf16"),
    "gpu_quantize": (True, "CUDA quantize kernels against a device copy"),
    "quantize_kernels": (True, "bandwidth probe of the CUDA quantize kernels (nvcc)"),
    "w4a16_kernels": (True, "bandwidth probe of the W4A16 kernels (nvcc)"),
}


def configure(p) -> None:
    """Arguments of ``bench``."""
    p.add_argument("name", nargs="?", help=f"one of: {', '.join(BENCHMARKS)}")
    p.add_argument("args", nargs="...", help="arguments passed to the benchmark script")
    p.add_argument("--json", action="store_true", help="with no NAME: the list as JSON")


def _root() -> Path:
    return Path(__file__).resolve().parents[2] / "benchmarks"


def run(args) -> int:
    """Lists, or runs one benchmark script's main."""
    if not args.name:
        lines = ["benchmarks (jax-bq bench NAME [ARGS...]; results in benchmarks/results/):"]
        for n, (gpu, what) in BENCHMARKS.items():
            lines.append(f"  {n:17s} {'GPU ' if gpu else 'any '} {what}")
        emit(args, {n: {"gpu": g, "what": w} for n, (g, w) in BENCHMARKS.items()},
             "\n".join(lines))  # fmt: skip
        return 0
    if args.name not in BENCHMARKS:
        raise CommandError(
            f"unknown benchmark {args.name!r}; expected one of {', '.join(BENCHMARKS)}"
        )
    script = _root() / f"bench_{args.name}.py"
    if not script.is_file():
        raise CommandError(
            f"{script} not found: benchmarks run from a source checkout of jax_bq "
            "(the installed package does not include them)"
        )
    if BENCHMARKS[args.name][0]:
        import jax

        if not any(d.platform == "gpu" for d in jax.devices()):
            raise CommandError(f"benchmark {args.name} needs a CUDA GPU; this machine has none")
    root = str(script.parents[1])
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [str(script), *args.args]
    sys.path[:0] = [root, str(script.parent)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
    return 0
