"""``--dtype``: auto keeps the source's dtype on convert and export; verify compares half-precision models in fp32."""

import json

import pytest
import torch
from safetensors import safe_open

import upcycle
from upcycle.cli import main
from upcycle.layers import moe_layers
from upcycle.sources import load_source

from .conftest import tiny_llama_folder


def stored_dtypes(folder) -> set[torch.dtype]:
    found = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            found |= {f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118
    return found


@pytest.mark.parametrize(("flag", "expected"), [("auto", "bfloat16"), ("float32", "float32")])
def test_convert_keeps_or_sets_the_dtype(tmp_path, flag, expected, capsys):
    dense = tiny_llama_folder(tmp_path / "dense", dtype="bfloat16")
    out = tmp_path / "moe"
    assert main(["convert", str(dense), "--experts", "4", "--dtype", flag, "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == expected
    assert stored_dtypes(out) == {"BF16" if expected == "bfloat16" else "F32"}
    diff = float(capsys.readouterr().out.split("max |moe - dense| = ")[1].split()[0])
    assert diff < 1e-5  # compared in fp32: the stored bf16 experts are exact copies
    assert main(["verify", str(out), "--against", str(dense)]) == 0


def test_verify_still_fails_a_wrong_half_precision_conversion(tmp_path):
    dense = load_source(tiny_llama_folder(tmp_path / "dense", dtype="bfloat16"), dtype="auto")
    moe = upcycle.convert(dense, num_experts=4, top_k=2, progress=False)
    assert next(moe.parameters()).dtype == torch.bfloat16
    assert upcycle.verify(moe, dense).passed()
    with torch.no_grad():
        next(iter(moe_layers(moe)))[1].experts.w_down.mul_(1.5)
    assert not upcycle.verify(moe, dense).passed()
    assert next(moe.parameters()).dtype == torch.bfloat16  # compared on copies


def test_export_dtype(tmp_path):
    saved = tmp_path / "moe"
    upcycle.save(upcycle.convert(load_source(tiny_llama_folder(tmp_path / "dense")), num_experts=2, progress=False),
                 saved)  # fmt: skip
    for flag, expected in (("auto", "F32"), ("bfloat16", "BF16")):
        out = tmp_path / f"mixtral-{flag}"
        assert main(["export", str(saved), "--format", "mixtral", "--dtype", flag, "--out", str(out)]) == 0
        assert stored_dtypes(out) == {expected}


def test_a_bad_dtype_is_refused():
    with pytest.raises(ValueError, match="--dtype takes auto, float32, bfloat16, float16; got 'fp8'"):
        load_source("timm:test_vit", random_init=True, dtype="fp8")
