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
(:func:`jax_bq.qat.explain_step`), so the FP8 backward products are visible.

    jax-bq bench train_step --out benchmarks/results/train_step_h200.json
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
from jax_bq.qat import explain_step  # noqa: E402

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
    ap.add_argument("--modes", default="bf16,fp8_train")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--inputs", type=int, default=2, help="distinct random batches, rotated")
    args = ap.parse_args()

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
    on_gpu = jax.devices()[0].platform == "gpu"
    rows = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(MODES)}")
        step = jax.jit(make_step(config, mode, optimizer))
        arg_list = [(params, opt_state, ids, mask) for ids, mask in batches]
        t_compile = time.perf_counter()
        _, _, loss = step(*arg_list[0])
        jax.block_until_ready(loss)
        t_compile = time.perf_counter() - t_compile
        print(f"{mode}: compile + first step {t_compile:.1f} s", flush=True)
        if on_gpu:
            t = device_time_per_call(step, arg_list, calls=args.calls, warmup=args.warmup)
            us, timing = t["us"], "device (profiler trace)"
        else:
            t = time_fn(step, *arg_list[0], warmup=args.warmup, iters=args.calls)
            us, timing = t["median_s"] * 1e6, "wall (no GPU)"
        plan = explain_step(make_step(config, mode, optimizer), *arg_list[0])
        rows.append(
            {
                "mode": mode,
                "step_ms": us / 1e3,
                "timing": timing,
                "loss": float(loss),
                "compile_s": t_compile,
                "qmatmuls": plan.splitlines(),
            }
        )
        print(f"{mode}: {us / 1e3:.2f} ms per step ({timing}); loss {float(loss):.4f}", flush=True)
        if plan:
            print(plan, flush=True)
    base = next((r["step_ms"] for r in rows if r["mode"] == "bf16"), None)
    for r in rows:
        r["speedup_vs_bf16"] = base / r["step_ms"] if base else None
    result = {"machine": machine(), "args": vars(args), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    md = markdown(result)
    out.with_suffix(".md").write_text(md)
    print(md)


def markdown(result) -> str:
    """The result as a markdown table (plus the qmatmul list of each mode)."""
    a = result["args"]
    lines = [
        f"# Training step: {a['config']} at {a['batch']} x {a['seq']} "
        f"({result['machine']['device']})",
        "",
        "| mode | ms / step | timing | speedup vs bf16 | loss |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        sp = f"{r['speedup_vs_bf16']:.2f}x" if r["speedup_vs_bf16"] else ""
        lines.append(
            f"| {r['mode']} | {r['step_ms']:.2f} | {r['timing']} | {sp} | {r['loss']:.4f} |"
        )
    for r in result["rows"]:
        if r["qmatmuls"]:
            lines += ["", f"qmatmuls of `{r['mode']}` (forward and backward):", "", "```"]
            lines += r["qmatmuls"] + ["```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
