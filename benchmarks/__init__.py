"""The project's benchmarks: one module per benchmark, run through ``jax-bq bench``.

``jax-bq bench`` lists them; ``jax-bq bench NAME [ARGS...]`` runs module
``bench_NAME`` (or ``NAME`` for the tools without the prefix) as ``__main__``
with ``ARGS`` as its command line; ``python -m benchmarks.bench_NAME ARGS``
from the repository root is the same. Each writes one JSON of results and a
markdown table made from it (``results/`` or the ``--out`` path it takes).

The benchmarks live beside the package, not in it: they are tools and records
(``results/``, CUDA probes compiled with nvcc), not something a user of
``jax_bq`` imports. How the figures are measured: ``docs/performance.md``.
"""

from __future__ import annotations

import ast
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: Benchmarks that measure nothing without a CUDA device (``jax-bq bench``
#: refuses them on a machine without one). The others run anywhere; some are
#: sized for a GPU and say so in their docstring.
GPU_ONLY = frozenset(
    {"qmatmul", "fp4", "gpu_quantize", "quantize_kernels", "w4a16_kernels", "layernorm_quantize"}
)
_NOT_BENCHMARKS = {"__init__", "common"}


def _summary(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def available() -> dict[str, dict]:
    """``{name: {"module", "gpu", "what"}}`` of every benchmark module here."""
    out = {}
    for path in sorted(HERE.glob("*.py")):
        if path.stem in _NOT_BENCHMARKS:
            continue
        name = path.stem.removeprefix("bench_")
        out[name] = {
            "module": f"benchmarks.{path.stem}",
            "gpu": name in GPU_ONLY,
            "what": _summary(path),
        }
    return out
