"""``jax-bq eval MODEL_DIR --corpus FILE [--quantized OUT_DIR]``: the fidelity table.

``MODEL_DIR`` may be ``minilm`` (the installed all-MiniLM-L6-v2) and ``FILE``
``stdlib`` (Python standard-library docstrings), both offline.

Embeds the corpus (one text per line; the last ``--queries`` lines, spread
over the file, are the queries) with the float32 model and compares: with
``--quantized``, the checkpoint in ``OUT_DIR``; without, the in-memory
variants of ``jax-bq demo`` (:data:`jax_bq.models.fidelity.DEMO_VARIANTS`).
Metrics (:func:`jax_bq.models.fidelity.embedding_fidelity`): mean and min
cosine to the float32 embedding, per-embedding Pearson, Pearson of all
query-text similarities, top-10 retrieval overlap.
"""

from __future__ import annotations

import time
from pathlib import Path

from jax_bq.commands.common import CommandError, emit, model_dir, progress


def configure(p) -> None:
    """Arguments of ``eval``."""
    p.add_argument("model_dir", help="the float Hugging Face model folder (the reference)")
    p.add_argument(
        "--corpus",
        required=True,
        metavar="FILE",
        help="UTF-8 text, one text a line; 'stdlib': Python standard-library docstrings",
    )
    p.add_argument("--quantized", metavar="OUT_DIR", help="a `jax-bq quantize` output folder")
    p.add_argument("--queries", type=int, default=None, help="queries (default: lines / 6)")
    p.add_argument("--limit", type=int, default=300, help="use at most this many texts (300)")
    p.add_argument(
        "--act-format",
        default="bf16",
        help="activations of the quantized model: bf16 (weight-only, default), fp8_e4m3, ...",
    )
    p.add_argument("--act-granularity", default=None, help="per_tensor | per_token | block_1x128")
    p.add_argument("--json", action="store_true", help="print the table as JSON")


def read_corpus(path: str, limit: int | None) -> list[str]:
    """Non-empty lines of a UTF-8 file (``"stdlib"``: standard-library docstrings)."""
    p = Path(path)
    if path == "stdlib" and not p.exists():
        from jax_bq.models.corpus import stdlib_docstrings

        docs = stdlib_docstrings()
        step = max(1, len(docs) // (limit or len(docs)))
        return docs[::step][:limit]
    if not p.is_file():
        raise CommandError(f"corpus {path} does not exist")
    try:
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise CommandError(f"corpus {path} is not UTF-8 text ({e})") from None
    texts = [ln for ln in lines if ln][:limit]
    if len(texts) < 12:
        raise CommandError(f"corpus {path} has {len(texts)} texts; eval needs at least 12")
    return texts


def _check_same_model(qparams, params, qdir, src) -> None:
    """The checkpoint holds the float model's tensors, in the same logical shapes."""
    from jax_bq.flax.rules import named_leaves
    from jax_bq.qtensor import QuantizedTensor

    def shapes(tree):
        out = {}
        for name, x in named_leaves(tree):
            if name.endswith("act_scale"):
                continue
            shape = tuple(x.shape)
            if isinstance(x, QuantizedTensor) and name.endswith("kernel"):
                shape = shape[::-1]  # stored [N, K], the Flax kernel is [K, N]
            out[name] = shape
        return out

    got, want = shapes(qparams), shapes(params)
    if got != want:
        diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        raise CommandError(
            f"{qdir} does not hold the model of {src}: {len(diff)} tensors differ "
            f"(e.g. {diff[0]}: {got.get(diff[0])} vs {want.get(diff[0])})"
        )


def run(args) -> int:
    """Embeds and prints the fidelity table."""
    from jax_bq.flax.rules import param_bytes
    from jax_bq.io import read_checkpoint
    from jax_bq.models.corpus import retrieval_split
    from jax_bq.models.fidelity import DEMO_VARIANTS, embedding_fidelity, evaluate
    from jax_bq.models.loading import SentenceEncoder, hf_bert_config, minilm

    src = model_dir(args.model_dir)
    texts = read_corpus(args.corpus, args.limit)
    n_q = args.queries or max(2, len(texts) // 6)
    if not 1 <= n_q <= len(texts) - 10:
        raise CommandError(f"--queries {n_q} must leave at least 10 of {len(texts)} texts")
    queries, corpus = retrieval_split(texts, n_q)
    t0 = time.perf_counter()
    enc = minilm(src)

    def is_kernel(name):
        return name.endswith("kernel")

    rows = []
    if args.quantized:
        qdir = Path(args.quantized)
        ck = read_checkpoint(qdir)
        config = hf_bert_config(qdir) if (qdir / "config.json").is_file() else enc.config
        _check_same_model(ck.params, enc.params, qdir, src)
        qenc = SentenceEncoder(config, ck.params, enc.tokenizer, enc.dtype, args.act_format,
                               args.act_granularity)  # fmt: skip
        with progress(total=2, desc="embed", unit="model") as bar:
            ref = enc.embed(corpus + queries)
            bar.update()
            emb = qenc.embed(corpus + queries)
            bar.update()
        m = embedding_fidelity(ref, emb, len(corpus))
        name = f"{qdir.name} ({ck.layout}, act {args.act_format})"
        rows.append({"variant": name, **m, "kernel_bytes": param_bytes(ck.params, is_kernel),
                     "kernel_bytes_fp32": param_bytes(enc.params, is_kernel)})  # fmt: skip
    else:
        with progress(total=len(DEMO_VARIANTS), desc="variants", unit="variant") as bar:

            def tick(name):
                bar.set_postfix_str(name)
                bar.update()

            result, _ = evaluate(enc, corpus, queries, DEMO_VARIANTS, progress=tick)
        for r in result:
            rows.append({"variant": r.name, "cosine": r.cosine, "min_cosine": r.min_cosine,
                         "pearson": r.pearson, "sim_pearson": r.sim_pearson, "top10": r.top10,
                         "kernel_bytes": r.kernel_bytes,
                         "kernel_bytes_fp32": r.kernel_bytes_fp32})  # fmt: skip
    seconds = time.perf_counter() - t0
    w = max(20, *(len(r["variant"]) for r in rows))
    head = (f"{'variant':{w}s} {'cosine':>9s} {'min cos':>8s} {'Pearson':>9s} {'sim r':>9s} "
            f"{'top-10':>7s} {'kernel MB':>10s} {'saved':>6s}")  # fmt: skip
    lines = [
        f"{src.name}: {len(corpus)} texts + {len(queries)} queries from {args.corpus}, "
        "each against the float32 model",
        head,
        "-" * len(head),
    ]
    for r in rows:
        saved = 1 - r["kernel_bytes"] / r["kernel_bytes_fp32"]
        r["saved"] = saved
        lines.append(
            f"{r['variant']:{w}s} {r['cosine']:9.6f} {r['min_cosine']:8.5f} {r['pearson']:9.6f} "
            f"{r['sim_pearson']:9.6f} {r['top10']:7.3f} {r['kernel_bytes'] / 1e6:10.2f} "
            f"{100 * saved:5.1f}%"
        )
    lines.append(f"({seconds:.1f} s)")
    emit(args, {"model_dir": str(src), "corpus": len(corpus), "queries": len(queries),
                "rows": rows, "seconds": seconds}, "\n".join(lines))  # fmt: skip
    return 0
