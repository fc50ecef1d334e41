"""tests/ops mirrors the ops: one ``tests/ops/test_<op>.py`` per primitive.

The ops are found, not listed: every module-level ``jax.extend.core.Primitive``
named ``<op>_p`` in a ``jax_bq.primitives`` module. Aspects of an op may have
their own file (``test_<op>_<aspect>.py``); every file under tests/ops names an op.
"""

import importlib
import pkgutil
from pathlib import Path

from jax.extend.core import Primitive

import jax_bq.primitives

OPS_DIR = Path(__file__).resolve().parent / "ops"
# Ops whose tests live elsewhere, and where (the file must name the op).
ELSEWHERE = {"qat_matmul": "test_autodiff.py"}


def primitive_ops() -> set[str]:
    ops = set()
    for info in pkgutil.iter_modules(jax_bq.primitives.__path__):
        module = importlib.import_module(f"jax_bq.primitives.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, Primitive) and name.endswith("_p"):
                ops.add(name[: -len("_p")])
    return ops


def test_primitives_are_found():
    ops = primitive_ops()
    assert {"quantize", "dequantize", "qmatmul", "hadamard", "layernorm_quantize"} <= ops


def test_every_op_has_its_test_file():
    missing = []
    for op in sorted(primitive_ops()):
        if op in ELSEWHERE:
            home = OPS_DIR.parent / ELSEWHERE[op]
            assert op in home.read_text(), f"{home} does not test {op}"
        elif not (OPS_DIR / f"test_{op}.py").is_file():
            missing.append(f"tests/ops/test_{op}.py")
    assert not missing, f"ops without a test file: {missing}"


def test_every_file_in_tests_ops_names_an_op():
    ops = primitive_ops()
    stray = [
        p.name
        for p in OPS_DIR.glob("test_*.py")
        if not any(p.stem == f"test_{op}" or p.stem.startswith(f"test_{op}_") for op in ops)
    ]
    assert not stray, f"tests/ops files named after no op: {stray}"
