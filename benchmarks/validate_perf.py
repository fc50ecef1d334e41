"""Validate jax_bq.perf's models against measured device time; fit and save the hardware profile.

Measure (GPU), in parts that each take <= ~150 s (``--budget-s``, default 140,
stops a part that runs long and says so in its rows)::

    for p in decode wide prefill kernels encoder; do
      jax-bq bench validate_perf --part $p --out /tmp/perf_$p.json
    done

* ``decode``: qmatmul at M = 1, 4, 16, 64 on an 8192x8192 weight, every path of
  every weight format (bf16 XLA, FP8 per-tensor / per-channel / 128x128 tiles on
  cuBLASLt, W8A16, dequantize + dot, NVFP4 W4A16 or FP8 conversion);
* ``wide``: the same at 1 and 16 x 28672 x 8192, 256 and 1024 x 8192 x 8192;
* ``prefill``: 8192^3 and the E5-large shapes (4096 x {1024, 4096} x {1024, 4096});
* ``kernels``: quantize/dequantize (FP8, NVFP4, MXFP8; 2 sizes), LayerNorm,
  attention (XLA and cuDNN) at sequence 128, 256, 512; copy bandwidth and launch floor;
* ``encoder``: the E5-large encoder, bf16 and FP8 W8A8, batch 1, 8, 32 (seq 128).

Each workload is timed with profiler device time (benchmarks/common.py); each
row records its wall time (``wall_s``) and each part's total is printed and
stored (``meta.part_wall_s``).

Fit and report (no GPU)::

    jax-bq bench validate_perf --fit /tmp/perf_*.json \
        --report benchmarks/results/perf_validation_h200.json \
        --profile jax_bq/perf/data/h200.json

splits the workloads (every third of each group held out), fits the efficiency
factors on the training part only, writes the profile, and writes FILE.md (the
predicted-vs-measured table, generated from the JSON) and FILE.png (scatter).
The plan check: for every qmatmul shape and weight format, the path ``plan``
picks with the fitted profile against the fastest path measured in the same
part (one run). ``--only A,B``: only workloads whose name contains A or B.
``--smoke``: tiny shapes on any device, host wall time (exercises the code only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

from benchmarks.common import device_time_per_call, machine  # noqa: E402
from jax_bq.perf import fit as ft  # noqa: E402
from jax_bq.perf import hardware as hw  # noqa: E402
from jax_bq.perf import planner, suite  # noqa: E402

TOL = 0.15
#: Measurement parts (``--part``): each fits ~150 s on one H200 (estimated from
#: ~1-2 s per workload: build, compile, one 20-call profiler trace).
PARTS = {
    "decode": [(1, 8192, 8192), (4, 8192, 8192), (16, 8192, 8192), (64, 8192, 8192)],
    "wide": [(1, 28672, 8192), (16, 28672, 8192), (256, 8192, 8192), (1024, 8192, 8192)],
    "prefill": [(8192, 8192, 8192), (4096, 1024, 1024), (4096, 4096, 1024), (4096, 1024, 4096)],
    "kernels": None,
    "encoder": None,
}
SMOKE_SHAPES = [(1, 256, 256), (96, 256, 512)]


def qmatmul_set(shapes) -> list:
    """Every path jax_bq has for each weight format, at each shape."""
    out = []
    for m, n, k in shapes:
        out.append(suite.qmatmul_workload(m, n, k, "bf16", "xla_bf16"))
        for wcfg in ("fp8_tensor", "fp8_channel", "fp8_tile"):
            out.append(suite.qmatmul_workload(m, n, k, wcfg, "cublaslt_fp8"))
            if m <= 64:
                out.append(suite.qmatmul_workload(m, n, k, wcfg, "w8a16"))
        out.append(suite.qmatmul_workload(m, n, k, "fp8_tensor", "dequant_dot"))
        out.append(suite.qmatmul_workload(m, n, k, "nvfp4", "dequant_dot"))
        out.append(suite.qmatmul_workload(m, n, k, "nvfp4", "w4a16" if m <= 64 else "fp4_via_fp8"))
    return out


def kernel_set(smoke: bool) -> list:
    """quantize/dequantize (3 formats, 2 sizes), LayerNorm, attention at 3 lengths."""
    out = []
    for r, c in [(256, 256)] if smoke else [(8192, 8192), (4096, 1024)]:
        for fmt in ("fp8_e4m3", "nvfp4", "mxfp8"):
            out.append(suite.quantize_workload(r, c, fmt))
            out.append(suite.quantize_workload(r, c, fmt, "dequantize"))
        out.append(suite.layernorm_workload(r * 4 if smoke else r, c))
    for s in [32, 64] if smoke else [128, 256, 512]:
        out.append(suite.attention_workload(2 if smoke else 32, 4 if smoke else 16, s, 64))
        if not smoke:
            out.append(suite.attention_workload(32, 16, s, 64, "cudnn"))
    return out


def encoder_set(smoke: bool, eff) -> list:
    """The E5-large encoder (MiniLM in smoke mode), bf16 and FP8 W8A8, 3 batch sizes."""
    model, seq = ("minilm-l6", 32) if smoke else ("e5-large", 128)
    return [
        suite.encoder_workload(model, b, seq, p, eff)
        for b in ([1, 2] if smoke else [1, 8, 32])
        for p in ("bf16", "fp8_w8a8_tensor")
    ]


def workloads(smoke: bool, eff, parts=tuple(PARTS)) -> list[tuple[str, object]]:
    """(part, workload) pairs of the named parts (smoke: tiny shapes, one qmatmul part)."""
    out = []
    for part in parts:
        if part == "kernels":
            ws = kernel_set(smoke)
        elif part == "encoder":
            ws = encoder_set(smoke, eff)
        elif smoke:
            ws = qmatmul_set(SMOKE_SHAPES) if part == "decode" else []
        else:
            ws = qmatmul_set(PARTS[part])
        out += [(part, w) for w in ws]
    return out


def measure_one(w, smoke: bool) -> dict:
    """One workload's row: measured device time, or a note saying why not."""
    from jax_bq.perf.measure import device_us

    row = ft.workload(w.name, w.group, w.ops)
    row["meta"] = w.meta
    t0 = time.perf_counter()
    try:
        fn, a, envs = w.build()
        with suite.env(envs):
            if smoke:
                us = device_us(fn, a, calls=3, warmup=1, wall=True)
            else:
                us = device_time_per_call(fn, a, calls=20)["us"]
        row["measured_us"] = us
        msg = f"{us:10.1f} us"
    except suite.Unavailable as e:
        row["note"] = str(e)
        msg = f"skipped: {e}"
    except Exception as e:  # one workload failing must not lose the run: recorded
        row["note"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
        msg = row["note"]
    row["wall_s"] = time.perf_counter() - t0
    print(f"{w.name:60s} {msg}  [{row['wall_s']:.1f} s]", flush=True)
    return row


def measure(args) -> dict:
    """Measures the selected parts; stops a part when it has used ``--budget-s``."""
    import jax

    dev = jax.devices()[0]
    key = hw.device_key(getattr(dev, "device_kind", "")) or "h200"
    eff = hw.effective(key, None)
    parts = [p for p in (args.part or ",".join(PARTS)).split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise SystemExit(f"unknown part(s) {bad}; one of {list(PARTS)}")
    only = [o for o in (args.only or "").split(",") if o]
    rows, timing, t_start = [], {}, {}
    for part, w in workloads(args.smoke, eff, parts):
        if only and not any(o in w.name for o in only):
            continue
        t_start.setdefault(part, time.perf_counter())
        if time.perf_counter() - t_start[part] > args.budget_s:
            row = ft.workload(w.name, w.group, w.ops)
            row.update(meta=w.meta, note=f"not measured: part {part} over {args.budget_s:.0f} s")
            rows.append(row)
            print(f"{w.name:60s} {row['note']}", flush=True)
            continue
        rows.append({**measure_one(w, args.smoke), "part": part})
        jax.clear_caches()
        timing[part] = time.perf_counter() - t_start[part]
    for part, t in timing.items():
        n = sum(1 for r in rows if r.get("part") == part and r.get("measured_us"))
        print(f"part {part}: {n} workloads measured in {t:.1f} s", flush=True)
    meta = {**machine(), "device_key": key, "smoke": args.smoke, "part_wall_s": timing}
    if not args.smoke and "kernels" in parts:
        try:
            meta.update(basics())
        except RuntimeError as e:  # no memcpy in the trace: the datasheet-relative fit, said so
            meta["basics_note"] = f"copy/launch not measured: {e}"
    return {"meta": meta, "workloads": rows}


def basics() -> dict:
    """Copy bandwidth (in-trace device-to-device memcpy) and the launch floor, measured."""
    import jax
    import jax.numpy as jnp

    big = [(jnp.full((1 << 28,), float(i), jnp.bfloat16),) for i in range(2)]  # 512 MiB
    copy_us = device_time_per_call(jax.jit(lambda a: a), big, copies=True)["us"]
    tiny = [(jnp.ones((1,), jnp.float32) * i,) for i in range(2)]
    launch = device_time_per_call(jax.jit(lambda a: a + 1), tiny)["us"]
    return {"copy_tbps": 2 * big[0][0].nbytes / copy_us / 1e6, "launch_us": launch}


def plan_check(data: dict, profile_path: Path, key: str) -> list[dict]:
    """Per (shape, weight format): plan's pick with the profile vs the fastest measured path."""
    groups: dict[tuple, dict] = {}
    for w in data["workloads"]:
        m = w.get("meta", {})
        if "path" not in m or not w.get("measured_us") or m["weights"] == "bf16":
            continue
        groups.setdefault((m["m"], m["n"], m["k"], m["weights"]), {})[m["path"]] = w["measured_us"]
    os.environ[hw.ENV_PROFILE] = str(profile_path)
    hw._LOADED.clear()
    planner._rank_cached.cache_clear()
    out = []
    for (m, n, k, wcfg), times in sorted(groups.items()):
        pick, how = _planned_path(m, n, k, wcfg, times, key)
        fastest = min(times, key=times.get)
        row = {
            "shape": f"{m}x{n}x{k}",
            "weights": wcfg,
            "plan": pick,
            "how": how,
            "plan_us": times.get(pick),
            "fastest": fastest,
            "fastest_us": times[fastest],
        }
        row["ratio"] = row["plan_us"] / row["fastest_us"] if row["plan_us"] else None
        out.append(row)
    return out


def recommend_check(data: dict, prof, key: str) -> list[dict]:
    """Per measured encoder shape: recommend()'s pick (among the measured presets) vs the
    fastest measured preset."""
    from jax_bq.perf.recommend import recommend

    shapes: dict[tuple, dict] = {}
    for w in data["workloads"]:
        m = w.get("meta", {})
        if w["group"] == "encoder" and w.get("measured_us"):
            model = w["name"].split()[1]
            shapes.setdefault((model, m["batch"], m["seq"]), {})[m["preset"]] = w["measured_us"]
    out = []
    for (model, b, sq), times in sorted(shapes.items()):
        r = recommend(
            model,
            "prefill",
            sq,
            b,
            device=key,
            profile=prof,
            presets=tuple(times),
            min_gain=0,
            min_cosine=0.0,
            allow_unmeasured=True,
        )
        fastest = min(times, key=times.get)
        out.append(
            {
                "model": model,
                "shape": f"{b}x{sq}",
                "recommended": r.strategy,
                "fastest_measured": fastest,
                "measured_us": times,
                "match": r.strategy == fastest,
            }
        )
    return out


def _planned_path(m, n, k, wcfg, times, key):
    """The plan's choice among the paths measured for this weight format (plan's auto rules)."""
    fmt, gran, _, _ = suite.WEIGHTS[wcfg]
    if fmt.startswith("fp8"):
        cands = tuple(p for p in ("cublaslt_fp8", "w8a16") if p in times)
        if len(cands) == 2:
            r, _ = planner.rank(key, m, n, k, fmt, gran, cands, _modes(gran))
            if r is not None:
                return r.best, r.describe()
        return (cands[0] if cands else "dequant_dot"), "only candidate"
    # NVFP4 weights: W4A16 at M <= 64; from M >= 256 the model ranks the FP8
    # conversion against dequantize + dot (jax_bq.ladder.fp4_model_rank)
    if m <= 64:
        return "w4a16", "ladder"
    if m < 256:
        return "dequant_dot", "ladder"
    cands = tuple(p for p in ("fp4_via_fp8", "dequant_dot") if p in times)
    if len(cands) == 2:
        r, _ = planner.rank(key, m, n, k, fmt, gran, cands)
        if r is not None:
            return r.best, r.describe()
    return "fp4_via_fp8", "ladder"


def _modes(gran):
    return {
        "per_tensor": ("SCALAR_32F", "SCALAR_32F"),
        "per_channel": ("OUTER_VEC_32F", "OUTER_VEC_32F"),
        "tile_2d": ("BLK128x128_32F", "VEC128_32F"),
    }[gran]


def fit_and_report(data: dict, json_path: Path, profile_path: Path) -> str:
    key = data["meta"].get("device_key", "h200")
    base = hw.HardwareProfile(
        device=key,
        device_kind=data["meta"].get("device", key),
        copy_tbps=data["meta"].get("copy_tbps", 4.24 if key == "h200" else None),
        launch_us=data["meta"].get("launch_us"),
    )
    eff0 = hw.effective(key, base)
    ws = [w for w in data["workloads"] if w.get("measured_us")]
    train, test = ft.split(ws)
    factors = ft.fit(train, eff0)
    prof = dataclasses.replace(
        base,
        efficiency=factors,
        source=f"fitted on {len(train)} of {len(ws)} workloads of {json_path.name}",
    )
    eff = hw.effective(key, prof)
    e_tr, e_te = ft.errors(train, eff), ft.errors(test, eff)
    s_tr, s_te, s_all = ft.summary(e_tr, TOL), ft.summary(e_te, TOL), ft.summary(e_tr + e_te, TOL)
    prof = dataclasses.replace(prof, fit_error={"train": s_tr, "held_out": s_te, "all": s_all})
    prof.save(profile_path)
    plans = plan_check(data, profile_path, key)
    recs = recommend_check(data, prof, key)
    report = {
        "recommend": recs,
        "summary": {"train": s_tr, "held_out": s_te, "all": s_all},
        "errors": [{**e, "split": "train"} for e in e_tr]
        + [{**e, "split": "held-out"} for e in e_te],
        "plan": plans,
        "profile": str(profile_path),
    }
    data["report"] = report
    json_path.write_text(json.dumps(data, indent=1))
    md = markdown(data)
    json_path.with_suffix(".md").write_text(md)
    scatter(report["errors"], json_path.with_suffix(".png"))
    return md


def _s(s: dict) -> str:
    if not s.get("n"):
        return "none"
    ok = round(s["within_tol"] * s["n"])
    return (
        f"n={s['n']}, within ±{s['tol']:.0%}: {ok}/{s['n']} ({s['within_tol']:.1%}), median |err| "
        f"{s['median_abs_err']:.1%}, max |err| {s['max_abs_err']:.1%}"
    )


def markdown(data: dict) -> str:
    """The predicted-vs-measured and plan tables, from the JSON."""
    rep = data["report"]
    lines = [f"# perf model validation ({data['meta'].get('device', '')})", ""]
    lines += [f"- {k}: {v}" for k, v in data["meta"].items()]
    lines += [
        f"- profile: {rep['profile']}",
        f"- train: {_s(rep['summary']['train'])}",
        f"- **held out: {_s(rep['summary']['held_out'])}**",
        f"- all: {_s(rep['summary']['all'])}",
        "",
        "| workload | split | measured µs | predicted µs | error |",
        "|---|---|---|---|---|",
    ]
    for e in sorted(rep["errors"], key=lambda e: e["name"]):
        lines.append(
            f"| {e['name']} | {e['split']} | {e['measured_us']:.1f} | {e['predicted_us']:.1f} "
            f"| {e['rel_err']:+.1%} |"
        )
    skipped = [w for w in data["workloads"] if not w.get("measured_us")]
    if skipped:
        lines += ["", "Not measured:", ""]
        lines += [f"- {w['name']}: {w.get('note', 'no measurement')}" for w in skipped]
    lines += [
        "",
        "## plan: picked path vs fastest measured path (same run)",
        "",
        "| shape | weights | plan | plan µs | fastest | fastest µs | ratio | how |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in rep["plan"]:
        r = f"{p['ratio']:.3f}" if p["ratio"] else "-"
        pu = f"{p['plan_us']:.1f}" if p["plan_us"] else "not measured"
        lines.append(
            f"| {p['shape']} | {p['weights']} | {p['plan']} | {pu} | {p['fastest']} "
            f"| {p['fastest_us']:.1f} | {r} | {p['how']} |"
        )
    ok = [p for p in rep["plan"] if p["ratio"] and p["ratio"] <= 1.05]
    lines += ["", f"plan within 5% of the fastest: {len(ok)} of {len(rep['plan'])}"]
    lines += [
        "",
        "## recommend vs the fastest measured preset (speed only: no fidelity floor, min_gain 0)",
        "",
        "| model | batch x seq | recommended | fastest measured | measured µs | match |",
        "|---|---|---|---|---|---|",
    ]
    for r in rep.get("recommend", []):
        t = ", ".join(f"{k} {v:.0f}" for k, v in r["measured_us"].items())
        lines.append(
            f"| {r['model']} | {r['shape']} | {r['recommended']} | {r['fastest_measured']} "
            f"| {t} | {'yes' if r['match'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def scatter(errors: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    for split, c in (("train", "tab:blue"), ("held-out", "tab:orange")):
        pts = [(e["measured_us"], e["predicted_us"]) for e in errors if e["split"] == split]
        if pts:
            ax.scatter(*zip(*pts, strict=True), s=14, c=c, label=split)
    lo = min(min(e["measured_us"], e["predicted_us"]) for e in errors) * 0.8
    hi = max(max(e["measured_us"], e["predicted_us"]) for e in errors) * 1.25
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
    for f in (1 - TOL, 1 + TOL):
        ax.plot([lo, hi], [lo * f, hi * f], "k--", lw=0.5)
    ax.set(xscale="log", yscale="log", xlabel="measured device time (µs)", ylabel="predicted (µs)")
    ax.set_title("jax_bq.perf: predicted vs measured (dashed: ±15%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merge_meta(metas: list[dict]) -> dict:
    """One meta of several parts' files: later keys win, part timings are joined."""
    out, walls = {}, {}
    for m in metas:
        out.update(m)
        walls.update(m.get("part_wall_s", {}))
    out["part_wall_s"] = walls
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", help="measure, then write this JSON (+ .md, .png)")
    ap.add_argument("--fit", nargs="+", help="fit and report from measurement JSON(s), merged")
    ap.add_argument("--part", help=f"measure only these parts, comma-separated: {list(PARTS)}")
    ap.add_argument("--only", help="measure only workloads whose name contains one of A,B,..")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=140.0,
        help="per part: stop measuring (rows say so) once this many seconds were used",
    )
    ap.add_argument("--report", help="with several --fit files: where the merged JSON goes")
    ap.add_argument(
        "--profile", help="where to write the fitted profile (default: FILE_profile.json)"
    )
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, wall time (code check only)")
    args = ap.parse_args()
    if bool(args.out) == bool(args.fit):
        ap.error("give exactly one of --out or --fit")
    if args.out:
        path = Path(args.out)
        data = measure(args)
        path.write_text(json.dumps(data, indent=1))
    else:
        parts = [json.loads(Path(f).read_text()) for f in args.fit]
        path = Path(args.report or args.fit[0])
        data = {"meta": merge_meta([d["meta"] for d in parts]), "workloads": []}
        data["workloads"] = [w for d in parts for w in d["workloads"]]
        if len(parts) > 1:
            data["meta"]["merged_from"] = ", ".join(args.fit)
    prof = Path(args.profile) if args.profile else path.with_name(path.stem + "_profile.json")
    print(fit_and_report(data, path, prof))


if __name__ == "__main__":
    main()
