"""The Python definition of the qmatmul ABI agrees with the C++ headers, value by value."""

import pathlib
import re

import pytest

from jax_bq.primitives import qmatmul_abi as abi

ROOT = pathlib.Path(__file__).resolve().parents[2]
QMATMUL_H = (ROOT / "ffi/cuda/qmatmul.h").read_text()
GEMM_H = (ROOT / "ffi/cuda/cublaslt_gemm.h").read_text()


def _enum(text: str, name: str) -> dict[str, int]:
    body = re.search(rf"enum (?:class )?{name}\b[^{{]*\{{(.*?)\}};", text, re.S).group(1)
    body = re.sub(r"//[^\n]*", "", body)
    return {k: int(v) for k, v in re.findall(r"(k\w+)\s*=\s*(\d+)", body)}


def _camel(name: str) -> str:
    return "k" + "".join(p.capitalize() for p in name.lower().split("_"))


@pytest.mark.parametrize(
    ("py", "cpp", "text"),
    [
        (abi.QmmPath, "QmmPath", QMATMUL_H),
        (abi.ActGran, "ActGran", QMATMUL_H),
        (abi.WGran, "WGran", QMATMUL_H),
    ],
    ids=["QmmPath", "ActGran", "WGran"],
)
def test_enum_matches_header(py, cpp, text):
    cpp_values = {k.lower(): v for k, v in _enum(text, cpp).items()}
    assert {_camel(m.name).lower(): int(m) for m in py} == cpp_values


def test_scale_modes_match_header():
    consts = dict(re.findall(r"(kScale\w+) = (\d+)", QMATMUL_H))
    expect = {
        "kScaleScalar": abi.ScaleMode.SCALAR_32F,
        "kScaleVec16Ue4m3": abi.ScaleMode.VEC16_UE4M3,
        "kScaleVec32Ue8m0": abi.ScaleMode.VEC32_UE8M0,
        "kScaleOuterVec": abi.ScaleMode.OUTER_VEC_32F,
        "kScaleVec128": abi.ScaleMode.VEC128_32F,
        "kScaleBlk128": abi.ScaleMode.BLK128x128_32F,
    }
    assert {k: int(v) for k, v in consts.items()} == {k: int(v) for k, v in expect.items()}


def test_epilogue_bits_match_header():
    cpp = _enum(GEMM_H, "EpilogueBits")
    names = {"kEpiBias": "BIAS", "kEpiGelu": "GELU_TANH", "kEpiResidual": "RESIDUAL"}
    names |= {"kEpiAmax": "AMAX", "kEpiGeluErf": "GELU_ERF"}
    assert {k: int(abi.Epi[v]) for k, v in names.items()} == cpp


def test_every_plan_name_has_an_id():
    assert set(abi.PATH_IDS) == {abi.CUBLAS_FP8, abi.WEIGHT_ONLY, abi.W4A16, abi.CUBLAS_BLOCKFP}
    assert set(abi.ACT_IDS) == {abi.ACT_TENSOR, abi.ACT_TOKEN, abi.ACT_BLOCK128, abi.ACT_BLOCKFP}
