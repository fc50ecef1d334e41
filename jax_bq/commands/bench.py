"""``jax-bq bench NAME [ARGS...]``: the project's benchmarks through one entry point.

Runs module ``benchmarks.bench_NAME`` of a source checkout (the ``benchmarks``
package sits beside ``jax_bq`` and is not installed with it) as ``__main__``
with ``ARGS`` as its command line, so each benchmark's own argument parser runs
(``jax-bq bench NAME --help``) and its results land where it says (its JSON
and the markdown table made from it). ``jax-bq bench`` alone lists them.
GPU-only benchmarks refuse to start without a CUDA device.
"""

from __future__ import annotations

import importlib.util
import runpy
import sys
from pathlib import Path

from jax_bq.commands.common import CommandError, emit


def configure(p) -> None:
    """Arguments of ``bench``."""
    p.add_argument("name", nargs="?", help="a benchmark; `jax-bq bench` lists them")
    p.add_argument("args", nargs="...", help="arguments passed to the benchmark")
    p.add_argument("--json", action="store_true", help="with no NAME: the list as JSON")


def _package():
    """The ``benchmarks`` package of the checkout this ``jax_bq`` runs from."""
    init = Path(__file__).resolve().parents[2] / "benchmarks" / "__init__.py"
    if not init.is_file():
        raise CommandError(
            f"{init.parent} not found: benchmarks run from a source checkout of jax_bq "
            "(the installed package does not include them)"
        )
    mod = sys.modules.get("benchmarks")
    if mod is not None:
        if Path(getattr(mod, "__file__", "") or "").resolve() != init:
            raise CommandError(f"another 'benchmarks' package is already imported: {mod}")
        return mod
    spec = importlib.util.spec_from_file_location(
        "benchmarks", init, submodule_search_locations=[str(init.parent)]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks"] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules["benchmarks"]
        raise
    return mod


def run(args) -> int:
    """Lists, or runs one benchmark module as ``__main__``."""
    table = _package().available()
    if not args.name:
        lines = ["benchmarks (jax-bq bench NAME [ARGS...]; NAME --help for its options):"]
        for n, b in table.items():
            lines.append(f"  {n:19s} {'GPU ' if b['gpu'] else 'any '} {b['what']}")
        emit(args, table, "\n".join(lines))
        return 0
    if args.name not in table:
        raise CommandError(f"unknown benchmark {args.name!r}; expected one of {', '.join(table)}")
    bench = table[args.name]
    if bench["gpu"]:
        import jax

        if not any(d.platform == "gpu" for d in jax.devices()):
            raise CommandError(f"benchmark {args.name} needs a CUDA GPU; this machine has none")
    old_argv = sys.argv
    sys.argv = [f"jax-bq bench {args.name}", *args.args]
    try:
        runpy.run_module(bench["module"], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
    return 0
