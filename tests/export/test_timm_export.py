"""timm export: after ``import upcycle``, timm rebuilds the converted model by name from the directory."""

import subprocess
import sys

import pytest
import torch

import upcycle
from upcycle.cli import main

from ..conversion.tiny_models import build


@pytest.mark.parametrize("case", ["vit", "eva02_swiglu_norm", "convnext_conv"])
def test_timm_local_dir_round_trip(case, tmp_path):
    import timm

    moe = upcycle.convert(build(case), "sparse_upcycling", num_experts=4, top_k=2, noise_std=0.05,
                          layers="last_half", progress=False).eval()  # fmt: skip
    upcycle.export(moe, tmp_path / "timm", format="timm")
    rebuilt = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32) if "eva" not in case else torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), moe(x))


def test_registration_works_whichever_is_imported_first(tmp_path):
    """A fresh process that imports timm *before* upcycle still finds the upcycle_moe entrypoint."""
    moe = upcycle.convert(build("vit"), "sparse_upcycling", num_experts=2, top_k=1, progress=False)
    upcycle.export(moe, tmp_path / "timm", format="timm")
    code = (
        "import upcycle._compat as c; c.apply_environment_fixes(); import timm; import upcycle; "
        f"m = timm.create_model('local-dir:{tmp_path / 'timm'}', pretrained=True); print(type(m).__name__)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "VisionTransformer"


def test_cli_export_timm_and_refusals(tmp_path, capsys):
    moe = upcycle.convert(build("vit"), "sparse_upcycling", num_experts=2, top_k=1, progress=False)
    upcycle.save(moe, tmp_path / "moe")
    assert main(["export", str(tmp_path / "moe"), "--format", "timm", "--out", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "model.safetensors").is_file()
    assert main(["export", str(tmp_path / "moe"), "--format", "mixtral", "--out", str(tmp_path / "m")]) == 2
    assert "cannot export to Mixtral" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    lm = upcycle.convert(build("llama"), "sparse_upcycling", num_experts=2, top_k=1, progress=False)
    with pytest.raises(ValueError, match="needs a converted timm model"):
        upcycle.export(lm, tmp_path / "x", format="timm")
    with pytest.raises(ValueError, match="unknown export format 'onnx'"):
        upcycle.export(lm, tmp_path / "x", format="onnx")
