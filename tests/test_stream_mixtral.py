"""Streaming into a Mixtral checkpoint writes what converting in memory and then ``upcycle export --format mixtral``
writes, and checks every written layer against the dense FFN."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import upcycle
import upcycle.stream.mixtral
from upcycle.export.shards import read_weights
from upcycle.stream import convert_streaming, stream

TINY = dict(
    vocab_size=130, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2,
)  # fmt: skip
RECIPE = dict(num_experts=4, top_k=2, layers="all")
WEIGHTS = (".safetensors", ".safetensors.index.json")


def _tokenizer(folder: Path) -> None:
    """A character-level tokenizer of 130 tokens saved as the checkpoint's tokenizer files."""
    import transformers
    from tokenizers import Tokenizer, models

    vocab = {"<unk>": 0, "<eos>": 1, **{chr(i): i + 2 for i in range(128)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    tokenizer.save_pretrained(folder)


def _save_tiny(directory: Path, tied: bool) -> Path:
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=tied))
    model.save_pretrained(directory, max_shard_size="20KB")  # several shards
    _tokenizer(directory)
    return directory


@pytest.fixture(scope="module", params=["untied", "tied"])
def source(request, tmp_path_factory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("dense") / request.param, tied=request.param == "tied")


@pytest.fixture(scope="module")
def untied(tmp_path_factory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("dense") / "untied", tied=False)


def _reference(source: Path, out: Path, layout: str | None, **recipe) -> Path:
    """``upcycle convert SOURCE --out A`` then ``upcycle export A --format mixtral --out B``."""
    from upcycle.convert import convert_source

    convert_source(str(source), out / "converted", **recipe)
    options = {} if layout is None else {"layout": layout}
    return upcycle.export(upcycle.load(out / "converted"), out / "exported", format="mixtral", **options)


def _files(directory: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in directory.iterdir() if p.is_file() and not p.name.endswith(WEIGHTS)}


def _leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("layout", [None, "legacy", "fused"])
def test_streamed_mixtral_equals_the_in_memory_export(source, layout, tmp_path):
    streamed = convert_streaming(source, tmp_path / "streamed", format="mixtral", layout=layout, progress=False,
                                 max_shard_bytes=40_000, **RECIPE)  # fmt: skip
    assert (streamed / "model.safetensors.index.json").is_file()  # small shards: several output files
    reference = _reference(source, tmp_path, layout, **RECIPE)

    got, expected = read_weights(streamed), read_weights(reference)
    assert got.keys() == expected.keys()
    assert all(got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name]) for name in expected)
    # config.json, generation_config.json, the export note and the tokenizer files, byte for byte
    assert _files(streamed) == _files(reference)
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(_files(streamed))


def test_streamed_mixtral_loads_with_the_dense_logits_and_tokenizer(untied, tmp_path):
    import transformers

    out = convert_streaming(untied, tmp_path / "out", format="mixtral", progress=False, **RECIPE)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    dense = transformers.AutoModelForCausalLM.from_pretrained(untied).eval()
    assert type(model).__name__ == "MixtralForCausalLM"
    ids = transformers.AutoTokenizer.from_pretrained(out)("hello", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, atol=1e-5, rtol=0)


def _corrupt_expert(monkeypatch, layer: int, expert: int) -> None:
    """The exporter's tensors for ``layer`` with ``expert``'s down projection scaled: a wrong mapping in the file."""
    original = upcycle.stream.mixtral.moe_tensors

    def corrupted(index, moe, layout):
        for name, tensor in original(index, moe, layout):
            if index == layer and name.endswith((f"experts.{expert}.w2.weight", "experts.down_proj")):
                tensor = tensor.clone()
                (tensor[expert] if tensor.ndim == 3 else tensor).mul_(1.5)
            yield name, tensor

    monkeypatch.setattr(upcycle.stream.mixtral, "moe_tensors", corrupted)


@pytest.mark.parametrize("layout", ["legacy", "fused"])
def test_a_corrupted_expert_fails_the_check_and_leaves_nothing(untied, layout, monkeypatch, tmp_path):
    """Expert 3 is never chosen by the uniform starting router: only the per-expert check can see it."""
    _corrupt_expert(monkeypatch, layer=1, expert=3)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp: expert 3 does not reproduce the dense FFN"):
        convert_streaming(untied, out, format="mixtral", layout=layout, progress=False, **RECIPE)
    assert not out.exists() and not _leftovers(out)
    # without the check the same corruption is written: the check is what stops it
    convert_streaming(untied, out, format="mixtral", layout=layout, progress=False, check=False, **RECIPE)
    assert out.is_dir()


def test_the_check_reports_every_layer(untied, tmp_path):
    result = stream(untied, tmp_path / "out", format="mixtral", progress=False, **RECIPE)
    assert result.worst_layer.startswith("model.layers.") and 0 <= result.worst_relative < 1e-5
    assert stream(untied, tmp_path / "unchecked", format="mixtral", progress=False, check=False,
                  **RECIPE).worst_relative is None  # fmt: skip


def test_a_corrupted_method_output_fails_the_upcycle_format_check(untied, monkeypatch, tmp_path):
    import upcycle.stream.producer

    original = upcycle.stream.producer.convert_ffn

    def corrupted(dense, site, cfg, generator):
        moe = original(dense, site, cfg, generator)
        if site.index == 2:
            moe.experts.w_up.data[2].mul_(0.5)
        return moe

    monkeypatch.setattr(upcycle.stream.producer, "convert_ffn", corrupted)
    with pytest.raises(ValueError, match=r"layers\.2\.mlp: expert 2 does not reproduce"):
        convert_streaming(untied, tmp_path / "out", progress=False, **RECIPE)
    assert not (tmp_path / "out").exists()


def test_noisy_copies_need_the_check_off(untied, tmp_path):
    noisy = {**RECIPE, "noise_std": 0.01}
    with pytest.raises(ValueError, match="--no-check"):
        convert_streaming(untied, tmp_path / "out", format="mixtral", progress=False, **noisy)
    out = convert_streaming(untied, tmp_path / "out", format="mixtral", progress=False, check=False, **noisy)
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"layers": "every_other"}, "still dense FFNs"),
        ({"router_renormalize": False}, "renormalize=False"),
        ({"format": "qwen2_moe"}, "streaming writes format upcycle or mixtral"),
        ({"format": "upcycle", "layout": "fused"}, "drop it for format 'upcycle'"),
    ],
    ids=["dense_layers", "not_renormalised", "other_format", "layout_without_mixtral"],
)
def test_what_mixtral_cannot_hold_is_refused_before_writing(untied, tmp_path, options, message):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        convert_streaming(untied, out, progress=False, **{"format": "mixtral", **RECIPE, **options})
    assert not out.exists() and not _leftovers(out)


def test_a_source_tensor_mixtral_has_no_place_for_is_refused(untied, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in untied.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    shard = broken / index["weight_map"]["model.norm.weight"]
    tensors = load_file(shard)
    from safetensors.torch import save_file

    save_file({**tensors, "model.extra.weight": torch.ones(3)}, shard, metadata={"format": "pt"})
    index["weight_map"]["model.extra.weight"] = shard.name
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"no place for: \['model\.extra\.weight'\]"):
        convert_streaming(broken, tmp_path / "out", format="mixtral", progress=False, **RECIPE)
    assert not (tmp_path / "out").exists()


def test_cli_streams_into_mixtral_and_prints_the_check(untied, tmp_path, capsys):
    from upcycle.cli import main

    out = tmp_path / "out"
    argv = ["convert", str(untied), "--stream", "--export", "mixtral", "--layout", "fused", "--experts", "4", "--out"]
    assert main([*argv, str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (mixtral)" in printed and "checked against its dense FFN: worst model.layers." in printed
    assert "model.layers.0.mlp.experts.gate_up_proj" in read_weights(out)
    assert main(["convert", str(untied), "--stream", "--layout", "fused", "--out", str(tmp_path / "x")]) == 2
    assert "--layout chooses the mixtral tensor layout" in capsys.readouterr().err


def test_a_non_finite_source_tensor_is_never_written(untied, tmp_path):
    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for path in untied.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    weight_map = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]
    shard = broken / weight_map["model.norm.weight"]
    tensors = load_file(shard)
    tensors["model.norm.weight"][3] = float("inf")
    save_file(tensors, shard, metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"NaN or Inf in model\.norm\.weight"):
        convert_streaming(broken, out, format="mixtral", progress=False, check=False, **RECIPE)
    assert not out.exists() and not _leftovers(out)
