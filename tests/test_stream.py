"""Streaming conversion writes exactly what ``upcycle.save(upcycle.convert(model))`` writes, shard by shard."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import upcycle
from upcycle.export.shards import read_weights
from upcycle.record import record_of
from upcycle.stream import convert_streaming

TINY = dict(
    vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2,
)  # fmt: skip
RECIPES = {
    "all": dict(num_experts=4, top_k=2),
    "every_other_noisy": dict(num_experts=4, top_k=2, layers="every_other", noise_std=0.01, router_noise_std=0.1),
    "granular": dict(num_experts=2, top_k=4, granularity=2, seed=7),
}


def _save_tiny(directory: Path, tied: bool = False, family: str = "llama") -> Path:
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),  # q/k/v biases: copied through
    }[family]
    torch.manual_seed(0)
    model = model_class(config_class(**TINY, tie_word_embeddings=tied))
    model.save_pretrained(directory, max_shard_size="20KB")  # ~30 KB of weights per layer: several shards
    return directory


@pytest.fixture(scope="module", params=["llama", "llama_tied", "qwen2"])
def source(request, tmp_path_factory) -> Path:
    family, _, tied = request.param.partition("_")
    directory = _save_tiny(tmp_path_factory.mktemp("dense") / request.param, tied=bool(tied), family=family)
    assert len(list(directory.glob("model-*.safetensors"))) >= 3
    return directory


@pytest.fixture(scope="module")
def plain_source(tmp_path_factory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("plain") / "llama")


@pytest.fixture(scope="module")
def dense(source):
    from upcycle.sources import load_source

    return load_source(str(source))  # as upcycle convert SOURCE reads it: the record names the folder


def _leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_streaming_equals_in_memory_convert(source, dense, recipe, tmp_path):
    overrides = RECIPES[recipe]
    check = "noisy" not in recipe  # noisy copies do not claim equivalence
    streamed_dir = convert_streaming(source, tmp_path / "streamed", progress=False, max_shard_bytes=64_000,
                                     check=check, **overrides)  # fmt: skip
    assert (streamed_dir / "model.safetensors.index.json").is_file()  # small shards: several output files
    reference = upcycle.convert(dense, progress=False, **overrides)
    saved_dir = upcycle.save(reference, tmp_path / "saved")

    # the files: same tensors bitwise (router weights and noise included), same record, same recipe
    streamed, saved = read_weights(streamed_dir), read_weights(saved_dir)
    assert streamed.keys() == saved.keys()
    assert all(torch.equal(streamed[name], saved[name]) for name in saved)
    assert json.loads((streamed_dir / "config.json").read_text()) == json.loads((saved_dir / "config.json").read_text())
    assert (streamed_dir / "recipe.yaml").read_text() == (saved_dir / "recipe.yaml").read_text()

    # the model: loads, same state dict and logits as the in-memory conversion
    model = upcycle.load(streamed_dir)
    expected = reference.state_dict()
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items())
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference.eval()(input_ids=ids).logits)
    assert record_of(model).layers.keys() == record_of(reference).layers.keys()


def test_tied_embeddings_stay_stored_once(tmp_path):  # the source has no lm_head tensor; neither has the output
    source = _save_tiny(tmp_path / "tied", tied=True)
    out = convert_streaming(source, tmp_path / "out", progress=False, num_experts=2, top_k=1)
    names = set(read_weights(out))
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    model = upcycle.load(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_existing_output_is_refused_and_kept(plain_source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        convert_streaming(plain_source, out, progress=False)
    assert sorted(os.listdir(out)) == ["keep.txt"] and not _leftovers(out)
    convert_streaming(plain_source, out, progress=False, overwrite=True, num_experts=2, top_k=1)
    assert not (out / "keep.txt").exists() and upcycle.load(out) is not None


@pytest.fixture
def broken(plain_source, tmp_path) -> Path:
    """A private copy of the source checkpoint that a test may damage."""
    return Path(shutil.copytree(plain_source, tmp_path / "broken"))


def _shard(directory: Path) -> Path:
    return sorted(directory.glob("model-*.safetensors"))[1]


def test_missing_shard_is_named(broken, tmp_path):
    shard = _shard(broken)
    shard.unlink()
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=shard.name):
        convert_streaming(broken, out, progress=False)
    assert not out.exists() and not _leftovers(out)


def test_truncated_shard_is_named(broken, tmp_path):
    shard = _shard(broken)
    shard.write_bytes(shard.read_bytes()[:-100])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"{shard.name}.*truncated"):
        convert_streaming(broken, out, progress=False)
    assert not out.exists() and not _leftovers(out)


def test_unsupported_model_type(broken, tmp_path):
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="llama, mistral, qwen2"):
        convert_streaming(broken, out, progress=False)
    assert not out.exists() and not _leftovers(out)


def test_nan_in_a_late_ffn_leaves_nothing(broken, tmp_path):
    """The error surfaces mid-stream, after shards were written: the partial output must disappear."""
    name = "model.layers.2.mlp.up_proj.weight"
    index = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]
    path = broken / index[name]
    tensors = load_file(path)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp.*NaN"):
        convert_streaming(broken, out, progress=False, max_shard_bytes=10_000)
    assert not out.exists() and not _leftovers(out)


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [
        (lambda d: shutil.rmtree(d), FileNotFoundError, "does not exist"),
        (lambda d: (d / "config.json").unlink(), FileNotFoundError, "config.json is missing"),
        (lambda d: [p.unlink() for p in d.glob("model*")], FileNotFoundError, "holds no model.safetensors"),
    ],
    ids=["no_directory", "no_config", "no_weights"],
)
def test_source_validation(broken, tmp_path, damage, error, message):
    damage(broken)
    with pytest.raises(error, match=message):
        convert_streaming(broken, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_source_that_is_a_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="not a directory"):
        convert_streaming(path, tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [({"num_hidden_layers": 4}, "config.json has 4 layers"), ({"intermediate_size": 48}, r"expected \(48, 32\)")],
    ids=["layers", "ffn_width"],
)
def test_config_that_disagrees_with_the_weights(broken, tmp_path, change, message):
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message):
        convert_streaming(broken, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_tokenizer_files_travel_as_upcycle_save_carries_them(broken, tmp_path):
    from upcycle.sources import load_source

    (broken / "tokenizer.json").write_text('{"version": "1.0"}')
    (broken / "tokenizer_config.json").write_text("{}")
    streamed = convert_streaming(broken, tmp_path / "streamed", progress=False, num_experts=2, top_k=1)
    saved = upcycle.save(upcycle.convert(load_source(str(broken)), num_experts=2, top_k=1, progress=False),
                         tmp_path / "saved")  # fmt: skip
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (streamed / name).read_text() == (saved / name).read_text()


def test_streaming_runs_on_one_thread_and_restores_the_setting(plain_source, tmp_path, monkeypatch):
    import upcycle.stream.native

    seen = []
    original = upcycle.stream.native.write_record

    def recording(*args):
        seen.append(torch.get_num_threads())
        original(*args)

    monkeypatch.setattr(upcycle.stream.native, "write_record", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        convert_streaming(plain_source, tmp_path / "out", progress=False, num_experts=2, top_k=1)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
