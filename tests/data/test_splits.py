import numpy as np
import pytest

from upcycle.data.splits import split_files, stratified_split


def _labels():
    return np.repeat(np.arange(4), [10, 20, 30, 40])  # 100 samples, unbalanced classes


def test_stratified_counts_per_class():
    labels = _labels()
    parts = stratified_split(labels, {"val": 2, "test": 3}, seed=0)
    assert set(parts) == {"val", "test", "train"}
    for cls in range(4):
        assert (labels[parts["val"]] == cls).sum() == 2
        assert (labels[parts["test"]] == cls).sum() == 3
    assert len(parts["train"]) == 100 - 20


def test_stratified_fractions_round_per_class():
    labels = _labels()
    parts = stratified_split(labels, {"val": 0.2, "test": 0.1}, seed=0)
    assert [(labels[parts["val"]] == c).sum() for c in range(4)] == [2, 4, 6, 8]
    assert [(labels[parts["test"]] == c).sum() for c in range(4)] == [1, 2, 3, 4]


def test_stratified_is_a_deterministic_partition():
    labels = _labels()
    a = stratified_split(labels, {"val": 0.2, "test": 0.2}, seed=7)
    b = stratified_split(labels, {"val": 0.2, "test": 0.2}, seed=7)
    c = stratified_split(labels, {"val": 0.2, "test": 0.2}, seed=8)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["val"], c["val"])
    everything = np.concatenate([a["train"], a["val"], a["test"]])
    assert np.array_equal(np.sort(everything), np.arange(100))  # disjoint and complete


def test_stratified_refuses_too_small_classes():
    with pytest.raises(ValueError, match="too few"):
        stratified_split(_labels(), {"val": 11}, seed=0)


def test_split_files_partition():
    names = [f"f{i:02d}.txt" for i in range(20)]
    a = split_files(names, 3, 2, seed=0)
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (15, 3, 2)
    assert sorted(a["train"] + a["val"] + a["test"]) == names
    assert a == split_files(reversed(names), 3, 2, seed=0)  # input order does not matter
    assert a != split_files(names, 3, 2, seed=1)
    with pytest.raises(ValueError):
        split_files(names[:4], 2, 2, seed=0)
