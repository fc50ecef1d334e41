"""Quantization recipes: calibration data -> transforms -> quantization -> fidelity report.

``quantize_with_recipe(encoder, "fp8_smooth", calibration_texts)`` runs, on a
:class:`jax_bq.models.SentenceEncoder` (post-LN BERT: MiniLM, E5, BGE):

1. **rotate** (optional): the exact per-head Hadamard fold V -> attention_output
   and the online FFN2-input rotation (``BertConfig.ffn_hadamard_block``,
   the ``jax_bq_hadamard`` op) with FFN2's kernel rotated to match;
2. **collect** the input statistics of every dense layer on the calibration
   texts (:func:`jax_bq.transforms.collect_layer_stats`), for smooth or GPTQ;
3. **smooth** (optional): SmoothQuant into attention_output, folded into V,
   alpha per layer by measured output error (the statistics are rescaled
   exactly, not recollected);
4. **quantize** every dense kernel: GPTQ codes under MSE-calibrated scales
   (``gptq``), or round-to-nearest;
5. **report** (optional): fidelity against the float32 encoder on evaluation
   texts (:class:`jax_bq.models.fidelity.FidelityRow`).

``calibration_seconds`` covers steps 1-4. See ``docs/accuracy_transforms.md``
for what folds exactly in a post-LN BERT and the measured ablation.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import jax
import numpy as np

from jax_bq.flax.rules import WeightQuant, param_bytes, quantize_model_weights
from jax_bq.qtensor import QuantizedTensor

__all__ = ["RECIPES", "Recipe", "RecipeResult", "quantize_with_recipe", "fidelity_report"]


@dataclass(frozen=True)
class Recipe:
    """What a recipe does (see the module docstring for the order).

    Attributes:
        name: recipe name.
        weights: weight format for every dense kernel.
        act_format: activation handling (``"fp8_e4m3"``: W8A8; ``"bf16"``: weight-only).
        act_granularity: ``"per_tensor"`` or ``"per_token"`` for W8A8.
        rotate: Hadamard rotations (V -> attention_output folded, FFN2 input online).
        smooth: SmoothQuant into attention_output (folded into V).
        gptq: GPTQ codes instead of round-to-nearest.
        ffn_block: FWHT block of the FFN2 rotation (``None``: the largest
            power of two <= 512 dividing the FFN width).
        damp: GPTQ damping.
    """

    name: str
    weights: WeightQuant
    act_format: str | None
    act_granularity: str | None = None
    rotate: bool = False
    smooth: bool = False
    gptq: bool = False
    ffn_block: int | None = None
    damp: float = 0.01


def _family(prefix, weights, act_format, act_granularity=None):
    f = dict(weights=weights, act_format=act_format, act_granularity=act_granularity)
    return {
        f"{prefix}_rtn": Recipe(f"{prefix}_rtn", **f),
        f"{prefix}_smooth": Recipe(f"{prefix}_smooth", **f, smooth=True),
        f"{prefix}_rotate": Recipe(f"{prefix}_rotate", **f, rotate=True),
        f"{prefix}_gptq": Recipe(f"{prefix}_gptq", **f, gptq=True),
        f"{prefix}_rotate_gptq": Recipe(f"{prefix}_rotate_gptq", **f, rotate=True, gptq=True),
        f"{prefix}_full": Recipe(f"{prefix}_full", **f, rotate=True, smooth=True, gptq=True),
    }


#: Every recipe: ``<format>_<methods>``; ``_full`` = rotate + smooth + GPTQ.
RECIPES: dict[str, Recipe] = {
    **_family("fp8", WeightQuant("fp8_e4m3"), "fp8_e4m3", "per_tensor"),
    **_family("fp8_tok", WeightQuant("fp8_e4m3"), "fp8_e4m3", "per_token"),
    **_family("nvfp4", WeightQuant("nvfp4", calibrate=True), "bf16"),
    # W8A16 (FP8 weights, bf16 activations): the weight half of W8A8's error, for the ablation.
    **_family("fp8w", WeightQuant("fp8_e4m3"), "bf16"),
}


@dataclass
class RecipeResult:
    """A quantized encoder and what the recipe did."""

    encoder: object  # SentenceEncoder
    recipe: Recipe
    calibration_seconds: float  # wall time of steps 1-4
    calibration_cpu_seconds: float  # CPU time of this process (all threads) in steps 1-4
    steps: dict = field(default_factory=dict)  # step name -> seconds / choices
    fidelity: object | None = None  # FidelityRow


def _check_encoder(encoder, recipe: Recipe) -> None:
    """Raises ``ValueError`` for a model ``recipe`` cannot transform.

    Needed: a :class:`SentenceEncoder` of a :class:`BertConfig`, float32
    ``[K, N]`` kernels of all six dense layers in every ``layer_<i>``, not
    already rotated; ``rotate`` also needs the plain (not fused) block, which
    has the online FFN2 rotation, and a power-of-two FFN block (checked later).
    """
    from jax_bq.models.bert import BertConfig
    from jax_bq.models.loading import SentenceEncoder

    if not isinstance(encoder, SentenceEncoder) or not isinstance(encoder.config, BertConfig):
        raise ValueError(
            f"recipes transform a jax_bq.models.SentenceEncoder (post-LN BERT), got "
            f"{type(encoder).__name__}"
        )
    p = encoder.params
    for i in range(encoder.config.num_layers):
        layer = p.get(f"layer_{i}") if isinstance(p, dict) else None
        if not isinstance(layer, dict):
            raise ValueError(f"recipes: params lack the BERT block 'layer_{i}'")
        for dense in ("query", "key", "value", "attention_output", "intermediate", "output"):
            k = layer.get(dense, {}).get("kernel")
            if k is None:
                raise ValueError(f"recipes: layer_{i}/{dense}/kernel is missing")
            if isinstance(k, QuantizedTensor) or np.dtype(k.dtype) != np.float32 or k.ndim != 2:
                raise ValueError(
                    f"recipes need float32 [K, N] kernels; layer_{i}/{dense}/kernel is "
                    f"{type(k).__name__} {getattr(k, 'dtype', '?')} (already quantized or cast?)"
                )
        if "ffn_hadamard_signs" in layer or encoder.config.ffn_hadamard_block is not None:
            raise ValueError(f"recipes: layer_{i} is already rotated")
    if recipe.rotate and encoder.fused:
        raise ValueError(
            f"recipe {recipe.name!r} rotates the FFN2 input online, which the fused block "
            "(SentenceEncoder.fused=True) does not do: pass the plain encoder"
        )


def _ffn_block(width: int, requested: int | None) -> int:
    if requested is not None:
        return requested
    b = 512
    while b >= 16:
        if width % b == 0:
            return b
        b //= 2
    raise ValueError(f"FFN width {width} has no power-of-two block >= 16 for the rotation")


def _rescale_stats(st, s):
    """Statistics of the inputs ``x / s`` from those of ``x`` (exact)."""
    from jax_bq.transforms.stats import LayerStats

    return LayerStats(st.hessian / np.outer(s, s), st.absmax / s, st.tokens, st.samples / s)


def _resolve(recipe: str | Recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {sorted(RECIPES)}")
    return RECIPES[recipe]


def _rotate(params, cfg, recipe: Recipe, seed: int, steps: dict):
    """Step 1: the folded V rotation and the online FFN2-input rotation."""
    from jax_bq.transforms.hadamard import fold_value_rotation, rotate_ffn_output

    block = _ffn_block(cfg.intermediate_size, recipe.ffn_block)
    params = fold_value_rotation(params, cfg.num_heads, seed)
    params = rotate_ffn_output(params, block, seed)
    steps["rotate_ffn_block"] = block
    return params, dataclasses.replace(cfg, ffn_hadamard_block=block)


def _smooth(params, stats, recipe: Recipe, steps: dict):
    """Step 3: SmoothQuant into attention_output; the statistics rescaled exactly."""
    from jax_bq.transforms.smoothquant import smooth_value_output

    t = time.perf_counter()
    params, chosen = smooth_value_output(
        params, stats, recipe.weights, recipe.act_format, recipe.act_granularity
    )
    for layer, c in chosen.items():
        if c is not None:
            key = f"{layer}/attention_output"
            stats[key] = _rescale_stats(stats[key], c[1])
    steps["smooth_alpha"] = {k: (None if c is None else c[0]) for k, c in chosen.items()}
    steps["smooth_seconds"] = time.perf_counter() - t
    return params


def quantize_with_recipe(
    encoder,
    recipe: str | Recipe,
    calibration_texts: Sequence[str],
    *,
    eval_corpus: Sequence[str] | None = None,
    eval_queries: Sequence[str] | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> RecipeResult:
    """Quantizes ``encoder`` by ``recipe`` (a name in :data:`RECIPES` or a :class:`Recipe`).

    Args:
        encoder: float32 :class:`jax_bq.models.SentenceEncoder` (BERT family).
        recipe: which transforms and format.
        calibration_texts: texts for the statistics (keep them apart from evaluation texts).
        eval_corpus: with ``eval_queries``, the result carries a fidelity report.
        eval_queries: the queries of that report (top-10 retrieval overlap).
        batch_size: calibration batch size.
        seed: seed of the random Hadamard signs.

    Returns:
        :class:`RecipeResult`.

    Raises:
        ValueError: an unknown recipe, no calibration texts, or a model the
            recipe cannot transform (see :func:`_check_encoder`).
    """
    from jax_bq.models.loading import SentenceEncoder
    from jax_bq.transforms.gptq import gptq_model
    from jax_bq.transforms.stats import collect_layer_stats

    recipe = _resolve(recipe)
    _check_encoder(encoder, recipe)
    texts = sorted(calibration_texts, key=len)  # similar lengths share a batch
    if not texts:
        raise ValueError("quantize_with_recipe needs calibration texts")
    cfg, params, steps = encoder.config, encoder.params, {}
    t0, c0 = time.perf_counter(), time.process_time()
    if recipe.rotate:
        params, cfg = _rotate(params, cfg, recipe, seed, steps)
    if recipe.smooth or recipe.gptq:  # round-to-nearest needs no statistics
        fenc = SentenceEncoder(cfg, params, encoder.tokenizer, encoder.dtype)
        t = time.perf_counter()
        batches = [
            fenc.tokenize(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)
        ]
        stats = collect_layer_stats(fenc.module, params, batches)
        steps["collect_seconds"] = time.perf_counter() - t
    if recipe.smooth:
        params = _smooth(params, stats, recipe, steps)
    t = time.perf_counter()
    if recipe.gptq:
        qparams, rep = gptq_model(params, stats, recipe.weights, damp=recipe.damp)
        steps["gptq_layers_kept_rtn"] = sorted(k for k, r in rep.items() if not r.used_gptq)
    else:
        qparams = quantize_model_weights(params, [("kernel$", recipe.weights)])
    jax.block_until_ready(jax.tree_util.tree_leaves(qparams))
    steps["quantize_seconds"] = time.perf_counter() - t
    act = (recipe.act_format, recipe.act_granularity)
    qenc = SentenceEncoder(cfg, qparams, encoder.tokenizer, encoder.dtype, *act)
    result = RecipeResult(qenc, recipe, time.perf_counter() - t0, time.process_time() - c0, steps)
    if eval_corpus is not None and eval_queries is not None:
        result.fidelity = fidelity_report(encoder, qenc, eval_corpus, eval_queries, recipe.name)
    return result


def fidelity_report(
    reference, quantized, corpus, queries, name: str = "quantized", ref_embeddings=None
):
    """The metrics of :mod:`jax_bq.models.fidelity` for an already-quantized encoder.

    Args:
        reference: the float32 encoder.
        quantized: the encoder to score.
        corpus: documents of the top-10 retrieval overlap.
        queries: its queries.
        name: row name.
        ref_embeddings: ``reference.embed(corpus + queries)`` when already
            computed (several reports against one reference).

    Returns:
        :class:`jax_bq.models.fidelity.FidelityRow`.
    """
    from jax_bq.models.fidelity import FidelityRow, _is_kernel, _topk
    from jax_bq.semantic import alignment

    texts = list(corpus) + list(queries)
    nc = len(corpus)
    ref = reference.embed(texts) if ref_embeddings is None else np.asarray(ref_embeddings)
    want = (len(texts), reference.config.hidden_size)
    if ref.shape != want:
        raise ValueError(f"ref_embeddings has shape {ref.shape}, expected {want}")
    t = time.perf_counter()
    emb = quantized.embed(texts)
    dt = time.perf_counter() - t
    cos = np.sum(ref * emb, axis=1) / (
        np.linalg.norm(ref, axis=1) * np.linalg.norm(emb, axis=1) + 1e-30
    )
    ref_top, top = _topk(ref[:nc], ref[nc:], 10), _topk(emb[:nc], emb[nc:], 10)
    sim_r = np.corrcoef((ref[nc:] @ ref[:nc].T).ravel(), (emb[nc:] @ emb[:nc].T).ravel())[0, 1]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ref_top, top, strict=True)])
    return FidelityRow(
        name,
        float(cos.mean()),
        float(cos.min()),
        alignment(ref, emb).pearson,
        float(sim_r),
        float(overlap),
        param_bytes(quantized.params, _is_kernel),
        param_bytes(reference.params, _is_kernel),
        dt,
    )
