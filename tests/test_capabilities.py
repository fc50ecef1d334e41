"""Capability table, format selection policy and the force-fallback switch."""

import jax
import jax.numpy as jnp
import pytest
from conftest import GPU_DEVICES

import jax_bq
from jax_bq import QuantFormat, capabilities
from jax_bq.capabilities import _row


@pytest.mark.parametrize(
    "cc,native",
    [
        (None, set()),
        ((8, 0), set()),
        ((8, 6), set()),
        ((8, 9), {"fp8_e4m3", "fp8_e5m2"}),
        ((9, 0), {"fp8_e4m3", "fp8_e5m2"}),
        ((10, 0), {"fp8_e4m3", "fp8_e5m2", "mxfp8", "mxfp4", "nvfp4"}),
        ((12, 0), {"fp8_e4m3", "fp8_e5m2", "mxfp8", "mxfp4", "nvfp4"}),
    ],
)
def test_capability_rows(cc, native):
    fmts, why = _row(cc)
    assert {f.value for f in fmts} == native
    assert why
    if cc and cc[0] == 12:
        assert "consumer Blackwell" in why
    if cc and cc[0] == 10:
        assert "datacenter Blackwell" in why


def test_cpu_has_no_native_formats():
    cpu = jax.devices("cpu")[0]
    for f in jax_bq.formats.QUANTIZED_FORMATS:
        cap = capabilities.native_matmul(f, cpu)
        assert not cap and "not a CUDA GPU" in cap.reason
    fmt, why = jax_bq.select_format("semantic", 32, cpu)
    assert fmt is QuantFormat.FP16 and "no FP4" in why


@pytest.mark.gpu
def test_gpu_rows_match_the_device():
    dev = GPU_DEVICES[0]
    cc = capabilities.compute_capability(dev)
    assert cc is not None
    fp8 = capabilities.native_matmul("fp8_e4m3", dev)
    assert bool(fp8) == (cc >= (8, 9))
    fmt, why = jax_bq.select_format("semantic", 32, dev)
    if cc[0] in (10, 12):
        assert fmt is QuantFormat.NVFP4
    elif cc >= (8, 9):
        assert fmt is QuantFormat.FP8_E4M3 and "NVFP4 not chosen" in why


def test_select_format_policy_on_a_hopper_row(monkeypatch):
    monkeypatch.setattr(
        capabilities,
        "native_matmul",
        lambda f, d=None: capabilities.Capability(
            QuantFormat.parse(f) in _row((10, 0))[0], "row 10.0"
        ),
    )
    assert jax_bq.select_format("e5-large", 16)[0] is QuantFormat.NVFP4
    assert jax_bq.select_format("e5-large", 15)[0] is QuantFormat.FP8_E4M3
    assert jax_bq.select_format("minilm", 64)[0] is QuantFormat.FP8_E4M3


def test_select_format_errors():
    with pytest.raises(ValueError, match="unknown model_kind 'gpt'"):
        jax_bq.select_format("gpt", 4)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        jax_bq.select_format("semantic", 0)


def test_quantize_auto_follows_select_format():
    x = jnp.ones((32, 64), jnp.float32)
    out, fmt, why = jax_bq.quantize_auto(x, "semantic")
    assert fmt is jax_bq.select_format("semantic", 32)[0]
    if fmt is QuantFormat.FP16:
        assert out.dtype == jnp.float16
    else:
        assert out.format is fmt


def test_force_fallback_switch(monkeypatch):
    monkeypatch.setenv("JAX_BQ_FORCE_FALLBACK", "1")
    assert not capabilities.kernels("cpu")
    assert "forced" in capabilities.native_matmul("fp8_e4m3").reason
    monkeypatch.setenv("JAX_BQ_FORCE_FALLBACK", "dequantize")
    assert capabilities.kernels("cpu").ok == capabilities._native.CPU.loaded


def test_info_report_mentions_everything():
    text = capabilities.report()
    for needle in ("jaxlib", "_jax_bq_cpu", "_jax_bq_cuda", "select_format", "fp8_e4m3"):
        assert needle in text
