"""``jax-bq quantize MODEL_DIR OUT_DIR``: a Hugging Face BERT-family checkpoint -> quantized.

The dense kernels (``*/kernel``) are quantized by ``--format`` (or by the
rules of ``--rules FILE``), and the result is saved with
:func:`jax_bq.io.save_quantized` in ``--layout`` together with the source's
``config.json`` and tokenizer/pooling files, so ``OUT_DIR`` is itself a model
folder that ``jax-bq eval`` and ``jax-bq inspect`` read.

``--rules FILE`` is JSON: a list of ``[pattern, spec]`` pairs, first match wins
(:func:`jax_bq.flax.quantize_model_weights`); ``spec`` is a format name,
``"bf16"``/``"fp16"`` (cast, not quantized), ``null`` (kept) or an object
``{"format", "granularity", "block_size", "calibrate"}``. Example::

    [["layer_0/.*/kernel", null], ["kernel$", {"format": "nvfp4", "calibrate": true}]]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from jax_bq.commands.common import CommandError, copy_side_files, emit, model_dir, progress

FORMATS = ("fp8", "fp8_e4m3", "fp8_e5m2", "fp4", "nvfp4", "mxfp8", "mxfp4")


def configure(p) -> None:
    """Arguments of ``quantize``."""
    p.add_argument(
        "model_dir", help="Hugging Face BERT-family folder (config.json, model.safetensors)"
    )
    p.add_argument("out_dir", help="output folder (created; files replaced atomically)")
    p.add_argument("--format", default="nvfp4", help=f"weight format: {', '.join(FORMATS)}")
    p.add_argument(
        "--granularity",
        default=None,
        help="per_tensor | per_channel | per_block | tile_2d (default: the format's)",
    )
    p.add_argument("--block-size", type=int, default=None, help="block along K for per_block")
    p.add_argument("--calibrate", action="store_true", help="MSE-calibrated block scales")
    p.add_argument("--rules", metavar="FILE", help="JSON [pattern, spec] rules (see module doc)")
    p.add_argument(
        "--layout",
        default="jax_bq",
        choices=("jax_bq", "compressed-tensors", "modelopt"),
        help="file layout (default jax_bq: every format; others for vLLM-style loaders)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _spec(obj, where: str):
    from jax_bq.flax.rules import WeightQuant

    if obj is None or isinstance(obj, str):
        return "fp8_e4m3" if obj == "fp8" else obj
    if isinstance(obj, dict):
        unknown = set(obj) - {"format", "granularity", "block_size", "calibrate"}
        if "format" not in obj or unknown:
            raise CommandError(f"{where}: a spec object needs 'format' (unknown keys {unknown})")
        fmt = "fp8_e4m3" if obj["format"] == "fp8" else obj["format"]
        return WeightQuant(fmt, obj.get("granularity"), obj.get("block_size"),
                           bool(obj.get("calibrate", False)))  # fmt: skip
    raise CommandError(f"{where}: spec must be a format name, null or an object, got {obj!r}")


def load_rules(path: str) -> list:
    """The ``[pattern, spec]`` rules of a JSON file."""
    p = Path(path)
    if not p.is_file():
        raise CommandError(f"rules file {path} does not exist")
    try:
        raw = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CommandError(f"rules file {path} is not valid JSON: {e}") from None
    if not isinstance(raw, list) or not all(isinstance(r, list) and len(r) == 2 for r in raw):
        raise CommandError(f"rules file {path} must hold a list of [pattern, spec] pairs")
    return [(str(pat), _spec(spec, f"{path} rule {i}")) for i, (pat, spec) in enumerate(raw)]


def run(args) -> int:
    """Loads, quantizes, saves; prints a summary."""
    import jax

    from jax_bq.flax.rules import WeightQuant, param_bytes, quantize_model_weights
    from jax_bq.io import save_quantized
    from jax_bq.models.loading import load_hf_bert

    src = model_dir(args.model_dir)
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise CommandError(f"output {out} exists and is not a folder")
    if out.resolve() == src.resolve():
        raise CommandError("OUT_DIR must differ from MODEL_DIR (the float weights would be lost)")
    fmt = "fp8_e4m3" if args.format == "fp8" else args.format
    if args.rules:
        rules = load_rules(args.rules)
    else:
        rules = [("kernel$", WeightQuant(fmt, args.granularity, args.block_size, args.calibrate))]
    t0 = time.perf_counter()
    with progress(total=3, desc="quantize", unit="step") as bar:
        bar.set_postfix_str("load")
        config, params = load_hf_bert(src)
        bar.update()
        bar.set_postfix_str("quantize" + (" + calibrate" if args.calibrate else ""))
        qparams = quantize_model_weights(params, rules)
        jax.block_until_ready(qparams)
        bar.update()
        bar.set_postfix_str("write")
        hf_config = json.loads((src / "config.json").read_text())
        meta = {"source": str(src), "format": fmt, "calibrate": args.calibrate,
                "rules": args.rules and Path(args.rules).read_text()}  # fmt: skip
        f = save_quantized(out, qparams, layout=args.layout, hf_config=hf_config, metadata=meta)
        copied = copy_side_files(src, out)
        bar.update()
    seconds = time.perf_counter() - t0

    def is_kernel(name):
        return name.endswith("kernel")

    fp32, qbytes = param_bytes(params, is_kernel), param_bytes(qparams, is_kernel)
    leaves = jax.tree_util.tree_leaves(
        qparams, is_leaf=lambda x: type(x).__name__ == "QuantizedTensor"
    )
    n_q = sum(type(x).__name__ == "QuantizedTensor" for x in leaves)
    result = {
        "model_dir": str(src),
        "out_dir": str(out),
        "file": str(f),
        "file_bytes": f.stat().st_size,
        "layout": args.layout,
        "format": fmt,
        "calibrate": args.calibrate,
        "quantized_tensors": n_q,
        "kernel_bytes_fp32": fp32,
        "kernel_bytes_quantized": qbytes,
        "kernel_bytes_saved": 1 - qbytes / fp32,
        "copied": copied,
        "seconds": seconds,
    }
    text = (
        f"quantized {n_q} kernels of {src.name} to {fmt}"
        + (" (calibrated)" if args.calibrate else "")
        + f": {fp32 / 1e6:.2f} MB float32 -> {qbytes / 1e6:.2f} MB "
        f"({100 * (1 - qbytes / fp32):.1f}% saved)\n"
        f"wrote {f} ({f.stat().st_size / 1e6:.2f} MB, layout {args.layout}) + config.json"
        + (f" + {len(copied)} tokenizer/pooling files" if copied else "")
        + f" in {seconds:.1f} s"
    )
    emit(args, result, text)
    return 0
