"""docs/api.md names every public name: ``jax_bq.__all__`` and each public module's ``__all__``.

Public modules are every ``jax_bq`` module whose dotted path has no ``_``-prefixed
part, except the ones listed in ``INTERNAL`` (CLI plumbing, the primitives behind the
public wrappers and the jnp twins; DESIGN.md describes those). A name counts as
documented when it appears inside a backtick span of docs/api.md.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import jax_bq

API_MD = Path(__file__).resolve().parents[1] / "docs" / "api.md"
INTERNAL = ("cli", "commands", "primitives", "reference", "reference_calibrate")
INTERNAL_PREFIX = ("reference_",)


def _public_modules() -> list[str]:
    names = ["jax_bq"]
    for m in pkgutil.walk_packages(jax_bq.__path__, "jax_bq."):
        parts = m.name.split(".")[1:]
        if any(p.startswith("_") for p in parts):
            continue
        if parts[0] in INTERNAL or parts[0].startswith(INTERNAL_PREFIX):
            continue
        names.append(m.name)
    return names


def _documented() -> set[str]:
    spans = re.findall(r"`([^`\n]+)`", API_MD.read_text())
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", " ".join(spans)))


@pytest.mark.parametrize("module", _public_modules())
def test_every_public_name_is_in_api_md(module):
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:  # an optional extra (flax) absent
        pytest.skip(f"{module}: {e}")
    missing = sorted(set(getattr(mod, "__all__", ())) - _documented())
    assert not missing, f"{module}.__all__ names missing from docs/api.md: {missing}"


def test_api_md_links_resolve():
    root = API_MD.parent
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", API_MD.read_text())
    broken = [t for t in links if "://" not in t and not (root / t).exists()]
    assert not broken, f"docs/api.md links to missing files: {broken}"
