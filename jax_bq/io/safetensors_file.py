"""Reading and writing the safetensors container, strictly and atomically.

The file is ``u64 header length (little endian) | JSON header | data``; the
header maps each tensor name to ``{"dtype", "shape", "data_offsets"}`` (byte
offsets into the data section) and may hold ``"__metadata__"``, a
string-to-string map. This module writes and reads that container itself
because the ``safetensors`` package's numpy and flax bindings cannot map the
float8 and bfloat16 dtype codes (``F8_E4M3``, ``F8_E5M2``, ``F8_E8M0``,
``BF16``) to ml_dtypes arrays; the bytes it writes are the standard format,
which ``safetensors.safe_open`` reads (tests check it).

Reading rejects, with :class:`CheckpointError`, every inconsistency instead of
returning garbage: a short file, a header that is not JSON, unknown dtypes,
offsets that overlap, leave holes, disagree with the shape, or end past the
file.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import ml_dtypes
import numpy as np

__all__ = ["CheckpointError", "DTYPE_CODES", "read_safetensors", "write_atomic", "encode"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as written: missing, truncated, tampered or foreign."""


#: safetensors dtype code -> numpy dtype.
DTYPE_CODES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODE_OF = {v: k for k, v in DTYPE_CODES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def encode(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors bytes of ``tensors`` (in sorted name order) and ``metadata``.

    Raises:
        ValueError: a dtype safetensors has no code for, or non-string metadata.
    """
    header: dict = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    chunks, offset = [], 0
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        code = _CODE_OF.get(arr.dtype)
        if code is None:
            raise ValueError(f"tensor {name!r}: dtype {arr.dtype} has no safetensors code")
        raw = np.ascontiguousarray(arr).tobytes()
        header[name] = {
            "dtype": code,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def write_atomic(path: str | os.PathLike, blob: bytes) -> None:
    """Writes ``blob`` to ``path`` via a temp file in the same folder, fsync and rename.

    A reader sees the old file or the new one, never a partial one; on any
    error the temp file is removed.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".jax_bq_tmp.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, validated.

    Raises:
        CheckpointError: missing file, truncated or malformed content (the
            message names the file and what is wrong).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if len(blob) < 8:
        raise CheckpointError(f"{path} is not a safetensors file ({len(blob)} bytes)")
    n = int.from_bytes(blob[:8], "little")
    if n > _MAX_HEADER or 8 + n > len(blob):
        raise CheckpointError(
            f"{path} is truncated or not a safetensors file (header of {n} bytes, "
            f"file of {len(blob)})"
        )
    try:
        header = json.loads(blob[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} has a corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header (not an object)")
    metadata = header.pop("__metadata__", None) or {}
    data = memoryview(blob)[8 + n :]
    spans, tensors = [], {}
    for name, info in header.items():
        try:
            dtype = DTYPE_CODES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {name!r} has a bad header entry ({e})") from None
        if end - start != math.prod(shape) * dtype.itemsize or start < 0:
            raise CheckpointError(
                f"{path}: tensor {name!r} {info['dtype']} {list(shape)} does not fit its "
                f"byte range [{start}, {end})"
            )
        if end > len(data):
            raise CheckpointError(
                f"{path} is truncated: tensor {name!r} ends at byte {end} of a "
                f"{len(data)}-byte data section"
            )
        spans.append((start, end))
        tensors[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(shape)
    spans.sort()
    pos = 0
    for start, end in spans:
        if start != pos:
            raise CheckpointError(f"{path}: tensor data overlaps or leaves a hole at byte {pos}")
        pos = end
    if pos != len(data):
        raise CheckpointError(
            f"{path}: {len(data) - pos} bytes after the last tensor (damaged or foreign file)"
        )
    return tensors, metadata
