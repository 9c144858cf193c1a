"""Sequence classification (an encoder with a head, on the domains of ``text_mixture``): labels, loss, metric and
refusals, on a tiny byte-vocabulary BERT."""

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import transformers

import upcycle
from upcycle.adapters import adapter_of
from upcycle.config import TrainConfig
from upcycle.data.tokenizers import ByteTokenizer
from upcycle.errors import UserError
from upcycle.eval import accuracy
from upcycle.eval.tasks import SequenceClassification, make_task
from upcycle.layers import moe_layers, routing_statistics
from upcycle.record import ConversionRecord, attach_record

SIZES = {"vocab_size": 259, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
         "num_attention_heads": 2, "max_position_embeddings": 32}  # fmt: skip


def classifier(labels=3):
    torch.manual_seed(0)
    config = transformers.BertConfig(**SIZES, num_labels=labels)
    return transformers.BertForSequenceClassification(config).eval()


def task_for(model, data="text_mixture", **options):
    smoothing, seed = options.pop("label_smoothing", 0.0), options.pop("seed", 0)
    options = {"num_sequences": 30, **options} if data == "text_mixture" else options  # the rest: the data's
    config = TrainConfig(data=data, steps=1, seq_len=16, label_smoothing=smoothing, seed=seed, data_options=options)
    return make_task(model, adapter_of(model), config)


@pytest.fixture(scope="module")
def model():
    return classifier()


def test_each_passage_is_labelled_with_its_domain(model):
    task = task_for(model)
    assert isinstance(task, SequenceClassification) and task.metric == "accuracy" and task.num_classes == 3
    assert isinstance(task.tokenizer, ByteTokenizer)  # a byte-vocabulary model reads bytes
    data = task.dataset("val")
    assert len(data) == len(data.data) == 30 and data.info is data.data.info and data[0]["input_ids"].shape == (16,)
    labels = {int(data[i]["labels"]) for i in range(len(data))}
    assert labels == {0, 1, 2}  # every domain is present
    for i in (0, len(data) // 2, len(data) - 1):
        assert torch.equal(data[i]["input_ids"], data.data[i]["input_ids"])
        assert data[i]["labels"] == data.data[i]["domain"]


def test_loss_is_cross_entropy_with_smoothing_and_accuracy_is_top1(model):
    task = task_for(model, label_smoothing=0.2)
    ids, labels = torch.randint(0, 259, (6, 16)), torch.tensor([0, 1, 2, 0, 1, 2])
    loss, metrics = task.loss(model, {"input_ids": ids, "labels": labels}, torch.Generator())
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(logits, labels, label_smoothing=0.2)), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))
    batches = [{"input_ids": ids, "labels": labels}, {"input_ids": ids[:2], "labels": labels.flip(0)[:2]}]
    assert task.evaluate(model, batches) == {"accuracy": accuracy(model, batches)}


def test_refusals():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "BertModel has no classification head; give it one with "
            "--num-labels N (or --reset-head, sized from the data's labels)"
        ),
    ):
        SequenceClassification(transformers.BertModel(transformers.BertConfig(**SIZES)), None, None)
    with pytest.raises(ValueError, match="shakespeare has no domain labels"):
        task_for(classifier(), data="shakespeare").dataset("val")
    with pytest.raises(
        ValueError,
        match=re.escape(
            "predicts 2 classes but text_mixture has 3 domains; load the "
            "encoder with a head of that many labels (num_labels)"
        ),
    ):
        task_for(classifier(labels=2)).dataset("val")
    with pytest.raises(ValueError, match="not the byte vocabulary"):
        task_for(transformers.BertForSequenceClassification(transformers.BertConfig(**{**SIZES, "vocab_size": 97})))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A character-level Hugging Face tokenizer of 130 tokens, saved as a checkpoint folder's tokenizer files."""
    from tokenizers import Tokenizer, models

    vocab = {"<unk>": 0, "<eos>": 1, **{chr(i): i + 2 for i in range(128)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>",
                                                     pad_token="<eos>", bos_token="<eos>")  # fmt: skip
    folder = tmp_path_factory.mktemp("checkpoint")
    tokenizer.save_pretrained(folder)
    return folder


def test_a_model_with_its_own_vocabulary_reads_text_with_its_tokenizer(tokenizer_dir):
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=130, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1))  # fmt: skip
    attach_record(lm, ConversionRecord(files=str(tokenizer_dir)))  # where upcycle.load / load_source found it
    task = task_for(lm, data="shakespeare")
    assert len(task.tokenizer) == 130 and task.vocab_size == 130
    data = task.dataset("val")
    assert data.info.vocab_size == 130 and data[0]["input_ids"].shape == (16,)
    assert all(32 <= i - 2 < 128 for i in data[0]["input_ids"].tolist())  # character codes + 2: its own ids
    encoder = transformers.BertForSequenceClassification(transformers.BertConfig(**{**SIZES, "vocab_size": 130},
                                                                                 num_labels=3))  # fmt: skip
    attach_record(encoder, ConversionRecord(files=str(tokenizer_dir)))
    mixture = task_for(encoder).dataset("val")
    assert mixture.info.vocab_size == 130 and mixture[0]["input_ids"].shape == (16,)


class TinyForSequenceClassification(torch.nn.Module):
    """Only what the task reads of a classifier: its class name and a config (byte vocabulary, 3 labels)."""

    def __init__(self, **config):
        super().__init__()
        self.config = SimpleNamespace(num_labels=3, vocab_size=259, **config)


@pytest.mark.parametrize(("config", "pad_id"), [({"pad_token_id": 5}, 5), ({"pad_token_id": None}, 258), ({}, 258)])
def test_texts_are_padded_with_the_models_padding_id_else_the_tokenizers(config, pad_id):
    """A model's own pad_token_id wins; without one (None, or no such attribute) the tokenizer's (bytes: 258)."""
    assert SequenceClassification(TinyForSequenceClassification(**config), None, None).pad_id == pad_id


@pytest.fixture
def user_texts(tmp_path, monkeypatch):
    """60 passages in a JSON-lines file, labelled in a column ``topic`` (not a usual label name) with 3 topics, half
    of them shorter than 16 characters and half longer; tokenized data and ``datasets``' cache in the test's folder."""
    import datasets

    monkeypatch.setenv("UPCYCLE_DATA", str(tmp_path / "upcycle-data"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    rows = [{"text": f"p{i}" if i % 2 else f"passage number {i} " * 3, "topic": ("sport", "news", "art")[i % 3]}
            for i in range(60)]  # fmt: skip
    path = tmp_path / "passages.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_the_users_labelled_texts_are_read_with_the_models_tokenizer_padding_and_options(tokenizer_dir, user_texts):
    """The user's file is read as text classification (even with its labels in an unusual column named by the run's
    options), with the model's tokenizer and padding id, the run's seq_len and seed; a head of the wrong size is
    refused naming the file."""
    from upcycle.data import load_dataset

    def encoder(labels):  # pads with id 0 (BERT's pad_token_id); its tokenizer would pad with 1
        model = transformers.BertForSequenceClassification(transformers.BertConfig(**{**SIZES, "vocab_size": 130},
                                                                                   num_labels=labels))  # fmt: skip
        attach_record(model, ConversionRecord(files=str(tokenizer_dir)))
        return model

    task = task_for(encoder(3), data=str(user_texts), seed=3, label_column="topic")
    assert task.pad_id == 0 and task.tokenizer.pad_token_id == 1
    data = task.dataset("val")
    direct = load_dataset(str(user_texts), "val", task="text-classification", tokenizer=task.tokenizer, pad_id=0,
                          seq_len=16, seed=3, label_column="topic")  # fmt: skip
    assert data.info.num_classes == 3 and data.info.seed == 3 and len(data) == 6
    assert data.ids.shape == (6, 16)  # the long passages are cut at the run's seq_len
    assert torch.equal(data.ids, direct.ids) and torch.equal(data.mask, direct.mask)
    assert torch.equal(data.labels, direct.labels)
    assert (data.mask == 0).any() and (data.ids[data.mask == 0] == 0).all()  # padded with the model's id
    assert all(32 <= i - 2 < 128 for i in data.ids[data.mask == 1].tolist())  # character codes + 2: its own ids
    with pytest.raises(UserError, match=re.escape(f"the model predicts 2 classes but {user_texts} has 3")):
        task_for(encoder(2), data=str(user_texts), label_column="topic").dataset("val")


def test_padding_is_masked_in_attention_and_left_out_of_routing():
    """The batch's attention mask reaches the model, and an MoE's routers see only the real tokens."""
    torch.manual_seed(0)
    config = transformers.BertConfig(**SIZES, num_labels=3, initializer_range=1.0)  # large weights: the mask shows
    model = transformers.BertForSequenceClassification(config).eval()
    ids, labels = torch.randint(0, 259, (2, 6)), torch.tensor([0, 2])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])  # two padding tokens in the first passage
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    task = task_for(model)
    loss, _ = task.loss(model, batch, torch.Generator())
    with torch.no_grad():
        masked, unmasked = model(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids).logits
    assert not torch.allclose(masked, unmasked, rtol=0.01)  # the mask changes this model's output
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(masked, labels)), rel=1e-5)
    moe = upcycle.convert(model, "sparse_upcycling", num_experts=4, top_k=2, progress=False)
    task.loss(moe, batch, torch.Generator())
    ((_, layer),) = moe_layers(moe)
    assert routing_statistics(layer.last_routing)["tokens"] == 10  # the real tokens only


def test_the_run_seed_and_options_choose_the_passages(model):
    from upcycle.data import load_dataset

    tokenizer = ByteTokenizer()
    chosen = [task_for(model, seed=seed).dataset("val") for seed in (0, 1)]
    direct = load_dataset("text_mixture", "val", tokenizer=tokenizer, seq_len=16, seed=1, num_sequences=30)
    assert all(torch.equal(chosen[1][i]["input_ids"], direct[i]["input_ids"]) for i in range(30))
    assert any(not torch.equal(chosen[0][i]["input_ids"], chosen[1][i]["input_ids"]) for i in range(30))
    assert len(task_for(model, num_sequences=12).dataset("val")) == 12


def test_language_model_loss_and_metrics():
    from upcycle.eval.tasks import CausalLM, next_token_loss

    torch.manual_seed(0)
    table = torch.nn.Embedding(259, 259)  # a plain model returning a logits tensor [b, t, V]
    ids = torch.randint(0, 259, (2, 9))
    expected = F.cross_entropy(table(ids)[:, :-1].reshape(-1, 259), ids[:, 1:].reshape(-1))
    assert float(next_token_loss(lambda input_ids: table(input_ids), ids).detach()) == pytest.approx(
        float(expected.detach())
    )
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=259, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1)).eval()  # fmt: skip
    task = task_for(lm, data="shakespeare")
    assert isinstance(task, CausalLM) and task.metric == "perplexity" and isinstance(task.tokenizer, ByteTokenizer)
    loss, metrics = task.loss(lm, {"input_ids": ids}, torch.Generator())
    assert metrics["perplexity"] == pytest.approx(math.exp(float(loss.detach())))
    with torch.no_grad():
        assert float(loss) == pytest.approx(float(lm(input_ids=ids, labels=ids).loss), rel=1e-5)
    result = task.evaluate(lm, [{"input_ids": ids}])
    assert result["loss"] == pytest.approx(math.log(result["perplexity"]))
    assert result["perplexity"] == pytest.approx(math.exp(float(loss.detach())), rel=1e-5)


def test_a_language_models_data_follows_the_run_seed():
    from upcycle.data import load_dataset

    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=259, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1))  # fmt: skip
    data = task_for(lm, seed=1).dataset("val")
    direct = load_dataset("text_mixture", "val", tokenizer=ByteTokenizer(), seq_len=16, seed=1, num_sequences=30)
    other = load_dataset("text_mixture", "val", tokenizer=ByteTokenizer(), seq_len=16, seed=0, num_sequences=30)
    assert all(torch.equal(data[i]["input_ids"], direct[i]["input_ids"]) for i in range(30))
    assert any(not torch.equal(data[i]["input_ids"], other[i]["input_ids"]) for i in range(30))


def test_a_language_model_reads_the_users_labelled_texts_as_text_to_predict(tmp_path, monkeypatch):
    """A user file whose rows carry a label column would be read as text classification; a language model reads its
    texts packed into seq_len blocks of next tokens, the labels ignored."""
    import datasets

    from upcycle.data import load_dataset
    from upcycle.data.packing import PackedTextDataset

    monkeypatch.setenv("UPCYCLE_DATA", str(tmp_path / "upcycle-data"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    path = tmp_path / "labelled.jsonl"
    path.write_text("".join(json.dumps({"text": f"passage number {i} " * 3, "label": i % 2}) + "\n" for i in range(40)))
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=259, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1))  # fmt: skip
    data = task_for(lm, data=str(path)).dataset("val")
    direct = load_dataset(str(path), "val", task="causal-lm", tokenizer=ByteTokenizer(), seq_len=16)
    assert isinstance(data, PackedTextDataset) and set(data[0]) == {"input_ids"}
    assert len(data) == len(direct) > 0 and all(torch.equal(data[i]["input_ids"], direct[i]["input_ids"])
                                                 for i in range(len(data)))  # fmt: skip


def test_image_task_reads_the_models_input_and_augments_only_training(vit):
    from upcycle.data import load_dataset
    from upcycle.eval.tasks import ImageClassification

    config = TrainConfig(data="digits", steps=1, augment=True, seed=2, data_options={"max_samples": 40})
    task = make_task(vit, adapter_of(vit), config)
    assert isinstance(task, ImageClassification) and task.num_classes == 10
    train, val = task.dataset("train"), task.dataset("val")
    assert train.augment and not val.augment and train[0]["x"].shape == (1, 8, 8)  # the model's input
    direct = load_dataset("digits", "val", image_size=8, channels=1, seed=2, max_samples=40)
    assert len(val) == len(direct) == 40 and torch.equal(val.labels, direct.labels)  # the run's seed and options
    assert not make_task(vit, adapter_of(vit), TrainConfig(data="digits", steps=1, augment=False)).dataset(
        "train").augment  # fmt: skip


def test_image_loss_smooths_labels_mixes_batches_and_scores_the_true_labels(vit):
    from upcycle.data.mixing import mix_batch, soft_cross_entropy

    x, labels = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    smooth = make_task(vit, adapter_of(vit), TrainConfig(data="digits", steps=1, label_smoothing=0.1))
    loss, metrics = smooth.loss(vit, {"x": x, "labels": labels}, torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = vit(x)
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(logits, labels, label_smoothing=0.1)), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0)):
        task = make_task(vit, adapter_of(vit), TrainConfig(data="digits", steps=1, mixup=mixup, cutmix=cutmix))
        loss, metrics = task.loss(vit, {"x": x, "labels": labels}, torch.Generator().manual_seed(3))
        mixed = mix_batch({"x": x, "labels": labels}, 10, mixup, cutmix, 1.0, torch.Generator().manual_seed(3))
        with torch.no_grad():
            mixed_logits = vit(mixed["x"]).float()
        assert float(loss.detach()) == pytest.approx(float(soft_cross_entropy(mixed_logits, mixed["labels"])), rel=1e-5)
        assert metrics["accuracy"] == pytest.approx(float((mixed_logits.argmax(-1) == labels).float().mean()))  # hard


def test_a_colour_model_reads_grey_images_as_three_channels():
    from upcycle.sources import load_timm

    rgb = load_timm("vit_tiny_patch16_224", None, False, {"img_size": 8, "patch_size": 4, "in_chans": 3,
                    "embed_dim": 16, "depth": 1, "num_heads": 2, "num_classes": 10})  # fmt: skip
    task = make_task(rgb, adapter_of(rgb), TrainConfig(data="digits", steps=1, data_options={"max_samples": 4}))
    assert task.dataset("val")[0]["x"].shape == (3, 8, 8)  # digits are grey: 1 channel


def test_a_diverging_language_models_perplexity_is_capped_at_e_to_the_50():
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=259, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1))  # fmt: skip
    task = task_for(lm, data="shakespeare")
    ids = torch.tensor([[1, 2, 3, 4]])

    def confidently_wrong(input_ids):  # all its mass on token 0, which never comes: a loss of about 1000
        return 1000.0 * F.one_hot(torch.zeros_like(input_ids), 259).float()

    loss, metrics = task.loss(confidently_wrong, {"input_ids": ids}, torch.Generator())
    assert float(loss) == pytest.approx(1000.0)
    assert metrics["perplexity"] == math.exp(50.0)  # not an overflow


def image_folder(root, count=8):
    from PIL import Image

    for i in range(count):
        (root / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (30, 20), (i * 20, 0, 255 - i * 20)).save(root / "ab"[i % 2] / f"{i}.png")
    return root


def test_the_users_images_are_read_through_the_models_own_timm_config(tmp_path):
    """A colour model keeps its per-channel mean and std; a grey one averages them; both at the model's input size
    (not the 224 of its architecture's tag), split with seed 0 unless the run says otherwise."""
    from upcycle.eval.tasks import image_dataset
    from upcycle.sources import load_timm

    folder = str(image_folder(tmp_path / "images"))
    models = {}
    for channels in (3, 1):
        models[channels] = load_timm("vit_tiny_patch16_224", None, False, {"img_size": 8 * channels, "patch_size": 8,
                                     "in_chans": channels, "embed_dim": 16, "depth": 1, "num_heads": 2})  # fmt: skip
        models[channels].pretrained_cfg = {**models[channels].pretrained_cfg, "mean": (0.1, 0.2, 0.6),
                                           "std": (0.3, 0.4, 0.5)}  # fmt: skip
    colour = image_dataset(models[3], folder, "train")
    assert colour[0]["x"].shape == (3, 24, 24) and colour.info.image_size == 24 and colour.info.seed == 0
    assert (colour.info.mean, colour.info.std) == (pytest.approx((0.1, 0.2, 0.6)), pytest.approx((0.3, 0.4, 0.5)))
    grey = image_dataset(models[1], folder, "val", seed=3)
    assert grey[0]["x"].shape == (1, 8, 8) and (grey.info.channels, grey.info.seed) == (1, 3)
    assert (grey.info.mean, grey.info.std) == (pytest.approx((0.3,)), pytest.approx((0.4,)))  # the channel means
    assert (colour.info.num_classes, colour.info.classes) == (2, ("a", "b"))  # classified images, from the folders


def test_evaluation_forwards_route_only_the_real_tokens():
    from upcycle.eval._common import resolve_forward

    torch.manual_seed(0)
    moe = upcycle.convert(classifier(), "sparse_upcycling", num_experts=4, top_k=2, progress=False)
    ids, mask = torch.randint(0, 259, (2, 6)), torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    ((_, layer),) = moe_layers(moe)
    for forward in (None, adapter_of(moe), lambda model, inputs: model(**inputs)):
        with torch.no_grad():
            resolve_forward(forward)(moe, {"input_ids": ids, "attention_mask": mask})
        assert routing_statistics(layer.last_routing)["tokens"] == 9  # three padding tokens left out
