"""JVP / transpose rules of the primitives (jax_bq.primitives.autodiff).

The STE is checked two ways: exactly (the tangent of quantize_dequantize is
the input tangent inside the representable range, zero where MX clipped) and
with ``jax.test_util.check_grads`` against finite differences taken with a
step (eps = 1) much wider than the FP8 grid, where fake-quant is the identity
up to its rounding error: the STE is the derivative of that identity, not of
the step function, so a finite difference finer than the grid cannot check it.
qmatmul is linear in ``x`` up to the bf16 rounding of its operands, so
check_grads applies directly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_bq
from jax_bq.primitives import qmatmul_p
from jax_bq.qat import qat_matmul

KEY = jax.random.PRNGKey(0)


def _bf16_dot(a, b):
    """``a @ b`` as the fallback computes it: bf16 operands, float32 accumulation."""
    dn = (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(
        a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), dn, preferred_element_type=jnp.float32
    )


def _close_bf16(got, want):
    """Within bf16 products: JAX transposes a bf16 dot into a bf16-valued cotangent."""
    assert got.dtype == want.dtype
    rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert rel < 1e-2, rel


def _x(shape=(4, 64), dtype=jnp.float32, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32).astype(dtype)


# ---- quantize / dequantize / STE --------------------------------------------------------


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_check_grads_ste(fmt):
    f = lambda x: jax_bq.quantize_dequantize(x, fmt, block_size=32)  # noqa: E731
    check_grads(f, (_x(),), order=1, modes=("fwd", "rev"), eps=1.0, atol=0.05, rtol=0.05)


@pytest.mark.parametrize(
    "fmt,kw",
    [
        ("fp8_e4m3", {"block_size": 32}),
        ("fp8_e5m2", {"granularity": "per_tensor"}),
        ("fp4", {"block_size": 16}),
        ("nvfp4", {}),
        ("fp8_e4m3", {"granularity": "per_channel", "axis": 0}),
    ],
    ids=["e4m3-b32", "e5m2-tensor", "fp4-b16", "nvfp4", "e4m3-channel-axis0"],
)
def test_ste_passes_tangent_exactly_when_nothing_clips(fmt, kw):
    dtype = jnp.bfloat16 if fmt == "fp8_e4m3" else jnp.float32
    x = _x((6, 64), dtype)
    t = _x((6, 64), dtype, seed=1)
    f = lambda x: jax_bq.quantize_dequantize(x, fmt, **kw)  # noqa: E731
    y, ty = jax.jit(lambda x, t: jax.jvp(f, (x,), (t,)))(x, t)
    ref = jax_bq.dequantize(jax_bq.quantize(x, fmt, **kw))
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(ref, np.float32))
    assert ty.dtype == dtype
    np.testing.assert_array_equal(np.asarray(ty, np.float32), np.asarray(t, np.float32))


def test_ste_zero_where_mx_clips():
    # MXFP8 block of 32: amax 500 -> E8M0 scale 2^(8 - 8) = 1, and 500 > 448 + 16 clips.
    x = np.full((1, 32), 3.0, np.float32)
    x[0, 5] = 500.0
    x[0, 6] = -460.0  # rounds to the top code without the clip: passes
    g = jax.grad(lambda x: jnp.sum(jax_bq.quantize_dequantize(x, "mxfp8")))(jnp.asarray(x))
    want = np.ones((1, 32), np.float32)
    want[0, 5] = 0.0
    np.testing.assert_array_equal(np.asarray(g), want)


def test_ste_nan_block_has_zero_tangent():
    x = _x((2, 32))
    x = x.at[0, 3].set(jnp.nan)
    g = jax.grad(lambda x: jnp.nansum(jax_bq.quantize_dequantize(x, "fp8_e4m3", block_size=32)))(x)
    assert np.all(np.asarray(g[0]) == 0) and np.all(np.asarray(g[1]) == 1)


def test_vjp_is_transpose_of_jvp():
    x, t, c = _x(), _x(seed=1), _x(seed=2)
    f = lambda x: jax_bq.quantize_dequantize(x, "fp4", block_size=16)  # noqa: E731
    _, jt = jax.jvp(f, (x,), (t,))
    _, vjp = jax.vjp(f, x)
    (vc,) = vjp(c)
    np.testing.assert_allclose(float(jnp.vdot(jt, c)), float(jnp.vdot(t, vc)), rtol=1e-6)


def test_quantize_tangents_are_symbolic_zeros_and_float0():
    x = _x()

    def parts(x):
        q = jax_bq.quantize(x, "fp4", block_size=16)  # uint8 codes
        q8 = jax_bq.quantize(x, "fp8_e4m3", block_size=32)
        return q.data, q.scales, q8.data

    _, (t_fp4, t_scales, t_fp8) = jax.jvp(parts, (x,), (jnp.ones_like(x),))
    assert t_fp4.dtype == jax.dtypes.float0
    assert t_scales.dtype == jnp.float32 and not np.any(np.asarray(t_scales))
    assert t_fp8.dtype == jnp.float8_e4m3fn and not np.any(np.asarray(t_fp8, np.float32))
    # No tangent work in the jaxpr: the JVP of quantize adds no equations.
    jaxpr = jax.make_jaxpr(lambda x, t: jax.jvp(parts, (x,), (t,)))(x, x)
    prims = [e.primitive.name for e in jaxpr.jaxpr.eqns]
    assert prims.count("jax_bq_quantize") == 2 and "jax_bq_dequantize" not in prims


def test_two_call_round_trip_has_zero_derivative():
    x = _x()
    g = jax.grad(lambda x: jnp.sum(jax_bq.dequantize(jax_bq.quantize(x, "fp8_e4m3"))))(x)
    assert not np.any(np.asarray(g))


def test_grad_wrt_codes_is_a_clear_error():
    q = jax_bq.quantize(_x(), "fp8_e4m3")
    with pytest.raises(ValueError, match="codes or scales"):
        jax.grad(lambda q: jnp.sum(jax_bq.dequantize(q)))(q)
    w = jax_bq.quantize(_x((16, 64)), "fp8_e4m3", granularity="per_channel")
    with pytest.raises(ValueError, match="codes or scales"):
        jax.grad(lambda w: jnp.sum(jax_bq.qmatmul(_x(), w, out_dtype=jnp.float32)))(w)


def test_transforms_compose():
    x = _x((3, 4, 64))

    def loss(x):
        return jnp.sum(jax_bq.quantize_dequantize(x, "fp8_e4m3", block_size=32) ** 2)

    g = jax.jit(jax.grad(loss))(x)
    gv = jax.jit(jax.vmap(jax.grad(loss)))(x)
    gr = jax.jit(jax.grad(jax.checkpoint(loss)))(x)
    y, lin = jax.linearize(loss, x)
    ref = 2 * jax_bq.quantize_dequantize(x, "fp8_e4m3", block_size=32)
    for got in (g, gr):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6)
    # vmap of grad: each member quantized on its own; here the blocks never span members.
    np.testing.assert_allclose(np.asarray(gv), np.asarray(ref), rtol=1e-6)
    np.testing.assert_allclose(float(lin(jnp.ones_like(x))), float(jnp.sum(ref)), rtol=1e-5)


# ---- qmatmul ----------------------------------------------------------------------------


def _w(n=32, k=64, gran="per_channel", **kw):
    return jax_bq.quantize(_x((n, k), seed=3), "fp8_e4m3", granularity=gran, **kw)


def test_check_grads_qmatmul_weight_only():
    w = _w()
    f = lambda x: jax_bq.qmatmul(x, w, out_dtype=jnp.float32, act_format="bf16")  # noqa: E731
    check_grads(f, (_x((8, 64)),), order=1, modes=("fwd", "rev"), eps=1.0, atol=0.02, rtol=0.02)


def test_qmatmul_dx_for_weight_only():
    w, x, c = _w(), _x((8, 64)), _x((8, 32), seed=5)
    _, vjp = jax.vjp(lambda x: jax_bq.qmatmul(x, w, out_dtype=jnp.float32, act_format="bf16"), x)
    (dx,) = vjp(c)
    ref = c @ jax_bq.dequantize(w, jnp.float32)
    _close_bf16(dx, ref)


@pytest.mark.parametrize(
    "gran,kw", [("per_tensor", {}), ("tile_2d", {"block_size": 32}), ("per_channel", {})]
)
def test_qmatmul_fp8_hybrid_backward(gran, kw):
    """W8A8 forward -> E5M2 x E4M3 backward product through qmatmul, close to ct . dq(w)."""
    w, x, c = _w(64, 64, gran, **kw), _x((8, 64)), _x((8, 64), seed=5)

    def f(x):
        return jax_bq.qmatmul(x, w, out_dtype=jnp.float32, act_format="fp8_e4m3")

    _, vjp = jax.vjp(f, x)
    (dx,) = jax.jit(vjp)(c)
    ref = c @ jax_bq.dequantize(w, jnp.float32)
    rel = float(jnp.linalg.norm(dx - ref) / jnp.linalg.norm(ref))
    assert rel < 0.1, rel  # E5M2 gradients: 2 mantissa bits
    # The backward product is a qmatmul with E5M2 activations (what plan/explain show).
    jaxpr = jax.make_jaxpr(vjp)(c)
    cfgs = [e.params["cfg"] for e in jaxpr.jaxpr.eqns if e.primitive is qmatmul_p]
    assert cfgs and all(c.act_format is jax_bq.QuantFormat.FP8_E5M2 for c in cfgs)
    assert all(c.w_format is jax_bq.QuantFormat.FP8_E4M3 for c in cfgs)


def test_qmatmul_hybrid_per_tensor_transpose_is_exact():
    """Per-tensor weights transpose as codes: dx equals ct_e5m2 . dq(w) up to the sums.

    With FP8 activations (W8A8) the backward quantizes the cotangent to E5M2. The
    fallback computes the product in bf16 (as ``_bf16_dot``); cuBLASLt multiplies
    the codes exactly and scales once, so there it is compared in float32.
    """
    w, x, c = _w(64, 64, "per_tensor"), _x((8, 64)), _x((8, 64), seed=5)
    kw = dict(out_dtype=jnp.float32, act_format="fp8_e4m3")
    _, vjp = jax.vjp(lambda x: jax_bq.qmatmul(x, w, **kw), x)
    (dx,) = vjp(c)
    cq = jax_bq.quantize_dequantize(c, "fp8_e5m2", granularity="per_tensor")
    wt = jax_bq.dequantize(w, jnp.float32)
    if jax_bq.plan(c, w, act_format="fp8_e5m2").path == "cublaslt_fp8":
        # Hopper's FP8 tensor cores accumulate with fewer bits than float32
        # (measured on the H200: up to 4e-5 of the largest entry); a wrong
        # cotangent quantization would be off by ~1e-2.
        ref = jnp.dot(cq, wt, precision="highest")
        tol = 2e-4 * float(jnp.max(jnp.abs(ref)))
        np.testing.assert_allclose(np.asarray(dx), np.asarray(ref), rtol=0, atol=tol)
    else:
        ref = _bf16_dot(cq, wt)
        np.testing.assert_allclose(np.asarray(dx), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_qmatmul_weight_only_backward_keeps_the_cotangent():
    """A 16-bit-activation forward (weight-only) differentiates in bf16, unquantized."""
    w, x, c = _w(64, 64, "per_tensor"), _x((8, 64)), _x((8, 64), seed=5)
    _, vjp = jax.vjp(lambda x: jax_bq.qmatmul(x, w, out_dtype=jnp.float32, act_format="bf16"), x)
    (dx,) = vjp(c)
    ref = _bf16_dot(c, jax_bq.dequantize(w, jnp.float32))
    # bf16 products: within bf16 rounding at the scale of the largest output
    tol = 2**-7 * float(jnp.max(jnp.abs(ref)))
    np.testing.assert_allclose(np.asarray(dx), np.asarray(ref), rtol=0, atol=tol)
    # ... and not the E5M2-quantized cotangent's product (that one is ~10x further off)
    cq = jax_bq.quantize_dequantize(c, "fp8_e5m2", granularity="per_tensor")
    far = _bf16_dot(cq, jax_bq.dequantize(w, jnp.float32))
    assert float(jnp.max(jnp.abs(dx - ref))) < float(jnp.max(jnp.abs(dx - far)))


def test_qmatmul_bias_and_residual_grads():
    w, x = _w(), _x((8, 64))
    b, r = _x((32,), seed=6), _x((8, 32), seed=7)

    def f(x, b, r):
        return jnp.sum(jax_bq.qmatmul(x, w, out_dtype=jnp.float32, bias=b, residual=r) ** 2)

    gx, gb, gr = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(x, b, r)
    y = jax_bq.qmatmul(x, w, out_dtype=jnp.float32, bias=b, residual=r)
    np.testing.assert_allclose(np.asarray(gb), np.asarray(jnp.sum(2 * y, 0)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gr), np.asarray(2 * y), rtol=1e-5)
    assert gx.shape == x.shape and np.all(np.isfinite(np.asarray(gx)))


@pytest.mark.parametrize("act_format", ["bf16", "fp8_e4m3"])
@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu"])
def test_qmatmul_gelu_epilogue_grads_match_jnp(activation, act_format):
    """d gelu(x w + b): the JVP recomputes the pre-activation, on every path."""
    w, x, b = _w(), _x((8, 64)), _x((32,), seed=6)
    kw = dict(out_dtype=jnp.float32, act_format=act_format)

    def fused(x, b):
        y = jax_bq.qmatmul(x, w, bias=b, activation=activation, **kw)
        return jnp.sum(y * jnp.cos(y))

    def unfused(x, b):
        z = jax_bq.qmatmul(x, w, **kw) + b
        y = jax.nn.gelu(z, approximate=activation == "gelu_tanh")
        return jnp.sum(y * jnp.cos(y))

    got = jax.jit(jax.grad(fused, argnums=(0, 1)))(x, b)
    want = jax.jit(jax.grad(unfused, argnums=(0, 1)))(x, b)
    for g, h in zip(got, want, strict=True):  # bf16 products: 2% of the largest entry
        tol = 2e-2 * float(jnp.max(jnp.abs(h)))
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=0, atol=tol)
    # forward mode agrees too (jvp of the fused call against the jnp composition)
    t = _x((8, 64), seed=9)
    _, jt = jax.jvp(lambda x: jax_bq.qmatmul(x, w, bias=b, activation=activation, **kw), (x,), (t,))
    gelu = functools.partial(jax.nn.gelu, approximate=activation == "gelu_tanh")
    _, jr = jax.jvp(lambda x: gelu(jax_bq.qmatmul(x, w, **kw) + b), (x,), (t,))
    tol = 2e-2 * float(jnp.max(jnp.abs(jr)))
    np.testing.assert_allclose(np.asarray(jt), np.asarray(jr), rtol=0, atol=tol)


def test_qmatmul_fp8_out_grad_is_a_clear_error():
    """An FP8 output fused in the GEMM raises; rounded in jnp after it, its derivative is 0."""
    w, x = _w(), _x((8, 64))
    kw = dict(out_format="fp8_e4m3", out_scale=1.0, act_format="fp8_e4m3")

    def f(x):
        return jnp.sum(jax_bq.dequantize(jax_bq.qmatmul(x, w, **kw), jnp.float32))

    cfg = jax_bq.plan(x, w, act_format="fp8_e4m3", epilogue=_fp8_out_epilogue()).config
    if cfg.out_format is not None:  # fused: the primitive has no rule for it
        with pytest.raises(ValueError, match="FP8"):
            jax.grad(f)(x)
    else:  # cuBLASLt refused it (the plan says so): jnp rounding, a zero derivative
        assert not np.any(np.asarray(jax.grad(f)(x)))


def _fp8_out_epilogue():
    from jax_bq.epilogue import Epilogue

    return Epilogue(False, None, False, jax_bq.QuantFormat.FP8_E4M3, False)


def test_qmatmul_vmap_of_grad_and_remat():
    w, x = _w(), _x((3, 8, 64))

    def loss(x):
        return jnp.sum(jax_bq.qmatmul(x, w, out_dtype=jnp.float32, act_format="bf16") ** 2)

    gv = jax.jit(jax.vmap(jax.grad(loss)))(x)
    g = jax.jit(jax.grad(jax.checkpoint(loss)))(x)
    np.testing.assert_allclose(np.asarray(gv), np.asarray(g), rtol=1e-5, atol=1e-5)


# ---- qat_matmul -------------------------------------------------------------------------


@pytest.mark.parametrize("grads", ["bf16", "fp8"])
def test_qat_matmul_grads_track_float(grads):
    x, w = _x((16, 64)), _x((32, 64), seed=3) * 0.2

    def loss(mm, x, w):
        return jnp.sum(jnp.tanh(mm(x, w)))

    def qat(x, w):
        return qat_matmul(x, w, out_dtype=jnp.float32, act_format="fp8_e4m3", grads=grads)

    gq = jax.jit(jax.grad(lambda x, w: loss(qat, x, w), argnums=(0, 1)))(x, w)
    gf = jax.grad(lambda x, w: loss(lambda a, b: a @ b.T, x, w), argnums=(0, 1))(x, w)
    for a, b in zip(gq, gf, strict=True):
        rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        assert rel < 0.1, (grads, rel)
    y = jax.jit(qat)(x, w)
    ref = jax_bq.qmatmul(x, jax_bq.quantize(w, "fp8_e4m3", granularity="per_channel"),
                         out_dtype=jnp.float32, act_format="fp8_e4m3")  # fmt: skip
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))


def test_qat_matmul_bf16_dw_is_ste():
    """grads='bf16': dw = ct^T . dq(q(x)) in bf16 (the STE passes everything for amax FP8)."""
    x, w, c = _x((16, 64)), _x((32, 64), seed=3), _x((16, 32), seed=4)
    f = lambda w: qat_matmul(x, w, out_dtype=jnp.float32, act_format="fp8_e4m3")  # noqa: E731
    _, vjp = jax.vjp(f, w)
    (dw,) = vjp(c)
    xq = jax_bq.quantize_dequantize(x, "fp8_e4m3", granularity="per_channel", axis=-1)
    _close_bf16(dw, c.T @ xq)


def test_qat_matmul_bad_inputs():
    with pytest.raises(ValueError, match="K mismatch"):
        qat_matmul(_x((4, 64)), _x((8, 32)))
    with pytest.raises(ValueError, match="grads"):
        qat_matmul(_x((4, 64)), _x((8, 64)), grads="int8")
