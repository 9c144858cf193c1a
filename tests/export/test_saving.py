"""``upcycle.save`` / ``upcycle.load`` on tiny models: shards past ``max_shard_bytes``, tied tensors stored once and
restored under either name, the record and recipe files, tokenizer files carried along, damaged directories refused
with the reason."""

import json
import re

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import upcycle
from upcycle.errors import UserError
from upcycle.export.saving import load_weights, read_record, unique_state
from upcycle.export.shards import INDEX, SINGLE, ShardWriter, read_weights, shard_files
from upcycle.export.tokenizer_files import copy_tokenizer_files
from upcycle.record import record_of

SIZES = {"vocab_size": 50, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip


def tiny_moe(tied=False):
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**SIZES, tie_word_embeddings=tied)).eval()
    return upcycle.convert(dense, "sparse_upcycling", num_experts=2, top_k=1, noise_std=0.01, progress=False).eval()


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_large_model_is_written_in_indexed_shards_that_load_back(tmp_path):
    moe = tiny_moe()
    state = unique_state(moe)
    biggest = max(t.numel() * t.element_size() for t in state.values())
    out = upcycle.save(moe, tmp_path / "m", max_shard_bytes=biggest)
    index = json.loads((out / INDEX).read_text())
    assert (out / INDEX).read_text() == json.dumps(index, indent=2) + "\n"  # indented, as Hugging Face writes it
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (out / SINGLE).exists()
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert set(index["weight_map"]) == set(state)  # every tensor, in exactly one shard
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert [p.name for p in shard_files(out)] == files
    assert same_weights(upcycle.load(out), moe)
    assert not list(out.glob("shard-*"))  # no temporary shard names left


@pytest.mark.parametrize(
    ("sizes", "shards"),
    [
        ([10, 10, 5, 30, 1], [["t0", "t1", "t2"], ["t3"], ["t4"]]),  # float32: 100 bytes fit; 120 alone; then 4
        ([10, 10, 10], [["t0", "t1"], ["t2"]]),  # 40 + 40 + 40: the shard's bytes add up, the third would pass 100
        ([15, 15, 10], [["t0"], ["t1", "t2"]]),  # 60 | 60 + 40: a new shard counts from zero, so 100 fit again
    ],
)
def test_shards_never_exceed_the_limit_unless_one_tensor_does(sizes, shards, tmp_path):
    with ShardWriter(tmp_path, max_shard_bytes=100) as writer:
        for i, size in enumerate(sizes):
            writer.add(f"t{i}", torch.full((size,), float(i)))
    index = json.loads((tmp_path / INDEX).read_text())
    written = {}
    for name, file in index["weight_map"].items():
        written.setdefault(file, []).append(name)
    assert sorted(written.values()) == shards
    state = read_weights(tmp_path)
    assert all(torch.equal(state[f"t{i}"], torch.full((n,), float(i))) for i, n in enumerate(sizes))


@pytest.mark.parametrize("max_shard_bytes", [100, 40])
def test_every_file_says_its_format_and_keeps_the_callers_metadata(max_shard_bytes, tmp_path):
    """Each safetensors file, single or one of the shards, has metadata format "pt" (transformers refuses a file
    whose metadata names another framework) next to what the caller asked for."""
    with ShardWriter(tmp_path, max_shard_bytes, metadata={"origin": "test"}) as writer:
        writer.add("a", torch.zeros(10))
        writer.add("b", torch.ones(10))
    files = shard_files(tmp_path)
    assert len(files) == (1 if max_shard_bytes == 100 else 2)
    for path in files:
        with safe_open(str(path), "pt") as handle:
            assert handle.metadata() == {"format": "pt", "origin": "test"}


def test_an_empty_writer_still_writes_one_file(tmp_path):
    with ShardWriter(tmp_path, max_shard_bytes=100):
        pass
    assert [p.name for p in tmp_path.iterdir()] == [SINGLE]


def test_every_tensor_after_a_repeated_one_is_kept():
    """unique_state skips a tensor that shares storage with an earlier one, and goes on with the rest."""
    shared = torch.nn.Linear(2, 2)
    model = torch.nn.Sequential(shared, shared, torch.nn.Linear(2, 3))
    assert list(model.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]
    assert list(unique_state(model)) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_tied_tensors_are_stored_once_and_restored_under_either_name(tmp_path):
    moe = tiny_moe(tied=True)
    out = upcycle.save(moe, tmp_path / "m")
    stored = read_weights(out)
    assert "model.embed_tokens.weight" in stored and "lm_head.weight" not in stored
    loaded = upcycle.load(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert same_weights(loaded, moe)
    # a file that kept the tie under its other name (the head) loads as well
    renamed = {("lm_head.weight" if k == "model.embed_tokens.weight" else k): v for k, v in stored.items()}
    fresh = upcycle.load(out)
    with torch.no_grad():
        fresh.model.embed_tokens.weight.zero_()
    load_weights(fresh, renamed, "renamed")
    assert torch.equal(fresh.model.embed_tokens.weight, moe.model.embed_tokens.weight)


def test_untied_tensors_missing_from_the_file_are_refused(tmp_path):
    moe = tiny_moe()
    state = dict(unique_state(moe))
    del state["lm_head.weight"]  # not tied here: really missing
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\]"):
        load_weights(tiny_moe(), state, "partial")
    state = dict(unique_state(moe), extra=torch.zeros(1))
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        load_weights(tiny_moe(), state, "extra")
    state = dict(unique_state(moe), **{"lm_head.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"lm_head.weight: file \(3, 3\) vs model \(50, 16\)"):
        load_weights(tiny_moe(), state, "reshaped")


def test_a_buffer_missing_from_the_file_is_refused_not_taken_for_a_tie():
    """Only parameters can be tied: a missing buffer (here BatchNorm statistics) is named, whatever else is there."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    state = {name: tensor for name, tensor in model.state_dict().items() if name != "1.running_mean"}
    with pytest.raises(ValueError, match=r"missing \['1.running_mean'\]"):
        load_weights(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)), state, "partial")


def test_save_refuses_an_existing_directory_unless_told_to_overwrite(tmp_path):
    first, second = tiny_moe(), tiny_moe(tied=True)
    out = upcycle.save(first, tmp_path / "m")
    with pytest.raises(FileExistsError, match="overwrite"):
        upcycle.save(second, out)
    assert same_weights(upcycle.load(out), first)
    upcycle.save(second, out, overwrite=True)
    assert same_weights(upcycle.load(out), second)


def test_a_model_with_nan_weights_is_not_saved(tmp_path):
    moe = tiny_moe()
    with torch.no_grad():
        moe.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(
        UserError, match=r"^the model to save contains NaN or Inf in lm_head\.weight; nothing was written"
    ):
        upcycle.save(moe, tmp_path / "m")
    assert not any(tmp_path.iterdir())


def test_a_directory_with_nan_weights_is_not_loaded(tmp_path):
    """The refusal names the directory and the tensor, and says what to do."""
    out = upcycle.save(tiny_moe(), tmp_path / "m")
    weights = read_weights(out)
    weights["lm_head.weight"][0, 0] = float("inf")
    save_file(weights, out / SINGLE)
    message = (
        f"the model in {out} contains NaN or Inf in lm_head.weight; the directory is damaged; convert or train it again"
    )
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        upcycle.load(out)


@pytest.mark.parametrize(("dtype", "loaded"), [("bfloat16", torch.bfloat16), (None, torch.float32)])
def test_load_rebuilds_the_model_in_its_recorded_dtype(dtype, loaded, tmp_path):
    """The recorded dtype, or float32 for a record that names none."""
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**SIZES)).to(torch.bfloat16).eval()
    moe = upcycle.convert(dense, "sparse_upcycling", num_experts=2, top_k=1, progress=False)
    out = upcycle.save(moe, tmp_path / "m")
    config = out / "config.json"
    assert json.loads(config.read_text())["dtype"] == "bfloat16"
    config.write_text(json.dumps({**json.loads(config.read_text()), "dtype": dtype}))
    assert {tensor.dtype for tensor in upcycle.load(out).state_dict().values()} == {loaded}


def test_a_mismatch_message_names_at_most_ten_tensors_one_a_line():
    moe = tiny_moe()
    state = {name: torch.zeros(1) for name in unique_state(moe)}
    assert len(state) > 10
    with pytest.raises(ValueError, match="do not match") as error:
        load_weights(moe, state, "shrunk")
    head, *lines = str(error.value).split("\n  ")
    assert head == "weights in shrunk do not match the recorded structure:"
    assert lines == [f"{name}: file (1,) vs model {tuple(moe.state_dict()[name].shape)}" for name in list(state)[:10]]


def test_missing_and_unexpected_tensors_are_named_ten_at_most():
    moe = tiny_moe()
    names = list(unique_state(moe))
    assert len(names) > 10
    with pytest.raises(ValueError, match=re.escape(f"missing {names[:10]}, unexpected []") + "$"):
        load_weights(moe, {}, "empty")
    extra = {f"extra{i}": torch.zeros(1) for i in range(11)}
    with pytest.raises(ValueError, match=re.escape(f"missing [], unexpected {list(extra)[:10]}") + "$"):
        load_weights(moe, {**unique_state(moe), **extra}, "extra")


def test_save_refuses_a_model_its_record_cannot_rebuild(tmp_path):
    """Weights that upcycle.load could not put back (an extra tensor, a resized one) are refused before writing."""
    extra = tiny_moe()
    extra.model.norm.register_parameter("scale", torch.nn.Parameter(torch.ones(1)))
    with pytest.raises(ValueError, match=r"cannot be rebuilt from its record: model\.norm\.scale$"):
        upcycle.save(extra, tmp_path / "extra")
    resized = tiny_moe()
    resized.lm_head = torch.nn.Linear(SIZES["hidden_size"], 7, bias=False)
    width = SIZES["hidden_size"]
    with pytest.raises(ValueError, match=rf"rebuilt from its record: lm_head\.weight \(7, {width}\) rebuilt as"):
        upcycle.save(resized, tmp_path / "resized")
    many = tiny_moe()  # the message names five, separated by semicolons
    for i in range(6):
        many.model.norm.register_parameter(f"extra{i}", torch.nn.Parameter(torch.ones(1)))
    names = "; ".join(f"model.norm.extra{i}" for i in range(5))
    with pytest.raises(ValueError, match=re.escape(f"the model cannot be rebuilt from its record: {names}") + "$"):
        upcycle.save(many, tmp_path / "many")
    assert not any(tmp_path.iterdir())


def test_record_and_recipe_are_written_and_checked(tmp_path):
    moe = tiny_moe()
    out = upcycle.save(moe, tmp_path / "m")
    assert read_record(out) == record_of(moe)
    record = json.loads((out / "config.json").read_text())
    assert record == record_of(moe).to_json() and "files" not in record  # where the files are now is not saved
    assert set(record["versions"]) >= {"upcycle", "torch", "transformers"}
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe == {"convert": record["convert"]} and recipe["convert"]["method"] == "sparse_upcycling"
    assert list(recipe["convert"]) == list(record["convert"])  # in the config's own order: the method first
    loaded = upcycle.load(out)
    assert record_of(loaded).files == str(out) and not loaded.training

    config = out / "config.json"
    config.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_record(out)
    config.write_text(json.dumps({**record, "version": -1}))
    with pytest.raises(UserError, match="not an upcycle record of version"):
        read_record(out)
    config.write_text(json.dumps({key: value for key, value in record.items() if key != "layers"}))
    with pytest.raises(UserError, match="lacks layers of an upcycle record"):
        read_record(out)


def test_load_names_the_damaged_file_or_directory(tmp_path):
    out = upcycle.save(tiny_moe(), tmp_path / "m")
    weights = read_weights(out)
    save_file({name: tensor for name, tensor in weights.items() if name != "lm_head.weight"}, out / SINGLE)
    damaged = re.escape(f"weights in {out} do not match") + r".*missing \['lm_head.weight'\]"
    with pytest.raises(ValueError, match=damaged):
        upcycle.load(out)
    config = out / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "version": -1}))
    with pytest.raises(UserError, match=re.escape(f"{config} is not an upcycle record")):
        upcycle.load(out)
    config.unlink()
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"{out} is not an upcycle model directory: config.json is missing")
    ):
        upcycle.load(out)


def test_a_dense_model_has_no_recipe(tmp_path):
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**SIZES)).eval()
    out = upcycle.save(dense, tmp_path / "d")
    assert not (out / "recipe.yaml").exists()
    assert same_weights(upcycle.load(out), dense)


def test_tokenizer_files_travel_with_the_model(tmp_path):
    origin = tmp_path / "origin"
    moe = tiny_moe()
    upcycle.save(moe, origin)
    (origin / "tokenizer.json").write_text("{}")
    (origin / "vocab.txt").write_text("a\nb\n")
    (origin / "notes.txt").write_text("not a tokenizer file")
    again = upcycle.save(upcycle.load(origin), tmp_path / "again")
    assert (again / "tokenizer.json").read_text() == "{}" and (again / "vocab.txt").read_text() == "a\nb\n"
    assert not (again / "notes.txt").exists()
    (tmp_path / "copies").mkdir()
    assert copy_tokenizer_files(upcycle.load(origin), tmp_path / "copies") == ["tokenizer.json", "vocab.txt"]
    assert copy_tokenizer_files(torch.nn.Linear(2, 2), tmp_path / "copies") == []  # no record: nothing to copy


def test_damaged_shards_are_named(tmp_path):
    out = upcycle.save(tiny_moe(), tmp_path / "m", max_shard_bytes=4096)
    (out / INDEX).write_text("{}")
    with pytest.raises(ValueError, match="is damaged"):
        shard_files(out)
    save_file({"x": torch.zeros(2)}, tmp_path / "one.safetensors")
    index = tmp_path / "idx"
    index.mkdir()
    (index / INDEX).write_text(json.dumps({"weight_map": {"x": "lost.safetensors", "y": "gone.safetensors"}}))
    missing = f"weights missing from {index}: {index / 'gone.safetensors'}, {index / 'lost.safetensors'}"
    with pytest.raises(FileNotFoundError, match=re.escape(missing) + "$"):
        read_weights(index)
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / SINGLE).write_bytes((tmp_path / "one.safetensors").read_bytes()[:-4])
    with pytest.raises(
        ValueError, match=re.escape(str(cut / SINGLE)) + r" cannot be read \(.+\); it is truncated or corrupt$"
    ):
        read_weights(cut)
