"""Flax param paths <-> Hugging Face tensor names.

Interoperable layouts name tensors the way the source framework did. For a
:class:`jax_bq.models.BertEncoder` tree the names are those of Hugging Face's
``BertModel`` (the inverse of :func:`jax_bq.models.bert_params_from_hf`), so
``layer_0/query/kernel`` is ``encoder.layer.0.attention.self.query.weight``.
Any other tree of nested dicts gets generic names: the module path joined by
``.``, with ``kernel`` and ``embedding`` leaves called ``weight``.

A leaf's *module* is its path without the last key; quantization tensors are
named after the module (``<module>.weight_scale``, ``<module>.input_scale``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["HfName", "flax_to_hf", "hf_to_flax_bert"]

_BLOCKS = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_output": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
    "output_norm": "output.LayerNorm",
}
_EMBEDS = {
    "word_embeddings": "embeddings.word_embeddings",
    "position_embeddings": "embeddings.position_embeddings",
    "token_type_embeddings": "embeddings.token_type_embeddings",
    "embeddings_norm": "embeddings.LayerNorm",
}
_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "act_scale": "input_scale"}
_LAYER = re.compile(r"^layer_(\d+)$")
_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class HfName:
    """Where a Flax leaf goes: ``module`` + ``.`` + ``leaf``; ``transpose`` for float kernels."""

    module: str
    leaf: str
    transpose: bool

    @property
    def tensor(self) -> str:
        """The full tensor name."""
        return f"{self.module}.{self.leaf}"


def _bert_module(parts: list[str]) -> str | None:
    if len(parts) == 1 and parts[0] in _EMBEDS:
        return _EMBEDS[parts[0]]
    if len(parts) == 2 and (m := _LAYER.match(parts[0])) and parts[1] in _BLOCKS:
        return f"encoder.layer.{m.group(1)}.{_BLOCKS[parts[1]]}"
    return None


def flax_to_hf(paths: list[str]) -> dict[str, HfName]:
    """Names for every leaf path (``/``-joined); BERT names if every path is a BERT leaf.

    Raises:
        ValueError: two paths would get the same tensor name.
    """
    split = {p: p.split("/") for p in paths}
    bert = all(_bert_module(s[:-1]) is not None for s in split.values())
    out, seen = {}, {}
    for p, s in split.items():
        module = _bert_module(s[:-1]) if bert else ".".join(s[:-1]) or "model"
        name = HfName(module, _LEAF.get(s[-1], s[-1]), s[-1] == "kernel")
        if name.tensor in seen:
            raise ValueError(f"params {seen[name.tensor]!r} and {p!r} both map to {name.tensor!r}")
        seen[name.tensor] = p
        out[p] = name
    return out


def hf_to_flax_bert(module: str, leaf: str) -> str | None:
    """The BertEncoder path of a Hugging Face ``module.leaf``; ``None`` if not a BERT tensor."""
    if module.startswith("bert."):
        module = module[5:]
    inv_embed = {v: k for k, v in _EMBEDS.items()}
    inv_block = {v: k for k, v in _BLOCKS.items()}
    if module in inv_embed:
        mod = inv_embed[module]
        if leaf == "weight":
            return f"{mod}/{'scale' if mod.endswith('norm') else 'embedding'}"
        return f"{mod}/{leaf}" if leaf == "bias" else None
    m = _HF_LAYER.match(module)
    if not m or m.group(2) not in inv_block:
        return None
    mod = f"layer_{m.group(1)}/{inv_block[m.group(2)]}"
    if leaf == "weight":
        return f"{mod}/{'scale' if mod.endswith('norm') else 'kernel'}"
    if leaf == "input_scale":
        return f"{mod}/act_scale"
    return f"{mod}/{leaf}" if leaf == "bias" else None
