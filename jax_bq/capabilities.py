"""What this machine can run natively, each answer with its reason.

Probes run once per device (:func:`device_caps`). The tensor-core table, the
first rungs of the qmatmul ladder (:mod:`jax_bq.ladder`):

==========================  ======================================================
compute capability          native low-precision matmul
==========================  ======================================================
10.x (datacenter Blackwell) FP8 (E4M3/E5M2), MXFP8, MXFP4, NVFP4 (tcgen05)
12.x (consumer Blackwell)   FP8, MXFP8, MXFP4, NVFP4 (mma.sync block-scaled); a
                            separate row: not "SM >= 10"
8.9 / 9.0 (Ada / Hopper)    FP8 (E4M3/E5M2) only
below 8.9, CPU              none: quantized weights are dequantized for matmuls
==========================  ======================================================
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import jax
import jaxlib.version

from jax_bq import _native
from jax_bq.config import ENV_FORCE_FALLBACK, forced_fallback
from jax_bq.formats import QUANTIZED_FORMATS, QuantFormat

_FP8 = (QuantFormat.FP8_E4M3, QuantFormat.FP8_E5M2)
_BLACKWELL = _FP8 + (QuantFormat.MXFP8, QuantFormat.MXFP4, QuantFormat.NVFP4)


@dataclass(frozen=True)
class Capability:
    """A yes/no answer and why."""

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


def compute_capability(device: jax.Device | None = None) -> tuple[int, int] | None:
    """``(major, minor)`` of a CUDA device, or None for CPU and other platforms."""
    device = device or jax.devices()[0]
    cc = getattr(device, "compute_capability", None)
    if device.platform != "gpu" or not cc:
        return None
    major, minor = (int(p) for p in str(cc).split(".")[:2])
    return major, minor


def _row(cc: tuple[int, int] | None) -> tuple[tuple[QuantFormat, ...], str]:
    if cc is None:
        return (), "no low-precision tensor cores (not a CUDA GPU)"
    if cc[0] == 10:
        return _BLACKWELL, f"SM {cc[0]}.{cc[1]} (datacenter Blackwell)"
    if cc[0] == 12:
        return _BLACKWELL, f"SM {cc[0]}.{cc[1]} (consumer Blackwell)"
    if cc >= (8, 9):
        return _FP8, f"SM {cc[0]}.{cc[1]} has FP8 tensor cores only"
    return (), f"SM {cc[0]}.{cc[1]} has no FP8 tensor cores (needs SM >= 8.9)"


@dataclass(frozen=True)
class DeviceCaps:
    """What one device offers the qmatmul ladder, probed once (:func:`device_caps`).

    Attributes:
        platform: ``"gpu"``, ``"cpu"``...
        compute_capability: ``(major, minor)`` of a CUDA device, else None.
        index: the device's local hardware id (what cuBLASLt calls the device).
        cuda_module: whether jax_bq's CUDA kernels are loaded, and why (not).
        tensor_cores: per quantized format, whether the device multiplies it
            natively, and why (not). Hardware only: ``JAX_BQ_FORCE_FALLBACK``
            is read per call by :func:`native_matmul` and the ladder.
    """

    platform: str
    compute_capability: tuple[int, int] | None
    index: int
    cuda_module: Capability
    tensor_cores: tuple[tuple[QuantFormat, Capability], ...]

    def native(self, fmt: QuantFormat) -> Capability:
        """The tensor-core answer for ``fmt`` (a quantized format)."""
        return dict(self.tensor_cores)[fmt]


@functools.cache
def device_caps(device: jax.Device) -> DeviceCaps:
    """The :class:`DeviceCaps` of ``device`` (probed on the first call, then cached)."""
    cc = compute_capability(device)
    native, why = _row(cc)
    cuda = _native.CUDA
    return DeviceCaps(
        platform=device.platform,
        compute_capability=cc,
        index=int(getattr(device, "local_hardware_id", None) or device.id),
        cuda_module=Capability(cuda.loaded, cuda.reason),
        tensor_cores=tuple(
            (f, Capability(f in native, f"native on {why}" if f in native else why))
            for f in QUANTIZED_FORMATS
        ),
    )


def native_matmul(fmt: QuantFormat | str, device: jax.Device | None = None) -> Capability:
    """Whether ``device`` has tensor cores for ``fmt`` (the first rung of the ladder)."""
    fmt = QuantFormat.parse(fmt)
    if not fmt.is_quantized:
        return Capability(True, f"{fmt.value} is the unquantized baseline")
    if forced_fallback("qmatmul"):
        return Capability(False, f"forced off by {ENV_FORCE_FALLBACK}")
    return device_caps(device or jax.devices()[0]).native(fmt)


def kernels(platform: str) -> Capability:
    """Whether jax_bq's quantize/dequantize kernels run on ``platform`` ('cpu'/'gpu')."""
    mod = _native.CPU if platform == "cpu" else _native.CUDA
    if forced_fallback("quantize") and forced_fallback("dequantize"):
        return Capability(False, f"forced to the jnp twin by {ENV_FORCE_FALLBACK}")
    if mod.loaded:
        return Capability(True, f"{mod.name}: {mod.reason}")
    return Capability(False, f"jnp twin; {mod.name} {mod.reason}")


def report() -> str:
    """Human-readable summary used by ``jax-bq info``."""
    lines = [
        f"jax {jax.__version__}, jaxlib {jaxlib.version.__version__}",
        f"backends: {', '.join(sorted({d.platform for d in jax.devices()}))} "
        f"(default {jax.default_backend()})",
        f"{ENV_FORCE_FALLBACK}={os.environ.get(ENV_FORCE_FALLBACK, '') or '(unset)'}",
        "",
        "modules:",
    ]
    for mod in (_native.CPU, _native.CUDA):
        state = "loaded" if mod.loaded else "missing"
        lines.append(f"  {mod.name:14s} {state}: {mod.reason}")
    lines.append("")
    lines.append("kernels: cpu: " + kernels("cpu").reason)
    lines.append("         gpu: " + kernels("gpu").reason)
    lines.append("")
    for kind in ("semantic", "light"):
        for bs in (1, 32):
            fmt, why = select_format(kind, bs)
            lines.append(f"select_format({kind!r}, batch {bs}): {fmt.value}: {why}")
    lines.append("")
    for d in jax.devices():
        cc = compute_capability(d)
        label = f"{d.platform}:{d.id} {getattr(d, 'device_kind', '')}".strip()
        if cc:
            label += f" (SM {cc[0]}.{cc[1]})"
        lines.append(f"device {label}")
        for f in QUANTIZED_FORMATS:
            cap = native_matmul(f, d)
            lines.append(f"  {f.value:9s} {'native' if cap.ok else 'fallback'}: {cap.reason}")
    return "\n".join(lines)


#: Encoders whose size makes FP4 weights worth it (seed policy).
HEAVY_MODEL_KINDS = ("semantic", "e5-large", "long-context", "sparse", "splade", "multimodal")
#: Small encoders (MiniLM-class): FP8 where supported, never FP4.
LIGHT_MODEL_KINDS = ("light", "minilm", "bge-small")
FP4_MIN_BATCH = 16


def select_format(
    model_kind: str, batch_size: int, device: jax.Device | None = None
) -> tuple[QuantFormat, str]:
    """Picks a storage format for a model on ``device`` and says why.

    Heavy encoders (``HEAVY_MODEL_KINDS``) prefer NVFP4 when FP4 runs natively
    and ``batch_size >= 16``; otherwise every model takes FP8 E4M3 where the
    device has FP8 tensor cores, else FP16.

    Args:
        model_kind: one of ``HEAVY_MODEL_KINDS`` or ``LIGHT_MODEL_KINDS``.
        batch_size: sequences per call (>= 1).
        device: defaults to the first JAX device.

    Returns:
        ``(format, reason)``.

    Raises:
        ValueError: for an unknown ``model_kind`` or a batch size below 1.
    """
    kind = model_kind.strip().lower()
    if kind not in HEAVY_MODEL_KINDS + LIGHT_MODEL_KINDS:
        known = ", ".join(HEAVY_MODEL_KINDS + LIGHT_MODEL_KINDS)
        raise ValueError(f"unknown model_kind {model_kind!r}; expected one of: {known}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = device or jax.devices()[0]
    fp4 = native_matmul(QuantFormat.NVFP4, device)
    fp8 = native_matmul(QuantFormat.FP8_E4M3, device)
    if kind in HEAVY_MODEL_KINDS:
        if fp4 and batch_size >= FP4_MIN_BATCH:
            return QuantFormat.NVFP4, f"heavy encoder, batch {batch_size} >= 16, {fp4.reason}"
        why_not = fp4.reason if not fp4 else f"batch {batch_size} < {FP4_MIN_BATCH}"
        if fp8:
            return QuantFormat.FP8_E4M3, f"NVFP4 not chosen ({why_not}); FP8 {fp8.reason}"
        return QuantFormat.FP16, f"no FP4 ({why_not}) and no FP8 ({fp8.reason})"
    if fp8:
        return QuantFormat.FP8_E4M3, f"light encoder; FP8 {fp8.reason}"
    return QuantFormat.FP16, f"light encoder; no FP8 ({fp8.reason})"


def quantize_auto(x, model_kind: str = "semantic", batch_size: int | None = None):
    """Quantizes ``x`` in the format :func:`select_format` picks for this device.

    Args:
        x: float array (rank 1 to 4).
        model_kind: see :func:`select_format`.
        batch_size: defaults to ``x.shape[0]``.

    Returns:
        ``(QuantizedTensor or float16 array, format, reason)``: FP16 is the
        unquantized rung of the ladder, returned as ``x.astype(float16)``.
    """
    from jax_bq.ops import quantize

    bs = int(x.shape[0]) if batch_size is None else batch_size
    fmt, reason = select_format(model_kind, bs)
    if fmt is QuantFormat.FP16:
        import jax.numpy as jnp

        return jnp.asarray(x).astype(jnp.float16), fmt, reason
    return quantize(x, fmt), fmt, reason
