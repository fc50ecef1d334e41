"""Sharded checks on 8 virtual CPU devices, run by tests/test_sharding.py in a subprocess.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before JAX
initializes, so these checks run in their own interpreter. Each check prints
one JSON line ``{"name", "ok", "detail"}``; the test asserts on them.
Usage: ``python tests/sharding_worker.py [GROUP ...]`` (default: all groups).
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_bq  # noqa: E402
from jax_bq import parallel  # noqa: E402
from jax_bq.sharding import quantized_sharding, shard_quantized  # noqa: E402

MESHES = {"1x8": (1, 8), "2x4": (2, 4), "8x1": (8, 1)}
WIDE = ("f32", "bf16", "f16")


def mesh_of(name: str):
    return jax.make_mesh(MESHES[name], ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def report(name: str, ok: bool, detail="") -> None:
    print(json.dumps({"name": name, "ok": bool(ok), "detail": str(detail)[:2000]}), flush=True)


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.reshape(-1).view(np.uint8) if a.dtype.itemsize == 1 else a.reshape(-1).view(np.uint32)


def same_bits(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        x.shape == y.shape and np.array_equal(bits(x), bits(y)) for x, y in zip(la, lb, strict=True)
    )


def run(f, *args):
    """(f(*args), compiled HLO text), compiling once."""
    compiled = jax.jit(f).lower(*args).compile()
    return compiled(*args), compiled.as_text()


def wide_gathers(text: str):
    return [
        str(c)
        for c in parallel.collectives(text)
        if c.op == "all-gather" and any(d in WIDE for d, _ in c.arrays)
    ]


# ------------------------------------------------------------ quantize ----
QUANT_CASES = {
    "fp8_block128": ("fp8_e4m3", {}),
    "nvfp4": ("nvfp4", {}),
    "fp4_block32": ("fp4", {"block_size": 32}),
    "mxfp6_e2m3": ("mxfp6_e2m3", {}),  # 4 codes per 3 bytes along the sharded axis
    "fp8_per_tensor": ("fp8_e4m3", {"granularity": "per_tensor"}),
    "fp8_tile_16x128": ("fp8_e4m3", {"granularity": "tile_2d", "block_size": (16, 128)}),
}


def quant_input():
    x = jax.random.normal(jax.random.key(0), (128, 1024), jnp.float32) * 3.0
    x = x.at[5, 7].set(jnp.nan).at[70, 900].set(jnp.inf)  # one poisoned block each
    x = x.at[32:48, 256:384].set(0.0)  # all-zero blocks
    return x


def group_quantize():
    x = quant_input()

    def f(x):
        out = {}
        for name, (fmt, kw) in QUANT_CASES.items():
            q = jax_bq.quantize(x, fmt, **kw)
            out[name] = (q, jax_bq.dequantize(q))
        return out

    ref = jax.jit(f)(x)
    for mname in MESHES:
        mesh = mesh_of(mname)
        xs = jax.device_put(x, NamedSharding(mesh, P("data", "model")))
        got, text = run(f, xs)
        for name in QUANT_CASES:
            report(f"quantize_bitwise[{mname}-{name}]", same_bits(got[name], ref[name]))
        report(f"quantize_no_gather[{mname}]", not wide_gathers(text), wide_gathers(text))
        q = got["fp8_block128"][0]
        want = NamedSharding(mesh, P("data", "model"))
        report(
            f"quantize_stays_sharded[{mname}]",
            q.data.sharding.is_equivalent_to(want, 2)
            and q.scales.sharding.is_equivalent_to(want, 2),
            (q.data.sharding, q.scales.sharding),
        )


def group_reshard():
    """A shard boundary inside a block: re-sharded with a warning, same bits."""
    x = jax.random.normal(jax.random.key(3), (16, 256), jnp.float32)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("jax_bq").addHandler(handler)
    mesh = mesh_of("1x8")
    xs = jax.device_put(x, NamedSharding(mesh, P(None, "model")))  # 2 blocks of 128, 8 shards
    f = jax.jit(lambda x: jax_bq.quantize(x, "fp8_e4m3"))
    ok = same_bits(f(xs), f(x))
    warned = [r.getMessage() for r in records if "re-sharded" in r.getMessage()]
    report("reshard_keeps_blocks_whole", ok and warned, warned)
    # Meshes with Explicit axes (jax.make_mesh's default) take the same rules.
    explicit = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    xe = jax.device_put(x, NamedSharding(explicit, P("data", None)))
    qe = jax.jit(lambda x: jax_bq.quantize(x, "fp8_e4m3"))(xe)
    report("explicit_mesh_bitwise", same_bits(qe, f(x)), qe.data.sharding)
    try:
        quantized_sharding(jax_bq.quantize(x, "fp8_e4m3"), mesh, P(None, "model"))
        report("quantized_sharding_rejects_split_block", False, "no error")
    except ValueError as e:
        report("quantized_sharding_rejects_split_block", "split" in str(e), e)


def group_calibrate():
    x = quant_input()[:, :512]
    mesh = mesh_of("2x4")
    xs = jax.device_put(x, NamedSharding(mesh, P("data", "model")))
    for fmt in ("fp8_e4m3", "nvfp4"):

        def f(x, fmt=fmt):
            q, stats = jax_bq.calibrate(x, fmt)
            return q, tuple(vars(stats).values())

        (got, text), ref = run(f, xs), jax.jit(f)(x)
        report(f"calibrate_bitwise[{fmt}]", same_bits(got, ref))
        if fmt == "fp8_e4m3":
            report("calibrate_no_gather", not wide_gathers(text), wide_gathers(text))


def group_qtensor():
    mesh = mesh_of("2x4")
    w = jax_bq.quantize(jax.random.normal(jax.random.key(4), (512, 1024), jnp.float32), "nvfp4")
    sh = quantized_sharding(w, mesh, P("model", "data"))
    ws = shard_quantized(w, mesh, P("model", "data"))
    ok = ws.data.sharding == sh.data and ws.scales.sharding == sh.scales
    ident = jax.jit(lambda q: q, out_shardings=sh)(ws)
    ok = ok and ident.data.sharding == sh.data and ident.scales.sharding == sh.scales
    ok = ok and same_bits(ident, w)
    report("qtensor_device_put_jit", ok, (ident.data.sharding, ident.scales.sharding))
    with tempfile.TemporaryDirectory() as d:  # host checkpoint round trip
        leaves, tree = jax.tree.flatten(ws)
        path = os.path.join(d, "w.npz")
        # npz has no float8: store the bytes, restore the dtype from the leaves.
        np.savez(path, *[np.asarray(a).reshape(-1).view(np.uint8) for a in leaves])
        with np.load(path) as z:
            arrays = [z[f"arr_{i}"].view(a.dtype).reshape(a.shape) for i, a in enumerate(leaves)]
        restored = jax.tree.unflatten(tree, arrays)
        restored = jax.device_put(restored, sh)
    report(
        "qtensor_checkpoint",
        same_bits(restored, w) and restored.scales.sharding == sh.scales,
        restored.scales.sharding,
    )


# ------------------------------------------------------------- qmatmul ----
def group_qmatmul():
    kx, kw, kb = jax.random.split(jax.random.key(5), 3)
    x = jax.random.normal(kx, (64, 1024), jnp.bfloat16)
    bias = jax.random.normal(kb, (512,), jnp.float32)
    wf = jax.random.normal(kw, (512, 1024), jnp.float32) * 0.05
    weights = {
        "fp8": jax_bq.quantize(wf, "fp8_e4m3"),  # 1x128 activation blocks
        "fp8_channel": jax_bq.quantize(wf, "fp8_e4m3", granularity="per_channel"),  # per token
        "nvfp4": jax_bq.quantize(wf, "nvfp4"),
        "mxfp6": jax_bq.quantize(wf, "mxfp6_e3m2"),  # dequantize + dot fallback, 3-byte units
    }
    layouts = {  # name: (x spec, w spec, allowed collectives)
        "dp": (P("data", None), P(), set()),
        "column": (P(), P("model", None), set()),
        "row": (P(None, "model"), P(None, "model"), {"all-reduce"}),
        "dp_row": (P("data", "model"), P(None, "model"), {"all-reduce"}),
    }

    def mm(x, w, b):
        return jax_bq.qmatmul(x, w, bias=b, activation="gelu", return_amax=True)

    runs = [("fp8", "2x4", name) for name in layouts]
    runs += [("fp8", "8x1", "dp"), ("nvfp4", "1x8", "column"), ("nvfp4", "1x8", "row")]
    runs += [("fp8_channel", "2x4", "dp_row"), ("mxfp6", "1x8", "row")]
    refs = {name: jax.jit(mm)(x, w, bias) for name, w in weights.items()}
    for wname, mname, lname in runs:
        w, (ref_y, ref_amax) = weights[wname], refs[wname]
        mesh = mesh_of(mname)
        xs_spec, ws_spec, allowed = layouts[lname]
        xs = jax.device_put(x, NamedSharding(mesh, xs_spec))
        ws = shard_quantized(w, mesh, ws_spec)
        (y, amax), text = run(mm, xs, ws, bias)
        err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref_y.astype(jnp.float32))))
        scale = float(jnp.max(jnp.abs(ref_y.astype(jnp.float32))))
        tag = f"{wname}-{mname}-{lname}"
        report(f"qmatmul_close[{tag}]", err <= 2e-2 * scale, (err, scale))
        report(
            f"qmatmul_amax[{tag}]",
            abs(float(amax) - float(ref_amax)) <= 1e-5 * float(ref_amax),
            (float(amax), float(ref_amax)),
        )
        cs = parallel.collectives(text)

        # Besides the partial-sum all-reduce (rank 2), only amax pmaxes may appear:
        # the output's (a scalar) and, for per-token scales, the row amax (rank 4).
        def is_amax(c):
            return c.op == "all-reduce" and all(len(s) != 2 for _, s in c.arrays)

        bad = [str(c) for c in cs if c.op not in allowed and not is_amax(c)]
        n_reduce = sum(1 for c in cs if c.op == "all-reduce" and not is_amax(c))
        want = 1 if "all-reduce" in allowed and MESHES[mname][1] > 1 else 0
        report(
            f"qmatmul_collectives[{tag}]",
            not bad and n_reduce == want,
            [str(c) for c in cs],
        )


# ---------------------------------------------------------------- BERT ----
def group_bert():
    from jax_bq.flax import quantize_model_weights
    from jax_bq.models.bert import BertConfig, BertEncoder

    cfg = BertConfig(
        vocab_size=100,  # not a dense-weight shape, so the HLO check can tell them apart
        hidden_size=128,
        num_layers=1,
        num_heads=8,
        intermediate_size=512,
        max_position_embeddings=32,
    )
    model = BertEncoder(cfg, dtype=jnp.float32)
    ids = jax.random.randint(jax.random.key(0), (8, 16), 0, 100)
    mask = jnp.ones((8, 16), jnp.int32).at[:, 12:].set(0)
    params = model.init(jax.random.key(1), ids, mask)["params"]
    qparams = quantize_model_weights(params, "nvfp4")

    def fwd(p, i, m):
        return model.apply({"params": p}, i, m)

    ref = jax.jit(fwd)(qparams, ids, mask)
    runs = [("8x1", "dp"), ("2x4", "tp"), ("1x8", "tp"), ("2x4", "fsdp")]
    h, f_dim, tokens = cfg.hidden_size, cfg.intermediate_size, ids.size
    # Dense weights ([N, K] and Flax [K, N]) and full activations, in any layout.
    dense = {(h, h), (f_dim, h), (h, f_dim), (tokens, h), (tokens, f_dim)}
    dense |= {(8, 16, h), (8, 16, f_dim)}
    for mname, pat in runs:
        mesh = mesh_of(mname)
        ps = parallel.encoder_param_shardings(qparams, mesh, pat)
        bs = parallel.batch_sharding(mesh, pat)
        f = fwd
        if pat == "fsdp":

            def f(p, i, m, mesh=mesh):
                return fwd(parallel.fsdp_gather(p, mesh), i, m)

        args = (jax.device_put(qparams, ps), jax.device_put(ids, bs), jax.device_put(mask, bs))
        out, text = run(f, *args)
        err = float(jnp.max(jnp.abs(out - ref)))
        tag = f"{pat}-{mname}"
        report(f"bert_close[{tag}]", err < 1e-3, err)
        cs = parallel.collectives(text)
        if pat == "dp":
            ok, detail = not cs, cs
        elif pat == "tp":
            reduces = [c for c in cs if c.op == "all-reduce"]
            ok = len(reduces) == 2 * cfg.num_layers and all(c.op == "all-reduce" for c in cs)
            detail = [str(c) for c in cs]
        else:
            gathers = [c for c in cs if c.op == "all-gather"]
            # Quantized scales may travel as f16 on CPU (no f8 collectives there).
            wide = [str(c) for c in gathers if any(d in WIDE and s in dense for d, s in c.arrays)]
            # Every quantized dense weight (6 per layer) is gathered as codes.
            u8 = [c for c in gathers if any(d == "u8" for d, _ in c.arrays)]
            ok = not wide and len(u8) >= 6 * cfg.num_layers
            detail = [str(c) for c in cs]
        report(f"bert_collectives[{tag}]", ok, detail)
    mesh = mesh_of("2x4")
    memory = {}
    for name, tree in (
        ("bf16", jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)),
        ("nvfp4", qparams),
    ):
        placed = jax.device_put(tree, parallel.encoder_param_shardings(tree, mesh, "fsdp"))
        memory[name] = sum(
            s.data.nbytes
            for a in jax.tree.leaves(placed)
            for s in a.addressable_shards
            if s.device == jax.devices()[0]
        )
    report("fsdp_memory_per_device", memory["nvfp4"] < memory["bf16"], memory)


GROUPS = {
    "quantize": group_quantize,
    "reshard": group_reshard,
    "calibrate": group_calibrate,
    "qtensor": group_qtensor,
    "qmatmul": group_qmatmul,
    "bert": group_bert,
}


def main(names) -> int:
    for name in names or GROUPS:
        try:
            GROUPS[name]()
        except Exception:  # noqa: BLE001 - reported as a failed check, with the traceback
            report(f"group[{name}]", False, traceback.format_exc())
        else:
            report(f"group[{name}]", True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
