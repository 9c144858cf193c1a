"""Bring your own data, from the CLI: a JSONL or CSV text-classification set trains a converted encoder with a fresh
head, an RGB image folder a converted timm model, a text file a converted LM; each is evaluated on its test split."""

import json
import random

import pytest
import torch
import transformers
from PIL import Image

from upcycle.cli import main

WORDS = ["the", "movie", "was", "plot", "actor", "film", "scene", "story"]


@pytest.fixture(autouse=True)
def _caches(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("UPCYCLE_DATA", str(tmp_path / "upcycle-data"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


def run(*argv) -> None:
    assert main([str(a) for a in argv]) == 0


def evaluated(tmp_path, model, data, *extra) -> dict:
    run("eval", model, "--data", data, "--out", tmp_path / "eval", *extra)
    return json.loads((tmp_path / "eval" / "eval.json").read_text())


def reviews(count: int) -> list[dict]:
    """Whether a review is positive is the word good or bad somewhere in it."""
    rng = random.Random(0)
    rows = []
    for i in range(count):
        words = [*rng.sample(WORDS, 4), "good" if i % 2 else "bad"]
        rng.shuffle(words)
        rows.append({"review": " ".join(words), "sentiment": "positive" if i % 2 else "negative"})
    return rows


def tiny_bert(folder) -> None:
    """A dense BERT encoder (no head) with its WordPiece tokenizer, as a Hugging Face folder."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "good", "bad"]
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    transformers.BertModel(config).save_pretrained(folder)
    transformers.BertTokenizer(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(folder)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_text_classification_file_trains_a_converted_encoder_with_a_fresh_head(tmp_path, suffix):
    import pandas as pd

    data = tmp_path / f"reviews{suffix}"
    frame = pd.DataFrame(reviews(200))
    frame.to_json(data, orient="records", lines=True) if suffix == ".jsonl" else frame.to_csv(data, index=False)
    tiny_bert(tmp_path / "bert")
    run("convert", tmp_path / "bert", "--experts", "4", "--top-k", "2", "--out", tmp_path / "moe")
    columns = ["--text-column", "review", "--label-column", "sentiment"]
    run("train", tmp_path / "moe", "--data", data, *columns, "--reset-head", "--steps", "40", "--lr", "3e-3",
        "--batch-size", "16", "--out", tmp_path / "run")  # fmt: skip
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["source"]["class"] == "BertForSequenceClassification"
    assert len(config["source"]["config"]["id2label"]) == 2
    assert all(name.startswith("bert.encoder.") for name in config["layers"])  # still the MoE encoder
    result = evaluated(tmp_path, tmp_path / "run" / "model", data, *columns)
    assert result["split"] == "test" and result["examples"] == 20  # the held-out tenth
    assert result["accuracy"] >= 0.9, result


def test_an_rgb_image_folder_trains_a_converted_timm_model(tmp_path):
    rng = random.Random(0)
    for label, channel in (("red", 0), ("blue", 2)):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(30):
            colour = [rng.randrange(60) for _ in range(3)]
            colour[channel] = 160 + rng.randrange(96)
            Image.new("RGB", (rng.randrange(40, 90), rng.randrange(40, 90)), tuple(colour)).save(
                tmp_path / "images" / label / f"{i}.jpg")  # fmt: skip
    run("convert", "timm:test_vit", "--random-init", "--experts", "4", "--layers", "last_half", "--out",
        tmp_path / "moe")  # fmt: skip
    run("train", tmp_path / "moe", "--data", tmp_path / "images", "--reset-head", "--steps", "30", "--lr", "2e-3",
        "--batch-size", "16", "--out", tmp_path / "run")  # fmt: skip
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["source"]["kwargs"]["num_classes"] == 2
    result = evaluated(tmp_path, tmp_path / "run" / "model", tmp_path / "images")
    assert result["split"] == "test" and result["examples"] == 6
    assert result["accuracy"] >= 5 / 6, result


def test_a_text_file_trains_a_converted_lm(tmp_path):
    book = tmp_path / "book.txt"
    rng = random.Random(0)
    book.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(60)))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "lm")  # the byte vocabulary: no tokenizer files
    run("convert", tmp_path / "lm", "--experts", "4", "--out", tmp_path / "moe")
    before = evaluated(tmp_path, tmp_path / "moe", book)["perplexity"]
    run("train", tmp_path / "moe", "--data", book, "--steps", "30", "--lr", "3e-3", "--batch-size", "8",
        "--out", tmp_path / "run")  # fmt: skip
    after = evaluated(tmp_path, tmp_path / "run" / "model", book)["perplexity"]
    assert after < before / 3, (before, after)  # 8 words and spaces: far below the 259-way start


def test_an_image_folder_calibrates_moe_jetpack_at_the_models_input(tmp_path):
    from upcycle.methods.jetpack.recycling import JetpackOptions, calibration_images
    from upcycle.sources import load_timm

    (tmp_path / "images" / "a").mkdir(parents=True)
    (tmp_path / "images" / "b").mkdir(parents=True)
    for i in range(12):
        Image.new("RGB", (30, 20), (i * 20, 0, 0)).save(tmp_path / "images" / "ab"[i % 2] / f"{i}.png")
    vit = load_timm("vit_tiny_patch16_224", kwargs={"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 1,
                                                    "num_heads": 2})  # fmt: skip
    options = JetpackOptions(calibration_data=str(tmp_path / "images"), calibration_images=8)
    images = calibration_images(vit, options)
    assert images.shape == (8, 3, 16, 16) and images.std() > 0


def test_a_converted_lm_becomes_a_text_classifier(tmp_path):
    """--task text-classification with --num-labels: the family's *ForSequenceClassification around the MoE body,
    pooling at the last token that is not the data's padding."""
    import pandas as pd

    data = tmp_path / "reviews.jsonl"
    pd.DataFrame(reviews(160)).to_json(data, orient="records", lines=True)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "lm")
    run("convert", tmp_path / "lm", "--experts", "4", "--out", tmp_path / "moe")
    flags = ["--task", "text-classification", "--text-column", "review", "--label-column", "sentiment"]
    run("train", tmp_path / "moe", "--data", data, *flags, "--num-labels", "2", "--steps", "60", "--lr", "3e-3",
        "--batch-size", "16", "--out", tmp_path / "run")  # fmt: skip
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert saved["source"]["class"] == "LlamaForSequenceClassification" and saved["layers"]
    result = evaluated(tmp_path, tmp_path / "run" / "model", data, *flags)
    assert result["accuracy"] >= 0.9, result
