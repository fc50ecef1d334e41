"""Device time of jitted calls from a ``jax.profiler`` trace (GPU kernels only).

The sum of the kernels one call launches, median over calls: device time,
without host dispatch or launch gaps. On a platform whose trace holds no GPU
kernels (CPU), :func:`device_us` raises; pass ``wall=True`` for host wall time
(smoke tests only: not what the models predict).
"""

from __future__ import annotations

import glob
import statistics
import tempfile
import time


def gpu_kernel_events(trace_dir: str, copies: bool = False) -> list[tuple[str, int, float]]:
    """(name, start ns, duration us) of every GPU kernel in a ``jax.profiler`` trace.

    Reads the GPU planes with ``jax.profiler.ProfileData`` (no TensorBoard);
    memcpy and memset events are left out unless ``copies``.
    """
    from jax.profiler import ProfileData

    files = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    if not files:
        return []
    out = []
    for plane in ProfileData.from_file(files[0]).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            for ev in line.events:
                if not copies and ev.name.startswith(("Memcpy", "Memset")):
                    continue
                out.append((ev.name, ev.start_ns, ev.duration_ns / 1e3))
    return out


def device_us(fn, args_list, calls: int = 20, warmup: int = 3, copies=False, wall=False) -> float:
    """Median device time (µs) of ``fn(*args_list[i % len])`` over ``calls`` calls.

    Raises:
        RuntimeError: the trace holds no GPU kernels (and ``wall`` is False).
    """
    import jax

    for i in range(warmup):
        jax.block_until_ready(fn(*args_list[i % len(args_list)]))
    if wall:
        ts = []
        for i in range(calls):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args_list[i % len(args_list)]))
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e6
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for i in range(calls):
                jax.block_until_ready(fn(*args_list[i % len(args_list)]))
        ev = sorted(gpu_kernel_events(d, copies), key=lambda e: e[1])
    if not ev:
        raise RuntimeError("the profiler trace holds no GPU kernels (no GPU, or nothing ran)")
    if len(ev) % calls:
        return sum(e[2] for e in ev) / calls
    per = len(ev) // calls
    return statistics.median(sum(e[2] for e in ev[c * per : (c + 1) * per]) for c in range(calls))
