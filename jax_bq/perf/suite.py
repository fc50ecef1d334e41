"""Measurable workloads paired with the operators the models say they run.

Used by ``jax-bq calibrate-hw`` (a small subset, to fit a profile on the local
GPU) and by ``benchmarks/validate_perf.py`` (the full validation set). Each
:class:`Workload` knows how to build its jitted function and rotated inputs
(weights in enough copies that L2 never holds the next call's operands) and
which :class:`~jax_bq.perf.roofline.OpCost` list predicts it.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from jax_bq.perf import attention as att
from jax_bq.perf import roofline as rl

#: Total bytes of rotated operand copies: 4x the H200's L2 (DESIGN.md §6 method).
ROTATE_BYTES = 240 << 20


class Unavailable(Exception):
    """The workload cannot run as specified here (the plan would take another path)."""


@dataclass
class Workload:
    """A named measurement, its predicted operators and how to build it."""

    name: str
    group: str
    ops: list  # [(OpCost, count)]
    build: Callable  # () -> (fn, args_list, env dict)
    meta: dict = field(default_factory=dict)


def copies(nbytes: int) -> int:
    """How many copies of ``nbytes`` operands to rotate so L2 holds none."""
    return max(2, min(16, math.ceil(ROTATE_BYTES / max(nbytes, 1))))


@contextlib.contextmanager
def env(values: dict):
    """Temporarily set environment variables (the fallback switch is read at trace time)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# weight config -> (format, granularity, quantize kwargs, cuBLASLt activation granularity)
WEIGHTS = {
    "fp8_tensor": ("fp8_e4m3", "per_tensor", {"granularity": "per_tensor"}, "per_tensor"),
    "fp8_channel": ("fp8_e4m3", "per_channel", {"granularity": "per_channel"}, "per_token"),
    "fp8_tile": ("fp8_e4m3", "tile_2d", {"granularity": "tile_2d"}, "block_1x128"),
    "nvfp4": ("nvfp4", "per_block", {}, None),
    "bf16": ("bf16", "", {}, None),
}


def qmatmul_kwargs(wcfg: str, path: str) -> tuple[dict, dict]:
    """(qmatmul kwargs, env) that make ``plan`` take ``path`` for weights ``wcfg``."""
    agran = WEIGHTS[wcfg][3]
    if path == "cublaslt_fp8":
        return {"act_format": "fp8_e4m3", "act_granularity": agran}, {}
    if path == "fp4_via_fp8":
        return {"act_format": "fp8_e4m3"}, {}
    if path == "w8a16":
        return {"act_format": "bf16"}, {}
    if path == "w4a16":
        return {}, {}
    if path == "dequant_dot":
        return {}, {"JAX_BQ_FORCE_FALLBACK": "qmatmul"}
    raise ValueError(f"no qmatmul kwargs for path {path!r}")


def qmatmul_ops(m, n, k, wcfg, path) -> list:
    """The (OpCost, count) list of :func:`qmatmul_workload`."""
    fmt, gran, _, agran = WEIGHTS[wcfg]
    kw = dict(w_format=fmt, w_granularity=gran)
    if path == "cublaslt_fp8":
        kw.update(act="dynamic", act_granularity=agran)
    if path == "dequant_dot":
        kw.update(act="dynamic" if fmt.startswith("fp8") else "bf16")
    return [(o, 1) for o in rl.gemm_costs(m, n, k, path, **kw)]


def qmatmul_workload(m: int, n: int, k: int, wcfg: str, path: str) -> Workload:
    """One ``qmatmul`` (or XLA bf16 dot for ``path="xla_bf16"``) at ``M x N x K``."""

    def build():
        import jax
        import jax.numpy as jnp

        import jax_bq as bq

        fmt, _, qkw, _ = WEIGHTS[wcfg]
        wb = rl.weight_bytes(
            fmt if fmt != "bf16" else "bf16", n, k, WEIGHTS[wcfg][1] or "per_channel"
        )
        r = copies(wb)
        keys = jax.random.split(jax.random.PRNGKey(m * 7 + n + k), r + 1)
        xs = [
            jax.random.normal(keys[0], (m, k), jnp.float32).astype(jnp.bfloat16) * (1 + i / 64)
            for i in range(r)
        ]
        if path == "xla_bf16":
            ws = [jax.random.normal(kk, (n, k), jnp.bfloat16) * 0.02 for kk in keys[1:]]
            dn = (((1,), (1,)), ((), ()))
            fn = jax.jit(
                lambda x, w: jax.lax.dot_general(x, w, dn, preferred_element_type=jnp.bfloat16)
            )
            return fn, list(zip(xs, ws, strict=True)), {}
        ws = [
            bq.quantize(jax.random.normal(kk, (n, k), jnp.float32) * 0.02, fmt, **qkw)
            for kk in keys[1:]
        ]
        kw, envs = qmatmul_kwargs(wcfg, path)
        with env(envs):
            got = bq.plan(jax.ShapeDtypeStruct((m, k), jnp.bfloat16), ws[0], **kw).path
        if got != path:
            raise Unavailable(f"plan takes {got}, not {path}")
        fn = jax.jit(lambda x, w: bq.qmatmul(x, w, **kw))
        return fn, list(zip(xs, ws, strict=True)), envs

    return Workload(
        f"qmatmul {m}x{n}x{k} {wcfg} {path}",
        f"gemm:{path}",
        qmatmul_ops(m, n, k, wcfg, path),
        build,
        {"m": m, "n": n, "k": k, "weights": wcfg, "path": path},
    )


def quantize_workload(rows: int, cols: int, fmt: str, op: str = "quantize") -> Workload:
    """``jax_bq.quantize`` (default granularity) or ``dequantize`` of a bf16 ``rows x cols``."""
    cost = (
        rl.quantize_cost(rows, cols, fmt)
        if op == "quantize"
        else rl.dequantize_cost(rows, cols, fmt)
    )

    def build():
        import jax
        import jax.numpy as jnp

        import jax_bq as bq

        r = copies(rows * cols * 2)
        keys = jax.random.split(jax.random.PRNGKey(rows + cols), r)
        xs = [jax.random.normal(kk, (rows, cols), jnp.bfloat16) for kk in keys]
        if op == "quantize":
            return jax.jit(lambda x: bq.quantize(x, fmt)), [(x,) for x in xs], {}
        qs = [bq.quantize(x, fmt) for x in xs]
        return jax.jit(lambda q: bq.dequantize(q, jnp.bfloat16)), [(q,) for q in qs], {}

    return Workload(
        f"{op} {rows}x{cols} bf16 {fmt}",
        f"{op}:{fmt}",
        [(cost, 1)],
        build,
        {"op": op, "format": fmt},
    )


def attention_workload(
    batch: int, heads: int, seq: int, head_dim: int, impl: str = "xla"
) -> Workload:
    """``jax.nn.dot_product_attention`` (bf16, padding mask as in BertEncoder) with ``impl``."""
    s = att.AttentionShape(batch, heads, seq, seq, head_dim)

    def build():
        import jax
        import jax.numpy as jnp

        shape = (batch, seq, heads, head_dim)
        r = copies(3 * 2 * math.prod(shape))
        keys = jax.random.split(jax.random.PRNGKey(seq), 3 * r)
        args = []
        for i in range(r):
            q, k, v = (jax.random.normal(keys[3 * i + j], shape, jnp.bfloat16) for j in range(3))
            args.append((q, k, v))
        mask = jnp.ones((batch, 1, 1, seq), bool)
        scale = 1.0 / math.sqrt(head_dim)
        if impl == "xla":
            fn = jax.jit(
                lambda q, k, v: jax.nn.dot_product_attention(
                    q, k, v, mask=mask, scale=scale, implementation="xla"
                )
            )
        else:
            fn = jax.jit(
                lambda q, k, v: jax.nn.dot_product_attention(
                    q, k, v, scale=scale, implementation="cudnn"
                )
            )
        return fn, args, {}

    return Workload(
        f"attention {batch}x{heads}x{seq}x{head_dim} {impl}",
        f"attention:{impl}",
        [(att.attention_cost(s, impl), 1)],
        build,
        {"seq": seq, "impl": impl},
    )


def layernorm_workload(rows: int, hidden: int) -> Workload:
    """LayerNorm of ``x + r`` in bf16 (float32 statistics), as the encoder's residual LN."""

    def build():
        import jax
        import jax.numpy as jnp

        r = copies(rows * hidden * 4)
        keys = jax.random.split(jax.random.PRNGKey(hidden), 2 * r)
        args = [
            (
                jax.random.normal(keys[2 * i], (rows, hidden), jnp.bfloat16),
                jax.random.normal(keys[2 * i + 1], (rows, hidden), jnp.bfloat16),
            )
            for i in range(r)
        ]
        g = jnp.ones((hidden,), jnp.bfloat16)

        def ln(x, res):
            y = (x + res).astype(jnp.float32)
            mu = y.mean(-1, keepdims=True)
            var = ((y - mu) ** 2).mean(-1, keepdims=True)
            return ((y - mu) * jax.lax.rsqrt(var + 1e-12) * g).astype(jnp.bfloat16)

        return jax.jit(ln), args, {}

    return Workload(
        f"layernorm {rows}x{hidden}", "layernorm", [(rl.layernorm_cost(rows, hidden), 1)], build, {}
    )


def encoder_workload(model: str, batch: int, seq: int, preset_name: str, eff) -> Workload:
    """A whole ``jax_bq.models.BertEncoder`` forward (random weights) under a uniform recipe.

    ``preset_name``: a :data:`~jax_bq.perf.presets.BENCHMARK_RECIPES` entry (every
    dense layer the same recipe, built with ``quantize_model_weights``).
    """
    from jax_bq.perf import models as mdl
    from jax_bq.perf.presets import preset

    cfg = mdl.model_config(model)
    strategy = preset(preset_name, cfg.layers)
    if len(strategy.recipes()) != 1:
        raise ValueError(f"{preset_name}: the encoder workload needs one recipe for every layer")
    (p,) = strategy.recipes()
    est = mdl.encoder_ops(cfg, batch, seq, strategy, eff)

    def build():
        import jax
        import jax.numpy as jnp
        import numpy as np

        from jax_bq.flax import WeightQuant, cast_float_params, quantize_model_weights
        from jax_bq.models import E5_LARGE, MINILM_L6, BertEncoder, random_bert_params

        bert = {"e5-large": E5_LARGE, "bge-large": E5_LARGE, "minilm-l6": MINILM_L6}[model]
        p32 = _random_params(model, bert, random_bert_params)
        if p.w_format == "bf16":
            params, module = cast_float_params(p32, jnp.bfloat16), BertEncoder(bert, jnp.bfloat16)
        else:
            spec = WeightQuant(p.w_format, p.w_granularity or None)
            params = cast_float_params(
                quantize_model_weights(p32, [("kernel$", spec)]), jnp.bfloat16
            )
            act = p.w_format if p.act == "dynamic" else "bf16"
            module = BertEncoder(
                bert, jnp.bfloat16, act, p.act_granularity if p.act == "dynamic" else None
            )
        rng = np.random.default_rng(0)
        args = []
        for _ in range(4):
            ids = jnp.asarray(rng.integers(1000, bert.vocab_size, (batch, seq)), jnp.int32)
            args.append((params, ids, jnp.ones((batch, seq), jnp.int32)))
        fn = jax.jit(lambda prm, i, msk: module.apply({"params": prm}, i, msk))
        return fn, args, {}

    return Workload(
        f"encoder {model} {batch}x{seq} {preset_name}",
        "encoder",
        list(est.ops),
        build,
        {"paths": est.paths, "batch": batch, "seq": seq, "preset": preset_name},
    )


_PARAMS: dict = {}


def _random_params(name, config, make):
    """Random float32 params of ``config``, made once per model (E5-large: 335M values)."""
    if name not in _PARAMS:
        _PARAMS.clear()
        _PARAMS[name] = make(config, seed=0)
    return _PARAMS[name]


def grouped(ops) -> list:
    """Merges equal OpCosts, summing their counts."""
    c: Counter = Counter()
    for o, n in ops:
        c[o] += n
    return list(c.items())
