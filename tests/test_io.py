"""jax_bq.io: bit-exact round trips per format and layout, refusal of damaged files."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_bq
from jax_bq.flax.rules import WeightQuant, quantize_model_weights
from jax_bq.io import CheckpointError, load_quantized, read_checkpoint, save_quantized
from jax_bq.io.safetensors_file import read_safetensors
from jax_bq.models.bert import BertConfig
from jax_bq.models.loading import bert_params_from_hf, random_bert_params

TINY = BertConfig(vocab_size=64, hidden_size=128, num_layers=1, num_heads=2,
                  intermediate_size=256, max_position_embeddings=32)  # fmt: skip


@pytest.fixture(scope="module")
def params():
    p = random_bert_params(TINY, seed=1)
    # Heavier tails than N(0, 0.02) so that scales differ between blocks.
    return jax.tree_util.tree_map(lambda x: x * (1 + jnp.abs(x) * 40), p)


def _leaves(tree):
    return jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, jax_bq.QuantizedTensor)
    )[0]


def assert_same(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb, strict=True):
        assert type(x) is type(y), path
        if isinstance(x, jax_bq.QuantizedTensor):
            assert jax.tree_util.tree_structure(x) == jax.tree_util.tree_structure(y), path
            for u, v in zip(
                jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y), strict=True
            ):
                assert u.dtype == v.dtype and u.shape == v.shape, path
                assert np.asarray(u).tobytes() == np.asarray(v).tobytes(), path
        else:
            assert x.dtype == y.dtype and x.shape == y.shape, path
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), path


JAX_BQ_SPECS = {
    "fp8_e4m3-channel": WeightQuant("fp8_e4m3"),
    "fp8_e4m3-tensor": WeightQuant("fp8_e4m3", "per_tensor"),
    "fp8_e4m3-tile": WeightQuant("fp8_e4m3", "tile_2d"),
    "fp8_e4m3-b32": WeightQuant("fp8_e4m3", "per_block", 32),
    "fp8_e5m2-b64": WeightQuant("fp8_e5m2", "per_block", 64),
    "fp4-b32": WeightQuant("fp4", block_size=32),
    "nvfp4": WeightQuant("nvfp4"),
    "mxfp8": WeightQuant("mxfp8"),
    "mxfp4": WeightQuant("mxfp4"),
}
CT_SPECS = [
    "fp8_e4m3-channel",
    "fp8_e4m3-tensor",
    "fp8_e4m3-tile",
    "fp8_e4m3-b32",
    "nvfp4",
    "mxfp4",
]
MO_SPECS = ["fp8_e4m3-channel", "fp8_e4m3-tensor", "nvfp4", "mxfp8"]
CASES = (
    [("jax_bq", s) for s in JAX_BQ_SPECS]
    + [("compressed-tensors", s) for s in CT_SPECS]
    + [("modelopt", s) for s in MO_SPECS]
)


@pytest.mark.parametrize("layout,spec", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_round_trip_bit_exact(tmp_path, params, layout, spec):
    q = quantize_model_weights(params, JAX_BQ_SPECS[spec])
    save_quantized(tmp_path / "ck", q, layout=layout, hf_config={"model_type": "bert"})
    ck = read_checkpoint(tmp_path / "ck")
    assert ck.layout == layout and ck.sha256
    assert_same(q, ck.params)
    # Saving what was loaded gives the same file, byte for byte.
    save_quantized(tmp_path / "again", ck.params, layout=layout, hf_config={"model_type": "bert"})
    assert (tmp_path / "ck/model.safetensors").read_bytes() == (
        tmp_path / "again/model.safetensors"
    ).read_bytes()


def test_jax_bq_layout_keeps_stacks_ragged_tails_and_casts(tmp_path):
    x = jax.random.normal(jax.random.key(0), (3, 24, 80), jnp.bfloat16)
    tree = {
        "stacked": jax.vmap(lambda a: jax_bq.quantize(a, "nvfp4"))(x),
        "ragged": jax_bq.quantize(x[0], "fp4", block_size=32),  # 80 = 2 * 32 + 16
        "e8m0": jax_bq.quantize(x[1], "mxfp4"),
        "norm": {"scale": jnp.ones((80,), jnp.bfloat16), "step": jnp.int32(7)},
    }
    save_quantized(tmp_path, tree)
    assert_same(tree, load_quantized(tmp_path))


def test_safetensors_library_reads_the_container(tmp_path, params):
    safetensors = pytest.importorskip("safetensors")
    q = quantize_model_weights(params, "nvfp4")
    f = save_quantized(tmp_path, q, layout="compressed-tensors")
    with safetensors.safe_open(str(f), framework="numpy") as st:
        keys = set(st.keys())
        meta = st.metadata()
        packed = st.get_tensor("encoder.layer.0.intermediate.dense.weight_packed")
    assert meta["format"] == "pt"
    assert "encoder.layer.0.attention.self.query.weight_global_scale" in keys
    want = np.asarray(q["layer_0"]["intermediate"]["kernel"].data)
    assert packed.dtype == np.uint8 and np.array_equal(packed, want)


def _unpack_e2m1(packed):
    lo, hi = packed & 0xF, packed >> 4
    codes = np.stack([lo, hi], axis=-1).reshape(packed.shape[0], -1)  # low nibble first
    return codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32)


def test_compressed_tensors_nvfp4_dequantizes_by_its_formula(tmp_path, params):
    """compressed-tensors: w = e2m1(code) * (weight_scale / weight_global_scale)."""
    q = quantize_model_weights(params, "nvfp4")
    f = save_quantized(tmp_path, q, layout="compressed-tensors")
    t, _ = read_safetensors(f)
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors"
    assert cfg["format"] == "nvfp4-pack-quantized"
    m = "encoder.layer.0.output.dense"
    assert m in cfg["config_groups"]["group_0"]["targets"]
    vals = _unpack_e2m1(t[f"{m}.weight_packed"])
    s = t[f"{m}.weight_scale"].astype(np.float32) / t[f"{m}.weight_global_scale"]
    w_ct = vals * np.repeat(s, 16, axis=1)
    ours = np.asarray(jax_bq.dequantize(q["layer_0"]["output"]["kernel"], jnp.float32))
    np.testing.assert_allclose(w_ct, ours, rtol=2**-22, atol=0)
    ref = np.asarray(params["layer_0"]["output"]["kernel"]).T
    assert jax_bq.sqnr_db(ref, w_ct) > 15


def test_modelopt_nvfp4_dequantizes_by_its_formula(tmp_path, params):
    """ModelOpt: w = e2m1(code) * weight_scale * weight_scale_2, bit for bit as jax_bq."""
    q = quantize_model_weights(params, "nvfp4")
    f = save_quantized(tmp_path, q, layout="modelopt")
    t, _ = read_safetensors(f)
    hq = json.loads((tmp_path / "hf_quant_config.json").read_text())
    assert hq["quantization"]["quant_algo"] == "NVFP4"
    assert hq["quantization"]["group_size"] == 16
    m = "encoder.layer.0.attention.self.key"
    w = t[f"{m}.weight"]
    assert w.dtype == np.uint8 and w.shape == (128, 64)
    assert t[f"{m}.weight_scale"].shape == (128, 8) and t[f"{m}.weight_scale_2"].shape == ()
    s = t[f"{m}.weight_scale"].astype(np.float32) * t[f"{m}.weight_scale_2"]
    w_mo = _unpack_e2m1(w) * np.repeat(s, 16, axis=1)
    ours = np.asarray(jax_bq.dequantize(q["layer_0"]["key"]["kernel"], jnp.float32))
    assert w_mo.tobytes() == ours.tobytes()


def test_ct_global_scale_is_reciprocal_of_modelopt(tmp_path, params):
    q = quantize_model_weights(params, "nvfp4")
    ct, _ = read_safetensors(save_quantized(tmp_path / "ct", q, layout="compressed-tensors"))
    mo, _ = read_safetensors(save_quantized(tmp_path / "mo", q, layout="modelopt"))
    m = "encoder.layer.0.attention.self.value"
    gs, s2 = ct[f"{m}.weight_global_scale"][0], mo[f"{m}.weight_scale_2"]
    assert abs(float(gs) * float(s2) - 1.0) < 2**-22
    amax = np.abs(np.asarray(params["layer_0"]["value"]["kernel"])).max()
    assert s2 == np.float32(amax) / np.float32(2688)


def _strip_record(src, dst):
    """A copy of a jax_bq-written checkpoint as another tool would write it (no record)."""
    t, meta = read_safetensors(src / "model.safetensors")
    from jax_bq.io.safetensors_file import encode

    dst.mkdir()
    (dst / "model.safetensors").write_bytes(encode(dict(t), {"format": "pt"}))
    cfg = json.loads((src / "config.json").read_text())
    del cfg["jax_bq_checkpoint"]
    (dst / "config.json").write_text(json.dumps(cfg))
    if (src / "hf_quant_config.json").exists():
        (dst / "hf_quant_config.json").write_text((src / "hf_quant_config.json").read_text())


@pytest.mark.parametrize(
    "layout,spec",
    [("compressed-tensors", s) for s in CT_SPECS] + [("modelopt", s) for s in MO_SPECS],
)
def test_import_foreign_files_by_convention(tmp_path, params, layout, spec):
    q = quantize_model_weights(params, JAX_BQ_SPECS[spec])
    save_quantized(tmp_path / "ours", q, layout=layout)
    _strip_record(tmp_path / "ours", tmp_path / "theirs")
    ck = read_checkpoint(tmp_path / "theirs")
    assert ck.sha256 is None and ck.layout == layout
    assert_same(q, ck.params)


def test_static_input_scales_travel(tmp_path, params):
    q = quantize_model_weights(params, WeightQuant("fp8_e4m3", "per_tensor"))
    q["layer_0"]["query"]["act_scale"] = jnp.float32(0.125)
    for layout in ("compressed-tensors", "modelopt"):
        f = save_quantized(tmp_path / layout, q, layout=layout)
        t, _ = read_safetensors(f)
        assert t["encoder.layer.0.attention.self.query.input_scale"].reshape(()) == 0.125
        assert_same(q, load_quantized(tmp_path / layout))
    cfg = json.loads((tmp_path / "compressed-tensors/config.json").read_text())
    groups = cfg["quantization_config"]["config_groups"].values()
    with_inputs = [g for g in groups if g["input_activations"]]
    assert with_inputs[0]["targets"] == ["encoder.layer.0.attention.self.query"]


def test_hf_names_match_the_bert_loader(tmp_path, params):
    """Float params saved in an HF layout load back through bert_params_from_hf."""
    q = quantize_model_weights(params, [("layer_0/query/kernel", "fp8_e4m3")])
    f = save_quantized(tmp_path, q, layout="compressed-tensors")
    t, _ = read_safetensors(f)
    floats = {k: v for k, v in t.items() if "query.weight" not in k and "query" not in k}
    assert "encoder.layer.0.intermediate.dense.weight" in floats
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert "encoder.layer.0.intermediate.dense" in cfg["ignore"]
    # Put back a float query to check every name with the real HF-name loader.
    floats["encoder.layer.0.attention.self.query.weight"] = np.asarray(
        params["layer_0"]["query"]["kernel"]
    ).T
    floats["encoder.layer.0.attention.self.query.bias"] = t[
        "encoder.layer.0.attention.self.query.bias"
    ]
    back = bert_params_from_hf(floats, TINY)
    assert np.array_equal(
        back["layer_0"]["intermediate"]["kernel"], params["layer_0"]["intermediate"]["kernel"]
    )


@pytest.mark.parametrize(
    "spec,layout",
    [
        ("fp8_e5m2-b64", "compressed-tensors"),
        ("fp4-b32", "modelopt"),
        ("mxfp8", "compressed-tensors"),
        ("fp8_e4m3-tile", "modelopt"),
    ],
)
def test_formats_a_layout_cannot_hold_are_refused(tmp_path, params, spec, layout):
    q = quantize_model_weights(params, JAX_BQ_SPECS[spec])
    with pytest.raises(ValueError, match="has no .* layout"):
        save_quantized(tmp_path, q, layout=layout)
    assert not (tmp_path / "model.safetensors").exists()


def test_modelopt_refuses_mixed_algos(tmp_path, params):
    q = quantize_model_weights(params, [("query/kernel$", "nvfp4"), ("kernel$", "fp8_e4m3")])
    with pytest.raises(ValueError, match="one quant_algo"):
        save_quantized(tmp_path, q, layout="modelopt")
    save_quantized(tmp_path / "ct", q, layout="compressed-tensors")  # mixed is fine there
    cfg = json.loads((tmp_path / "ct/config.json").read_text())["quantization_config"]
    assert cfg["format"] == "mixed-precision" and len(cfg["config_groups"]) == 2
    assert_same(q, load_quantized(tmp_path / "ct"))


@pytest.fixture
def saved(tmp_path, params):
    save_quantized(tmp_path, quantize_model_weights(params, "nvfp4"))
    return tmp_path


def test_truncated_file_refused(saved):
    f = saved / "model.safetensors"
    blob = f.read_bytes()
    for cut in (4, 100, len(blob) - 1):
        f.write_bytes(blob[:cut])
        with pytest.raises(CheckpointError, match="truncated|not a safetensors"):
            load_quantized(saved)


def test_tampered_byte_refused(saved):
    f = saved / "model.safetensors"
    blob = bytearray(f.read_bytes())
    blob[-10] ^= 0x01
    f.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="sha256"):
        load_quantized(saved)


def test_tampered_record_refused(saved):
    f = saved / "model.safetensors"
    t, meta = read_safetensors(f)
    from jax_bq.io.safetensors_file import encode

    meta = dict(meta)
    meta["jax_bq.record"] = meta["jax_bq.record"].replace('"nvfp4"', '"mxfp4"', 1)
    f.write_bytes(encode(dict(t), meta))
    with pytest.raises(CheckpointError, match="sha256"):
        load_quantized(saved)


def test_config_from_another_save_refused(saved, tmp_path_factory, params):
    other = tmp_path_factory.mktemp("other")
    save_quantized(other, quantize_model_weights(params, "mxfp4"))
    (saved / "config.json").write_text((other / "config.json").read_text())
    with pytest.raises(CheckpointError, match="different saves"):
        load_quantized(saved)


def test_missing_and_foreign_files_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_quantized(tmp_path / "nope")
    (tmp_path / "model.safetensors").write_bytes(b"{not a checkpoint at all}")
    with pytest.raises(CheckpointError):
        load_quantized(tmp_path)


def test_failed_save_leaves_no_temp_files(tmp_path):
    with pytest.raises(ValueError, match="string keys"):
        save_quantized(tmp_path, {"a": [jnp.ones(3)]})
    assert list(tmp_path.iterdir()) == []


def test_ct_reciprocal_that_does_not_invert_exactly_is_restored(tmp_path, params):
    """f32(1 / f32(1 / ts)) != ts for some ts: the record keeps ts; foreign import is 1 ulp."""
    ts = np.random.default_rng(0).uniform(1e-4, 1e-2, 1000).astype(np.float32)
    bad = ts[(np.float32(1) / (np.float32(1) / ts)) != ts][0]
    q = quantize_model_weights(params, "nvfp4")
    k = q["layer_0"]["query"]["kernel"]
    k = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(k), [k.data, k.scales, jnp.asarray(bad)]
    )
    tree = {"layer_0": {"query": {"kernel": k}}}
    save_quantized(tmp_path / "ours", tree, layout="compressed-tensors")
    assert_same(tree, load_quantized(tmp_path / "ours"))
    _strip_record(tmp_path / "ours", tmp_path / "theirs")
    got = load_quantized(tmp_path / "theirs")["layer_0"]["query"]["kernel"].tensor_scale
    assert got != bad and abs(float(got) - float(bad)) <= float(bad) * 2**-23
