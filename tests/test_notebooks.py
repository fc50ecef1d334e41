"""Executes every notebook under notebooks/ top to bottom (CPU, in-repo package)."""

import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    if path.stem.startswith("02"):
        pytest.importorskip("tokenizers")
        from jax_bq.models.loading import minilm_dir

        try:
            minilm_dir()
        except FileNotFoundError as e:
            pytest.skip(str(e))
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs, f"{path.name}: outputs are committed (clear them)"
    # The kernel is this interpreter, importing jax_bq from the checkout.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    from ipykernel.kernelspec import install  # noqa: F401  (ensures ipykernel is importable)

    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        kernel_manager_class="jupyter_client.manager.KernelManager",
    )
    client.km = client.kernel_manager_class(kernel_name="python3")
    client.km.kernel_cmd = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    t0 = time.perf_counter()
    client.execute()
    print(f"{path.name}: {time.perf_counter() - t0:.1f} s")
