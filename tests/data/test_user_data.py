"""The user's data (``--data SPEC``): every SPEC form through the ``datasets`` library, splits that never overlap,
columns detected or named, labels mapped the same in every split, tokenized text cached by content."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from upcycle.data import load_dataset
from upcycle.data.registry import UnknownDatasetError
from upcycle.data.user import pick_split, read_splits
from upcycle.errors import UserError

ROWS = [{"text": f"row {i} {'good' if i % 3 else 'bad'}", "label": "pos" if i % 3 else "neg"} for i in range(60)]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Tokenized data and ``datasets``' own cache go to the test's folder."""
    import datasets

    monkeypatch.setenv("UPCYCLE_DATA", str(tmp_path / "upcycle-data"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_file_type_reads_the_same_rows(tmp_path, suffix):
    import pandas as pd

    path = tmp_path / f"data{suffix}"
    frame = pd.DataFrame(ROWS)
    {".jsonl": lambda: write_jsonl(path, ROWS), ".json": lambda: frame.to_json(path, orient="records"),
     ".csv": lambda: frame.to_csv(path, index=False), ".parquet": lambda: frame.to_parquet(path)}[suffix]()  # fmt: skip
    splits = read_splits(str(path))
    assert list(splits) == ["train"] and list(splits["train"]["text"]) == [row["text"] for row in ROWS]


def test_carved_splits_are_disjoint_deterministic_and_cover_every_row(tmp_path):
    splits = read_splits(str(write_jsonl(tmp_path / "d.jsonl", ROWS)))
    parts = {name: list(pick_split(splits, name, 0.1, seed=3)["text"]) for name in ("train", "val", "test")}
    assert (len(parts["val"]), len(parts["test"]), len(parts["train"])) == (6, 6, 48)
    assert sorted(parts["train"] + parts["val"] + parts["test"]) == sorted(row["text"] for row in ROWS)
    assert list(pick_split(splits, "val", 0.1, seed=3)["text"]) == parts["val"]  # the same seed, the same split
    assert list(pick_split(splits, "val", 0.1, seed=4)["text"]) != parts["val"]


def test_the_datasets_own_splits_are_used(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS[:40])
    write_jsonl(folder / "validation.jsonl", ROWS[40:50])
    write_jsonl(folder / "test.jsonl", ROWS[50:])
    splits = read_splits(str(folder))
    assert list(pick_split(splits, "test", 0.1, 0)["text"]) == [row["text"] for row in ROWS[50:]]
    assert list(pick_split(splits, "val", 0.1, 0)["text"]) == [row["text"] for row in ROWS[40:50]]
    assert list(pick_split(splits, "train", 0.1, 0)["text"]) == [row["text"] for row in ROWS[:40]]


def test_a_missing_validation_split_comes_from_train_only(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS[:50])
    write_jsonl(folder / "test.jsonl", ROWS[50:])
    splits = read_splits(str(folder))
    val, train = list(pick_split(splits, "val", 0.2, 0)["text"]), list(pick_split(splits, "train", 0.2, 0)["text"])
    assert len(val) == 10 and len(train) == 40 and not set(val) & set(train)
    assert set(val) <= {row["text"] for row in ROWS[:50]}


def test_save_to_disk_folder(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:50]),
                          "test": datasets.Dataset.from_list(ROWS[50:])}).save_to_disk(tmp_path / "saved")  # fmt: skip
    test = pick_split(read_splits(str(tmp_path / "saved")), "test", 0.1, 0)
    assert list(test["text"]) == [r["text"] for r in ROWS[50:]]


def test_text_classification_items_labels_and_padding(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    train = load_dataset(str(path), "train", task="text-classification", seq_len=12)
    test = load_dataset(str(path), "test", task="text-classification", seq_len=12)
    assert train.info.classes == test.info.classes == ("neg", "pos") and train.info.num_classes == 2
    item = train[0]
    assert set(item) == {"input_ids", "attention_mask", "labels"}
    assert item["input_ids"].shape == item["attention_mask"].shape and train.info.seq_len <= 12
    lengths = train.mask.sum(1)
    assert lengths.max() == train.ids.shape[1]  # padded to the longest, no further
    for row in range(len(train)):  # padding sits after the text and is masked out
        n = int(lengths[row])
        assert (train.mask[row, :n] == 1).all() and (train.mask[row, n:] == 0).all()
        assert (train.ids[row, n:] == 258).all()  # the byte tokenizer's PAD
    by_text = {r["text"]: r["label"] for r in ROWS}
    for i in range(len(test)):
        text = bytes(int(t) for t in test.ids[i, 1 : int(test.mask[i].sum())]).decode()
        assert test.info.classes[int(test[i]["labels"])] == by_text[text]


def test_causal_lm_from_a_text_file_packs_paragraphs(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(f"paragraph {i} " + "words " * 20 for i in range(40)))
    train = load_dataset(str(path), "train", task="causal-lm", seq_len=32)
    val = load_dataset(str(path), "val", task="causal-lm", seq_len=32)
    assert train[0]["input_ids"].shape == (32,) and len(train) > len(val) > 0
    assert train.info.kind == "text" and train.info.num_tokens == len(train) * 32


def test_an_rgb_image_folder_goes_through_the_models_transform(tmp_path):
    for label, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (20 + i, 24), colour).save(tmp_path / "images" / label / f"{i}.png")
    config = {"input_size": (3, 16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
              "crop_pct": 1.0}  # fmt: skip
    data = load_dataset(str(tmp_path / "images"), "test", task="image-classification", data_config=config)
    assert data.info.classes == ("blue", "red") and data.info.image_size == 16 and data.info.channels == 3
    for i in range(len(data)):
        item = data[i]
        assert item["x"].shape == (3, 16, 16)
        red = data.info.classes[int(item["labels"])] == "red"
        assert torch.allclose(item["x"][0 if red else 2], torch.ones(16, 16), atol=1e-5)  # (1 - 0.5) / 0.5
        assert torch.allclose(item["x"][2 if red else 0], -torch.ones(16, 16), atol=1e-5)


def test_hub_dataset_from_the_datasets_cache(tmp_path):
    """As ``datasets`` left it after loading ``org/reviews`` online once: read offline through its own cache."""
    import datasets
    from datasets.packaged_modules.json.json import Json

    write_jsonl(tmp_path / "train.jsonl", ROWS[:50])
    write_jsonl(tmp_path / "test.jsonl", ROWS[50:])
    files = datasets.data_files.DataFilesDict.from_patterns({"train": [str(tmp_path / "train.jsonl")],
                                                             "test": [str(tmp_path / "test.jsonl")]})  # fmt: skip
    cache = datasets.config.HF_DATASETS_CACHE
    builder = Json(cache_dir=str(cache), dataset_name="org___reviews", data_files=files, hash="0" * 16)
    builder.download_and_prepare()
    prepared = cache / "org___reviews"  # the layout datasets writes for a hub dataset: NAME/CONFIG/VERSION/HASH
    next(prepared.iterdir()).rename(prepared / "default")
    for arrow in prepared.rglob("org___reviews-*.arrow"):
        arrow.rename(arrow.with_name(arrow.name.replace("org___reviews-", "reviews-")))
    test = load_dataset("org/reviews", "test", task="text-classification")
    assert len(test) == 10 and test.info.classes == ("neg", "pos")


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: write_jsonl(p / "d.jsonl", [{"body": "x", "label": 1}] * 20), "cannot tell which column of --data .* "
     "holds the text; its columns: body, label; name it with --text-column"),
    (lambda p: write_jsonl(p / "d.jsonl", [{"text": "x", "y": 1}] * 20), "holds the label; its columns: text, y"),
    (lambda p: (p / "d.xml").write_text("<x/>") and p / "d.xml", "unknown file type '.xml'"),
    (lambda p: write_jsonl(p / "d.jsonl", [{"text": "x", "label": 1}] * 2), "2 rows are too few to hold out"),
])  # fmt: skip
def test_bad_data_is_named(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        load_dataset(str(make(tmp_path)), "train", task="text-classification")


def test_a_test_label_the_training_rows_never_had(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", ROWS[:50])
    write_jsonl(folder / "test.jsonl", [{"text": "odd", "label": "neutral"}])
    with pytest.raises(UserError, match=r"labels \['neutral'\] are not in the training split's 2 classes"):
        load_dataset(str(folder), "test", task="text-classification")


def test_not_a_dataset_names_the_builtins():
    with pytest.raises(UnknownDatasetError, match=r"not a built-in dataset .*digits.*a hub id ORG/NAME"):
        load_dataset("no_such_set", "train")


def test_tokenized_text_is_cached_by_content_not_path(tmp_path, monkeypatch):
    import upcycle.data.spec as spec

    builds = []
    original = spec.pack_documents
    monkeypatch.setattr(spec, "pack_documents", lambda *a, **k: builds.append(1) or original(*a, **k))
    first = tmp_path / "a" / "book.txt"
    first.parent.mkdir()
    first.write_text("\n\n".join(f"paragraph {i} " + "words " * 20 for i in range(20)))
    a = load_dataset(str(first), "train", task="causal-lm", seq_len=16)
    moved = tmp_path / "b" / "elsewhere.txt"
    moved.parent.mkdir()
    shutil.move(first, moved)
    b = load_dataset(str(moved), "train", task="causal-lm", seq_len=16)
    assert len(builds) == 1 and torch.equal(a.sequences, b.sequences)  # the moved file: found in the cache
    moved.write_text(moved.read_text().replace("words", "other"))
    load_dataset(str(moved), "train", task="causal-lm", seq_len=16)
    assert len(builds) == 2  # an edited file is tokenized again
    assert np.all([p.suffix == ".safetensors" for p in (tmp_path / "upcycle-data" / "tokenized").iterdir()])


def test_a_mixture_of_the_users_text_per_domain(tmp_path):
    for name, word in (("a", "alpha"), ("b", "beta")):
        (tmp_path / f"{name}.txt").write_text("\n\n".join(f"{word} {i} " * 10 for i in range(30)))
    sources = {"first": str(tmp_path / "a.txt"), "second": str(tmp_path / "b.txt")}
    mixed = load_dataset("text_mixture", "train", sources=sources, weights={"first": 3, "second": 1}, seq_len=16)
    assert mixed.info.domains == ("first", "second")
    counts = torch.bincount(mixed.domain_ids, minlength=2)
    assert abs(int(counts[0]) - 3 * int(counts[1])) <= 3  # 3 : 1, up to rounding
    alone = load_dataset("text_mixture", "val", sources=sources, domain="second", seq_len=16)
    assert set(alone.domain_ids.tolist()) == {1} and b"beta" in bytes(t for t in alone.sequences[0].tolist() if t < 256)
    natural = load_dataset("text_mixture", "train", sources=sources, seq_len=16)  # all of both
    sizes = {d: len(part) for d, part in natural.per_domain().items()}
    assert sizes == {"first": int((natural.domain_ids == 0).sum()), "second": int((natural.domain_ids == 1).sum())}
