r"""Contrastive fine-tuning of a :class:`~jax_bq.models.BertEncoder` (bf16, QAT FP8, FP8 training).

The loss is the in-batch-negatives (InfoNCE / "multiple negatives ranking")
loss on normalized embeddings: for a batch of pairs ``(q_i, d_i)``,

.. math::
    L = -\frac{1}{B} \sum_i \log \frac{\exp(\tau\, q_i \cdot d_i)}
        {\sum_j \exp(\tau\, q_i \cdot d_j)}

with ``tau = 20`` (temperature 0.05). Pairs come from real text:
:func:`docstring_pairs` splits a docstring paragraph into its first sentence
(the query) and the rest (the document).

Modes (:data:`MODES`), all with float32 master weights and bf16 activations:

* ``"bf16"``: plain bf16 dots;
* ``"qat_fp8"``: the dense layers run ``qat_matmul`` with E4M3 per-channel
  weights and E4M3 per-token activations (W8A8) in the forward, bf16
  backward products, ``dW`` through the straight-through estimator;
* ``"fp8_train"``: E4M3 per-tensor weights and activations in the forward and
  E5M2 gradients in the backward products, all through ``qmatmul`` (the FP8
  training step, TransformerEngine's hybrid recipe).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_bq.flax.rules import WeightQuant
from jax_bq.models.bert import BertConfig, BertEncoder

__all__ = [
    "MODES",
    "contrastive_loss",
    "docstring_pairs",
    "encoder_for_mode",
    "make_train_step",
    "module_docstring_pairs",
    "pad_batch",
    "retrieval_metrics",
    "training_modules",
]

MODES = {
    "bf16": {},
    "qat_fp8": {"qat": WeightQuant("fp8_e4m3"), "act_format": "fp8_e4m3"},
    "fp8_train": {
        "qat": WeightQuant("fp8_e4m3", granularity="per_tensor"),
        "act_format": "fp8_e4m3",
        "act_granularity": "per_tensor",
        "qat_grads": "fp8",
    },
}

#: Inverse temperature of the contrastive loss (sentence-transformers' default scale).
SCALE = 20.0


def encoder_for_mode(config: BertConfig, mode: str, dtype=jnp.bfloat16) -> BertEncoder:
    """The :class:`BertEncoder` that trains in ``mode`` (a key of :data:`MODES`)."""
    if mode not in MODES:
        raise ValueError(f"unknown fine-tuning mode {mode!r}; expected one of {sorted(MODES)}")
    return BertEncoder(config, dtype, **MODES[mode])


def docstring_pairs(texts: list[str], min_chars: int = 30) -> list[tuple[str, str]]:
    """``(first sentence, rest)`` of each paragraph whose parts both have ``min_chars``."""
    pairs = []
    for t in texts:
        m = re.match(r"(.+?[.!?])\s+(.*)$", t)
        if m and len(m.group(1)) >= min_chars and len(m.group(2)) >= min_chars:
            pairs.append((m.group(1), m.group(2)))
    return pairs


#: Standard-library modules never imported for training pairs (GUI, side effects, tests).
_SKIP_MODULES = frozenset(
    "antigravity this idlelib tkinter turtle turtledemo test lib2to3 ensurepip venv "
    "pydoc_data".split()
)


def training_modules() -> tuple[str, ...]:
    """Public standard-library modules outside the evaluation corpus (``corpus.MODULES``)."""
    import sys

    from jax_bq.models.corpus import MODULES

    names = sorted(getattr(sys, "stdlib_module_names", ()))
    return tuple(
        m for m in names if not m.startswith("_") and m not in _SKIP_MODULES and m not in MODULES
    )


def module_docstring_pairs(modules: tuple[str, ...], min_chars: int = 30, max_chars: int = 600):
    """(first sentence, rest of the docstring) of each public function, class and method.

    Whitespace is collapsed and the rest is cut to ``max_chars``; a pair needs
    ``min_chars`` on both sides; duplicates are dropped; deterministic order.
    """
    import inspect
    import warnings

    from jax_bq.models.corpus import _collect

    seen: set[str] = set()
    texts: list[str] = []

    def add(obj):
        doc = getattr(obj, "__doc__", None)
        if doc:
            text = " ".join(inspect.cleandoc(doc).split())[: max_chars + 200]
            if text not in seen:
                seen.add(text)
                texts.append(text)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _collect(add, modules)
    return [(q, d[:max_chars]) for q, d in docstring_pairs(texts, min_chars)]


def pad_batch(tokenizer, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Int32 ids and mask ``[len(texts), length]``: truncated and right-padded to ``length``."""
    enc = tokenizer.encode_batch(list(texts))
    ids = np.zeros((len(texts), length), np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for i, e in enumerate(enc):
        n = min(len(e.ids), length)
        ids[i, :n] = e.ids[:n]
        mask[i, :n] = e.attention_mask[:n]
    return ids, mask


def contrastive_loss(q: jax.Array, d: jax.Array, scale: float = SCALE) -> jax.Array:
    """In-batch-negatives cross entropy of normalized ``q[B, H]`` against ``d[B, H]``."""
    logits = scale * (q.astype(jnp.float32) @ d.astype(jnp.float32).T)
    labels = jnp.arange(q.shape[0])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(logp[labels, labels])


def make_train_step(
    module: BertEncoder, optimizer, *, fidelity_weight: float = 0.0, with_parts: bool = False
) -> Callable:
    r"""A jitted training step of ``module`` with the optax ``optimizer``.

    ``step(params, opt_state, q_ids, q_mask, d_ids, d_mask) -> (params, opt_state, loss)``;
    ``loss`` is the contrastive loss :math:`L` of the batch (the quantized
    forward's, for a QAT module) and never includes the fidelity term: it is
    what the modes are compared on. With ``fidelity_weight`` :math:`\lambda > 0`
    (a QAT ``module``, ``module.qat`` set) the parameters descend on the total

    .. math::
        L + \lambda G, \qquad G = \frac{1}{2B} \sum_{t}
            \bigl(1 - \cos(f(W)_t,\ \mathrm{sg}[f_q(W)_t])\bigr)

    over the ``2B`` texts of the batch, where ``f_q`` is the quantized
    forward QAT trains, ``f`` the float forward of the same master weights
    ``W`` (``module`` without ``qat`` and activation quantization) and
    ``sg`` stop-gradient. It keeps the master weights' float model close to
    the quantized one, which the straight-through estimator alone does not:
    STE moves ``W`` as if rounding were the identity, so sub-grid updates
    pile up in ``W`` in the loss's descent direction, a coherent offset the
    quantized forward never sees. Cost: one more forward and backward (float
    products) per text. The stop-gradient matters: without it the two
    sides' gradients nearly cancel under the STE (on a tiny encoder the gap
    stays where plain QAT leaves it); with the float side as the target
    instead (quantized student, the usual distillation direction) the tiny
    encoder's gap closes as much, but that variant was not measured on MiniLM.

    With ``with_parts=True`` the third output is a dict of float32 scalars
    instead: ``"contrastive"`` (:math:`L`, the same value as ``loss``),
    ``"fidelity"`` (:math:`G`, 0 without the term) and ``"total"``
    (:math:`L + \lambda G`, what the gradient descends).

    Raises:
        ValueError: ``fidelity_weight < 0``, or ``> 0`` for a module without ``qat``.
    """
    import optax

    if fidelity_weight < 0:
        raise ValueError(f"fidelity_weight must be >= 0, got {fidelity_weight}")
    if fidelity_weight > 0 and module.qat is None:
        raise ValueError(
            f"fidelity_weight={fidelity_weight} needs a QAT module (module.qat is None: "
            "its float and quantized forwards are the same)"
        )
    reference = module.clone(qat=None, act_format=None, act_granularity=None)

    def loss_fn(params, q_ids, q_mask, d_ids, d_mask):
        q = module.apply({"params": params}, q_ids, q_mask)
        d = module.apply({"params": params}, d_ids, d_mask)
        loss = contrastive_loss(q, d)
        if not fidelity_weight:
            return loss, (loss, jnp.zeros((), jnp.float32))
        fq = reference.apply({"params": params}, q_ids, q_mask)
        fd = reference.apply({"params": params}, d_ids, d_mask)
        gap = 0.5 * (_cosine_gap(fq, q) + _cosine_gap(fd, d))
        return loss + fidelity_weight * gap, (loss, gap)

    @jax.jit
    def step(params, opt_state, q_ids, q_mask, d_ids, d_mask):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (total, (loss, gap)), grads = grad_fn(params, q_ids, q_mask, d_ids, d_mask)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        out = {"contrastive": loss, "fidelity": gap, "total": total} if with_parts else loss
        return optax.apply_updates(params, updates), opt_state, out

    return step


def _cosine_gap(x: jax.Array, target: jax.Array) -> jax.Array:
    """Mean ``1 - cos(x_i, sg(target_i))`` over rows (float32)."""
    x = x.astype(jnp.float32)
    t = jax.lax.stop_gradient(target).astype(jnp.float32)
    cos = jnp.sum(x * t, -1) / (jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(t, axis=-1))
    return jnp.mean(1.0 - cos)


def retrieval_metrics(q: np.ndarray, d: np.ndarray) -> dict:
    """Recall@1, recall@5 and MRR of query ``i`` retrieving document ``i`` (cosine)."""
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    sims = q @ d.T
    rank = (sims > np.diag(sims)[:, None]).sum(axis=1)  # 0 = the right document is first
    return {
        "recall@1": float(np.mean(rank < 1)),
        "recall@5": float(np.mean(rank < 5)),
        "mrr": float(np.mean(1.0 / (rank + 1))),
    }
