"""jax_bq's compressed-tensors and ModelOpt exports, read by compressed-tensors' own code.

Needs PyTorch and the ``compressed-tensors`` package (with its imports: transformers,
pydantic, loguru); skips, naming what is missing, where they are absent (CI does not
install PyTorch). The checkpoint is read the way compressed-tensors reads a model-free
checkpoint: ``safetensors.torch.load_file`` and ``CompressedTensorsDequantizer`` (its
``config.json`` parser, pydantic validation of ``quantization_config``, scheme-format
inference, target matching and per-format decompressors, and its check that no
quantization parameter is left over). ModelOpt NVFP4 files go through its
``ModelOptNvfp4Converter`` first.

On a machine that has PyTorch but no network, carry the pure-Python wheels (and
pydantic-core for its Python) fetched with ``pip download --no-deps`` of
compressed-tensors, pydantic, pydantic-core, annotated-types, typing-inspection,
typing-extensions and loguru, install them with ``--no-deps --target DIR`` and put DIR
first on ``PYTHONPATH``.

What "equal" means, per format (from compressed-tensors' decompressors):

* FP8 E4M3 (tensor, channel, 128x128 block, 1 x 32 group): ``f32(code) * scale`` in
  float32, as jax_bq: bit for bit.
* MXFP4: codes and the E8M0 scale are decoded to bfloat16 and multiplied there; both are
  exact (an E2M1 value times a power of two), so bit for bit with jax_bq's float32.
* NVFP4: ``bf16(code * (f32(weight_scale) / weight_global_scale))``: the result is
  rounded to bfloat16, and ``weight_global_scale = f32(1 / ts)`` makes ``s / (1 / ts)``
  differ from jax_bq's ``s * ts`` by up to 1 float32 ulp. So: bit for bit with jax_bq's
  bfloat16 dequantize when ``ts`` is a power of two (the reciprocal is exact), and
  within one bfloat16 ulp of it otherwise.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_bq
from jax_bq.flax.rules import WeightQuant, quantize_model_weights
from jax_bq.io import save_quantized
from jax_bq.io.names import flax_to_hf
from jax_bq.models.bert import BertConfig
from jax_bq.models.loading import random_bert_params

torch = pytest.importorskip("torch", reason="needs PyTorch (compressed-tensors runs on it)")
ct = pytest.importorskip("compressed_tensors", reason="needs the compressed-tensors package")
safetensors_torch = pytest.importorskip("safetensors.torch")

from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.compressors.format import infer_module_format  # noqa: E402
from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (  # noqa: E402
    CompressedTensorsDequantizer,
)
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402

TINY = BertConfig(vocab_size=64, hidden_size=128, num_layers=1, num_heads=2,
                  intermediate_size=256, max_position_embeddings=32)  # fmt: skip

SPECS = {
    "fp8-tensor": WeightQuant("fp8_e4m3", "per_tensor"),
    "fp8-channel": WeightQuant("fp8_e4m3"),
    "fp8-block128": WeightQuant("fp8_e4m3", "tile_2d"),
    "fp8-group32": WeightQuant("fp8_e4m3", "per_block", 32),
    "nvfp4": WeightQuant("nvfp4"),
    "mxfp4": WeightQuant("mxfp4"),
}
CT_FORMAT = {
    "fp8-tensor": "naive-quantized",  # weight-only FP8: what compressed-tensors infers
    "fp8-channel": "naive-quantized",
    "fp8-block128": "naive-quantized",
    "fp8-group32": "naive-quantized",
    "nvfp4": "nvfp4-pack-quantized",
    "mxfp4": "mxfp4-pack-quantized",
}


def _params(pow2_tensor_scale: bool):
    p = random_bert_params(TINY, seed=3)
    p = jax.tree_util.tree_map(lambda x: x * (1 + jnp.abs(x) * 40), p)
    if pow2_tensor_scale:
        # amax = 2688 * 2^-12 exactly: NVFP4's ts = amax / (6 * 448) = 2^-12.
        p = jax.tree_util.tree_map(lambda x: (x / jnp.abs(x).max()) * 0.65625, p)
    return p


def _quantized_by_module(q) -> dict[str, jax_bq.QuantizedTensor]:
    leaves = jax.tree_util.tree_flatten_with_path(
        q, is_leaf=lambda x: isinstance(x, jax_bq.QuantizedTensor)
    )[0]
    names = {"/".join(k.key for k in path): leaf for path, leaf in leaves}
    hf = flax_to_hf(list(names))
    return {
        hf[n].module: leaf for n, leaf in names.items() if isinstance(leaf, jax_bq.QuantizedTensor)
    }


def _bf16_ulp(x: np.ndarray) -> np.ndarray:
    b = x.astype(ml_dtypes.bfloat16)
    up = np.nextafter(b, np.array(np.inf, ml_dtypes.bfloat16)).astype(np.float32)
    return np.abs(up - b.astype(np.float32))


def _ct_dequantize(folder) -> dict[str, np.ndarray]:
    tensors = safetensors_torch.load_file(str(folder / "model.safetensors"))
    deq = CompressedTensorsDequantizer(folder, dtype=torch.float32)
    out = deq.validate(tensors)  # also refuses leftover quantization parameters
    return {k: v.float().numpy() for k, v in out.items()}


def _compare(name, ours_q, theirs, pow2):
    ours32 = np.asarray(jax_bq.dequantize(ours_q, jnp.float32))
    assert theirs.shape == ours32.shape, (name, theirs.shape, ours32.shape)
    if ours_q.format is not jax_bq.QuantFormat.NVFP4:
        assert theirs.tobytes() == ours32.tobytes(), name
        return
    ours16 = np.asarray(jax_bq.dequantize(ours_q, jnp.bfloat16)).astype(np.float32)
    if pow2:
        assert theirs.tobytes() == ours16.tobytes(), name
    else:
        diff = np.abs(theirs - ours16)
        assert np.all(diff <= _bf16_ulp(ours32)), (name, float(diff.max()))


# The power-of-two tensor scale matters for NVFP4 only.
CASES = [(s, False) for s in SPECS] + [("nvfp4", True)]


@pytest.mark.parametrize("spec,pow2", CASES, ids=[s + ("-ts-pow2" if p else "") for s, p in CASES])
def test_compressed_tensors_decompresses_our_export(tmp_path, spec, pow2):
    q = quantize_model_weights(_params(pow2), SPECS[spec])
    save_quantized(tmp_path, q, layout="compressed-tensors", hf_config={"model_type": "bert"})

    qcfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qcfg)  # their schema accepts ours
    for gname, scheme in parsed.config_groups.items():
        inferred = infer_module_format(torch.nn.Linear, scheme)
        assert scheme.format == inferred.value == CT_FORMAT[spec], gname
        assert BaseCompressor.get_value_from_registry(scheme.format) is not None

    theirs = _ct_dequantize(tmp_path)
    ours = _quantized_by_module(q)
    assert ours, "no quantized weights in the tree"
    for module, qt in ours.items():
        _compare(module, qt, theirs[f"{module}.weight"], pow2)


@pytest.mark.parametrize("pow2", [True, False], ids=["ts-pow2", "ts-any"])
def test_modelopt_nvfp4_export_through_their_converter(tmp_path, pow2):
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4 import (
        ModelOptNvfp4Converter,
    )
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import NVFP4

    q = quantize_model_weights(_params(pow2), "nvfp4")
    save_quantized(tmp_path, q, layout="modelopt", hf_config={"model_type": "bert"})
    ours = _quantized_by_module(q)
    tensors = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    conv = ModelOptNvfp4Converter(targets=sorted(ours))
    tensors = conv.validate(tensors)
    scheme = QuantizationScheme(targets=sorted(ours), **NVFP4)
    for module, qt in ours.items():
        local = {p: tensors[f"{module}.{p}"] for p in ("weight_packed", "weight_scale",
                                                       "weight_global_scale")}  # fmt: skip
        theirs = NVFP4PackedCompressor.decompress(local, scheme)["weight"].float().numpy()
        _compare(module, qt, theirs, pow2)
