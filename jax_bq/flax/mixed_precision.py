"""Mixed precision chosen by measured sensitivity: which kernels stay out of a format.

Quantizing every dense kernel of a small encoder adds many small errors: in
all-MiniLM-L6-v2 each of the 36 kernels alone in FP8 W8A8 costs the
embeddings at most ~1e-4 of cosine, all 36 together ~2.3e-3. A target such as
"mean cosine >= 0.999" is then met by keeping the few kernels that contribute
most in higher precision (or in a finer fallback format), which is what
:func:`plan_mixed_precision` finds.

Method (first-order, then verified):

1. ``reference = run(params)`` (float outputs, ``[n, d]``).
2. For every candidate kernel ``i`` alone, ``loss_i = 1 - metric(reference,
   run(params with only i quantized by spec))``, where ``metric`` is the mean
   per-row cosine or Pearson correlation (:func:`jax_bq.semantic.alignment`);
   with a ``fallback`` spec, ``fallback_loss_i`` likewise.
3. Independent quantization noise adds in variance, and ``1 - cos`` is half
   the squared relative error for small errors, so losses add to first order:
   ``loss(S kept) ~ sum_{i not in S} loss_i + sum_{i in S} fallback_loss_i``
   (on MiniLM FP8 W8A8 the 36 single-kernel losses sum to 1.837e-3, all 36
   quantized together measure 1.852e-3). Kernels are kept in decreasing
   ``density_i = (loss_i - fallback_loss_i) / (kept bytes_i - quantized
   bytes_i)``, the loss removed per byte given back (a greedy knapsack: the
   fewest bytes for the target, not the fewest kernels), until the estimate
   is within ``1 - target``.
4. The whole plan is run; while it misses the target the next kernel is also
   kept. The measured value is returned, not the estimate.

``run`` is the caller's: the same texts with the same activation handling
(``act_format``) the model will serve with. Plan on texts that are not the
ones the result is reported on (the fidelity benchmark plans on docstrings of
other standard-library modules than it evaluates on).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import numpy as np

from jax_bq.flax.rules import (
    Spec,
    WeightQuant,
    _as_spec,
    _Cast,
    _store_leaf,
    named_leaves,
    param_bytes,
    path_name,
)
from jax_bq.qtensor import QuantizedTensor
from jax_bq.semantic import alignment

__all__ = ["KernelSensitivity", "MixedPrecisionPlan", "kernel_sensitivity", "plan_mixed_precision"]

_METRICS = ("cosine", "pearson")


@dataclass(frozen=True)
class KernelSensitivity:
    """Loss of the outputs when one kernel alone is quantized.

    Attributes:
        name: the kernel's ``/``-joined param path.
        loss: ``1 - metric`` with only this kernel in ``spec``.
        fallback_loss: the same in the fallback spec (0 when kept as is).
        bytes_kept: the kernel's bytes when kept (as stored in ``params``,
            or codes + scales in the fallback spec).
        bytes_quantized: codes + scales in ``spec``.
    """

    name: str
    loss: float
    fallback_loss: float
    bytes_kept: int
    bytes_quantized: int

    @property
    def gain(self) -> float:
        """Loss removed by keeping this kernel out of ``spec``."""
        return self.loss - self.fallback_loss

    @property
    def density(self) -> float:
        """``gain`` per byte that keeping the kernel costs."""
        return self.gain / max(self.bytes_kept - self.bytes_quantized, 1)


@dataclass
class MixedPrecisionPlan:
    """Result of :func:`plan_mixed_precision`.

    Attributes:
        rules: ``(pattern, spec)`` pairs for
            :func:`jax_bq.flax.quantize_model_weights`: each kept kernel by
            its exact path (``None``, ``"bf16"``/``"fp16"`` or the fallback
            spec), then every other
            candidate in ``spec``.
        kept: paths of the kernels kept out of ``spec``, most sensitive first.
        measured: the metric of the whole plan on the planning run.
        all_quantized: the metric with every candidate in ``spec``.
        estimate: the first-order estimate for the starting set (step 3).
        sensitivities: per-kernel losses, highest ``density`` first.
    """

    rules: list[tuple[str, WeightQuant | str | None]]
    kept: list[str]
    measured: float
    all_quantized: float
    estimate: float
    metric: str
    target: float
    sensitivities: list[KernelSensitivity] = field(default_factory=list)

    @property
    def met(self) -> bool:
        """Whether ``measured >= target``."""
        return self.measured >= self.target


def _metric(reference: np.ndarray, out, metric: str) -> float:
    rep = alignment(reference, np.asarray(out, np.float64))
    return rep.cosine if metric == "cosine" else rep.pearson


def _candidates(params, select: Callable[[str], bool] | None) -> dict[str, object]:
    out = {}
    for name, leaf in named_leaves(params):
        if select is not None:
            if not select(name):
                continue
        elif name.rsplit("/", 1)[-1] != "kernel":
            continue
        if isinstance(leaf, QuantizedTensor):
            raise ValueError(f"{name} is already quantized; pass the float params")
        if select is None and getattr(leaf, "ndim", 0) != 2:
            continue
        out[name] = leaf
    if not out:
        raise ValueError("no candidate kernel in params (default: rank-2 leaves named 'kernel')")
    return out


def _with(params, replaced: dict[str, object]):
    """``params`` with the leaves at the given paths swapped."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    new = [replaced.get(path_name(p), leaf) for p, leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, new)


def _leaf_bytes(leaf) -> int:
    return param_bytes({"x": leaf})


class _Quantized:
    """Each candidate quantized once per spec (calibrated specs are slow)."""

    def __init__(self, cands: dict[str, object], spec: WeightQuant, fallback: Spec):
        self.cands, self.specs = cands, {True: spec, False: fallback}
        self.cache: dict[tuple[str, bool], object] = {}

    def __call__(self, name: str, in_spec: bool):
        key = (name, in_spec)
        if key not in self.cache:
            self.cache[key] = _store_leaf(name, self.cands[name], self.specs[in_spec])
        return self.cache[key]


def _quantized_spec(spec) -> WeightQuant:
    out = _as_spec(spec)
    if not isinstance(out, WeightQuant):
        raise ValueError(f"spec must be a quantized format, got {spec!r}")
    return out


def _check(metric: str) -> None:
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")


def _setup(params, run, spec, fallback, metric, select) -> tuple[_Quantized, np.ndarray]:
    """Checked specs and metric, the candidates' quantizer, the reference outputs."""
    _check(metric)
    quant = _Quantized(_candidates(params, select), _quantized_spec(spec), _as_spec(fallback))
    return quant, np.asarray(run(params), np.float64)


def _sensitivities(params, run, ref, quant: _Quantized, metric, progress):
    out = []
    has_fallback = quant.specs[False] is not None
    for name in quant.cands:
        if progress:
            progress(name)
        q = quant(name, True)
        loss = 1.0 - _metric(ref, run(_with(params, {name: q})), metric)
        kept = quant(name, False)
        fb = 1.0 - _metric(ref, run(_with(params, {name: kept})), metric) if has_fallback else 0.0
        out.append(KernelSensitivity(name, loss, fb, _leaf_bytes(kept), _leaf_bytes(q)))
    out.sort(key=lambda s: s.density, reverse=True)
    return out


def kernel_sensitivity(
    params,
    run: Callable[[object], np.ndarray],
    spec: WeightQuant | str,
    *,
    fallback: WeightQuant | str | None = None,
    metric: str = "cosine",
    select: Callable[[str], bool] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[KernelSensitivity]:
    """Per-kernel loss ``1 - metric(run(params), run(params with one kernel in spec))``.

    Args:
        params: float Flax params (nothing quantized yet).
        run: ``params -> [n, d]`` outputs (e.g. embeddings of planning texts).
        spec: the format every kernel would get.
        fallback: what a kept kernel gets instead: ``None`` (stays as it is
            in ``params``), ``"bf16"``/``"fp16"`` (stored in that dtype) or
            a quantized spec (e.g. FP8 for an FP4 plan).
        metric: ``"cosine"`` or ``"pearson"`` (mean over output rows).
        select: which paths are candidates (default: rank-2 ``kernel`` leaves).
        progress: called with each kernel's path before it is measured.

    Returns:
        One :class:`KernelSensitivity` per candidate, largest ``density``
        first. ``run`` is called ``1 + n`` times (``1 + 2n`` with a fallback).
    """
    quant, ref = _setup(params, run, spec, fallback, metric, select)
    return _sensitivities(params, run, ref, quant, metric, progress)


def plan_mixed_precision(
    params,
    run: Callable[[object], np.ndarray],
    spec: WeightQuant | str,
    target: float,
    *,
    fallback: WeightQuant | str | None = None,
    metric: str = "cosine",
    select: Callable[[str], bool] | None = None,
    progress: Callable[[str], None] | None = None,
) -> MixedPrecisionPlan:
    """Fewest bytes kept out of ``spec`` so that ``metric >= target`` on ``run``.

    See the module docstring for the method. Kernels are kept in order of
    decreasing ``density``; the first-order estimate picks the starting set
    and whole-model runs add kernels until the measured metric meets
    ``target`` (or every kernel is kept, when ``fallback`` alone cannot meet
    it: ``plan.met`` is then False). A starting set larger than needed is not
    shrunk.

    Args:
        params: float Flax params (nothing quantized yet).
        run: ``params -> [n, d]`` outputs; called ``2 + n`` times (``2 + 2n``
            with a fallback) plus once per kernel added after the estimate.
        spec: the format the other kernels get.
        target: the metric to reach, in (0, 1), e.g. 0.999 for cosine.
        fallback: what a kept kernel gets: ``None`` (as in ``params``),
            ``"bf16"``/``"fp16"``, or a quantized spec.
        metric: ``"cosine"`` or ``"pearson"``.
        select: which paths are candidates (default: rank-2 ``kernel`` leaves).
        progress: called with each kernel's path while measuring.

    Returns:
        A :class:`MixedPrecisionPlan`; ``quantize_model_weights(params,
        plan.rules)`` builds the model.

    Raises:
        ValueError: ``target`` outside (0, 1), an unknown metric, no candidates.
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"target must be in (0, 1), got {target}")
    quant, ref = _setup(params, run, spec, fallback, metric, select)
    spec, fallback = quant.specs[True], quant.specs[False]
    sens = _sensitivities(params, run, ref, quant, metric, progress)
    order = [s.name for s in sens]

    def measure(n_kept: int) -> float:
        repl = {n: quant(n, i >= n_kept) for i, n in enumerate(order)}
        return _metric(ref, run(_with(params, repl)), metric)

    total = sum(s.loss for s in sens)
    n_kept = 0
    while n_kept < len(sens) and total > 1.0 - target:
        total -= sens[n_kept].gain
        n_kept += 1
    estimate = 1.0 - total
    all_quantized = measure(0)
    measured = all_quantized if n_kept == 0 else measure(n_kept)
    while measured < target and n_kept < len(sens):
        n_kept += 1
        measured = measure(n_kept)
    kept_as = fallback.name if isinstance(fallback, _Cast) else fallback
    rules = [(f"^{re.escape(n)}$", kept_as) for n in order[:n_kept]]
    rules += [(f"^{re.escape(n)}$", spec) for n in order[n_kept:]]
    return MixedPrecisionPlan(
        rules=rules,
        kept=order[:n_kept],
        measured=measured,
        all_quantized=all_quantized,
        estimate=estimate,
        metric=metric,
        target=target,
        sensitivities=sens,
    )
