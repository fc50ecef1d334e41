"""Fine-tune the real all-MiniLM-L6-v2 in three modes: bf16, QAT FP8 (W8A8), FP8 training step.

In-batch-negatives contrastive loss (:mod:`jax_bq.models.finetune`) on
(first sentence, rest of the docstring) pairs from standard-library
docstrings: evaluation pairs are every 4th pair of the retrieval corpus's
modules (``corpus.MODULES``), training pairs the others plus those of all
other public standard-library modules (texts disjoint from the evaluation).
Every mode starts from the same weights and sees the same batches in the
same order. Reports retrieval quality (recall@1/5, MRR of the
first sentence retrieving its paragraph's rest) before and after, evaluated
with float32 inference and with quantized W8A8 inference (``qmatmul``,
E4M3 per-channel weights and per-token activations), the mean cosine between
the two, the loss curves (JSON and a PNG plot) and seconds per step.

The loss that the modes are compared on (``losses`` in the JSON, the plot,
"max dloss vs bf16" and its tolerance :data:`LOSS_TOLERANCE`) is the
contrastive component ``L`` of each mode's forward (``make_train_step``'s
``loss``), never the fidelity term: a QAT run with ``--fidelity-weight w``
descends on ``L + w * G`` (``G``: mean ``1 - cos`` between the float and the
stop-gradient quantized forward), logged beside it as ``fidelity_gaps`` and
``total_losses``.

The committed results: the three modes (one run per mode, merged), then QAT
with the fidelity term (``make_train_step(fidelity_weight=)``) at weights 40
and 70 (and at 70 with learning rates 1e-4 and 2e-4), merged in::

    jax-bq bench finetune_minilm --out /tmp/ft/MODE.json --modes MODE --steps 120 --eval-pairs 128
    jax-bq bench finetune_minilm --out /tmp/ft/qat_fid70.json --modes qat_fp8 --steps 120 \
        --eval-pairs 128 --skip-before --fidelity-weight 70 [--fidelity-lr 1e-4]
    jax-bq bench finetune_minilm --merge benchmarks/results/finetune_minilm_cpu.json \
        /tmp/ft/qat_fid*.json --out benchmarks/results/finetune_minilm_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_bq.models import BertEncoder, load_hf_bert, load_tokenizer, minilm_dir
from jax_bq.models.corpus import MODULES
from jax_bq.models.finetune import (
    MODES,
    encoder_for_mode,
    make_train_step,
    module_docstring_pairs,
    pad_batch,
    retrieval_metrics,
    training_modules,
)
from jax_bq.qat import snap_weights


def _embedder(config, length: int, quantized: bool, act_format=None):
    module = BertEncoder(config, jnp.float32, act_format=act_format)
    apply = jax.jit(lambda p, i, m: module.apply({"params": p}, i, m))

    def embed(params, tokenizer, texts, batch=64):
        if quantized:
            from jax_bq.flax import quantize_model_weights

            params = quantize_model_weights(params, "fp8_e4m3")
        out = []
        for s in range(0, len(texts), batch):
            chunk = texts[s : s + batch]
            ids, mask = pad_batch(tokenizer, chunk + [""] * (batch - len(chunk)), length)
            out.append(np.asarray(apply(params, ids, mask), np.float32)[: len(chunk)])
        return np.concatenate(out)

    return embed


def evaluate(params, config, tokenizer, pairs, length) -> dict:
    """Retrieval metrics with float and quantized inference, and their embedding cosine."""
    queries = [q for q, _ in pairs]
    docs = [d for _, d in pairs]
    res = {}
    embs = {}
    for name, quantized in (("float32", False), ("fp8_w8a8", True)):
        embed = _embedder(config, length, quantized, "fp8_e4m3" if quantized else None)
        q, d = embed(params, tokenizer, queries), embed(params, tokenizer, docs)
        embs[name] = np.concatenate([q, d])
        res[name] = retrieval_metrics(q, d)
    # The exported weights (dq(q(W)), what the quantized forward uses) in float32.
    embed = _embedder(config, length, False)
    snapped = snap_weights(params, "fp8_e4m3")
    embs["exported_float32"] = np.concatenate(
        [embed(snapped, tokenizer, queries), embed(snapped, tokenizer, docs)]
    )
    a, b = embs["float32"], embs["fp8_w8a8"]
    res["cosine_fp8_vs_float"] = _cosine(a, b)
    res["cosine_fp8_vs_exported_float"] = _cosine(embs["exported_float32"], b)
    res["cosine_exported_vs_master_float"] = _cosine(embs["exported_float32"], a)
    return res


def _cosine(a, b) -> dict:
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"mean": float(cos.mean()), "min": float(cos.min())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON results path (a .md and .png beside it)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=32, help="tokens per text (truncate/pad)")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--eval-pairs", type=int, default=256)
    ap.add_argument("--eval-every", type=int, default=4, help="every n-th corpus pair is held out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--fidelity-weight",
        type=float,
        default=0.0,
        help="make_train_step(fidelity_weight=) of the --regularize modes",
    )
    ap.add_argument(
        "--fidelity-lr", type=float, default=None, help="learning rate of the --regularize modes"
    )
    ap.add_argument("--regularize", default="qat_fp8", help="modes --fidelity-weight applies to")
    ap.add_argument(
        "--skip-before", action="store_true", help="no evaluation before (merge takes another's)"
    )
    ap.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="combine result files of single-mode runs (same settings) into --out; no training",
    )
    args = ap.parse_args()
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        results = parts[0]
        keys = ("steps", "batch", "length", "lr", "seed", "eval_pairs", "eval_every")
        for part in parts[1:]:
            if any(part["args"][k] != results["args"][k] for k in keys):
                raise ValueError(f"{args.merge}: runs with different settings cannot be merged")
            results["before"] = results["before"] or part["before"]
            results["modes"].update(part["modes"])
        results["args"]["modes"] = ",".join(results["modes"])
        _write(results, Path(args.out))
        return

    d = minilm_dir()
    config, params0 = load_hf_bert(d)
    tokenizer = load_tokenizer(d, config.max_seq_length)
    corpus = module_docstring_pairs(MODULES)
    evals = corpus[:: args.eval_every][: args.eval_pairs]
    held = set(evals)
    train = module_docstring_pairs(training_modules()) + [p for p in corpus if p not in held]
    rng = np.random.default_rng(args.seed)
    order = np.concatenate(
        [rng.permutation(len(train)) for _ in range(args.steps * args.batch // len(train) + 1)]
    )
    batches = []
    for s in range(args.steps):
        idx = order[s * args.batch : (s + 1) * args.batch]
        q_ids, q_mask = pad_batch(tokenizer, [train[i][0] for i in idx], args.length)
        d_ids, d_mask = pad_batch(tokenizer, [train[i][1] for i in idx], args.length)
        batches.append((q_ids, q_mask, d_ids, d_mask))

    before = None
    if not args.skip_before:
        t0 = time.perf_counter()
        before = evaluate(params0, config, tokenizer, evals, args.length)
        eval_s = time.perf_counter() - t0
        print(f"before: {json.dumps(before)} ({eval_s:.1f} s)", flush=True)
    results = {
        "model": "all-MiniLM-L6-v2",
        "device": jax.devices()[0].device_kind,
        "host": platform.processor() or platform.machine(),
        "train_pairs": len(train),
        "eval_pairs": len(evals),
        "args": vars(args),
        "before": before,
        "modes": {},
    }
    for mode in args.modes.split(","):
        module = encoder_for_mode(config, mode)
        regularized = mode in args.regularize.split(",")
        fidelity = args.fidelity_weight if regularized else 0.0
        lr = args.fidelity_lr if regularized and args.fidelity_lr else args.lr
        optimizer = optax.adamw(lr, weight_decay=0.01)
        step = make_train_step(module, optimizer, fidelity_weight=fidelity, with_parts=True)
        params = jax.tree_util.tree_map(jnp.asarray, params0)
        state = optimizer.init(params)
        losses, gaps, totals, times = [], [], [], []
        for s, batch in enumerate(batches):
            t = time.perf_counter()
            params, state, parts = step(params, state, *batch)
            losses.append(float(parts["contrastive"]))  # blocks
            times.append(time.perf_counter() - t)
            gaps.append(float(parts["fidelity"]))
            totals.append(float(parts["total"]))
            if s % 20 == 0 or s == len(batches) - 1:
                print(
                    f"{mode} step {s}: contrastive loss {losses[-1]:.4f}, fidelity gap "
                    f"{gaps[-1]:.5f}, total {totals[-1]:.4f} ({times[-1]:.2f} s)",
                    flush=True,
                )
        after = evaluate(params, config, tokenizer, evals, args.length)
        print(f"{mode} after: {json.dumps(after)}", flush=True)
        label = f"{mode} fidelity {fidelity:g}" if fidelity else mode
        label += f" lr {lr:g}" if lr != args.lr else ""
        results["modes"][label] = {
            "losses": losses,
            "fidelity_gaps": gaps,
            "total_losses": totals,
            "seconds_per_step_median": float(np.median(times[1:])),
            "compile_and_first_step_s": times[0],
            "after": after,
            "fidelity_weight": fidelity,
            "lr": lr,
        }
    _write(results, Path(args.out))


def _write(results, out: Path) -> None:
    _track(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(markdown(results))
    _plot(results, out.with_suffix(".png"))
    print(markdown(results))


def _smooth(x, w=20):
    x = np.asarray(x)
    return np.convolve(x, np.ones(w) / w, mode="valid") if len(x) >= w else x


#: A mode's loss tracks bf16 when its 20-step moving average stays within this of bf16's
#: (about 5% of the loss level after fine-tuning, ~0.4; the quantization noise of the
#: unregularized FP8 modes alone is 0.008-0.011).
LOSS_TOLERANCE = 0.02


def _track(results) -> None:
    """Max |smoothed loss - smoothed bf16 loss| per mode (20-step moving average).

    ``losses`` are the contrastive component (``make_train_step``'s ``loss``,
    never including the fidelity term), the fair comparison across modes;
    ``total_losses`` (contrastive + weight x fidelity gap, what the QAT runs
    with a fidelity term descend) are summarized beside them where logged.
    """
    if "bf16" not in results["modes"]:
        return
    ref = _smooth(results["modes"]["bf16"]["losses"])
    for r in results["modes"].values():
        r["max_abs_smoothed_loss_diff_vs_bf16"] = float(np.max(np.abs(_smooth(r["losses"]) - ref)))
        r["tracks_bf16"] = r["max_abs_smoothed_loss_diff_vs_bf16"] <= LOSS_TOLERANCE
        r["final_loss_mean_last20"] = float(np.mean(r["losses"][-20:]))
        if r.get("total_losses"):
            r["final_total_loss_mean_last20"] = float(np.mean(r["total_losses"][-20:]))
            r["final_fidelity_gap_mean_last20"] = float(np.mean(r["fidelity_gaps"][-20:]))


def markdown(results) -> str:
    """The results as a markdown table."""
    b = results["before"]
    lines = [
        f"# all-MiniLM-L6-v2 contrastive fine-tune ({results['device']}, "
        f"{results['args']['steps']} steps x batch {results['args']['batch']} x "
        f"{results['args']['length']} tokens; {results['train_pairs']} train pairs, "
        f"{results['eval_pairs']} eval pairs)",
        "",
        "| mode | s/step | final loss (last 20) | max dloss vs bf16 | final total (last 20) "
        "| R@1 f32 | R@1 fp8 | MRR f32 | MRR fp8 | cos(fp8, f32) | cos(fp8, exported f32) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if b:
        lines.append(
            f"| before | | | | | {b['float32']['recall@1']:.3f} | {b['fp8_w8a8']['recall@1']:.3f} "
            f"| {b['float32']['mrr']:.3f} | {b['fp8_w8a8']['mrr']:.3f} "
            f"| {b['cosine_fp8_vs_float']['mean']:.5f} | {_exported(b)} |"
        )
    for mode, r in results["modes"].items():
        a = r["after"]
        lines.append(
            f"| {mode} | {r['seconds_per_step_median']:.2f} | "
            f"{r.get('final_loss_mean_last20', float('nan')):.4f} | "
            f"{r.get('max_abs_smoothed_loss_diff_vs_bf16', float('nan')):.4f} | "
            f"{_total(r)} | {a['float32']['recall@1']:.3f} | {a['fp8_w8a8']['recall@1']:.3f} | "
            f"{a['float32']['mrr']:.3f} | {a['fp8_w8a8']['mrr']:.3f} | "
            f"{a['cosine_fp8_vs_float']['mean']:.5f} | {_exported(a)} |"
        )
    lines += [
        "",
        "loss: the contrastive (in-batch negatives) loss of the mode's forward, never including "
        "the fidelity term, so that every mode is compared on the same quantity; final total: "
        "what the parameters descend, loss + w x fidelity gap G (= loss without a fidelity "
        "term; '-': G not logged by that run). "
        "s/step is wall time on the machine that ran it (on a shared CPU, with modes run in "
        "parallel, it is no speed comparison); max dloss: largest gap between the 20-step moving "
        "averages of the mode's loss and bf16's (same batches, same order; tolerance "
        f"{LOSS_TOLERANCE}); R@1/MRR: first "
        "sentence retrieving the rest of its docstring among the eval pairs, with float32 and "
        "FP8 W8A8 (per-channel weights, per-token activations) inference; cos(fp8, f32): mean "
        "cosine between those two embeddings (the same weights: float master vs quantized); "
        "cos(fp8, exported f32): FP8 W8A8 against the float32 forward of the exported weights "
        "dq(q(W)) (jax_bq.qat.snap_weights: what QAT ships; only the activations' quantization "
        "differs); '-': not measured in that run; 'fidelity w': QAT with "
        "make_train_step(fidelity_weight=w), the term 1 - cos(float forward, stop-gradient "
        "quantized forward) of the same master weights added to the loss.",
    ]
    return "\n".join(lines) + "\n"


def _total(r) -> str:
    if not r.get("fidelity_weight"):
        return f"{r.get('final_loss_mean_last20', float('nan')):.4f}"
    t = r.get("final_total_loss_mean_last20")
    return f"{t:.4f}" if t is not None else "-"


def _exported(r) -> str:
    c = r.get("cosine_fp8_vs_exported_float")
    return f"{c['mean']:.5f}" if c else "-"


def _plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, r in results["modes"].items():
        ax.plot(r["losses"], alpha=0.25)
        sm = _smooth(r["losses"])
        color = ax.lines[-1].get_color()
        ax.plot(np.arange(len(sm)) + 19, sm, label=f"{mode} (20-step mean)", color=color)
    ax.set_xlabel("step")
    ax.set_ylabel("in-batch contrastive loss")
    ax.set_title(f"all-MiniLM-L6-v2 fine-tune on stdlib docstring pairs ({results['device']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
