"""Timing and result-writing helpers shared by the benchmarks."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import jax

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


def write(name: str, meta: dict, rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Writes results/NAME.json and results/NAME.md; returns the markdown table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    head = "| " + " | ".join(title for _, title in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _ in columns:
            v = r.get(key, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    md = "\n".join(lines)
    meta_lines = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    (RESULTS / f"{name}.md").write_text(f"# {name}\n\n{meta_lines}\n\n{md}\n")
    return md
