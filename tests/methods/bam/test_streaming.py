"""Streaming merges (BTX, BAM) write what ``upcycle.save(upcycle.merge(models))`` writes for the loaded inputs, and
check every FFN expert against the input FFN it copies."""

import json
from pathlib import Path

import pytest
import torch

import upcycle
import upcycle.methods.bam.streaming as streaming
from upcycle.export.shards import read_weights
from upcycle.methods.bam.streaming import merge_streaming
from upcycle.sources import load_source

TINY = dict(
    vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2,
)  # fmt: skip
VARIANTS = {
    "btx": {"method": "btx"},
    "btx_top2": {"method": "btx", "top_k": 2, "renormalize": True, "seed": 3},
    "bam_expert_kv": {"method": "bam"},
    "bam_shared_kv": {"method": "bam", "shared_kv": True, "top_k": 2},
}
WEIGHTS = (".safetensors", ".safetensors.index.json")


def _inputs(root: Path, tied: bool, count: int = 3) -> list[Path]:
    """A seed and its branches: copies of one random Llama, each moved by its own noise, saved in shards."""
    import transformers

    torch.manual_seed(0)
    seed = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=tied))
    folders = []
    for i in range(count):
        model = seed if i == 0 else _perturbed(seed, i)
        folder = root / f"input{i}"
        model.save_pretrained(folder, max_shard_size="20KB")
        (folder / "tokenizer_config.json").write_text('{"seed": "tokenizer"}')
        folders.append(folder)
    return folders


def _perturbed(model, i):
    import copy

    branch = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(i)
    with torch.no_grad():
        for tensor in branch.parameters():
            tensor.add_(0.01 * torch.randn(tensor.shape, generator=generator))
    return branch


@pytest.fixture(scope="module", params=["untied", "tied"])
def inputs(request, tmp_path_factory) -> list[Path]:
    return _inputs(tmp_path_factory.mktemp("inputs"), tied=request.param == "tied")


def _files(directory: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in directory.iterdir() if p.is_file() and not p.name.endswith(WEIGHTS)}


def _assert_same(streamed: Path, reference: Path) -> None:
    got, expected = read_weights(streamed), read_weights(reference)
    assert got.keys() == expected.keys()
    assert all(got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name]) for name in expected)
    assert _files(streamed) == _files(reference)  # config.json (the record), recipe.yaml, the tokenizer files


@pytest.mark.parametrize("variant", VARIANTS)
def test_streamed_merge_equals_the_saved_in_memory_merge(inputs, variant, tmp_path):
    options = VARIANTS[variant]
    done = merge_streaming(inputs, tmp_path / "streamed", progress=False, max_shard_bytes=30_000, **options)
    assert (done.out / "model.safetensors.index.json").is_file()  # several shards
    assert done.worst_relative is not None and done.worst_relative < 1e-5
    merged = upcycle.merge([load_source(str(folder)) for folder in inputs], **options)
    _assert_same(done.out, upcycle.save(merged, tmp_path / "saved"))
    assert (done.out / "tokenizer_config.json").read_text() == '{"seed": "tokenizer"}'


@pytest.mark.parametrize("layout", ["legacy", "fused"])
def test_streamed_btx_into_mixtral_equals_the_exported_merge(inputs, layout, tmp_path):
    options = VARIANTS["btx_top2"]
    streamed = merge_streaming(inputs, tmp_path / "streamed", format="mixtral", layout=layout, progress=False,
                               max_shard_bytes=30_000, **options).out  # fmt: skip
    merged = upcycle.merge([load_source(str(folder)) for folder in inputs], **options)
    _assert_same(streamed, upcycle.export(merged, tmp_path / "exported", format="mixtral", layout=layout))


@pytest.mark.parametrize("method", ["btx", "bam"])
def test_a_corrupted_expert_fails_the_check_and_leaves_nothing(inputs, method, monkeypatch, tmp_path):
    original = streaming.stack_experts if method == "bam" else streaming.btx_layer

    def corrupted(ffns, *args):
        built = original(ffns, *args)
        (built if method == "bam" else built.experts).w_down.data[2].mul_(1.5)  # expert 2 of every layer
        return built

    monkeypatch.setattr(streaming, "stack_experts" if method == "bam" else "btx_layer", corrupted)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp: expert 2 does not reproduce"):
        merge_streaming(inputs, out, method=method, progress=False)
    assert not out.exists()


def test_branches_that_are_not_the_seeds_architecture_are_refused(inputs, tmp_path):
    import transformers

    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, "intermediate_size": 48}))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"model 1 \(.*other\) is not the seed's architecture"):
        merge_streaming([inputs[0], tmp_path / "other"], tmp_path / "out", method="btx", progress=False)
    config = json.loads((inputs[1] / "config.json").read_text())
    changed = tmp_path / "eps"
    changed.mkdir()
    for path in inputs[1].iterdir():
        (changed / path.name).write_bytes(path.read_bytes())
    (changed / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    with pytest.raises(ValueError, match=r"model 1 has rms_norm_eps=0\.001"):
        merge_streaming([inputs[0], changed], tmp_path / "out", method="btx", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "bam", "format": "mixtral"}, "stream it in format 'upcycle'"),
        ({"method": "btx", "format": "mixtral"}, "renormalize=False"),
        ({"method": "btx", "top_k": 4}, "top_k=4 is larger than the 3 experts"),
    ],
    ids=["bam_as_mixtral", "btx_raw_top1_as_mixtral", "top_k"],
)
def test_refusals_before_writing(inputs, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        merge_streaming(inputs, tmp_path / "out", progress=False, **options)
    assert not (tmp_path / "out").exists()
