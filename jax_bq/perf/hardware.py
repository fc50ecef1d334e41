"""Device registry (datasheet figures, each sourced) and measured hardware profiles.

Two kinds of numbers, kept apart:

* :class:`DeviceSpec`: what the vendor publishes (dense tensor-core peaks per
  precision, memory bandwidth, L2, SM count, compute capability), one table
  per device in ``data/devices.toml``. Every figure carries its source in
  ``sources``; sparse ("with sparsity") peaks are halved to dense ones, said
  so where it applies.
* :class:`HardwareProfile`: what was **measured** on one device (copy
  bandwidth, GEMM rates, launch overhead, attention throughput) plus the
  efficiency factors fitted from measured operator times
  (:mod:`jax_bq.perf.fit`). Saved as versioned JSON; the models prefer it over
  the datasheet wherever it has a figure (:func:`effective`).

Lookup order of :func:`load_profile`: ``$JAX_BQ_HW_PROFILE`` (a file), the
user cache (``~/.cache/jax_bq/hw/<key>.json``, written by ``jax-bq
calibrate-hw``), then the profiles shipped in ``jax_bq/perf/data`` (fitted
from the measurements committed under ``benchmarks/results``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

#: Version of the profile JSON layout; :func:`HardwareProfile.from_json` refuses others.
PROFILE_VERSION = 1

PRECISIONS = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8", "fp4")

_DATA = Path(__file__).resolve().parent / "data"
ENV_PROFILE = "JAX_BQ_HW_PROFILE"


@dataclass(frozen=True)
class DeviceSpec:
    """Published figures of one GPU (dense, no sparsity).

    Attributes:
        key: registry key (``"h200"``).
        name: marketing name.
        compute_capability: ``(major, minor)``.
        num_sms: streaming multiprocessors.
        mem_bw_tbps: peak DRAM bandwidth, TB/s (10^12 bytes/s).
        mem_gb: DRAM capacity, GB.
        l2_mb: L2 cache, MB.
        peak_tflops: dense tensor-core peak per precision (``fp32`` is the
            non-tensor FMA rate); a precision absent has no tensor-core path.
        fp8: FP8 (E4M3/E5M2) tensor cores.
        fp4: FP4 / NVFP4 tensor cores.
        mx: MX block-scaled (MXFP8/MXFP4) tensor cores.
        sources: where each figure comes from.
    """

    key: str
    name: str
    compute_capability: tuple[int, int]
    num_sms: int
    mem_bw_tbps: float
    mem_gb: float
    l2_mb: float
    peak_tflops: dict
    fp8: bool
    fp4: bool
    mx: bool
    sources: tuple[str, ...]

    def peak(self, precision: str) -> float:
        """Dense peak in FLOP/s for ``precision`` (ValueError if it has no tensor cores)."""
        if precision not in self.peak_tflops:
            raise ValueError(
                f"{self.name} has no {precision} tensor-core rate (has {sorted(self.peak_tflops)})"
            )
        return self.peak_tflops[precision] * 1e12


def _load_registry(path: Path) -> dict[str, DeviceSpec]:
    """The :class:`DeviceSpec` per table of the TOML device registry at ``path``."""
    with path.open("rb") as f:
        tables = tomllib.load(f)
    return {
        key: DeviceSpec(
            key=key,
            **{
                **entry,
                "compute_capability": tuple(entry["compute_capability"]),
                "sources": tuple(entry["sources"]),
            },
        )
        for key, entry in tables.items()
    }


#: Registry key -> published figures, read from ``data/devices.toml`` (each entry sourced there).
REGISTRY: dict[str, DeviceSpec] = _load_registry(_DATA / "devices.toml")

# device_kind strings (jax.Device.device_kind) -> registry key.
_KIND_PATTERNS = (
    (r"h200", "h200"),
    (r"h100", "h100_sxm"),
    (r"gb200", "gb200"),
    (r"b200", "b200"),
    (r"gb10\b|dgx spark", "gb10"),
    (r"5090", "rtx_5090"),
    (r"l40s", "l40s"),
    (r"a100", "a100_sxm"),
)


def device_key(kind: str) -> str | None:
    """Registry key of a ``device_kind`` string (``"NVIDIA H200"`` -> ``"h200"``), or None."""
    k = kind.lower()
    if k in REGISTRY:
        return k
    for pat, key in _KIND_PATTERNS:
        if re.search(pat, k):
            return key
    return None


def spec(device) -> DeviceSpec:
    """The :class:`DeviceSpec` of a registry key, ``device_kind`` string or ``jax.Device``.

    Raises:
        ValueError: the device is not in the registry.
    """
    kind = device if isinstance(device, str) else getattr(device, "device_kind", str(device))
    key = device_key(kind)
    if key is None:
        raise ValueError(f"{kind!r} is not in the hardware registry (known: {sorted(REGISTRY)})")
    return REGISTRY[key]


@dataclass(frozen=True)
class HardwareProfile:
    """Measured figures of one device and the efficiency factors fitted to it.

    Attributes:
        device: registry key of the device it was measured on.
        device_kind: ``jax.Device.device_kind`` at measurement time.
        copy_tbps: device-to-device copy bandwidth (read + write), TB/s.
        gemm_tflops: measured large-GEMM rate per precision (``bf16``, ``fp8``).
        launch_us: per-kernel launch/latency floor, µs (an empty kernel's device time).
        attention_tflops: measured attention throughput per implementation.
        efficiency: per model key, fitted ``{"mem": e_m, "comp": e_c, "lat_us": t0}``
            (:mod:`jax_bq.perf.roofline`).
        source: how it was obtained (files, command, date).
        fit_error: summary of the fit (train / held-out errors), if fitted.
        version: :data:`PROFILE_VERSION`.
    """

    device: str
    device_kind: str
    copy_tbps: float | None = None
    gemm_tflops: dict = field(default_factory=dict)
    launch_us: float | None = None
    attention_tflops: dict = field(default_factory=dict)
    efficiency: dict = field(default_factory=dict)
    source: str = ""
    fit_error: dict = field(default_factory=dict)
    version: int = PROFILE_VERSION

    def to_json(self) -> str:
        """The profile as versioned JSON text."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HardwareProfile:
        """Parses a saved profile.

        Raises:
            ValueError: wrong version, unknown keys or device not in the registry.
        """
        d = json.loads(text)
        if d.get("version") != PROFILE_VERSION:
            raise ValueError(
                f"hardware profile version {d.get('version')} != {PROFILE_VERSION}: re-run "
                "jax-bq calibrate-hw"
            )
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown hardware profile fields {sorted(unknown)}")
        if d.get("device") not in REGISTRY:
            raise ValueError(f"profile device {d.get('device')!r} is not in the registry")
        return cls(**d)

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the JSON to ``path`` (creating folders); returns the path."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_json() + "\n")
        return p


def cache_path(key: str) -> Path:
    """Where ``jax-bq calibrate-hw`` saves the profile of registry key ``key``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jax_bq" / "hw" / f"{key}.json"


def shipped_path(key: str) -> Path:
    """The profile shipped with the package for ``key`` (may not exist)."""
    return _DATA / f"{key}.json"


def transfer(profile: HardwareProfile, to_device: str) -> HardwareProfile:
    """``profile`` (measured on one device) carried over to another of the same architecture.

    The efficiency factors are fractions of datasheet rates, so they are kept;
    the measured copy bandwidth is scaled by the ratio of the datasheet
    bandwidths (H200 4.8 -> H100 SXM 3.35 TB/s); the launch floor is kept. Only
    meaningful within one architecture (H200 -> H100: the same GH100 compute,
    different HBM); the source says it was transferred, and estimates made
    with it are predictions for a device nobody measured here.

    Raises:
        ValueError: unknown device, or a different compute capability.
    """
    src, dst = spec(profile.device), spec(to_device)
    if src.compute_capability != dst.compute_capability:
        raise ValueError(
            f"cannot transfer a {src.name} profile to {dst.name}: compute capability "
            f"{src.compute_capability} != {dst.compute_capability}"
        )
    copy = profile.copy_tbps * dst.mem_bw_tbps / src.mem_bw_tbps if profile.copy_tbps else None
    return dataclasses.replace(
        profile,
        device=dst.key,
        device_kind=dst.name,
        copy_tbps=copy,
        gemm_tflops={},
        attention_tflops={},
        source=f"transferred from {src.name} ({profile.source})",
    )


_LOADED: dict[str, tuple[HardwareProfile | None, str]] = {}


def load_profile(device, *, refresh: bool = False) -> tuple[HardwareProfile | None, str]:
    """The measured profile of ``device`` (key, kind string or jax.Device) and where it came from.

    Returns ``(None, why)`` when there is none. Cached per key; ``refresh`` re-reads.
    """
    kind = device if isinstance(device, str) else getattr(device, "device_kind", str(device))
    key = device_key(kind)
    if key is None:
        return None, f"{kind!r} is not in the hardware registry"
    if key in _LOADED and not refresh:
        return _LOADED[key]
    candidates = []
    env = os.environ.get(ENV_PROFILE)
    if env:
        candidates.append(Path(env))
    candidates += [cache_path(key), shipped_path(key)]
    result: tuple[HardwareProfile | None, str] = (
        None,
        f"no measured profile for {key} (looked in {', '.join(str(c) for c in candidates)}; "
        "run jax-bq calibrate-hw)",
    )
    for c in candidates:
        if c.is_file():
            prof = HardwareProfile.from_json(c.read_text())
            if prof.device != key:
                continue
            result = (prof, str(c))
            break
    _LOADED[key] = result
    return result


@dataclass(frozen=True)
class Effective:
    """The figures the models use: measured where a profile has them, else datasheet.

    Attributes:
        spec: the datasheet entry.
        bw: memory bandwidth, bytes/s.
        peak: tensor-core rate per precision, FLOP/s.
        launch_s: per-kernel floor, seconds.
        efficiency: fitted factors per model key (empty without a profile).
        measured: a measured profile supplied any of these.
        origin: one line saying which figure came from where.
    """

    spec: DeviceSpec
    bw: float
    peak: dict
    launch_s: float
    efficiency: dict
    measured: bool
    origin: str


#: Launch/latency floor used without a measurement: ~2-3 µs device time for a small
#: kernel on Hopper (the 1.1-1.3 µs single-kernel fusions in
#: benchmarks/results/e2e_kernels_h200.txt, plus tail effects).
DEFAULT_LAUNCH_S = 2.0e-6


def effective(device, profile: HardwareProfile | None | str = "auto") -> Effective:
    """Datasheet figures of ``device`` overridden by its measured profile.

    ``profile="auto"`` loads it (:func:`load_profile`); ``None`` forces the datasheet.
    Peak rates stay the datasheet's: measured GEMM rates enter through the fitted
    compute efficiencies, so one figure is never counted twice.
    """
    s = spec(device if isinstance(device, str) else getattr(device, "device_kind", device))
    if isinstance(profile, str) and profile == "auto":
        profile, _ = load_profile(s.key)
    peak = {p: v * 1e12 for p, v in s.peak_tflops.items()}
    if profile is None:
        return Effective(
            s, s.mem_bw_tbps * 1e12, peak, DEFAULT_LAUNCH_S, {}, False, "datasheet figures"
        )
    bw = (profile.copy_tbps or s.mem_bw_tbps) * 1e12
    launch = (profile.launch_us or DEFAULT_LAUNCH_S * 1e6) * 1e-6
    origin = (
        f"measured profile ({profile.source or 'no source recorded'}): copy "
        f"{bw / 1e12:.2f} TB/s, launch {launch * 1e6:.1f} us, "
        f"{len(profile.efficiency)} fitted efficiency keys"
    )
    return Effective(s, bw, peak, launch, dict(profile.efficiency), True, origin)
