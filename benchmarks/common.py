"""Timing and result-writing helpers shared by the benchmarks."""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax

from jax_bq.perf.measure import gpu_kernel_events  # noqa: F401 - the trace reader

RESULTS = Path(__file__).resolve().parent / "results"


def time_fn(fn, *args, warmup: int = 3, iters: int = 20) -> dict:
    """Median / min / spread in seconds of ``fn(*args)``, each call awaited."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - t0)
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "iters": iters,
    }


def device_time_per_call(
    fn, args_list: list, calls: int = 20, warmup: int = 3, copies: bool = False
) -> dict:
    """Device time of the kernels one call of ``fn`` launches, from a profiler trace.

    Call i runs ``fn(*args_list[i % len(args_list)])`` (rotate inputs larger
    than L2 so that no call reads what the previous one left in it). The
    traced calls' kernels, in start order, are split evenly into calls (each
    call of a jitted function launches the same kernels); the result is the
    median over calls of the summed kernel durations: device time, without
    host dispatch or launch gaps.

    Returns ``{"us": median, "span_us": median span, "kernels": per call,
    "names": sorted set}``, where a call's span runs from its first kernel's
    start to its last kernel's end (device time plus every gap between its
    kernels: host work inside the call counts against it); ``copies`` counts
    device memcpy/memset events too.
    """
    for i in range(warmup):
        jax.block_until_ready(fn(*args_list[i % len(args_list)]))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for i in range(calls):
                jax.block_until_ready(fn(*args_list[i % len(args_list)]))
        events = sorted(gpu_kernel_events(d, copies), key=lambda e: e[1])
    if not events:
        raise RuntimeError("the trace holds no GPU kernels")
    names = sorted({e[0][:60] for e in events})
    if len(events) % calls:  # not the same kernels every call: the mean, said so
        return {
            "us": sum(e[2] for e in events) / calls,
            "span_us": float("nan"),
            "kernels": len(events) / calls,
            "names": names,
        }
    per = len(events) // calls
    chunks = [events[c * per : (c + 1) * per] for c in range(calls)]
    sums = [sum(e[2] for e in ch) for ch in chunks]
    spans = [max(e[1] + e[2] * 1e3 for e in ch) / 1e3 - ch[0][1] / 1e3 for ch in chunks]
    return {
        "us": statistics.median(sums),
        "span_us": statistics.median(spans),
        "kernels": per,
        "names": names,
    }


def machine() -> dict:
    dev = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "platform": dev.platform,
        "device": getattr(dev, "device_kind", str(dev)),
        "cpu": platform.processor(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


#: Leading columns of the quantize/dequantize bandwidth tables.
BANDWIDTH_COLUMNS = [
    ("op", "op"),
    ("input", "input"),
    ("format", "format"),
    ("shape", "shape"),
    ("us", "µs"),
    ("TBps", "TB/s (R+W)"),
    ("pct_copy", "% of copy"),
]


def probe_output(name: str, description: str) -> dict:
    """The JSON of probe NAME: ``--json FILE`` reads a saved run, else it is run.

    Command line of the kernel-level benchmarks: ``[--arch 90a] [--json FILE]``.
    """
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--arch", default="90a", help="nvcc arch suffix (sm_ARCH)")
    ap.add_argument("--json", help="use an existing probe output instead of running it")
    args = ap.parse_args()
    if args.json:
        return json.loads(Path(args.json).read_text())
    return run_probe(name, args.arch)


def run_probe(name: str, arch: str) -> dict:
    """Compiles benchmarks/probes/NAME.cu for sm_ARCH, runs it, returns its JSON.

    The probe's stderr (its human-readable log) is passed through.
    """
    import subprocess
    import sys
    import tempfile

    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / name
        subprocess.run(
            [
                "nvcc",
                "-std=c++20",
                "-O2",
                f"-gencode=arch=compute_{arch},code=sm_{arch}",
                f"-I{root / 'ffi/include'}",
                f"-I{root / 'ffi/cuda'}",
                str(root / f"benchmarks/probes/{name}.cu"),
                "-o",
                str(exe),
            ],
            check=True,
        )
        run = subprocess.run([str(exe)], capture_output=True, text=True)
        sys.stderr.write(run.stderr)
        if run.returncode != 0:
            raise SystemExit(f"probe {name} exited {run.returncode}")
        return json.loads(run.stdout)


def _table(result: dict) -> str:
    columns = result["columns"]
    lines = [
        "| " + " | ".join(title for _, title in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for r in result["rows"]:
        cells = []
        for key, _ in columns:
            v = r.get(key, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The markdown page of a results JSON written by :func:`write`: meta list and table."""
    meta_lines = "\n".join(f"- {k}: {v}" for k, v in result["meta"].items())
    return f"# {result['name']}\n\n{meta_lines}\n\n{_table(result)}\n"


def write(
    name: str, meta: dict, rows: list[dict], columns: list[tuple[str, str]], results=None
) -> str:
    """Writes RESULTS/NAME.json, then RESULTS/NAME.md made from that JSON alone.

    The JSON holds ``name``, ``meta``, ``columns`` ([key, title] pairs) and
    ``rows``; ``python -m benchmarks.common FILE.json`` remakes the markdown.
    Returns the markdown table (without the meta list).
    """
    out = Path(results or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    result = {"name": name, "meta": meta, "columns": [list(c) for c in columns], "rows": rows}
    text = json.dumps(result, indent=2)
    (out / f"{name}.json").write_text(text)
    (out / f"{name}.md").write_text(markdown(json.loads(text)))
    return _table(result)


def per_call(op, xs, weights, iters=15, scale=1, spans=(2, 4)) -> float:
    """Seconds per op call: slope between 2sR and 4sR rotated calls in one executable.

    Every call gets its own activation (``xs`` holds >= 4sR distinct ones), so
    XLA cannot merge identical calls (it CSEs pure custom calls and dots).
    ``scale`` > 1 lengthens the executables of microsecond-scale ops so that
    host timing jitter stays small against the slope; ``spans`` sets the two
    executable lengths in units of ``sR``.
    """
    r = len(weights)
    lo, hi = spans[0] * r * scale, spans[1] * r * scale
    assert len(xs) >= hi

    def make(calls):
        def f(xs, ws):
            # Chain the calls (an optimization barrier makes call i's input wait
            # for call i-1's output) so XLA cannot merge dots that share a weight.
            outs = []
            for i in range(calls):
                a = xs[i]
                if outs:
                    a, _ = jax.lax.optimization_barrier((a, outs[-1]))
                outs.append(op(a, ws[i % r]))
            return tuple(outs)

        return jax.jit(f)

    t_lo = time_fn(make(lo), xs[:lo], weights, warmup=2, iters=iters)["median_s"]
    t_hi = time_fn(make(hi), xs[:hi], weights, warmup=2, iters=iters)["median_s"]
    return (t_hi - t_lo) / (hi - lo)


if __name__ == "__main__":
    import sys

    for path in sys.argv[1:]:
        p = Path(path)
        p.with_suffix(".md").write_text(markdown(json.loads(p.read_text())))
        print(f"wrote {p.with_suffix('.md')}")
