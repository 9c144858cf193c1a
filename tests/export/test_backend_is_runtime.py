"""The expert compute backend is a runtime choice, never saved with a model: a model saved while a non-default
backend was active loads with the default one and computes the same outputs."""

import inspect
import json

import pytest
import torch

import upcycle
from upcycle.adapters import find_adapter
from upcycle.layers import Experts, list_backends, moe_layers, set_backend

from ..conversion.tiny_models import build
from ..models.helpers import tiny_lm

DEFAULT = inspect.signature(Experts).parameters["backend"].default
OTHERS = [name for name in list_backends() if name != DEFAULT]


def backends(model) -> set[str]:
    groups = [group for _, layer in moe_layers(model) for group in getattr(layer.experts, "groups", lambda: [])()]
    return {layer.experts.backend for _, layer in moe_layers(model)} | {group.backend for group in groups}


def test_there_is_a_non_default_backend():
    assert DEFAULT == "auto" and OTHERS


@pytest.mark.parametrize("backend", OTHERS)
@pytest.mark.parametrize("case", ["vit", "llama"])
def test_a_model_converted_with_a_backend_loads_with_the_default(case, backend, tmp_path):
    dense = build(case)
    moe = upcycle.convert(dense, "sparse_upcycling", num_experts=4, top_k=2, noise_std=0.05, backend=backend,
                          layers="last_half", progress=False).eval()  # fmt: skip
    assert backends(moe) == {backend}
    upcycle.save(moe, tmp_path / "out")
    loaded = upcycle.load(tmp_path / "out")
    assert backends(loaded) == {DEFAULT}
    adapter = find_adapter(dense)
    inputs = adapter.example_inputs(dense, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(adapter.outputs(loaded, inputs), adapter.outputs(moe, inputs))
    for name in ("config.json", "recipe.yaml"):
        assert "backend" not in (tmp_path / "out" / name).read_text(), name
    assert backends(moe) == {backend}  # saving does not touch the live model's choice


def test_a_backend_switched_after_conversion_is_not_saved(tmp_path):
    moe = upcycle.convert(build("llama"), "sparse_upcycling", num_experts=3, top_k=2, progress=False).eval()
    set_backend(moe, "eager")
    upcycle.save(moe, tmp_path / "out")
    loaded = upcycle.load(tmp_path / "out")
    assert backends(loaded) == {DEFAULT}
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, moe(input_ids=ids).logits)


def test_jetpack_dual_path_experts_load_with_the_default(tmp_path):
    dense = build("vit")
    moe = upcycle.convert(dense, "moe_jetpack", num_experts=4, top_k=2, layers="last_half", progress=False).eval()
    set_backend(moe, OTHERS[0])
    upcycle.save(moe, tmp_path / "out")
    assert backends(upcycle.load(tmp_path / "out")) == {DEFAULT}


def test_a_merged_model_loads_with_the_default(tmp_path):
    models = [tiny_lm(parallel=True, seed=s) for s in range(2)]
    merged = upcycle.merge(models, method="btx", backend=OTHERS[0]).eval()
    assert backends(merged) == {OTHERS[0]}
    upcycle.save(merged, tmp_path / "m")
    loaded = upcycle.load(tmp_path / "m")
    assert backends(loaded) == {DEFAULT}
    assert "backend" not in (tmp_path / "m" / "config.json").read_text()
    ids = torch.randint(0, models[0].config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, merged(input_ids=ids).logits)


def test_a_record_saved_with_a_backend_by_an_older_version_loads_with_the_default(tmp_path):
    moe = upcycle.convert(build("vit"), "sparse_upcycling", num_experts=2, top_k=1, progress=False).eval()
    upcycle.save(moe, tmp_path / "out")
    config = tmp_path / "out" / "config.json"
    record = json.loads(config.read_text())
    record["convert"]["backend"] = "eager"
    for spec in record["layers"].values():
        spec["experts"]["backend"] = "eager"
    config.write_text(json.dumps(record))
    assert backends(upcycle.load(tmp_path / "out")) == {DEFAULT}


def test_timm_export_rebuilds_with_the_default(tmp_path):
    import timm

    moe = upcycle.convert(build("vit"), "sparse_upcycling", num_experts=2, top_k=1, progress=False).eval()
    set_backend(moe, OTHERS[0])
    upcycle.export(moe, tmp_path / "timm", format="timm")
    upcycle.register_with_timm()
    rebuilt = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    assert backends(rebuilt) == {DEFAULT}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), moe(x))
