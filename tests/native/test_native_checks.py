"""The host-side C++ checks under tests/native, built and run by pytest.

``format_registry_check.cc``: the generated format dispatch and its refusal of
unknown ids (quick). ``e2m1_exhaustive.cc``: ``EncodeE2M1`` and
``EncodeE2M1ByMinima`` against the generic minifloat encoder on every float32
bit pattern (2^32 inputs, about a minute; marked ``exhaustive``). Each is
compiled with the system C++ compiler (the one that builds the package).
"""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _build_and_run(source: str, opt: str, tmp_path: Path) -> str:
    cxx = shutil.which("c++")
    assert cxx, "no C++ compiler (c++) on PATH: the package build needs one too"
    flags = ["-std=c++20", opt, f"-I{ROOT / 'ffi/include'}"]
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and " fma " in cpuinfo.read_text():
        flags.append("-mfma")  # std::fma in hardware (~4x faster for the E2M1 sweep)
    exe = tmp_path / Path(source).stem
    build = subprocess.run(
        [cxx, *flags, str(ROOT / "tests/native" / source), "-o", str(exe)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def test_format_registry_check(tmp_path):
    _build_and_run("format_registry_check.cc", "-O1", tmp_path)


@pytest.mark.exhaustive
def test_e2m1_encoder_every_float32(tmp_path):
    _build_and_run("e2m1_exhaustive.cc", "-O2", tmp_path)
