"""timm export: once upcycle has registered its entrypoint (``upcycle.register_with_timm()``, or ``import upcycle``
after timm), timm rebuilds the converted model by name from the directory."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import upcycle
from upcycle.cli import main
from upcycle.export.timm_export import upcycle_moe

from ..conversion.tiny_models import TIMM_CASES, build

COMPAT = str(Path(upcycle.__file__).parent / "_compat.py")


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


@pytest.mark.parametrize(
    "imports",
    [
        # timm first (after the torchvision fix, run from its file, as a CPU torch needs): `import upcycle` registers
        f"import importlib.util as u; s = u.spec_from_file_location('fix', {COMPAT!r}); c = u.module_from_spec(s); "
        "s.loader.exec_module(c); c.fix_torchvision_operators(); "
        "import sys, timm; assert 'upcycle' not in sys.modules; import upcycle",
        # upcycle first: nothing hooks the import of timm, so the caller registers
        "import upcycle; upcycle.register_with_timm(); import timm",
    ],
    ids=["timm_first", "upcycle_first"],
)
def test_a_fresh_process_loads_the_export_in_either_import_order(imports, tmp_path):
    moe = upcycle.convert(build("vit"), "sparse_upcycling", num_experts=2, top_k=1, progress=False)
    upcycle.export(moe, tmp_path / "timm", format="timm")
    load = f"m = timm.create_model('local-dir:{tmp_path / 'timm'}', pretrained=True); print(type(m).__name__)"
    code = f"{imports}; {load}"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "VisionTransformer"


def test_cli_export_timm_and_refusals(tmp_path, capsys):
    moe = upcycle.convert(build("vit"), "sparse_upcycling", num_experts=2, top_k=1, progress=False)
    upcycle.save(moe, tmp_path / "moe")
    assert main(["export", str(tmp_path / "moe"), "--format", "timm", "--out", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "model.safetensors").is_file()
    assert main(["export", str(tmp_path / "moe"), "--format", "mixtral", "--out", str(tmp_path / "m")]) == 2
    assert "cannot export as 'mixtral': models of the 'timm_vit' adapter export as 'timm'" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
    lm = upcycle.convert(build("llama"), "sparse_upcycling", num_experts=2, top_k=1, progress=False)
    with pytest.raises(ValueError, match="cannot export as 'timm': models of the 'hf_llama' adapter"):
        upcycle.export(lm, tmp_path / "x", format="timm")
    with pytest.raises(ValueError, match="unknown export format 'onnx'"):
        upcycle.export(lm, tmp_path / "x", format="onnx")


def test_export_carries_the_preprocessing_config_and_refuses_a_new_head(tmp_path):
    import timm

    vit = build("vit")
    moe = upcycle.convert(vit, "sparse_upcycling", num_experts=2, top_k=1, progress=False).eval()
    upcycle.export(moe, tmp_path / "timm", format="timm")
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    for key in ("input_size", "mean", "std", "first_conv", "classifier"):  # what timm's transforms and heads read
        assert config["pretrained_cfg"][key] == json.loads(json.dumps(vit.pretrained_cfg[key]))
    assert config["num_classes"] == 5 and config["num_features"] == vit.num_features
    rebuilt = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True, num_classes=5)
    assert rebuilt.num_classes == 5  # asking for the exported head size is fine
    with pytest.raises(ValueError, match="resizing its head is not supported"):
        timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True, num_classes=7)


def exported_vit(directory: Path) -> tuple[torch.nn.Module, dict]:
    """A converted ViT exported for timm, and the config.json timm reads."""
    moe = upcycle.convert(build("vit"), "sparse_upcycling", num_experts=2, top_k=1, progress=False).eval()
    upcycle.export(moe, directory, format="timm")
    return moe, json.loads((directory / "config.json").read_text())


def test_the_entrypoint_builds_the_skeleton_unless_asked_for_weights(tmp_path):
    """upcycle_moe called as a factory: by default the structure with fresh weights and no file read; with
    pretrained=True and timm's PretrainedCfg object (not only the dict local-dir passes), the exported weights."""
    from timm.models import PretrainedCfg

    moe, config = exported_vit(tmp_path / "timm")
    record = config["model_args"]["upcycle_record"]
    skeleton = upcycle_moe(upcycle_record=record)
    shapes = {name: tensor.shape for name, tensor in moe.state_dict().items()}
    assert {name: tensor.shape for name, tensor in skeleton.state_dict().items()} == shapes
    assert not torch.equal(skeleton.head.weight, moe.head.weight)
    cfg = PretrainedCfg(file=str(tmp_path / "timm"))
    loaded = upcycle_moe(pretrained=True, pretrained_cfg=cfg, upcycle_record=record)
    for name, tensor in moe.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_the_entrypoint_without_a_record_says_where_it_comes_from():
    """timm.create_model("upcycle_moe") by name, without an exported directory's record, says how to build one."""
    message = "upcycle_moe is built from an exported directory: timm.create_model('local-dir:DIR')"
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        upcycle_moe()


def test_a_model_built_outside_upcycle_with_unrecorded_arguments_is_refused_with_the_fix(tmp_path):
    """A timm model created directly, with an argument upcycle cannot read off the model (reg_tokens), rebuilds
    differently; the refusal names each tensor that does not fit and says to load the dense model with upcycle."""
    import timm

    arch, kwargs = TIMM_CASES["vit"]
    dense = timm.create_model(arch, num_classes=5, reg_tokens=1, **kwargs)
    moe = upcycle.convert(dense, "sparse_upcycling", num_experts=2, top_k=1, progress=False)
    message = (
        "the model cannot be rebuilt from its record: reg_token; pos_embed (1, 18, 48) rebuilt as (1, 17, 48)\n"
        "load the dense model with upcycle (timm:ARCH, upcycle.load), which records the timm.create_model keyword "
        "arguments it was built with, before upcycle.convert"
    )
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        upcycle.export(moe, tmp_path / "timm", format="timm")
    assert not any(tmp_path.iterdir())


def test_a_damaged_export_names_what_is_wrong(tmp_path):
    import timm

    out = tmp_path / "timm"
    _, config = exported_vit(out)
    weights = load_file(out / "model.safetensors")
    save_file({name: tensor for name, tensor in weights.items() if name != "head.weight"}, out / "model.safetensors")
    with pytest.raises(ValueError, match=f"weights in {re.escape(str(out))}.* missing \\['head.weight'\\]"):
        timm.create_model(f"local-dir:{out}", pretrained=True)
    del config["model_args"]["upcycle_record"]["layers"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"the exported config\.json's upcycle_record lacks layers"):
        timm.create_model(f"local-dir:{out}", pretrained=True)
