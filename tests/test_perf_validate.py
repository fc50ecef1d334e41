"""benchmarks/validate_perf.py: its workload set meets the issue's counts; fit + report (CPU)."""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import validate_perf as vp  # noqa: E402

from jax_bq.perf import fit as ft  # noqa: E402
from jax_bq.perf import hardware as hw  # noqa: E402
from jax_bq.perf import planner  # noqa: E402

H200 = hw.effective("h200", None)


def test_workload_set_covers_the_targets():
    ws = vp.workloads(False, H200)
    assert len(ws) >= 30
    parts = collections.Counter(p for p, _ in ws)
    assert set(parts) == set(vp.PARTS)
    gemm = [w.meta for _, w in ws if "path" in w.meta]
    shapes = {(m["m"], m["n"], m["k"]) for m in gemm}
    assert len(shapes) >= 6 and min(s[0] for s in shapes) == 1 and (8192,) * 3 in shapes
    assert {1, 4, 16, 64} <= {s[0] for s in shapes if s[1:] == (8192, 8192)}
    assert {(1, 28672, 8192), (4096, 1024, 1024), (4096, 4096, 1024), (4096, 1024, 4096)} <= shapes
    paths = {m["path"] for m in gemm}
    assert paths == {"xla_bf16", "cublaslt_fp8", "w8a16", "w4a16", "fp4_via_fp8", "dequant_dot"}
    # plan quality needs every candidate of a weight format measured in the same part
    by_part = collections.defaultdict(set)
    for p, w in ws:
        if "path" in w.meta:
            m = w.meta
            by_part[(m["m"], m["n"], m["k"], m["weights"])].add(p)
    assert all(len(v) == 1 for v in by_part.values())
    groups = collections.Counter(w.group for _, w in ws)
    assert groups["encoder"] == 6 and groups["attention:xla"] == 3
    assert any(g.startswith("quantize") for g in groups) and any(
        g.startswith("dequantize") for g in groups
    )


def _synthetic(tmp_path: Path) -> Path:
    """A measurement file whose times are the datasheet model's, perturbed by +-5%."""
    rows = []
    for i, (_, w) in enumerate(vp.workloads(False, H200, ("decode",))[:24]):
        row = ft.workload(w.name, w.group, w.ops)
        row["meta"] = w.meta
        row["measured_us"] = ft.predict_us(row, H200) * (1 + 0.05 * ((i % 3) - 1))
        rows.append(row)
    path = tmp_path / "part.json"
    path.write_text(
        json.dumps({"meta": {"device_key": "h200", "copy_tbps": 4.24}, "workloads": rows})
    )
    return path


def test_fit_and_report_writes_table_plot_and_plan(tmp_path, monkeypatch):
    monkeypatch.setattr(
        ft, "_GRID", {**ft._GRID, "mem": ft._GRID["mem"][::3], "comp": ft._GRID["comp"][::3]}
    )
    # plan_check points the planner at the fitted profile: restored after the test
    monkeypatch.setenv(hw.ENV_PROFILE, str(tmp_path / "profile.json"))
    monkeypatch.setattr(hw, "_LOADED", {})
    src = _synthetic(tmp_path)
    data = json.loads(src.read_text())
    md = vp.fit_and_report(data, tmp_path / "report.json", tmp_path / "profile.json")
    assert "held out" in md and "| workload | split |" in md
    assert (tmp_path / "report.png").stat().st_size > 0
    rep = json.loads((tmp_path / "report.json").read_text())["report"]
    assert rep["summary"]["held_out"]["n"] > 0
    assert rep["plan"] and all(p["plan"] for p in rep["plan"])
    assert hw.HardwareProfile.from_json((tmp_path / "profile.json").read_text()).efficiency
    planner._rank_cached.cache_clear()


def test_merge_meta_joins_part_timings():
    m = vp.merge_meta(
        [{"a": 1, "part_wall_s": {"decode": 10.0}}, {"part_wall_s": {"kernels": 5.0}}]
    )
    assert m["a"] == 1 and m["part_wall_s"] == {"decode": 10.0, "kernels": 5.0}


def test_unknown_part_is_refused():
    args = type("A", (), {"part": "decod", "only": None, "smoke": True, "budget_s": 1.0})()
    with pytest.raises(SystemExit, match="unknown part"):
        vp.measure(args)
