"""The hook ``jax_bq.matmul.plan`` calls: rank a shape's available paths by predicted time.

Only with a **measured** profile of the device (:func:`~jax_bq.perf.hardware.load_profile`):
without one, :func:`rank` returns ``None`` plus the reason, and the plan keeps
its fixed crossover rule and says so. The ranking is cached per (device,
shape, format, candidate set); ties (equal predictions to 0.1 µs) keep the
order the ladder lists the candidates in, so the choice is deterministic.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from jax_bq.perf import roofline as rl
from jax_bq.perf.hardware import effective, load_profile


@dataclass(frozen=True)
class Ranking:
    """Candidate paths, fastest first, with predicted device time (µs)."""

    ranked: tuple[tuple[str, float], ...]
    source: str

    @property
    def best(self) -> str:
        """The fastest predicted path."""
        return self.ranked[0][0]

    def describe(self) -> str:
        """Both (all) predictions, fastest first, and the profile used."""
        preds = ", ".join(f"{p} {us:.1f} us" for p, us in self.ranked)
        return f"predicted {preds} (roofline model, {self.source})"


def _mode_class(scale_modes) -> str:
    return rl._SCALE_CLASS.get(scale_modes[0], "outer") if scale_modes else "tensor"


@functools.lru_cache(maxsize=4096)
def _rank_cached(
    kind: str, m, n, k, w_format, w_granularity, candidates, scale_modes, act
) -> Ranking | None:
    prof, where = load_profile(kind)
    if prof is None:
        return None
    eff = effective(kind, prof)
    a_gran = {"tensor": "per_tensor", "outer": "per_token", "block": "block_1x128"}[
        _mode_class(scale_modes)
    ]
    out = []
    for path in candidates:
        kw = dict(w_format=w_format, w_granularity=w_granularity)
        if path == "cublaslt_fp8":
            kw.update(act=act, act_granularity=a_gran)
        ops = rl.gemm_costs(m, n, k, path, **kw)
        out.append((path, round(rl.total_s(ops, eff) * 1e6, 1)))
    order = sorted(range(len(out)), key=lambda i: (out[i][1], i))
    return Ranking(tuple(out[i] for i in order), f"profile {where}")


def rank(
    device,
    m: int,
    n: int,
    k: int,
    w_format: str,
    w_granularity: str,
    candidates: tuple[str, ...],
    scale_modes: tuple[str, str] | None = None,
    act: str = "dynamic",
) -> tuple[Ranking | None, str]:
    """Rank ``candidates`` (paths of :data:`~jax_bq.perf.roofline.GEMM_PATHS`) for one shape.

    Args:
        device: ``jax.Device`` or ``device_kind`` string.
        m: activation rows; n, k: the ``[N, K]`` weight.
        n: output features.
        k: contraction size.
        w_format: weight format value (``"fp8_e4m3"``).
        w_granularity: weight granularity value (``"per_tensor"``...).
        candidates: the paths the ladder allows for this call, in ladder order.
        scale_modes: cuBLASLt (weight, activation) scale modes of the FP8 candidate.
        act: ``"dynamic"`` (activations quantized in the call) or ``"pre"``.

    Returns:
        ``(Ranking, "")``, or ``(None, why)`` when the device has no measured profile.
    """
    kind = device if isinstance(device, str) else getattr(device, "device_kind", str(device))
    try:
        r = _rank_cached(
            kind, m, n, k, w_format, w_granularity, tuple(candidates), scale_modes, act
        )
    except ValueError as e:  # device not in the registry
        return None, str(e)
    if r is None:
        return None, load_profile(kind)[1]
    return r, ""
