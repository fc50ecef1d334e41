"""``jax-bq inspect PATH [--original MODEL_DIR]``: what a quantized checkpoint holds.

Per tensor: path, format, granularity/block, logical shape, bytes stored and
bytes as float32; with ``--original`` (the float model folder) also the SQNR
(``10 log10(sum x^2 / sum (x - dequant(q))^2)``, dB) and the MSE of each
quantized weight against the original.
"""

from __future__ import annotations

import math

import numpy as np

from jax_bq.commands.common import CommandError, emit, model_dir


def configure(p) -> None:
    """Arguments of ``inspect``."""
    p.add_argument("path", help="checkpoint folder or its model.safetensors")
    p.add_argument(
        "--original", metavar="MODEL_DIR", help="float model folder: SQNR/MSE per tensor"
    )
    p.add_argument("--json", action="store_true", help="print the table as JSON")


def run(args) -> int:
    """Reads, verifies and tabulates a checkpoint."""
    from jax_bq.io import read_checkpoint

    ck = read_checkpoint(args.path)
    original = _original_tensors(args.original) if args.original else None
    rows = _rows(ck.params, original)
    stored = sum(r["bytes"] for r in rows)
    as_f32 = sum(r["bytes_fp32"] for r in rows)
    result = {"path": str(ck.path), "layout": ck.layout, "sha256": ck.sha256,
              "file_bytes": ck.file_bytes, "bytes": stored, "bytes_fp32": as_f32,
              "tensors": rows}  # fmt: skip
    emit(args, result, _table(ck, rows, original is not None, stored, as_f32))
    return 0


def _original_tensors(folder: str) -> dict:
    """The float model's tensors by name (``--original``)."""
    import jax

    from jax_bq.flax.rules import path_name
    from jax_bq.models.loading import load_hf_bert

    params = load_hf_bert(model_dir(folder, "--original"))[1]
    return {path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _rows(params, original: dict | None) -> list[dict]:
    """One row per tensor: format, scaling, shape, bytes (and SQNR/MSE vs ``original``)."""
    import jax_bq
    from jax_bq.flax.rules import named_leaves

    rows = []
    for name, leaf in named_leaves(params):
        if isinstance(leaf, jax_bq.QuantizedTensor):
            nbytes, shape = leaf.nbytes, leaf.shape
            fmt = leaf.format.value
            how = leaf.granularity.value + (
                f" {'x'.join(map(str, leaf.block))}" if leaf.block else ""
            )
        else:
            shape = tuple(np.shape(leaf))
            nbytes = math.prod(shape) * np.dtype(leaf.dtype).itemsize
            fmt, how = np.dtype(leaf.dtype).name, ""
        row = {"tensor": name, "format": fmt, "scaling": how, "shape": list(shape),
               "bytes": nbytes, "bytes_fp32": 4 * math.prod(shape)}  # fmt: skip
        if original is not None and isinstance(leaf, jax_bq.QuantizedTensor):
            row |= _error_vs_original(name, leaf, original)
        rows.append(row)
    return rows


def _error_vs_original(name: str, leaf, original: dict) -> dict:
    """SQNR and MSE of the dequantized ``leaf`` against the float tensor ``name``."""
    import jax.numpy as jnp

    import jax_bq
    from jax_bq.flax.rules import kernel_to_nk

    if name not in original:
        raise CommandError(f"--original has no tensor {name} (different model?)")
    x = np.asarray(original[name], np.float32)
    if name.endswith("kernel"):  # Flax [K, N] -> the quantized [N, K]
        x = np.asarray(kernel_to_nk(x, 1, name))
    if x.shape != leaf.shape:
        raise CommandError(f"{name}: original shape {x.shape} is not {leaf.shape}")
    y = np.asarray(jax_bq.dequantize(leaf, jnp.float32))
    return {"sqnr_db": float(jax_bq.sqnr_db(x, y)), "mse": float(np.mean((x - y) ** 2))}


def _table(ck, rows: list[dict], extra: bool, stored: int, as_f32: int) -> str:
    """The human-readable table of :func:`run`."""
    w = max(len(r["tensor"]) for r in rows)
    head = f"{'tensor':{w}s} {'format':9s} {'scaling':15s} {'shape':>12s} {'bytes':>10s}" + (
        f" {'SQNR dB':>8s} {'MSE':>10s}" if extra else ""
    )
    lines = [
        f"{ck.path} ({ck.file_bytes / 1e6:.2f} MB, layout {ck.layout}, "
        + (f"sha256 {ck.sha256[:16]}... verified)" if ck.sha256 else "written by another tool)"),
        head,
        "-" * len(head),
    ]
    for r in rows:
        shape = "x".join(map(str, r["shape"])) or "scalar"
        line = (
            f"{r['tensor']:{w}s} {r['format']:9s} {r['scaling']:15s} {shape:>12s} {r['bytes']:10d}"
        )
        if "sqnr_db" in r:
            line += f" {r['sqnr_db']:8.2f} {r['mse']:10.3g}"
        lines.append(line)
    n_q = sum(1 for r in rows if r["scaling"])
    lines.append(
        f"{len(rows)} tensors ({n_q} quantized): {stored / 1e6:.2f} MB stored, "
        f"{as_f32 / 1e6:.2f} MB as float32 ({100 * (1 - stored / as_f32):.1f}% saved)"
    )
    return "\n".join(lines)
