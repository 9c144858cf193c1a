"""``timm:ARCH.TAG`` / ``--pretrained``: timm's own loader reads the cached weights; no weights is an error, never
a silent random init."""

import json

import pytest
import torch
from safetensors.torch import save_file

import upcycle
from upcycle.cli import main
from upcycle.errors import UserError
from upcycle.sources import load_source, load_timm

TAGGED = "test_vit.r160_in1k"  # timm's own tiny test ViT (0.37 M parameters) and its pretrained tag


@pytest.fixture
def cached_weights(hub_cache, tmp_path) -> tuple[dict[str, torch.Tensor], str]:
    """Weights (not timm's seeded init) in the hub cache where timm looks for the tag: ``timm/test_vit.r160_in1k``."""
    import timm

    torch.manual_seed(123)
    model = timm.create_model(TAGGED, pretrained=False)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    folder = tmp_path / "weights"
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    return state, hub_cache.seed(f"timm/{TAGGED}", folder)


@pytest.mark.parametrize("how", ["tag", "--pretrained"])
def test_a_pretrained_tag_loads_the_cached_weights(cached_weights, how):
    state, commit = cached_weights
    # --pretrained: the architecture's default tag is this one
    dense = load_source(f"timm:{TAGGED}") if how == "tag" else load_source("timm:test_vit", pretrained=True)
    for name, tensor in dense.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    record = upcycle.record_of(dense)
    assert (record.weights, record.revision) == ("pretrained", commit)


def test_the_converted_model_keeps_the_pretrained_tensors(cached_weights, tmp_path):
    state, commit = cached_weights
    out = tmp_path / "moe"
    assert main(["convert", f"timm:{TAGGED}", "--experts", "4", "--top-k", "2", "--out", str(out)]) == 0
    moe = upcycle.load(out)
    converted = moe.state_dict()
    ffn = [name for name in state if ".mlp." in name]
    kept = [name for name in state if name not in ffn]
    assert ffn and all(name not in converted for name in ffn)  # replaced by experts
    for name in kept:  # every non-FFN tensor equals the cached weights
        assert torch.equal(converted[name], state[name]), name
    config = json.loads((out / "config.json").read_text())
    assert (config["origin"], config["weights"], config["revision"]) == (f"timm:{TAGGED}", "pretrained", commit)
    assert main(["verify", str(out), "--against", f"timm:{TAGGED}"]) == 0


def test_no_weights_without_random_init_fails_cleanly(hub_cache, tmp_path, capsys):
    out = tmp_path / "moe"
    assert main(["convert", "timm:test_vit", "--out", str(out)]) == 2
    assert "timm:test_vit names no weights: use timm:ARCH.TAG or --pretrained" in capsys.readouterr().err
    assert main(["convert", f"timm:{TAGGED}", "--out", str(out)]) == 2  # the tag is not in the (empty) cache
    error = capsys.readouterr().err
    assert f"the pretrained weights of timm:{TAGGED} are not in the cache" in error
    assert f"hf download timm/{TAGGED}" in error and "Traceback" not in error
    assert not out.exists()


def test_random_init_is_explicit_and_recorded(tmp_path):
    dense = load_source("timm:test_vit", random_init=True)
    again = load_timm("test_vit")
    assert all(torch.equal(a, b) for a, b in zip(dense.state_dict().values(), again.state_dict().values(), strict=True))
    assert upcycle.record_of(dense).weights == "random init"
    out = tmp_path / "moe"
    assert main(["convert", "timm:test_vit", "--random-init", "--experts", "2", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["weights"] == "random init"


@pytest.mark.parametrize(("source", "flags", "message"), [
    (f"timm:{TAGGED}", {"random_init": True}, "takes one source of weights, got a pretrained tag or --pretrained and "
                                              "--random-init"),
    ("timm:test_vit", {"pretrained": True, "checkpoint": "w.safetensors"}, "takes one source of weights"),
    ("timm:resnet18.no_such_tag", {}, "timm has no pretrained weights 'resnet18.no_such_tag'; its tags: resnet18."),
    ("timm:no_such_net.tag", {}, "timm has no architecture 'no_such_net'"),
    ("some/folder", {"random_init": True}, "go with a timm:ARCH source only"),
])  # fmt: skip
def test_conflicting_or_unknown_weights_are_refused(source, flags, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_source(source, **flags)
