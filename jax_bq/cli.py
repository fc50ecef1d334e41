"""``jax-bq`` command line: ``info`` and ``demo``."""

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


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``jax-bq`` / ``python -m jax_bq``."""
    parser = argparse.ArgumentParser(prog="jax-bq", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, built modules and native formats per device")
    p_demo = sub.add_parser("demo", help="quantize sample tensors in every format")
    p_demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.cmd == "info":
        from jax_bq import capabilities

        print(capabilities.report())
    else:
        print(
            "jax_bq demo: bf16 tensors quantized in every format (block defaults: FP8 128, "
            "FP4 32, NVFP4 16, MX 32), dequantized back to float32.\n"
        )
        print(demo(args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
