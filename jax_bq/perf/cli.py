"""``jax-bq calibrate-hw`` and ``jax-bq recommend``; :func:`register` adds them to the CLI."""

from __future__ import annotations

import dataclasses
import datetime


def calibrate(out: str | None = None, quick: bool = False) -> str:
    """Measures the local GPU, fits the efficiency factors, saves the profile; returns a report.

    Measured: device-to-device copy bandwidth, launch floor (a 1-element kernel),
    bf16 and FP8 GEMM rates at 8192^3 (XLA dot; XLA's direct float8 dot), attention
    throughput (XLA, 32x16x512x64), then the suite of :func:`workloads` for the fit.
    """
    import jax

    from jax_bq.perf import fit as ft
    from jax_bq.perf import hardware as hw

    dev = jax.devices()[0]
    if dev.platform != "gpu":
        raise SystemExit(f"calibrate-hw needs a GPU; the default device is {dev.platform}")
    kind = dev.device_kind
    key = hw.device_key(kind)
    if key is None:
        raise SystemExit(f"{kind!r} is not in the hardware registry: add a DeviceSpec first")
    lines = [f"device: {kind} (registry key {key})"]
    prof = measure_basics(key, kind, quick)
    lines.append(
        f"copy {prof.copy_tbps:.2f} TB/s, launch floor {prof.launch_us:.2f} us, "
        f"bf16 GEMM {prof.gemm_tflops['bf16']:.0f} TFLOP/s, "
        f"FP8 GEMM {prof.gemm_tflops['fp8']:.0f} TFLOP/s, "
        f"attention (xla) {prof.attention_tflops['xla']:.0f} TFLOP/s"
    )
    eff = hw.effective(key, prof)
    measured, notes = measure_suite(workloads(quick, eff))
    lines += notes
    train, test = ft.split(measured)
    prof = dataclasses.replace(
        prof,
        efficiency=ft.fit(train, eff),
        source=f"jax-bq calibrate-hw on {kind}, {datetime.date.today().isoformat()}",
    )
    eff = hw.effective(key, prof)
    tr, te = ft.summary(ft.errors(train, eff)), ft.summary(ft.errors(test, eff))
    prof = dataclasses.replace(prof, fit_error={"train": tr, "held_out": te})
    path = prof.save(out or hw.cache_path(key))
    lines.append(f"fit: train {_fmt(tr)}; held out {_fmt(te)}")
    lines.append(f"saved {path}")
    return "\n".join(lines)


def measure_basics(key: str, kind: str, quick: bool):
    """A HardwareProfile with the measured copy rate, launch floor, GEMM and attention rates."""
    import jax
    import jax.numpy as jnp

    from jax_bq.perf import hardware as hw
    from jax_bq.perf import suite
    from jax_bq.perf.measure import device_us

    big = [jnp.full((1 << 28,), float(i), jnp.bfloat16) for i in range(2)]  # 512 MiB each
    copy_us = device_us(jax.jit(lambda a: a), [(b,) for b in big], copies=True)
    copy = 2 * big[0].nbytes / copy_us / 1e6
    del big
    tiny = [(jnp.ones((1,), jnp.float32) * i,) for i in range(2)]
    launch = device_us(jax.jit(lambda a: a + 1), tiny)
    n = 4096 if quick else 8192
    a = [(jax.random.normal(jax.random.PRNGKey(i), (n, n), jnp.bfloat16),) * 2 for i in range(2)]
    dn = (((1,), (1,)), ((), ()))
    mm = jax.jit(lambda x, w: jax.lax.dot_general(x, w, dn, preferred_element_type=jnp.bfloat16))
    bf16 = 2 * n**3 / device_us(mm, a) / 1e6
    f8 = [(x.astype(jnp.float8_e4m3fn), w.astype(jnp.float8_e4m3fn)) for x, w in a]
    mm8 = jax.jit(lambda x, w: jax.lax.dot_general(x, w, dn, preferred_element_type=jnp.float32))
    fp8 = 2 * n**3 / device_us(mm8, f8) / 1e6
    aw = suite.attention_workload(32, 16, 512, 64)
    fn, args, _ = aw.build()
    att_tf = aw.ops[0][0].flops / device_us(fn, args) / 1e6
    return hw.HardwareProfile(
        device=key,
        device_kind=kind,
        copy_tbps=copy,
        gemm_tflops={"bf16": bf16, "fp8": fp8},
        launch_us=launch,
        attention_tflops={"xla": att_tf},
    )


def measure_suite(ws) -> tuple[list[dict], list[str]]:
    """(fit workloads with their measured device time, notes on those skipped or failed)."""
    from jax_bq.perf import fit as ft
    from jax_bq.perf import suite
    from jax_bq.perf.measure import device_us

    measured, notes = [], []
    for w in ws:
        try:
            fn, args, envs = w.build()
            with suite.env(envs):
                us = device_us(fn, args)
        except suite.Unavailable as e:
            notes.append(f"  skipped {w.name}: {e}")
            continue
        except Exception as e:  # recorded, the calibration goes on without it
            notes.append(f"  failed {w.name}: {type(e).__name__}: {str(e)[:200]}")
            continue
        measured.append(ft.workload(w.name, w.group, w.ops, us))
    return measured, notes


def _fmt(s: dict) -> str:
    if not s.get("n"):
        return "no workloads"
    return (
        f"n={s['n']}, within 15%: {s['within_tol']:.0%}, median |err| "
        f"{s['median_abs_err']:.1%}, max {s['max_abs_err']:.1%}"
    )


def workloads(quick: bool, eff) -> list:
    """The calibration suite: every qmatmul path at decode and prefill shapes, quantize, LN."""
    from jax_bq.perf import suite

    shapes = [(1, 8192, 8192), (16, 8192, 8192), (64, 8192, 8192), (1024, 8192, 8192)]
    if not quick:
        shapes += [(4096, 4096, 4096), (1, 28672, 8192), (4096, 1024, 1024)]
    out = []
    for m, n, k in shapes:
        out.append(suite.qmatmul_workload(m, n, k, "bf16", "xla_bf16"))
        for wcfg in ("fp8_tensor", "fp8_channel", "fp8_tile"):
            out.append(suite.qmatmul_workload(m, n, k, wcfg, "cublaslt_fp8"))
            if m <= 64:
                out.append(suite.qmatmul_workload(m, n, k, wcfg, "w8a16"))
        out.append(suite.qmatmul_workload(m, n, k, "nvfp4", "w4a16" if m <= 64 else "fp4_via_fp8"))
        out.append(suite.qmatmul_workload(m, n, k, "fp8_tensor", "dequant_dot"))
    for fmt in ("fp8_e4m3", "nvfp4", "mxfp8"):
        out.append(suite.quantize_workload(8192, 8192, fmt))
        out.append(suite.quantize_workload(8192, 8192, fmt, "dequantize"))
    out.append(suite.layernorm_workload(4096, 1024))
    for s in (128, 512):
        out.append(suite.attention_workload(32, 16, s, 64))
    return out


def recommend_cmd(args) -> str:
    """Runs ``jax-bq recommend``; returns the table."""
    from jax_bq.perf.recommend import recommend

    device = args.device
    if device == "local":
        import jax

        device = jax.devices()[0]
    r = recommend(
        args.model,
        args.phase,
        args.seq,
        args.batch,
        device=device,
        min_cosine=args.min_cosine,
        allow_unmeasured=args.allow_unmeasured,
        min_gain=args.min_gain,
        kv_format=args.kv_format,
        context=args.context,
    )
    return r.table()


def _calibrate_args(p) -> None:
    p.add_argument("--out", help="profile path (default: the user cache)")
    p.add_argument("--quick", action="store_true", help="smaller suite")


def _recommend_args(r) -> None:
    r.add_argument("--model", default="e5-large", help="minilm-l6, e5-large, bge-large, llama-3-8b")
    r.add_argument("--phase", default="prefill", choices=("prefill", "decode"))
    r.add_argument("--batch", type=int, default=1)
    r.add_argument("--seq", type=int, default=128)
    r.add_argument("--context", type=int, default=None, help="decode: cached tokens")
    r.add_argument("--kv-format", default="bf16", choices=("bf16", "fp8", "nvfp4"))
    r.add_argument("--device", default="local", help="registry key or 'local'")
    r.add_argument("--min-cosine", type=float, default=0.99)
    r.add_argument("--allow-unmeasured", action="store_true")
    r.add_argument("--min-gain", type=float, default=0.05, help="speed margin over bf16")


def register() -> None:
    """Adds ``calibrate-hw`` and ``recommend`` to the ``jax-bq`` subcommands."""
    from jax_bq.cli import register as add

    add(
        "calibrate-hw",
        "measure this GPU and save its hardware profile",
        _calibrate_args,
        lambda a: print(calibrate(a.out, a.quick)) or 0,
    )
    add(
        "recommend",
        "predict the fastest quantization preset",
        _recommend_args,
        lambda a: print(recommend_cmd(a)) or 0,
    )
