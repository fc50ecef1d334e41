"""Randomized Walsh-Hadamard rotations: folded into weights where exact, online elsewhere.

A rotation ``R`` (orthogonal, ``R R^T = I``) inserted before a linear layer,
``y = (x R)(R^T W)``, leaves the product unchanged and spreads outlier
channels of ``x`` and ``W`` over all channels, which lowers the error of
quantizing either (QuaRot, SpinQuant, QuIP#). Here ``R = D H`` with ``D`` a
random +-1 diagonal and ``H`` the normalized Sylvester-Hadamard matrix
(``H = H^T``, ``H H = I``), block-diagonal with blocks of ``n`` (a power of two)
when the width is not one.

What is exact in a post-LayerNorm BERT block (``h = LN(h + O(attn(Q h, K h, V h)))``,
``h = LN(h + W2 gelu(W1 h))``), in real arithmetic:

* **V -> attention_output (folded, free).** Attention mixes tokens, not
  channels: ``a_head = P_head (h W_v,head)``. So ``W_v,head <- W_v,head R_h``
  (columns, and the bias) with ``W_o <- diag(R_h)^T W_o`` (rows of each head)
  leaves the block's output unchanged for any orthogonal ``R_h`` of the head
  width (:func:`fold_value_rotation`).
* **Q/K output channels** can be rotated together per head (``QK^T``
  unchanged) but no quantized input changes, so it is not used.
* **Inputs of Q/K/V and FFN1 (a LayerNorm's output).** In post-LN BERT that
  output is also the residual stream, and LayerNorm's per-channel gamma (and
  the mean it subtracts) does not commute with a rotation, so a rotation can
  be folded into neither the LayerNorm nor the residual; it would need an
  online transform. Measured on MiniLM, a rotation there does not lower the
  input x weight error (``sum_j E[x_j^2] |W_j|^2`` rises by 1-40%), so these
  inputs are not rotated.
* **FFN2 input (GELU output).** GELU is elementwise, so nothing folds; the
  transform runs online: ``gelu(.) * d`` then the blocked FWHT
  (:func:`fwht`, the ``jax_bq_hadamard`` FFI op), and ``W2 <- R^T W2`` is
  folded (:func:`rotate_ffn_output`). This is where BERT's outliers are:
  on MiniLM the error proxy falls by up to 18x.

The rotated model computes the same function up to float32 rounding (tests
check 1e-5).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_bq.primitives.hadamard import MAX_HADAMARD_BLOCK, hadamard_p

__all__ = [
    "fwht",
    "hadamard_matrix",
    "random_signs",
    "block_rotation",
    "fold_value_rotation",
    "rotate_ffn_output",
]


def _check_block(n: int, d: int, what: str) -> None:
    if not (isinstance(n, int | np.integer) and 2 <= n <= MAX_HADAMARD_BLOCK and n & (n - 1) == 0):
        raise ValueError(
            f"{what}: block must be a power of two in [2, {MAX_HADAMARD_BLOCK}], got {n!r}"
        )
    if d % n:
        raise ValueError(f"{what}: block {n} does not divide the width {d}")


def fwht(x, block: int | None = None, scale: float | None = None) -> jax.Array:
    """Blocked fast Walsh-Hadamard transform along the last axis (``jax_bq_hadamard``).

    ``y[..., b*n:(b+1)*n] = scale * H_n x[..., b*n:(b+1)*n]`` for every block
    ``b``, ``H_n`` the unnormalized Sylvester matrix (entries +-1,
    ``H_{2m} = [[H_m, H_m], [H_m, -H_m]]``). The default ``scale = 1/sqrt(n)``
    makes it orthonormal and an involution. Butterfly order and rounding are
    pinned (:mod:`jax_bq.primitives.hadamard`); CPU and CUDA kernels match
    the jnp twin bit for bit.

    Args:
        x: float32/bf16/f16 array, rank >= 1.
        block: ``n``, a power of two in [2, 8192] dividing ``x.shape[-1]``
            (default: the whole last axis, which must then be a power of two).
        scale: float32 multiplier (default ``1/sqrt(n)``).

    Raises:
        ValueError: bad dtype, rank or block.
    """
    dtype = getattr(x, "dtype", None)
    shape = tuple(getattr(x, "shape", ()))
    if dtype is None or np.dtype(dtype) not in (
        np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16)
    ) or not shape:  # fmt: skip
        raise ValueError(f"fwht expects a float32/bf16/f16 array of rank >= 1, got {shape} {dtype}")
    n = shape[-1] if block is None else block
    _check_block(n, shape[-1], f"fwht of shape {shape}")
    s = np.float32(1.0 / math.sqrt(n) if scale is None else scale)
    y = hadamard_p.bind(jnp.reshape(x, (-1, shape[-1])), block=int(n), scale=float(s))
    return jnp.reshape(y, shape)


def hadamard_matrix(n: int) -> np.ndarray:
    """Normalized Sylvester-Hadamard matrix ``H_n / sqrt(n)`` (float64, symmetric, orthogonal)."""
    _check_block(n, n, "hadamard_matrix")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(n)


def random_signs(d: int, seed: int = 0) -> np.ndarray:
    """``d`` random +-1 (float32) from ``seed``: the diagonal ``D`` of ``R = D H``."""
    return np.where(np.random.default_rng(seed).random(d) < 0.5, -1.0, 1.0).astype(np.float32)


def block_rotation(d: int, block: int, signs=None) -> np.ndarray:
    """``R = diag(signs) blockdiag(H_n, ..., H_n)`` as a ``[d, d]`` float64 matrix.

    ``x R`` equals ``fwht(x * signs, block)`` (up to float32 rounding).
    """
    _check_block(block, d, "block_rotation")
    r = np.kron(np.eye(d // block), hadamard_matrix(block))
    if signs is not None:
        r = np.asarray(signs, np.float64)[:, None] * r
    return r


def _f32(a) -> jax.Array:
    return jnp.asarray(np.asarray(a, np.float64), jnp.float32)


def fold_value_rotation(params, num_heads: int, seed: int = 0):
    """Folds a random per-head Hadamard rotation into V's outputs and attention_output's inputs.

    For every layer ``layer_i`` of a :class:`jax_bq.models.BertEncoder` param
    tree: ``W_v <- W_v R``, ``b_v <- b_v R``, ``W_o <- R^T W_o`` with
    ``R = diag(d) blockdiag(H_{d_head})`` (one head per block). Exact
    (module docstring); returns a new tree.

    Raises:
        ValueError: no ``layer_i`` with float value/attention_output kernels,
            or a head width that is not a power of two.
    """
    out = jax.tree_util.tree_map(lambda a: a, params)
    layers = sorted(k for k in params if k.startswith("layer_"))
    if not layers:
        raise ValueError(
            "fold_value_rotation: params has no 'layer_<i>' blocks (not a BertEncoder)"
        )
    for i, name in enumerate(layers):
        p = out[name]
        try:
            wv, bv, wo = p["value"]["kernel"], p["value"]["bias"], p["attention_output"]["kernel"]
        except (KeyError, TypeError):
            raise ValueError(
                f"fold_value_rotation: {name} lacks value/attention_output params"
            ) from None
        if not all(hasattr(a, "dtype") and a.ndim == 2 for a in (wv, wo)):
            raise ValueError(
                f"fold_value_rotation: {name} kernels must be float [K, N] (not quantized)"
            )
        d = wv.shape[1]
        if d % num_heads:
            raise ValueError(
                f"fold_value_rotation: width {d} is not a multiple of {num_heads} heads"
            )
        r = block_rotation(d, d // num_heads, random_signs(d, seed + i))
        p["value"] = dict(p["value"], kernel=_f32(np.asarray(wv, np.float64) @ r),
                          bias=_f32(np.asarray(bv, np.float64) @ r))  # fmt: skip
        p["attention_output"] = dict(
            p["attention_output"], kernel=_f32(r.T @ np.asarray(wo, np.float64))
        )
    return out


def rotate_ffn_output(params, block: int, seed: int = 0):
    """Prepares the online FFN2-input rotation (``BertConfig.ffn_hadamard_block=block``).

    Per layer: ``ffn_hadamard_signs <- d`` (random +-1) and
    ``W_2 <- R^T W_2`` with ``R = diag(d) blockdiag(H_block)``; the model
    computes ``fwht(gelu(.) * d, block) @ W_2``, equal to ``gelu(.) @ W_2``.

    Raises:
        ValueError: params without ``layer_<i>/output`` float kernels or a bad block.
    """
    out = jax.tree_util.tree_map(lambda a: a, params)
    layers = sorted(k for k in params if k.startswith("layer_"))
    if not layers:
        raise ValueError("rotate_ffn_output: params has no 'layer_<i>' blocks (not a BertEncoder)")
    for i, name in enumerate(layers):
        p = out[name]
        w2 = p.get("output", {}).get("kernel") if isinstance(p, dict) else None
        if w2 is None or not hasattr(w2, "dtype") or w2.ndim != 2:
            raise ValueError(
                f"rotate_ffn_output: {name}/output/kernel must be a float [K, N] kernel"
            )
        k = w2.shape[0]
        _check_block(block, k, f"rotate_ffn_output ({name})")
        signs = random_signs(k, 1000 + seed + i)
        r = block_rotation(k, block, signs)
        p["output"] = dict(p["output"], kernel=_f32(r.T @ np.asarray(w2, np.float64)))
        p["ffn_hadamard_signs"] = jnp.asarray(signs)
    return out
