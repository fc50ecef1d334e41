"""Flax BERT-family sentence encoders (MiniLM, E5, BGE) with quantizable dense layers.

Needs ``flax`` and ``tokenizers`` (``pip install jax_bq[flax]``).
"""

from jax_bq.models.bert import BGE_LARGE, E5_LARGE, MINILM_L6, BertConfig, BertEncoder
from jax_bq.models.loading import (
    SentenceEncoder,
    bert_params_from_hf,
    load_hf_bert,
    load_tokenizer,
    minilm,
    minilm_dir,
    random_bert_params,
)

__all__ = [
    "BGE_LARGE",
    "E5_LARGE",
    "MINILM_L6",
    "BertConfig",
    "BertEncoder",
    "SentenceEncoder",
    "bert_params_from_hf",
    "load_hf_bert",
    "load_tokenizer",
    "minilm",
    "minilm_dir",
    "random_bert_params",
]
