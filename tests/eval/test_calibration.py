"""Calibration inputs and the FFN inputs recorded on them: images at the model's size or token blocks from its own
tokenizer, from the train split; each site's rows are exactly what its module receives (channels-first conv MLPs
included), subsampled on request, with the model's training flag restored and unknown sites refused."""

import pytest
import torch

from tests.conversion.tiny_models import build
from upcycle.adapters import find_adapter
from upcycle.eval.calibration import calibration_inputs, collect_ffn_inputs
from upcycle.pretrain import build_dense


def sites_of(model):
    return [site.name for site in find_adapter(model).ffn_sites(model)]


def test_images_come_at_the_model_input_size_and_text_as_token_blocks():
    vit = build("vit")
    images = calibration_inputs(vit, find_adapter(vit), "mnist5k", 6)
    assert images.shape == (6, 3, 32, 32)  # grey digits read as the RGB the model takes
    lm = build_dense("lm_tiny")
    ids = calibration_inputs(lm, find_adapter(lm), "shakespeare", 3, seq_len=16)
    assert ids.shape == (3, 16) and ids.dtype == torch.long
    with pytest.raises(ValueError, match="at least one example"):
        calibration_inputs(lm, find_adapter(lm), "shakespeare", 0)


@pytest.mark.parametrize("family", ["vit", "convnext_conv"])
def test_each_site_records_exactly_what_its_module_receives(family):
    model = build(family).train()
    adapter = find_adapter(model)
    site = sites_of(model)[0]  # the first stage: many positions per image
    seen = []
    hook = model.get_submodule(site).register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    inputs = torch.randn(3, 3, 32, 32)
    rows = collect_ffn_inputs(model, adapter, [site], inputs, batch_size=2)[site]
    hook.remove()
    assert model.training  # the flag comes back
    expected = torch.cat([x.movedim(1, -1) if family == "convnext_conv" else x for x in seen])
    torch.testing.assert_close(rows, expected.reshape(-1, rows.shape[1]), rtol=0, atol=0)
    subset = collect_ffn_inputs(model, adapter, [site], inputs, max_tokens=5)[site]
    assert subset.shape == (5, rows.shape[1])
    assert torch.equal(subset[0], rows[0]) and torch.equal(subset[-1], rows[-1])
    with pytest.raises(ValueError, match="unknown FFN sites"):
        collect_ffn_inputs(model, adapter, ["nowhere"], inputs)
