"""Dataset behaviour independent of the storage: subsets, splits, shuffling, augmentation, batching."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from impq_onnx.data import Preprocess, dataset_from_arrays
from impq_onnx.data.dataset import AUGMENT_PADDING
from impq_onnx.errors import DataError

RAW = Preprocess(size=(8, 8), resize=None, mean=(0.0,), std=(1.0,), value_scale=255.0, channels="L")


def _dataset(n=30, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    # Every image has a distinct first pixel so batches can be traced back to samples.
    images = rng.integers(1, 256, (n, 8, 8, 1), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n)
    return dataset_from_arrays(images, np.arange(n) % classes, RAW)


def _ids(x):
    return x[:, 0, 0, 0].astype(int).tolist()


def test_batches_in_order_cover_everything_once():
    data = _dataset(10)
    batches = list(data.batches(4))
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    assert sum((_ids(x) for x, _ in batches), []) == list(range(10))
    assert [len(x) for x, _ in data.batches(4, drop_last=True)] == [4, 4]
    assert data.num_batches(4) == 3 and data.num_batches(4, drop_last=True) == 2
    x, y = batches[0]
    assert x.dtype == np.float32 and y.dtype == np.int64 and y.tolist() == [0, 1, 2, 0]


def test_shuffling_is_a_permutation_fixed_by_the_seed():
    data = _dataset(25)
    order = lambda seed: sum((_ids(x) for x, _ in data.batches(7, shuffle=True, seed=seed)), [])  # noqa: E731
    assert order(1) == order(1) and sorted(order(1)) == list(range(25))
    assert order(1) != order(2) and order(1) != list(range(25))
    for x, y in data.batches(7, shuffle=True, seed=5):
        assert (np.array(_ids(x)) % 3 == y).all()  # labels travel with their images


def test_augmentation_is_a_padded_crop_and_flip_fixed_by_the_seed():
    data = _dataset(12)
    plain = np.concatenate([x for x, _ in data.batches(12)])
    aug = np.concatenate([x for x, _ in data.batches(12, augment=True, seed=4)])
    again = np.concatenate([x for x, _ in data.batches(12, augment=True, seed=4)])
    np.testing.assert_array_equal(aug, again)
    assert not np.array_equal(aug, plain)
    p = AUGMENT_PADDING
    for original, augmented in zip(plain[:, 0], aug[:, 0]):
        padded = np.pad(original, p)
        candidates = [padded[t : t + 8, s : s + 8] for t in range(2 * p + 1) for s in range(2 * p + 1)]
        candidates += [c[:, ::-1] for c in candidates]
        assert any(np.array_equal(augmented, c) for c in candidates)


def test_subset_and_chained_subset():
    data = _dataset(10)
    sub = data.subset([9, 2, 4]).subset([2, 0])
    assert _ids(next(sub.batches(5))[0]) == [4, 9] and sub.labels.tolist() == [1, 0]
    assert sub.classes == data.classes
    with pytest.raises(IndexError):
        data.subset([10])


def test_split_is_stratified_disjoint_and_deterministic():
    data = _dataset(30)
    train, val = data.split(0.2, seed=0)
    assert len(train) == 24 and len(val) == 6 and np.bincount(val.labels).tolist() == [2, 2, 2]
    train_ids = set(_ids(next(train.batches(30))[0]))
    val_ids = set(_ids(next(val.batches(30))[0]))
    assert not train_ids & val_ids and train_ids | val_ids == set(range(30))
    again = data.split(0.2, seed=0)[1]
    assert _ids(next(again.batches(30))[0]) == sorted(val_ids)
    other = data.split(0.2, seed=1)[1]
    assert set(_ids(next(other.batches(30))[0])) != val_ids


def test_split_refuses_impossible_fractions():
    with pytest.raises(DataError, match="between 0 and 1"):
        _dataset(10).split(1.0, seed=0)
    with pytest.raises(DataError, match="too few"):
        _dataset(3).split(0.1, seed=0)


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(-1, 4), min_size=4, max_size=60),
    fraction=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**31),
)
def test_split_partitions_any_labelling(labels, fraction, seed):
    labels = np.array(labels)
    data = dataset_from_arrays(np.zeros((len(labels), 8, 8, 1), np.uint8), labels, RAW)
    try:
        train, val = data.split(fraction, seed)
    except DataError:
        return  # too few samples for this fraction
    assert len(train) + len(val) == len(data)
    assert sorted(np.concatenate([train.items, val.items]).tolist()) == list(range(len(data)))
    for label in np.unique(labels):
        assert (val.labels == label).sum() == round((labels == label).sum() * fraction)
