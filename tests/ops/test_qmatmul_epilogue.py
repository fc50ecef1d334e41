"""qmatmul's epilogue (bias, GELU, residual, FP8 output, amax) against an unfused oracle.

The oracle is the unfused reference spelled out in float64: dequantize both
operands, dot, add the bias, apply the activation, add the residual, then
round once (to the output dtype, or to FP8 codes with the static scale).
Outputs in 16 bits agree to a tolerance (GPU sum order, bf16 rounding of the
fallback's dequantized operands); FP8 codes may differ by at most one code
where the product lands near a rounding boundary, and such codes are counted
and bounded. Every backend runs it: the CPU (reference lowering) and, where
there is one, the GPU (cuBLASLt epilogues, with the plan saying they fused).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from test_qmatmul import _oracle, _rand

import jax_bq as bq
from jax_bq.primitives import qmatmul as qp

M, N, K = 96, 256, 512


def _gelu(v, approximate):
    if approximate:
        return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))
    from math import erf

    return 0.5 * v * (1 + np.vectorize(erf)(v / np.sqrt(2)))


def _unfused(x, w, p, bias, activation, residual, y=None):
    """The epilogue in float64 after ``y`` (default: the float64 oracle product)."""
    y = _oracle(x, w, p) if y is None else np.asarray(y, np.float64).reshape(-1, w.shape[0])
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    if activation is not None:
        y = _gelu(y, activation == "gelu_tanh")
    if residual is not None:
        y = y + np.asarray(residual, np.float64).reshape(y.shape)
    return y


def _operands(seed=0):
    x = _rand((M, K), seed)
    w = bq.quantize(
        _rand((N, K), seed + 1, jnp.float32) * 0.05, "fp8_e4m3", granularity="per_tensor"
    )
    bias = _rand((N,), seed + 2) * 0.5
    residual = _rand((M, N), seed + 3)
    return x, w, bias, residual


def _fp8_codes_close(codes, ref_y, scale, fmt=ml_dtypes.float8_e4m3fn, max_frac=0.02):
    want = np.clip(ref_y / scale, -448.0, 448.0).astype(fmt)
    got = np.asarray(codes).view(np.uint8).astype(np.int32)
    want_i = want.view(np.uint8).astype(np.int32)
    # Codes are sign-magnitude: compare magnitudes within one step, same sign.
    diff = np.abs((got & 0x7F) - (want_i & 0x7F))
    sign_ok = ((got ^ want_i) & 0x80 == 0) | ((got & 0x7F) == 0) | ((want_i & 0x7F) == 0)
    assert diff.max() <= 1 and sign_ok.all(), f"max code distance {diff.max()}"
    assert (diff != 0).mean() <= max_frac, f"{(diff != 0).mean():.3%} of codes off by one"


CASES = [
    dict(bias=b, activation=a, residual=r, out_fp8=f)
    for b, a, r, f in itertools.product(
        [False, True], [None, "gelu_tanh", "gelu"], [False, True], [False, True]
    )
    if not (a and r) and not (f and r)
]


def _id(c):
    return (
        "-".join(
            [k for k in ("bias", "residual", "out_fp8") if c[k]]
            + ([c["activation"]] if c["activation"] else [])
        )
        or "plain"
    )


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_epilogue_matches_unfused_reference(backend, case):
    x, w, bias, residual = _operands()
    kw = dict(act_format="fp8_e4m3", act_granularity="per_tensor")
    args = dict(
        bias=bias if case["bias"] else None,
        activation=case["activation"],
        residual=residual if case["residual"] else None,
    )
    scale = 0.125
    if case["out_fp8"]:
        args.update(out_format="fp8_e4m3", out_scale=scale)
    static = {k: args.pop(k) for k in ("out_format", "activation") if k in args}
    fn = jax.jit(lambda x, w, a: bq.qmatmul(x, w, **kw, **a, **static, return_amax=True))
    out, amax = fn(x, w, args)
    args.update(static)
    p = bq.plan(x, w, **kw)
    ref = _unfused(x, w, p, args["bias"], case["activation"], args["residual"])
    np.testing.assert_allclose(float(amax), np.abs(ref).max(), rtol=1e-2)
    if case["out_fp8"]:
        assert isinstance(out, bq.QuantizedTensor) and out.format is bq.QuantFormat.FP8_E4M3
        assert float(np.asarray(out.scales).reshape(())) == scale
        # Codes against the unfused spelling on the same GEMM: its float32
        # product, the epilogue in float64, one FP8 rounding.
        y32 = jax.jit(lambda x, w: bq.qmatmul(x, w, **kw, out_dtype=jnp.float32))(x, w)
        unfused = _unfused(x, w, p, args["bias"], case["activation"], args["residual"], y32)
        _fp8_codes_close(out.data, unfused, scale)
        back = np.asarray(bq.dequantize(out, jnp.float32), np.float64)
        assert np.abs(back - np.clip(ref, -448 * scale, 448 * scale)).max() <= 32 * scale
    else:
        y = np.asarray(out, np.float64)
        err = np.abs(y - ref).max() / (np.abs(ref).max() + 1e-30)
        assert err < 2e-2, f"max rel err {err:.3g}"


@pytest.mark.parametrize("backend", ["gpu"], indirect=True)  # CPU runs the reference epilogue
def test_gpu_fuses_the_epilogue_where_cublaslt_allows(backend):
    x, w, bias, residual = _operands()
    kw = dict(act_format="fp8_e4m3", act_granularity="per_tensor")
    epi = bq.epilogue.Epilogue(
        bias=True, activation="gelu_tanh", out_format=bq.QuantFormat.FP8_E4M3
    )
    p = bq.plan(x, w, **kw, epilogue=epi)
    assert p.path == qp.CUBLAS_FP8
    assert p.config.epilogue == qp.EPI_BIAS | qp.EPI_GELU_TANH, str(p)
    assert p.config.out_format is bq.QuantFormat.FP8_E4M3, str(p)
    exact = bq.epilogue.Epilogue(bias=True, activation="gelu", out_format=bq.QuantFormat.FP8_E4M3)
    p = bq.plan(x, w, **kw, epilogue=exact)
    assert p.config.epilogue == qp.EPI_BIAS | qp.EPI_GELU_ERF, str(p)  # jax_bq's kernel
    assert p.config.out_format is bq.QuantFormat.FP8_E4M3, str(p)
    epi = bq.epilogue.Epilogue(bias=True, residual=True)
    p = bq.plan(x, w, **kw, epilogue=epi)
    assert p.config.epilogue == qp.EPI_BIAS | qp.EPI_RESIDUAL, str(p)
    hlo = (
        jax.jit(lambda x, w, b, r: bq.qmatmul(x, w, **kw, bias=b, residual=r))
        .lower(x, w, bias, residual)
        .as_text()
    )
    assert "jax_bq_qmatmul" in hlo


def test_fp8_output_feeds_the_next_qmatmul(backend):
    x, w, bias, _ = _operands()
    w2 = bq.quantize(_rand((128, N), 9, jnp.float32) * 0.05, "fp8_e4m3", granularity="per_tensor")
    h = bq.qmatmul(x, w, bias=bias, activation="gelu_tanh", out_format="fp8_e4m3", out_scale=0.05)
    y = jax.jit(bq.qmatmul)(h, w2)
    ref = (
        np.asarray(bq.dequantize(h, jnp.float32), np.float64)
        @ np.asarray(bq.dequantize(w2, jnp.float32), np.float64).T
    )
    err = np.abs(np.asarray(y, np.float64) - ref).max() / np.abs(ref).max()
    assert err < 2e-2
    assert float(np.asarray(h.scales).reshape(())) == 0.0625  # rounded up to a power of two


def test_epilogue_under_vmap(backend):
    x, w, bias, residual = _operands()
    xs = jnp.stack([x, 2 * x])
    rs = jnp.stack([residual, -residual])
    f = jax.vmap(
        lambda a, r: bq.qmatmul(
            a, w, act_format="fp8_e4m3", act_granularity="per_token", bias=bias, residual=r
        )
    )
    got = np.asarray(f(xs, rs), np.float32)
    for i in range(2):
        one = bq.qmatmul(
            xs[i], w, act_format="fp8_e4m3", act_granularity="per_token", bias=bias, residual=rs[i]
        )
        np.testing.assert_allclose(got[i], np.asarray(one, np.float32), rtol=1e-2, atol=1e-2)


def test_weight_only_path_applies_the_epilogue_after_the_gemm(backend):
    x, w, bias, _ = _operands()
    x1 = x[:4]
    out = bq.qmatmul(x1, w, act_format="bf16", bias=bias, activation="gelu")
    p = bq.plan(
        x1, w, act_format="bf16", epilogue=bq.epilogue.Epilogue(bias=True, activation="gelu")
    )
    ref = _unfused(x1, w, p, bias, "gelu", None)
    err = np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max()
    assert err < 2e-2
    assert "Epilogue +bias gelu" in str(p)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bias=jnp.zeros((N + 1,))), r"bias must have shape \(N,\) = \(256,\)"),
        (dict(residual=jnp.zeros((M, N), jnp.float32)), "residual dtype float32 differs"),
        (dict(residual=jnp.zeros((M, N + 16), jnp.bfloat16)), r"residual must have the output"),
        (dict(out_format="nvfp4", out_scale=1.0), "out_format must be fp8_e4m3 or fp8_e5m2"),
        (dict(out_format="fp8_e4m3"), "out_format needs out_scale"),
        (dict(out_scale=1.0), "out_scale is only used with out_format"),
        (dict(activation="relu"), "activation must be one of"),
        (
            dict(activation="gelu", residual=jnp.zeros((M, N), jnp.bfloat16)),
            "either activation= or residual=",
        ),
        (
            dict(out_format="fp8_e4m3", out_scale=1.0, residual=jnp.zeros((M, N), jnp.bfloat16)),
            "FP8 output takes no residual",
        ),
    ],
)
def test_bad_epilogue_operands_raise(kwargs, match):
    x, w, _, _ = _operands()
    with pytest.raises(ValueError, match=match):
        bq.qmatmul(x, w, **kwargs)
