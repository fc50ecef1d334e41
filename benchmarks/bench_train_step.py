"""One training step (forward + backward + AdamW) of a BERT encoder: bf16 vs the FP8 training step.

The step: random token ids ``[batch, seq]`` (full attention mask), pooled
embeddings of the two halves of the batch compared by the in-batch-negatives
contrastive loss (:mod:`jax_bq.models.finetune`), ``jax.value_and_grad``, an
optax AdamW update, all in one jitted function; float32 master weights and
optimizer state, bf16 activations. Modes (:data:`jax_bq.models.finetune.MODES`):

* ``bf16``: plain bf16 dots;
* ``fp8_train``: every dense layer runs ``qat_matmul`` with E4M3 per-tensor
  weights and activations in the forward and E5M2 gradients in both backward
  products, all through ``qmatmul`` (cuBLASLt FP8 on a GPU with FP8 tensor
  cores: TransformerEngine's hybrid recipe with current scaling);
* ``qat_fp8`` (optional): W8A8 forward, bf16 backward products.

Time per step: on a GPU the device time of the step's kernels from a
``jax.profiler`` trace (benchmarks/common.py), median over ``--calls`` steps
after ``--warmup`` steps; elsewhere wall time (said in the JSON). The JSON
also lists every qmatmul the step runs, forward and backward, with its path
(:func:`jax_bq.qat.explain_jaxpr` of the traced step), so the FP8 backward
products are visible, and the cost before the first step split into
tracing, lowering, XLA compilation and the first step. Modes run in the
order given; the JSON and the table are rewritten after each mode's
compilation and after its timing, so a run cut short keeps what it measured.

    jax-bq bench train_step --out benchmarks/results/train_step_h200.json --modes fp8_train,bf16
    jax-bq bench train_step --config tiny --batch 8 --seq 32 --out /tmp/t.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import device_time_per_call, machine, time_fn  # noqa: E402
from jax_bq.models import E5_LARGE, MINILM_L6, BertConfig, random_bert_params  # noqa: E402
from jax_bq.models.finetune import MODES, contrastive_loss, encoder_for_mode  # noqa: E402
from jax_bq.qat import explain_jaxpr  # noqa: E402

CONFIGS = {
    "e5_large": E5_LARGE,
    "minilm": MINILM_L6,
    # A CPU smoke-test size (same code path).
    "tiny": BertConfig(
        vocab_size=2000, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256
    ),
}


def make_step(config, mode: str, optimizer):
    """``step(params, opt_state, ids, mask) -> (params, opt_state, loss)``, jitted."""
    module = encoder_for_mode(config, mode)

    def loss_fn(params, ids, mask):
        emb = module.apply({"params": params}, ids, mask)
        half = ids.shape[0] // 2
        return contrastive_loss(emb[:half], emb[half:])

    def step(params, opt_state, ids, mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids, mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON path (a .md table is written beside it)")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="e5_large")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--modes", default="bf16,fp8_train", help="comma-separated, run in this order")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--inputs", type=int, default=2, help="distinct random batches, rotated")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"unknown modes {bad or args.modes!r}; expected some of {sorted(MODES)}")

    config = CONFIGS[args.config]
    params = random_bert_params(config, seed=0)
    optimizer = optax.adamw(1e-5, weight_decay=0.01)
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(0)
    batches = [
        (
            jnp.asarray(rng.integers(1, config.vocab_size, (args.batch, args.seq)), jnp.int32),
            jnp.ones((args.batch, args.seq), jnp.int32),
        )
        for _ in range(args.inputs)
    ]
    arg_list = [(params, opt_state, ids, mask) for ids, mask in batches]
    on_gpu = jax.devices()[0].platform == "gpu"
    result = {"machine": machine(), "args": vars(args), "rows": []}
    out = Path(args.out)
    for mode in modes:
        row = {"mode": mode}
        result["rows"].append(row)
        step = run_mode(row, make_step(config, mode, optimizer), arg_list)
        _write(result, out)  # a run cut during the timing keeps the compile times and paths
        if on_gpu:
            t = device_time_per_call(step, arg_list, calls=args.calls, warmup=args.warmup)
            us, timing = t["us"], "device (profiler trace)"
        else:
            t = time_fn(step, *arg_list[0], warmup=args.warmup, iters=args.calls)
            us, timing = t["median_s"] * 1e6, "wall (no GPU)"
        row.update(step_ms=us / 1e3, timing=timing)
        print(f"{mode}: {us / 1e3:.2f} ms per step ({timing}); loss {row['loss']:.4f}", flush=True)
        _write(result, out)
    print(markdown(result))


def run_mode(row: dict, step_fn, arg_list):
    """Traces, lowers and compiles ``step_fn`` once, runs its first step; fills ``row``.

    ``row`` gets ``trace_s`` (Python tracing to a jaxpr, where jax_bq's rules
    and plans run), ``lower_s`` (jaxpr to StableHLO), ``xla_compile_s``,
    ``first_step_s``, ``compile_s`` (their sum: the cost before the first
    loss), ``loss`` and ``qmatmuls`` (:func:`jax_bq.qat.explain_jaxpr` of the
    traced step). Returns the compiled step.
    """
    mode = row["mode"]
    t0 = time.perf_counter()
    traced = jax.jit(step_fn).trace(*arg_list[0])
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    _, _, loss = compiled(*arg_list[0])
    jax.block_until_ready(loss)
    t4 = time.perf_counter()
    plan = explain_jaxpr(traced.jaxpr)
    row.update(
        trace_s=t1 - t0,
        lower_s=t2 - t1,
        xla_compile_s=t3 - t2,
        first_step_s=t4 - t3,
        compile_s=t4 - t0,
        loss=float(loss),
        qmatmuls=plan.splitlines(),
    )
    print(
        f"{mode}: trace {t1 - t0:.1f} s, lower {t2 - t1:.1f} s, XLA compile {t3 - t2:.1f} s, "
        f"first step {t4 - t3:.1f} s",
        flush=True,
    )
    if plan:
        print(plan, flush=True)
    return compiled


def _write(result, out: Path) -> None:
    """Writes the JSON and the markdown table (speedups against the bf16 row, if timed)."""
    rows = result["rows"]
    base = next((r.get("step_ms") for r in rows if r["mode"] == "bf16"), None)
    for r in rows:
        ms = r.get("step_ms")
        r["speedup_vs_bf16"] = base / ms if base and ms else None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))


def markdown(result) -> str:
    """The result as a markdown table (plus the qmatmul list of each mode)."""
    a = result["args"]
    lines = [
        f"# Training step: {a['config']} at {a['batch']} x {a['seq']} "
        f"({result['machine']['device']})",
        "",
        "| mode | ms / step | timing | speedup vs bf16 | loss | trace s | lower s "
        "| XLA compile s | first step s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def num(r, key, fmt):
        v = r.get(key)
        return format(v, fmt) if v is not None else "-"

    for r in result["rows"]:
        sp = f"{r['speedup_vs_bf16']:.2f}x" if r.get("speedup_vs_bf16") else ""
        lines.append(
            f"| {r['mode']} | {num(r, 'step_ms', '.2f')} | {r.get('timing', 'not timed')} "
            f"| {sp} | {num(r, 'loss', '.4f')} | {num(r, 'trace_s', '.1f')} "
            f"| {num(r, 'lower_s', '.1f')} | {num(r, 'xla_compile_s', '.1f')} "
            f"| {num(r, 'first_step_s', '.1f')} |"
        )
    for r in result["rows"]:
        if r.get("qmatmuls"):
            lines += ["", f"qmatmuls of `{r['mode']}` (forward and backward):", "", "```"]
            lines += r["qmatmuls"] + ["```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
