import dataclasses

import pytest

from upcycle.data import DatasetInfo, UnknownDatasetError, dataset_options, list_datasets, load_dataset

ALL = ["digits", "fashion_mnist", "mnist5k", "python_code", "python_docs", "shakespeare", "text_mixture"]


def test_list_datasets_names_every_dataset():
    assert list_datasets() == ALL


def test_unknown_dataset_lists_known_names():
    with pytest.raises(UnknownDatasetError) as err:
        load_dataset("cifar100", "train")
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    assert "cifar100" in message
    assert all(name in message for name in ALL)


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match=r"unknown split 'valid'.*train, val, test"):
        load_dataset("digits", "valid")


def test_unknown_option_names_the_accepted_ones():
    with pytest.raises(TypeError, match=r"no option imagesize.*image_size"):
        load_dataset("digits", "train", imagesize=32)


def test_options_of_image_and_text_sets():
    assert {"image_size", "channels", "augment", "seed"} <= set(dataset_options("digits"))
    assert {"tokenizer", "seq_len", "max_tokens", "seed"} <= set(dataset_options("python_docs"))
    assert {"weights", "domain"} <= set(dataset_options("text_mixture"))


def test_dataset_info_is_a_frozen_dataclass():
    info = load_dataset("digits", "val").info
    assert isinstance(info, DatasetInfo)
    assert (info.name, info.kind, info.split, info.num_classes, info.image_size, info.channels) == (
        "digits",
        "image",
        "val",
        10,
        8,
        1,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.size = 3
