"""benchmarks/ as a package behind ``jax-bq bench``: imports, listing, JSON -> markdown."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd
    )


def test_every_benchmark_module_imports():
    r = _run(
        "import importlib, json, benchmarks\n"
        "t = benchmarks.available()\n"
        "for b in t.values(): importlib.import_module(b['module'])\n"
        "print(json.dumps(sorted(t)))"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    names = json.loads(r.stdout.splitlines()[-1])
    files = {
        p.stem.removeprefix("bench_")
        for p in (ROOT / "benchmarks").glob("*.py")
        if p.stem not in ("__init__", "common")
    }
    assert set(names) == files and "qmatmul" in names


def test_no_sys_path_edits_in_tools():
    offenders = []
    for folder in ("benchmarks", "scripts", "docs/experiments"):
        for p in (ROOT / folder).rglob("*.py"):
            if re.search(r"^\s*sys\.path\.(insert|append)\(", p.read_text(), re.M):
                offenders.append(str(p.relative_to(ROOT)))
    assert not offenders, f"sys.path edits (import benchmarks.* instead): {offenders}"


def test_cli_lists_and_runs_a_benchmark_outside_the_checkout(tmp_path):
    # From another folder, so that the package is found from jax_bq's checkout, not the cwd.
    r = _run(
        "import sys; from jax_bq import cli\n"
        "sys.exit(cli.main(['bench', 'cpu_quantize', '--help']))",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--tag" in r.stdout
    r = _run("from jax_bq import cli; cli.main(['bench', '--json'])", cwd=tmp_path)
    listing = json.loads(r.stdout)
    assert listing["qmatmul"]["gpu"] and not listing["cpu_quantize"]["gpu"]
    assert all(b["what"] for b in listing.values()), "a benchmark without a docstring"


def test_markdown_is_made_from_the_json(tmp_path):
    from benchmarks import common

    rows = [{"shape": "1x2", "us": 1.23456, "n": 3}, {"shape": "4x5", "us": 7.0}]
    table = common.write("demo", {"device": "cpu"}, rows, [("shape", "shape"), ("us", "µs")],
                         results=tmp_path)  # fmt: skip
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["columns"] == [["shape", "shape"], ["us", "µs"]] and saved["rows"] == rows
    md = (tmp_path / "demo.md").read_text()
    assert md == common.markdown(saved)
    assert "| 1x2 | 1.23 |" in table and "- device: cpu" in md
    (tmp_path / "demo.md").unlink()
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.common", str(tmp_path / "demo.json")],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "demo.md").read_text() == md
