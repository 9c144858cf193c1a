"""Routers initialised from data: spherical k-means finds direction clusters; a conversion with ``router init: data``
stays dense-equivalent, keeps tied rows tied and routes each calibration token to the expert of its nearest centroid
with logits of the asked spread; a merge's rows point at each expert's domain mean (pooled for the seed); bad
requests are refused before anything changes; the CLI reaches it and streaming refuses it."""

import pytest
import torch
import transformers

import upcycle
from upcycle.adapters import get_adapter
from upcycle.cli import main
from upcycle.data.tokenizers import ByteTokenizer
from upcycle.errors import UserError
from upcycle.eval.calibration import calibration_inputs, record_inputs
from upcycle.layers import moe_layers
from upcycle.record import record_of
from upcycle.routers_from_data import init_routers_from_data, spherical_kmeans, tied_group_size

BYTE_LLAMA = dict(vocab_size=ByteTokenizer().vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
EXAMPLES = 6


def byte_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**BYTE_LLAMA)).eval()


def layer_inputs(model, data: str) -> dict[str, torch.Tensor]:
    adapter = get_adapter(record_of(model).adapter)
    inputs = calibration_inputs(model, adapter, data, EXAMPLES, 128)
    return record_inputs(model, dict(moe_layers(model)), inputs)


def test_spherical_kmeans_finds_direction_clusters():
    g = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=1)
    # three tight bundles of directions, at very different lengths (only the angle may count)
    points = torch.cat([(d + 0.05 * torch.randn(40, 16, generator=g)) * scale
                        for d, scale in zip(directions, (0.1, 1.0, 50.0), strict=True)])  # fmt: skip
    centroids = spherical_kmeans(points, 3, torch.Generator().manual_seed(1))
    similarity = centroids @ directions.T  # [3, 3]: each true direction matched by one centroid
    assert similarity.amax(dim=0).min() > 0.99
    with pytest.raises(ValueError, match="cannot seed 5 clusters"):
        spherical_kmeans(points[:4], 5, g)


def test_a_data_initialised_conversion_is_exact_and_routes_tokens_to_their_nearest_centroid():
    dense = byte_llama()
    moe = upcycle.convert(dense, "sparse_upcycling", num_experts=4, top_k=2, router_init="data",
                          router_init_data="shakespeare", router_init_examples=EXAMPLES, progress=False)  # fmt: skip
    assert upcycle.verify(moe, dense).passed()  # copies: whatever the router says, the layer is the dense FFN
    inputs = layer_inputs(moe, "shakespeare")
    for name, layer in moe_layers(moe):
        gate = layer.router.gate.weight.detach()  # [e, d]
        norms = gate.norm(dim=1)
        torch.testing.assert_close(norms, norms[:1].expand_as(norms))  # unit directions, one scale
        x = inputs[name]
        logits = x @ gate.T
        assert abs(logits.std(dim=1).mean().item() - 1.0) < 0.05  # the asked spread (logit_std 1)
        # each row is the mean direction of the tokens it wins: a k-means fixed point
        winners = logits.argmax(dim=1)
        for j in winners.unique():
            mean = torch.nn.functional.normalize(torch.nn.functional.normalize(x[winners == j], dim=1).sum(0), dim=0)
            assert torch.dot(mean, gate[j] / norms[j]) > 0.999
        assert winners.unique().numel() > 1  # the router does not start by sending everything to one expert


@pytest.mark.parametrize("method, options", [("sparse_upcycling", {"granularity": 2}),
                                             ("shared_finegrained", {"segments": 2})])  # fmt: skip
def test_tied_rows_stay_tied_and_the_conversion_exact(method, options):
    dense = byte_llama()
    moe = upcycle.convert(dense, method, num_experts=4, top_k=2, router_init="data", router_init_data="shakespeare",
                          router_init_examples=EXAMPLES, progress=False, **options)  # fmt: skip
    assert upcycle.verify(moe, dense).passed()
    for _, layer in moe_layers(moe):
        gate = layer.router.gate.weight
        assert tied_group_size(gate) == 2 and not torch.equal(gate[0], gate[2])


def test_a_merge_points_each_row_at_its_domain_mean_and_the_seed_at_all_of_them():
    models = [byte_llama(seed) for seed in range(3)]
    domains = [["shakespeare", "python_code"], "shakespeare", "python_code"]
    merged = upcycle.merge(models, "btx", top_k=1, router_init_domains=domains, router_init_examples=EXAMPLES)
    per_set = {data: layer_inputs(merged, data) for data in ("shakespeare", "python_code")}
    # one calibration pass: the first layer's inputs are what they were; later layers' inputs were routed by the
    # random routers then, by the data routers now, which moves their means a little
    for (name, layer), tolerance in zip(moe_layers(merged), (1e-6, 1e-2), strict=True):
        gate = torch.nn.functional.normalize(layer.router.gate.weight.detach(), dim=1)
        code, text = per_set["python_code"][name], per_set["shakespeare"][name]
        expected = [torch.cat([text, code]).mean(0), text.mean(0), code.mean(0)]
        for row, mean in zip(gate, expected, strict=True):
            assert torch.dot(row, torch.nn.functional.normalize(mean, dim=0)) > 1 - tolerance
    with pytest.raises(UserError, match="one per input"):
        upcycle.merge(models, "btx", router_init_domains=["shakespeare"])


def test_bad_requests_are_refused():
    dense = byte_llama()
    with pytest.raises(ValueError, match="init_data"):
        upcycle.load_convert_config(router_init="data")
    soft = upcycle.convert(dense, "sparse_upcycling", num_experts=2, router_type="soft", progress=False)
    with pytest.raises(ValueError, match="no linear gate"):
        init_routers_from_data(soft, "shakespeare")
    moe = upcycle.convert(dense, "sparse_upcycling", num_experts=2, progress=False)
    with pytest.raises(ValueError, match="either data"):
        init_routers_from_data(moe)
    with pytest.raises(ValueError, match="2 experts"):
        init_routers_from_data(moe, domains=["shakespeare"], examples=2)


def test_the_cli_reaches_it_and_streaming_refuses_it(tmp_path):
    byte_llama().save_pretrained(tmp_path / "dense")
    common = ["convert", str(tmp_path / "dense"), "--experts", "4", "--router-init", "data",
              "--router-init-data", "shakespeare"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "moe")]) == 0
    gate = moe_layers(upcycle.load(tmp_path / "moe"))[0][1].router.gate.weight
    assert gate.norm(dim=1).std() < 1e-4 * gate.norm(dim=1).mean()  # data rows: equal norms, not a normal draw
    assert main([*common, "--stream", "--out", str(tmp_path / "streamed")]) != 0
    assert not (tmp_path / "streamed").exists()


def test_the_bam_recipe_hands_the_seed_all_domains_and_each_branch_its_own():
    from upcycle.methods.bam.recipe import BAMRecipe

    assert BAMRecipe().router_init_domains() is None  # random routers, as the papers
    recipe = BAMRecipe(router_init="data", domains=["shakespeare", "python_code"])
    assert recipe.router_init_domains() == [["shakespeare", "python_code"], "shakespeare", "python_code"]


@pytest.mark.parametrize(
    "arguments",
    [{"method": "sparse_upcycling", "router": {"init": "data", "init_data": "shakespeare", "init_examples": 2}},
     {"method": "cmoe", "num_experts": 6, "options": {"calibration_examples": 2, "calibration_seq_len": 16}}],
    ids=["router_from_data", "cmoe"],
)  # fmt: skip
def test_calibration_reads_text_with_the_checkpoints_own_tokenizer(tmp_path, arguments):
    """A checkpoint with its own vocabulary (not bytes): the calibration inside convert tokenises with the tokenizer
    found through the dense model's record, and the converted model still knows where that tokenizer is."""
    from upcycle.record import ConversionRecord, attach_record

    from .export.helpers import save_tiny_tokenizer, tiny_llama

    save_tiny_tokenizer(tmp_path)
    dense = tiny_llama()
    attach_record(dense, ConversionRecord(origin="a-checkpoint", files=str(tmp_path)))  # as load_source attaches it
    moe = upcycle.convert(dense, **{"num_experts": 4, "top_k": 2, "layers": "all", "progress": False, **arguments})
    assert moe_layers(moe) and record_of(moe).files == str(tmp_path)
