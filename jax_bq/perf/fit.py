r"""Fitting the roofline efficiency factors to measured device times.

A **workload** is one measured thing (a ``qmatmul`` call, a quantize, an
attention, a whole encoder) with the operators the models say it runs::

    {"name": str, "group": str, "measured_us": float,
     "ops": [[OpCost fields as a dict, count], ...]}

The predicted time of a workload is ``sum(count * predict(op))``. For every
efficiency key (:data:`~jax_bq.perf.roofline.DEFAULT_EFFICIENCY`) the factors
``(e_mem, e_comp, e_l2, t_tile, t_splitk, t_lat)`` minimise ``sum(log(pred / measured)^2)``
over the training workloads that contain the key, by exhaustive search on a
grid followed by a finer grid around the best point (plus a weak prior towards
the defaults, :data:`PRIOR`, for parameters the data cannot separate), one key at a time
(coordinate descent, a few sweeps: composite workloads such as a whole encoder
share keys with single-kernel ones).

**Measurement method.** Workloads carry ``"timing"``. Profiler device time
(the default) is what the roofline predicts. ``"host slope"`` rows (per-call
slope of host time over executables that chain many calls, the older qmatmul
tables) also contain the gaps between calls, so they are predicted as
``scale * device + gap`` with one ``(scale, gap_us)`` pair for all of them
(:data:`HOST_SLOPE_KEY`), fitted with the rest: e.g. the same 8192^3 GEMMs
read 8-10% slower by host slope than by device time, and no host-slope call
is shorter than ~27 us. Without that term the decode GEMMs' gaps were fitted
into the kernels' own latency and every small device-timed GEMM came out too slow.

Honesty: :func:`split` holds out every third workload of each group (ordered by
name) and :func:`fit` reports the error on the training and the held-out set
separately; the profile saved is the one fitted on the training set only.
"""

from __future__ import annotations

import dataclasses
import statistics

import numpy as np

from jax_bq.perf import roofline as rl
from jax_bq.perf.hardware import Effective

#: Efficiency-dict key of the host-slope timing transform ``{"scale", "gap_us"}``.
HOST_SLOPE_KEY = "timing:host_slope"
HOST_SLOPE = "host slope"
_NO_TRANSFORM = {"scale": 1.0, "gap_us": 0.0, "floor_us": 0.0}

#: Weight of the prior (per workload) against the squared log errors.
PRIOR = 0.01

_GRID = {
    "mem": np.geomspace(0.15, 1.2, 20),
    "l2": np.geomspace(1.0, 16.0, 13),
    "unit_us": np.geomspace(0.1, 6.0, 16),
    "mma_us": np.concatenate([[0.0], np.geomspace(0.01, 1.0, 11)]),
    "comp": np.geomspace(0.02, 1.2, 20),
    "tile_us": np.array([0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0]),
    "splitk_us": np.array([0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 13.0, 16.0]),
    "lat_us": np.array(
        [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 13.0, 16.0, 20.0, 25.0, 30.0, 40.0]
    ),
    "scale": np.linspace(0.9, 1.3, 41),
    "gap_us": np.linspace(0.0, 20.0, 41),
    "floor_us": np.concatenate([[0.0], np.linspace(15.0, 40.0, 51)]),
}


def op_to_json(op: rl.OpCost) -> dict:
    """An OpCost as a JSON-able dict."""
    d = dataclasses.asdict(op)
    d["tile"] = list(op.tile) if op.tile is not None else None
    d["chain"] = list(op.chain) if op.chain is not None else None
    return d


def op_from_json(d: dict) -> rl.OpCost:
    """The OpCost of :func:`op_to_json`."""
    d = dict(d)
    t = d.get("tile")
    # (M, N, K); files written before the tile choice held (M, N, tm, tn, K)
    d["tile"] = (t[0], t[1], t[-1]) if t is not None else None
    if d.get("chain") is not None:
        d["chain"] = tuple(d["chain"])
    return rl.OpCost(**d)


def workload(name: str, group: str, ops, measured_us: float | None = None) -> dict:
    """A workload dict from ``ops`` (a list of OpCost or of (OpCost, count))."""
    pairs = [(o, 1) if isinstance(o, rl.OpCost) else o for o in ops]
    return {
        "name": name,
        "group": group,
        "measured_us": measured_us,
        "ops": [[op_to_json(o), c] for o, c in pairs],
    }


def timing_transform(w: dict, eff: Effective) -> dict:
    """``{"scale", "gap_us", "floor_us"}`` mapping device time to ``w``'s measurement method."""
    if w.get("timing") != HOST_SLOPE:
        return _NO_TRANSFORM
    return {**_NO_TRANSFORM, **eff.efficiency.get(HOST_SLOPE_KEY, {})}


def host_slope_us(device_us, scale, gap_us, floor_us=0.0):
    r"""Per-call slope of host time of a call whose kernels take ``device_us`` on the device.

    .. math:: t_{host} = \max(t_{floor},\ s \cdot t_{dev} + t_{gap})

    The device side (``scale * device + gap``: the gaps between the calls' kernels)
    or the host side bounds the slope: a chain of calls cannot run faster than
    the host issues them (``floor_us``: the host work of one call, e.g. a custom
    call's descriptor set-up and launches), however short its kernels are.
    Broadcasts over numpy arrays (the fit's grids).
    """
    return np.maximum(floor_us, scale * np.asarray(device_us) + gap_us)


def predict_us(w: dict, eff: Effective) -> float:
    """Predicted time (µs) of workload ``w`` as its method measures it (device time by default)."""
    dev = sum(c * rl.predict(op_from_json(o), eff).time_s for o, c in w["ops"]) * 1e6
    tr = timing_transform(w, eff)
    return float(host_slope_us(dev, tr["scale"], tr["gap_us"], tr["floor_us"]))


def split(workloads: list[dict], every: int = 3) -> tuple[list[dict], list[dict]]:
    """(train, held-out): every ``every``-th workload of each group, by name, is held out."""
    groups: dict[str, list[dict]] = {}
    for w in workloads:
        groups.setdefault(w["group"], []).append(w)
    train, test = [], []
    for ws in groups.values():
        for i, w in enumerate(sorted(ws, key=lambda w: w["name"])):
            (test if i % every == every - 1 else train).append(w)
    return train, test


def _vec_time(op: rl.OpCost, eff: Effective, P: dict) -> np.ndarray:
    """Predicted seconds of ``op`` for every parameter combination in ``P`` (arrays)."""
    t_mem = op.bytes / (eff.bw * P["mem"])
    if op.l2_bytes:
        t_mem = t_mem + op.l2_bytes / (eff.bw * P["l2"])
    t_split = 0.0
    if op.chain is not None:
        t_comp = rl.chain_s(op.chain, eff.spec.num_sms, P["unit_us"], P["mma_us"])
    elif not op.flops:
        t_comp = np.zeros_like(t_mem)
    elif op.tile is not None:
        peak = eff.peak[op.precision]
        t_comp, t_split = rl.tiled_compute_s(
            op.tile, peak, eff.spec.num_sms, P["comp"], P["tile_us"], P["splitk_us"]
        )
    else:
        t_comp = op.flops / (eff.peak[op.precision] * P["comp"])
    body = t_comp + t_mem if op.combine == "sum" else np.maximum(t_comp, t_mem)
    return P["lat_us"] * 1e-6 + t_split + body


def _grid(axes: dict) -> dict:
    mesh = np.meshgrid(*axes.values(), indexing="ij")
    return {k: v.ravel() for k, v in zip(axes, mesh, strict=True)}


def _fit_key(key, ws, eff, cur):
    """Best factors of ``key`` given the current factors of the others."""
    host = {**_NO_TRANSFORM, **cur.get(HOST_SLOPE_KEY, {})}
    parsed = [
        (
            [(op_from_json(o), c) for o, c in w["ops"]],
            w["measured_us"] * 1e-6,
            host if w.get("timing") == HOST_SLOPE else _NO_TRANSFORM,
        )
        for w in ws
    ]
    has_flops = any(op.flops for ops, _, _ in parsed for op, _ in ops if op.key == key)
    has_tile = any(op.tile for ops, _, _ in parsed for op, _ in ops if op.key == key)
    has_l2 = any(op.l2_bytes for ops, _, _ in parsed for op, _ in ops if op.key == key)
    has_chain = any(op.chain for ops, _, _ in parsed for op, _ in ops if op.key == key)
    d = rl.DEFAULT_EFFICIENCY[key]
    axes = {
        "mem": _GRID["mem"],
        "comp": _GRID["comp"] if has_flops and not has_chain else np.array([d["comp"]]),
        "tile_us": _GRID["tile_us"] if has_tile else np.array([0.0]),
        "splitk_us": _GRID["splitk_us"] if has_tile else np.array([0.0]),
        "lat_us": _GRID["lat_us"],
        "l2": _GRID["l2"] if has_l2 else np.array([d.get("l2", rl.DEFAULT_L2)]),
        "unit_us": _GRID["unit_us"] if has_chain else np.array([d["unit_us"]]),
        "mma_us": _GRID["mma_us"] if has_chain else np.array([d["mma_us"]]),
    }
    best = None
    for _ in range(2):  # coarse grid, then a finer one around its optimum
        P = _grid(axes)
        err = np.zeros_like(P["mem"])
        for ops, meas, tr in parsed:
            t = np.zeros_like(P["mem"])
            for op, c in ops:
                if op.key == key:
                    t = t + c * _vec_time(op, eff, P)
                else:
                    t = (
                        t
                        + c
                        * rl.predict(op, eff, cur.get(op.key, rl.DEFAULT_EFFICIENCY[op.key])).time_s
                    )
            pred = host_slope_us(t * 1e6, tr["scale"], tr["gap_us"], tr["floor_us"]) * 1e-6
            err += np.log(pred / meas) ** 2
        # A weak prior towards the defaults: decides between parameter sets the data
        # cannot tell apart (e.g. latency vs bandwidth when only one size was measured).
        lam = PRIOR * len(parsed)
        err += lam * (np.log(P["mem"] / d["mem"]) ** 2 + np.log(P["comp"] / d["comp"]) ** 2)
        err += lam * np.log(P["l2"] / d.get("l2", rl.DEFAULT_L2)) ** 2
        err += lam * ((P["lat_us"] - d["lat_us"]) / 10.0) ** 2
        err += lam * ((P["splitk_us"] - d["splitk_us"]) / 10.0) ** 2
        i = int(np.argmin(err))
        best = {k: float(P[k][i]) for k in P}
        axes = {
            k: (np.linspace(0.8 * best[k], 1.2 * best[k], 9) if len(v) > 1 and best[k] > 0 else v)
            for k, v in axes.items()
        }
    return best


def fit(workloads: list[dict], eff: Effective, sweeps: int = 8) -> dict:
    """Efficiency factors per key fitted to ``workloads`` (those with a measurement).

    Returns ``{key: {"mem", "comp", "tile_us", "splitk_us", "lat_us", "l2", "n": workloads}}``;
    keys no workload exercises are left out (their defaults stay flagged unfitted).
    """
    ws = [w for w in workloads if w.get("measured_us")]
    keys: dict[str, list[dict]] = {}
    for w in ws:
        for k in {o["key"] for o, _ in w["ops"]}:
            keys.setdefault(k, []).append(w)
    # Keys seen alone first: they pin down composite workloads' shared terms.
    # (ties by name: the sweep order must not depend on string hashing)
    order = sorted(
        keys, key=lambda k: (min(len({o["key"] for o, _ in w["ops"]}) for w in keys[k]), k)
    )
    host = [w for w in ws if w.get("timing") == HOST_SLOPE]
    cur: dict[str, dict] = {}
    for _ in range(sweeps):
        for k in order:
            cur[k] = _fit_key(k, keys[k], eff, cur)
        if host:
            cur[HOST_SLOPE_KEY] = _fit_host_slope(host, eff, cur)
    n = {k: len(v) for k, v in keys.items()} | {HOST_SLOPE_KEY: len(host)}
    return {k: {**v, "n": n[k]} for k, v in cur.items()}


def _fit_host_slope(ws, eff, cur) -> dict:
    """``(scale, gap_us, floor_us)`` of the host-slope rows (:func:`host_slope_us`).

    Fitted given the current device-time factors of every key.
    """
    dev = np.array(
        [
            sum(
                c * rl.predict(op, eff, cur.get(op.key, rl.DEFAULT_EFFICIENCY[op.key])).time_s
                for op, c in ((op_from_json(o), c) for o, c in w["ops"])
            )
            * 1e6
            for w in ws
        ]
    )
    meas = np.array([w["measured_us"] for w in ws])
    S, G, F = np.meshgrid(_GRID["scale"], _GRID["gap_us"], _GRID["floor_us"], indexing="ij")
    pred = host_slope_us(dev, S[..., None], G[..., None], F[..., None])
    err = (np.log(pred / meas) ** 2).sum(-1)
    err += PRIOR * len(ws) * (np.log(S) ** 2 + (G / 10.0) ** 2)  # prior: no transform
    i, j, f = np.unravel_index(int(np.argmin(err)), err.shape)
    return {"scale": float(S[i, j, f]), "gap_us": float(G[i, j, f]), "floor_us": float(F[i, j, f])}


def errors(workloads: list[dict], eff: Effective) -> list[dict]:
    """Per workload: predicted, measured, relative error ``pred / meas - 1``."""
    out = []
    for w in workloads:
        if not w.get("measured_us"):
            continue
        p = predict_us(w, eff)
        out.append(
            {
                "name": w["name"],
                "group": w["group"],
                "measured_us": w["measured_us"],
                "predicted_us": p,
                "rel_err": p / w["measured_us"] - 1,
            }
        )
    return out


def summary(errs: list[dict], tol: float = 0.15) -> dict:
    """Count, fraction within ``tol``, median and max absolute relative error."""
    if not errs:
        return {"n": 0}
    a = [abs(e["rel_err"]) for e in errs]
    return {
        "n": len(a),
        "within_tol": sum(x <= tol for x in a) / len(a),
        "tol": tol,
        "median_abs_err": statistics.median(a),
        "max_abs_err": max(a),
    }
