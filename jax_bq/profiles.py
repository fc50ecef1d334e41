"""Calibration profiles on disk: one safetensors file, verified before use.

Layout of a profile file (a standard safetensors file, no pickle anywhere):

* tensors ``"<i>.data"``, ``"<i>.scales"`` and, for NVFP4, ``"<i>.tensor_scale"``
  for the i-th calibrated weight, stored as raw bytes (uint8) with their dtype
  and shape in the metadata, so float8 codes and scales round-trip bit for bit;
* header metadata ``"jax_bq_profile"``: the JSON description (schema version,
  model id, format, UTC timestamp, config, checkpoint hash, per-tensor
  results, overall MSE, semantic correlation);
* header metadata ``"content_sha256"``: sha256 over that JSON text and every
  tensor's name and bytes in sorted order.

Writes go to a temporary file in the same directory, are fsynced and then
renamed over the target (atomic on POSIX), so concurrent writers leave one
complete profile, never a mixture. Loading refuses, with the reason, a file
that does not parse (truncated, garbled header), a checksum mismatch (any
flipped byte), another schema version, weights whose sha256 differs from the
recorded checkpoint hash, and a different calibration config.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass, field

import jax.numpy as jnp
import numpy as np

from jax_bq.calibration import CalibrationConfig, CalibrationResult, checkpoint_hash
from jax_bq.formats import QuantFormat
from jax_bq.qtensor import QuantizedTensor

SCHEMA_VERSION = 1
_META_KEY = "jax_bq_profile"
_HASH_KEY = "content_sha256"


class ProfileError(ValueError):
    """A profile that must not be used; the message says why."""


@dataclass
class ModelCalibrationProfile:
    """Calibration of a whole model (see module docstring for the file format).

    ``overall_mse_before``/``after`` are mean squared errors per element over
    all calibrated tensors; ``semantic_correlation`` is filled in by
    :func:`jax_bq.semantic.validate_semantic_alignment` users (None until then).
    """

    model_id: str
    format: QuantFormat
    created_utc: str
    checkpoint_hash: str
    config: CalibrationConfig
    results: dict[str, CalibrationResult] = field(repr=False)
    overall_mse_before: float
    overall_mse_after: float
    semantic_correlation: float | None = None
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def create(cls, model_id, config, results, checkpoint) -> ModelCalibrationProfile:
        """Builds a profile stamped with the current UTC time."""
        n = sum(r.numel for r in results.values())
        before = sum(r.mse_before * r.numel for r in results.values()) / max(n, 1)
        after = sum(r.mse_after * r.numel for r in results.values()) / max(n, 1)
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        return cls(model_id, config.format, now, checkpoint, config, results, before, after)

    @property
    def improvement(self) -> float:
        """``1 - overall_mse_after / overall_mse_before``."""
        if self.overall_mse_before == 0:
            return 0.0
        return 1.0 - self.overall_mse_after / self.overall_mse_before


def _result_meta(r: CalibrationResult) -> dict:
    return {
        **r.quantized.layout_record(),
        "name": r.name,
        "block_size": r.block_size,
        "mse_before": r.mse_before,
        "mse_after": r.mse_after,
        "clipped": r.clipped,
        "numel": r.numel,
        "block_scores": {str(k): v for k, v in r.block_scores.items()},
        "arrays": {},
    }


def _to_bytes(a) -> tuple[np.ndarray, dict]:
    arr = np.asarray(a)
    shape = list(arr.shape)  # ascontiguousarray turns 0-d arrays into 1-d ones
    raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    return raw, {"dtype": arr.dtype.name, "shape": shape}


def _from_bytes(raw: np.ndarray, info: dict) -> np.ndarray:
    dtype = np.dtype(jnp.dtype(info["dtype"]))
    return np.frombuffer(raw.tobytes(), dtype=dtype).reshape(info["shape"])


def _content_hash(meta_text: str, tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(meta_text.encode())
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(np.ascontiguousarray(tensors[name]).tobytes())
    return h.hexdigest()


def save_profile(profile: ModelCalibrationProfile, path: str | os.PathLike) -> None:
    """Writes ``profile`` atomically (temp file, fsync, rename, directory fsync)."""
    from safetensors.numpy import save

    tensors: dict[str, np.ndarray] = {}
    entries = []
    for i, r in enumerate(profile.results.values()):
        m = _result_meta(r)
        for part, arr in r.quantized.arrays().items():
            raw, info = _to_bytes(arr)
            key = f"{i}.{part}"
            tensors[key] = raw
            m["arrays"][part] = {"key": key, **info}
        entries.append(m)
    meta = {
        "schema_version": profile.schema_version,
        "model_id": profile.model_id,
        "format": profile.format.value,
        "created_utc": profile.created_utc,
        "checkpoint_hash": profile.checkpoint_hash,
        "config": profile.config.to_json(),
        "overall_mse_before": profile.overall_mse_before,
        "overall_mse_after": profile.overall_mse_after,
        "semantic_correlation": profile.semantic_correlation,
        "tensors": entries,
    }
    meta_text = json.dumps(meta, sort_keys=True)
    blob = save(
        tensors, metadata={_META_KEY: meta_text, _HASH_KEY: _content_hash(meta_text, tensors)}
    )
    from jax_bq.io.safetensors_file import write_atomic

    write_atomic(path, blob)


def _read(path) -> tuple[dict, dict[str, np.ndarray]]:
    from jax_bq.io.safetensors_file import CheckpointError, read_safetensors

    path = os.fspath(path)
    try:
        tensors, extra = read_safetensors(path)
    except CheckpointError as e:
        if not os.path.isfile(path):
            raise ProfileError(f"cannot read profile {path}: {e}") from e
        raise ProfileError(f"profile {path} is corrupt or truncated ({e})") from e
    try:
        meta_text, digest = extra[_META_KEY], extra[_HASH_KEY]
        meta = json.loads(meta_text)
    except (KeyError, ValueError) as e:  # no or unparsable profile record: a damaged file
        raise ProfileError(
            f"profile {path} is corrupt or truncated ({type(e).__name__}: {e})"
        ) from e
    if _content_hash(meta_text, tensors) != digest:
        raise ProfileError(f"profile {path} fails its sha256 check: the content was modified")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ProfileError(
            f"profile {path} has schema version {meta.get('schema_version')}, this jax_bq "
            f"reads {SCHEMA_VERSION}"
        )
    return meta, tensors


def _check_against(meta: dict, path, params, config) -> None:
    if params is not None:
        current = checkpoint_hash(params)
        if current != meta["checkpoint_hash"]:
            raise ProfileError(
                f"profile {path} was made for checkpoint {meta['checkpoint_hash'][:16]}..., "
                f"these weights hash to {current[:16]}...: the weights changed"
            )
    if config is not None and config.to_json() != meta["config"]:
        raise ProfileError(
            f"profile {path} was made with config {meta['config']}, not {config.to_json()}"
        )


def load_profile(path, params=None, config: CalibrationConfig | None = None):
    """Loads and verifies a profile; raises :class:`ProfileError` with the reason.

    Args:
        path: the profile file.
        params: if given, the weights must hash to the recorded checkpoint.
        config: if given, must equal the recorded calibration config.
    """
    meta, tensors = _read(path)
    _check_against(meta, path, params, config)
    results = {}
    for m in meta["tensors"]:
        parts = {k: jnp.asarray(_from_bytes(tensors[v["key"]], v)) for k, v in m["arrays"].items()}
        q = QuantizedTensor.from_record(m, **parts).validate()
        results[m["name"]] = CalibrationResult(
            name=m["name"],
            format=q.format,
            block_size=m["block_size"],
            quantized=q,
            mse_before=m["mse_before"],
            mse_after=m["mse_after"],
            clipped=m["clipped"],
            numel=m["numel"],
            block_scores={int(k): v for k, v in m["block_scores"].items()},
        )
    return ModelCalibrationProfile(
        model_id=meta["model_id"],
        format=QuantFormat.parse(meta["format"]),
        created_utc=meta["created_utc"],
        checkpoint_hash=meta["checkpoint_hash"],
        config=CalibrationConfig.from_json(meta["config"]),
        results=results,
        overall_mse_before=meta["overall_mse_before"],
        overall_mse_after=meta["overall_mse_after"],
        semantic_correlation=meta["semantic_correlation"],
        schema_version=meta["schema_version"],
    )


def profile_valid(path, params=None, config: CalibrationConfig | None = None):
    """``(True, "")`` if :func:`load_profile` would accept the file, else ``(False, reason)``."""
    try:
        meta, _ = _read(path)
        _check_against(meta, path, params, config)
    except ProfileError as e:
        return False, str(e)
    return True, ""
