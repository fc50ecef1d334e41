"""Saving and loading quantized param trees as safetensors checkpoints.

A checkpoint is a directory: ``model.safetensors`` + ``config.json`` (+
``hf_quant_config.json`` for the ModelOpt layout). Three layouts:

* ``"jax_bq"``: every leaf of any nested-dict param tree, every jax_bq format,
  granularity, block and stack; a :class:`QuantizedTensor` ``p`` is stored as
  ``p#data``, ``p#scales`` (and ``p#tensor_scale``) in their own dtypes.
* ``"compressed-tensors"`` and ``"modelopt"``: Hugging Face tensor names
  (:mod:`jax_bq.io.names`) and the tensors those projects define
  (:mod:`jax_bq.io.layouts`, docs/checkpoints.md), with
  ``quantization_config`` in ``config.json`` so that vLLM-style loaders read
  the weights.

Every file jax_bq writes records, in the safetensors ``__metadata__``, the
param tree (paths, QuantizedTensor static fields, original shapes) and a
sha256 over that record and every tensor's name, dtype, shape and bytes;
``config.json`` repeats the sha256. Loading recomputes it and refuses a file
whose content changed, so ``save -> load`` gives back the same bytes for every
array in every layout. Files written by other tools (no record) are imported
by their layout's conventions. Writes are atomic per file (temp file + fsync +
``os.replace``) and the safetensors file, written last, is what ``config.json``
must match, so an interrupted save is detected. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_bq.formats import QuantFormat
from jax_bq.io import layouts
from jax_bq.io.names import flax_to_hf, hf_to_flax_bert
from jax_bq.io.safetensors_file import CheckpointError, encode, read_safetensors, write_atomic
from jax_bq.qtensor import QuantizedTensor

__all__ = ["Checkpoint", "CheckpointError", "load_quantized", "read_checkpoint", "save_quantized"]

SCHEMA = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
HF_QUANT_CONFIG = "hf_quant_config.json"
_RECORD = "jax_bq.record"
_SHA = "jax_bq.sha256"


def _path_name(path) -> str:
    parts = []
    for p in path:
        if not isinstance(p, jax.tree_util.DictKey) or not isinstance(p.key, str):
            raise ValueError(
                f"save_quantized takes nested dicts with string keys (Flax params); got key {p!r}"
            )
        if "/" in p.key or "#" in p.key:
            raise ValueError(f"param key {p.key!r} contains '/' or '#'")
        parts.append(p.key)
    return "/".join(parts)


def _flatten(params) -> list[tuple[str, Any]]:
    leaves = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, QuantizedTensor)
    )[0]
    if not leaves:
        raise ValueError("params has no leaves")
    out = []
    for path, leaf in leaves:
        name = _path_name(path)
        if isinstance(leaf, QuantizedTensor):
            leaf.validate()
        elif not hasattr(leaf, "dtype"):
            raise ValueError(f"{name}: leaf of type {type(leaf).__name__} is not an array")
        out.append((name, leaf))
    return out


def _unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for name, leaf in flat.items():
        node = tree
        *heads, last = name.split("/")
        for h in heads:
            node = node.setdefault(h, {})
        node[last] = leaf
    return tree


def _sha256(record_text: str, tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(record_text.encode())
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"\0{name}\0{a.dtype.str}\0{list(a.shape)}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _qt_fields(q: QuantizedTensor) -> dict:
    return {
        **q.layout_record(),
        "data_shape": list(q.data.shape),
        "scales_shape": list(q.scales.shape),
    }


def _encode_jax_bq(flat):
    tensors, record = {}, {}
    for name, leaf in flat:
        if isinstance(leaf, QuantizedTensor):
            names = {}
            for part, arr in leaf.arrays().items():
                tensors[f"{name}#{part}"] = np.asarray(arr)
                names[part] = f"{name}#{part}"
            record[name] = {"kind": "qtensor", **_qt_fields(leaf), "tensors": names}
        else:
            tensors[name] = np.asarray(leaf)
            record[name] = {"kind": "array", "tensor": name, "shape": list(np.shape(leaf))}
    return tensors, record, None


def _encode_hf(flat, layout):
    hf = flax_to_hf([n for n, _ in flat])
    tensors, record = {}, {}
    schemes: dict[str, list] = {}  # json(scheme) -> modules
    float_modules = []
    act_scaled = {hf[n].module for n, leaf in flat if n.endswith("act_scale")}
    for name, leaf in flat:
        h = hf[name]
        if isinstance(leaf, QuantizedTensor):
            t, scheme = layouts.encode_weight(leaf, layout, h.module)
            entry = {"kind": "qtensor", **_qt_fields(leaf), "module": h.module}
            if leaf.format is QuantFormat.NVFP4 and layout == layouts.CT:
                bits = np.asarray(leaf.tensor_scale, np.float32).view(np.uint32)
                entry["tensor_scale_bits"] = int(bits.reshape(()))
            tensors.update(t)
            record[name] = entry
            if h.module in act_scaled:
                scheme = {**scheme, "input_activations": True}
            schemes.setdefault(json.dumps(scheme, sort_keys=True), []).append(h.module)
            continue
        arr = np.asarray(leaf)
        if name.endswith("act_scale"):
            arr = arr.reshape(1) if layout == layouts.CT else arr.reshape(())
        elif h.transpose:
            if arr.ndim != 2:
                raise ValueError(f"{name}: a float kernel of shape {arr.shape} is not [K, N]")
            arr = np.ascontiguousarray(arr.T)
            float_modules.append(h.module)
        tensors[h.tensor] = arr
        record[name] = {
            "kind": "array",
            "tensor": h.tensor,
            "shape": list(np.shape(leaf)),
            "transposed": bool(h.transpose),
        }
    if not schemes:
        raise ValueError(f"params hold no QuantizedTensor: nothing for a {layout} checkpoint")
    return tensors, record, (schemes, sorted(set(float_modules)))


def _ct_config(schemes, ignore) -> dict:
    groups, formats = {}, set()
    for i, (key, modules) in enumerate(sorted(schemes.items(), key=lambda kv: kv[1])):
        s = json.loads(key)
        inputs, fmt = None, s["format"]
        if s.get("input_activations"):
            inputs = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                      "symmetric": True}  # fmt: skip
        elif fmt == "float-quantized":
            fmt = "naive-quantized"  # FP8 weight-only: what compressed-tensors infers
        formats.add(fmt)
        groups[f"group_{i}"] = {
            "targets": sorted(modules),
            "weights": s["weights"],
            "input_activations": inputs,
            "output_activations": None,
            "format": fmt,
        }
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


def _modelopt_config(schemes, ignore) -> tuple[dict, dict]:
    algos = {json.loads(k)["quant_algo"] for k in schemes}
    if len(algos) != 1:
        raise ValueError(
            f"the modelopt layout holds one quant_algo per checkpoint, these params need "
            f"{sorted(algos)}; use layout='compressed-tensors' or 'jax_bq' for mixed formats"
        )
    s = json.loads(next(iter(schemes)))
    quant = {
        "quant_algo": s["quant_algo"],
        "kv_cache_quant_algo": None,
        "exclude_modules": ignore,
    }
    if "group_size" in s:
        quant["group_size"] = s["group_size"]
    hf_quant = {"producer": {"name": "modelopt", "version": "unified-hf (jax_bq writer)"},
                "quantization": quant}  # fmt: skip
    cfg = {"quant_method": "modelopt", **{k: v for k, v in quant.items() if k != "exclude_modules"},
           "ignore": ignore}  # fmt: skip
    return cfg, hf_quant


def save_quantized(
    path: str | os.PathLike,
    params,
    *,
    layout: str = "jax_bq",
    hf_config: dict | None = None,
    metadata: dict | None = None,
) -> Path:
    """Saves a (quantized) param tree as a safetensors checkpoint directory.

    Args:
        path: output directory (created; files in it are replaced atomically).
        params: nested dicts of arrays and :class:`jax_bq.QuantizedTensor`
            leaves, e.g. the output of :func:`jax_bq.flax.quantize_model_weights`.
        layout: ``"jax_bq"`` (everything, exactly), ``"compressed-tensors"``
            or ``"modelopt"`` (Hugging Face names; see :mod:`jax_bq.io.layouts`
            for which formats each holds).
        hf_config: the source model's ``config.json`` dict; copied into the
            output's ``config.json`` with ``quantization_config`` added.
        metadata: JSON-serializable extra information recorded in the file.

    Returns:
        The path of the written ``model.safetensors``.

    Raises:
        ValueError: params that are not nested dicts of arrays, a format the
            layout cannot hold (named), or an unknown layout.
    """
    if layout not in layouts.LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {layouts.LAYOUTS}")
    flat = _flatten(params)
    if layout == layouts.JAX_BQ:
        tensors, record, extra = _encode_jax_bq(flat)
    else:
        tensors, record, extra = _encode_hf(flat, layout)
    rec = {"schema": SCHEMA, "layout": layout, "leaves": record, "user": metadata or {}}
    record_text = json.dumps(rec, sort_keys=True)
    sha = _sha256(record_text, tensors)
    blob = encode(tensors, {"format": "pt", _RECORD: record_text, _SHA: sha})
    config = dict(hf_config or {})
    hf_quant = None
    if layout == layouts.JAX_BQ:
        config["quantization_config"] = {"quant_method": "jax_bq", "schema": SCHEMA}
    elif layout == layouts.CT:
        config["quantization_config"] = _ct_config(*extra)
    else:
        config["quantization_config"], hf_quant = _modelopt_config(*extra)
    config["jax_bq_checkpoint"] = {"file": WEIGHTS, "layout": layout, "sha256": sha}
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    write_atomic(out / CONFIG, (json.dumps(config, indent=2) + "\n").encode())
    if hf_quant is not None:
        write_atomic(out / HF_QUANT_CONFIG, (json.dumps(hf_quant, indent=2) + "\n").encode())
    write_atomic(out / WEIGHTS, blob)
    return out / WEIGHTS


@dataclass
class Checkpoint:
    """A loaded checkpoint: the param tree and what the files say about it."""

    params: dict
    layout: str
    path: Path
    sha256: str | None  # None for files jax_bq did not write
    config: dict = field(default_factory=dict)
    user: dict = field(default_factory=dict)
    file_bytes: int = 0


def _locate(path) -> tuple[Path, Path]:
    p = Path(path)
    if p.is_dir():
        d, f = p, p / WEIGHTS
    else:
        d, f = p.parent, p
    if not f.is_file():
        raise CheckpointError(f"no checkpoint at {path}: {f} does not exist")
    return d, f


def _read_json(p: Path) -> dict:
    if not p.is_file():
        return {}
    try:
        v = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p} is not valid JSON ({e})") from None
    if not isinstance(v, dict):
        raise CheckpointError(f"{p} does not hold a JSON object")
    return v


def _decode_recorded(rec: dict, tensors, layout, f) -> dict:
    flat = {}
    try:
        for name, e in rec["leaves"].items():
            if e["kind"] == "array":
                a = tensors[e["tensor"]]
                if e.get("transposed"):
                    a = a.T
                flat[name] = jnp.asarray(a.reshape(e["shape"]))
                continue
            if layout == layouts.JAX_BQ:
                parts = {k: jnp.asarray(tensors[v]) for k, v in e["tensors"].items()}
                q = QuantizedTensor.from_record(e, **parts)
            else:
                args = {"strategy": {"tile_2d": "block", "per_block": "group"}.get(
                    e["granularity"]), "block_structure": e["block"],
                    "group_size": (e["block"] or [0])[0]}  # fmt: skip
                if e["granularity"] in ("per_tensor", "per_channel"):
                    args = {"strategy": e["granularity"][4:]}
                q = layouts.decode_weight(
                    tensors, layout, e["module"], args, jnp.dtype(e["dtype"]),
                    e.get("tensor_scale_bits"),
                )  # fmt: skip
                q = QuantizedTensor.from_record(
                    e, q.data, q.scales.reshape(e["scales_shape"]), q.tensor_scale
                )
            flat[name] = q.validate()
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{f}: its record does not match its tensors ({err})") from None
    return _unflatten(flat)


def _ct_args_by_module(qcfg: dict) -> dict[str, dict]:
    out = {}
    for g in (qcfg.get("config_groups") or {}).values():
        for t in g.get("targets") or []:
            out[t] = g.get("weights") or {}
    return out


def _decode_foreign(tensors, layout, config, f) -> dict:
    qcfg = config.get("quantization_config") or {}
    by_module = _ct_args_by_module(qcfg) if layout == layouts.CT else {}
    default_args = next(iter(by_module.values()), {}) if len(
        {json.dumps(v, sort_keys=True) for v in by_module.values()}) == 1 else {}  # fmt: skip
    modules = sorted({n.rsplit(".", 1)[0] for n in tensors if n.endswith(".weight_scale")})
    flat: dict[str, Any] = {}
    used = set()
    for m in modules:
        try:
            q = layouts.decode_weight(tensors, layout, m, by_module.get(m, default_args))
        except ValueError as e:
            raise CheckpointError(f"{f}: {e}") from None
        flat[f"{m}.weight"] = q
        used |= {n for n in tensors if n.startswith(m + ".weight")}
    for n, a in tensors.items():
        if n not in used:
            flat[n] = a
    # BERT names -> BertEncoder params; anything else stays a flat dict of HF names.
    mapped = {}
    for n, leaf in flat.items():
        mod, _, leaf_name = n.rpartition(".")
        p = hf_to_flax_bert(mod, leaf_name)
        if p is None:
            if n.endswith("position_ids") or ".pooler." in f".{n}":
                continue
            return {n: leaf if isinstance(leaf, QuantizedTensor) else jnp.asarray(leaf)
                    for n, leaf in flat.items()}  # fmt: skip
        if not isinstance(leaf, QuantizedTensor):
            leaf = jnp.asarray(leaf.T if p.endswith("/kernel") else leaf)
            if p.endswith("act_scale"):
                leaf = leaf.reshape(())
        mapped[p] = leaf
    return _unflatten(mapped)


def _detect_layout(config: dict, hf_quant: dict) -> str:
    method = (config.get("quantization_config") or {}).get("quant_method", "")
    if method in ("compressed-tensors", "compressed_tensors"):
        return layouts.CT
    if method.startswith("modelopt") or hf_quant.get("producer", {}).get("name") == "modelopt":
        return layouts.MODELOPT
    if method == "jax_bq":
        return layouts.JAX_BQ
    raise CheckpointError(
        f"cannot tell the layout: config.json quantization_config.quant_method is {method!r} "
        "(expected jax_bq, compressed-tensors or modelopt)"
    )


def read_checkpoint(path: str | os.PathLike, *, verify: bool = True) -> Checkpoint:
    """Loads a checkpoint directory (or its ``model.safetensors``) with what it records.

    Raises:
        CheckpointError: missing, truncated, tampered (sha256 mismatch) or
            unreadable files, with one line naming the file and the problem.
    """
    d, f = _locate(path)
    tensors, meta = read_safetensors(f)
    config = _read_json(d / CONFIG)
    hf_quant = _read_json(d / HF_QUANT_CONFIG)
    record_text, sha = meta.get(_RECORD), meta.get(_SHA)
    if record_text is not None:
        if sha is None or _sha256(record_text, tensors) != sha:
            raise CheckpointError(f"{f} fails its sha256 check: the content was modified")
        want = (config.get("jax_bq_checkpoint") or {}).get("sha256")
        if verify and want is not None and want != sha:
            raise CheckpointError(
                f"{d / CONFIG} records sha256 {want[:12]}..., {f.name} has {sha[:12]}...: "
                "the files come from different saves"
            )
        try:
            rec = json.loads(record_text)
            layout = rec["layout"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{f}: unreadable jax_bq record ({e})") from None
        if rec.get("schema") != SCHEMA:
            raise CheckpointError(f"{f} has schema {rec.get('schema')}, this jax_bq reads {SCHEMA}")
        params = _decode_recorded(rec, tensors, layout, f)
        user = rec.get("user") or {}
    else:
        if verify and (config.get("jax_bq_checkpoint") or {}).get("sha256"):
            raise CheckpointError(f"{f} lost its jax_bq record but config.json expects one")
        layout = _detect_layout(config, hf_quant)
        if layout == layouts.JAX_BQ:
            raise CheckpointError(f"{f} claims the jax_bq layout but has no jax_bq record")
        params, user = _decode_foreign(tensors, layout, config, f), {}
    return Checkpoint(params, layout, f, sha, config, user, f.stat().st_size)


def load_quantized(path: str | os.PathLike, *, verify: bool = True):
    """Loads the param tree of a checkpoint written by :func:`save_quantized` or another tool.

    Files jax_bq wrote come back exactly as saved (same tree, same bytes,
    same QuantizedTensor fields), after their sha256 is checked. Other
    compressed-tensors / ModelOpt files are imported by those layouts'
    conventions: BERT tensor names become :class:`jax_bq.models.BertEncoder`
    params, anything else a flat dict keyed by tensor (``<module>.weight``
    for quantized weights) name.

    Args:
        path: checkpoint directory or its ``model.safetensors``.
        verify: also require ``config.json``'s recorded sha256 to match.

    Raises:
        CheckpointError: (a ``ValueError``) missing, truncated, tampered or
            unrecognised files.
    """
    return read_checkpoint(path, verify=verify).params
