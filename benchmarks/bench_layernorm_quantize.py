"""Fused residual + LayerNorm + FP8 quantize on the GPU vs XLA's own fusion of the same jnp.

Per M in {4096, 16384}, H = 1024, bf16 x and residual (the BERT-large /
E5-large post-LN step): ``jax_bq.layernorm_quantize`` with a static scale,
dynamic per-token and dynamic per-tensor scales, against XLA fusing the
jnp spelling (``x + r`` in bf16, LayerNorm in float32, bf16 ``y`` plus
``quantize_static`` codes of the float32 result) and against a bf16 LayerNorm
alone (no codes). Device time and span per call from a profiler trace
(``common.device_time_per_call``, medians over calls), inputs rotated among
copies totalling >= 128 MB so that L2 (60 MB on the H200) holds none of them.
GB/s counts the bytes the op must move: x and residual read once (2 + 2
bytes per element), y written (2) and codes written (1); the dynamic
per-tensor path re-reads x and residual, which the count leaves out (it is
the cost of that mode). Also reports the share of FP8 codes where XLA's
fusion differs from jax_bq's pinned numerics (XLA contracts to FMA and sums
in its own order; differences are 1-code rounding-boundary cases).

Usage: jax-bq bench layernorm_quantize --out FILE.json  (writes FILE.md too)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jax_bq  # noqa: E402
from benchmarks import common  # noqa: E402
from jax_bq.static import quantize_static  # noqa: E402

H = 1024
SCALE = 2.0**-5
EPS = 1e-12


def xla_fused(x, r, gamma, beta):
    """The unfused model's jnp, which XLA fuses as it likes."""
    s = (x + r).astype(jnp.float32)
    mean = jnp.mean(s, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(s - mean), axis=-1, keepdims=True)
    y32 = (s - mean) * jax.lax.rsqrt(var + EPS) * gamma + beta
    q = quantize_static(y32, SCALE, exact_scale=True)
    return q.data, y32.astype(x.dtype)


def xla_ln_only(x, r, gamma, beta):
    s = (x + r).astype(jnp.float32)
    mean = jnp.mean(s, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(s - mean), axis=-1, keepdims=True)
    return ((s - mean) * jax.lax.rsqrt(var + EPS) * gamma + beta).astype(x.dtype)


def variants():
    def ours(**kw):
        def f(x, r, gamma, beta):
            q, y = jax_bq.layernorm_quantize(x, gamma, beta, residual=r, eps=EPS, **kw)
            return q.data, q.scales, y

        return f

    return {
        "jax_bq static": ours(scale=SCALE, exact_scale=True),
        "jax_bq per-token": ours(granularity="per_token"),
        "jax_bq per-tensor (dynamic)": ours(granularity="per_tensor"),
        "XLA jnp LN + static quantize": xla_fused,
        "XLA jnp LN only (bf16 out, no codes)": xla_ln_only,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON output path (a .md table is written beside)")
    ap.add_argument("--calls", type=int, default=30)
    args = ap.parse_args()
    if jax.devices()[0].platform != "gpu":
        raise SystemExit("bench_layernorm_quantize needs a GPU (jax.devices() has none)")
    rng = np.random.default_rng(0)
    gamma = jnp.asarray(rng.standard_normal(H).astype(np.float32))
    beta = jnp.asarray(rng.standard_normal(H).astype(np.float32) * 0.5)
    rows = []
    for m in (4096, 16384):
        copies = max(2, -(-128 * 2**20 // (m * H * 4)))
        sets = [
            (
                jnp.asarray(rng.standard_normal((m, H)) * 3, jnp.bfloat16),
                jnp.asarray(rng.standard_normal((m, H)), jnp.bfloat16),
                gamma,
                beta,
            )
            for _ in range(copies)
        ]
        moved = m * H * (2 + 2 + 2 + 1)
        ref_codes = None
        for name, fn in variants().items():
            jf = jax.jit(fn)
            t = common.device_time_per_call(jf, sets, calls=args.calls)
            row = {
                "M": m,
                "H": H,
                "variant": name,
                "device_us": t["us"],
                "span_us": t["span_us"],
                "kernels": t["kernels"],
                "GB/s": moved / (t["us"] * 1e-6) / 1e9,
                "kernel_names": ", ".join(t["names"]),
            }
            out = jf(*sets[0])
            codes = np.asarray(out[0]).view(np.uint8) if isinstance(out, tuple) else None
            if name == "jax_bq static":
                ref_codes = codes
            elif name.startswith("XLA jnp LN + static") and ref_codes is not None:
                diff = np.abs(codes.view(np.int8).astype(int) - ref_codes.view(np.int8).astype(int))
                row["codes_differing_from_jax_bq"] = float((diff > 0).mean())
                row["max_code_diff"] = int(diff.max())
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "kernel_names"}), flush=True)
    for r in rows:
        base = next(b for b in rows if b["M"] == r["M"] and b["variant"].startswith("XLA jnp LN +"))
        r["speedup_vs_xla"] = base["device_us"] / r["device_us"]
    meta = common.machine()
    out = Path(args.out)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    cols = [
        ("M", "M"),
        ("variant", "variant"),
        ("device_us", "device µs"),
        ("span_us", "span µs"),
        ("kernels", "kernels"),
        ("GB/s", "GB/s (7 B/elt)"),
        ("speedup_vs_xla", "× XLA LN+quantize"),
        ("codes_differing_from_jax_bq", "codes ≠ jax_bq"),
    ]
    lines = ["| " + " | ".join(t for _, t in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [
            f"{r[k]:.3g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k, _ in cols
        ]
        lines.append("| " + " | ".join(cells) + " |")
    md = f"# layernorm_quantize (H = {H}, bf16)\n\n" + "\n".join(
        f"- {k}: {v}" for k, v in meta.items()
    )
    out.with_suffix(".md").write_text(md + "\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
