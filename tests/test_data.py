"""bmerge.data: digits split, task splits by class, tfds through data_source (mocked), minibatches."""

import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bmerge import data


@pytest.fixture(scope="module")
def digits():
  return data.load("digits", seed=0, test_fraction=0.2)


def test_digits_shapes_ranges_and_stratified_split(digits):
  ds = digits
  assert ds.num_classes == 10 and ds.num_features == 64
  assert ds.train_x.shape == (1437, 64) and ds.test_x.shape == (360, 64)
  assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.int32
  assert 0.0 <= ds.train_x.min() and ds.train_x.max() <= 1.0 and ds.train_x.max() == 1.0
  all_y = np.concatenate([ds.train_y, ds.test_y])
  counts = np.bincount(all_y, minlength=10)
  assert counts.sum() == 1797
  # Stratified: every class's test count is its share of the test set, to within one example.
  test_counts = np.bincount(ds.test_y, minlength=10)
  assert np.all(np.abs(test_counts - counts * 360 / 1797) <= 1)
  # The split is a partition of the 1,797 images (no image in both, none lost).
  from sklearn.datasets import load_digits
  raw = (load_digits().data / 16).astype(np.float32)
  both = np.concatenate([ds.train_x, ds.test_x])
  assert sorted(map(bytes, both)) == sorted(map(bytes, raw))


def test_digits_split_is_deterministic_by_seed(digits):
  again = data.load("digits", seed=0)
  np.testing.assert_array_equal(again.train_x, digits.train_x)
  np.testing.assert_array_equal(again.test_y, digits.test_y)
  other = data.load("digits", seed=1)
  assert not np.array_equal(other.test_y, digits.test_y)


@pytest.mark.parametrize("groups", [data.IMBALANCED, data.BALANCED])
def test_task_splits_keep_global_labels_and_partition_the_data(digits, groups):
  tasks = data.split_by_classes(digits.train_x, digits.train_y, groups)
  assert len(tasks) == len(groups)
  for (x, y), g in zip(tasks, groups):
    assert set(np.unique(y).tolist()) == set(g)  # only (and all) its classes, as global ids
    assert len(x) == len(y) == np.isin(digits.train_y, g).sum()
  rows = np.concatenate([x for x, _ in tasks])
  assert len(rows) == len(digits.train_x)
  assert sorted(map(bytes, rows)) == sorted(map(bytes, digits.train_x))


def test_split_and_load_reject_bad_arguments(digits):
  with pytest.raises(ValueError, match="groups"):
    data.split_by_classes(digits.train_x, digits.train_y, [(0, 1), (1, 2)])
  with pytest.raises(ValueError, match="groups"):
    data.split_by_classes(digits.train_x, digits.train_y, [(0,), (11,)])
  with pytest.raises(ValueError, match="`x` and `y`"):
    data.split_by_classes(digits.train_x, digits.train_y[:-1], [(0,)])
  with pytest.raises(ValueError, match="name"):
    data.load("imagenet")
  with pytest.raises(ValueError, match="test_fraction"):
    data.load("digits", test_fraction=1.5)


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_data_source_under_mock_data(name, shape):
  with tfds.testing.mock_data(num_examples=6):
    ds = data.load(name)
    flat = data.load(name, flatten=True)
  assert ds.train_x.shape == (6, *shape) and ds.test_x.shape == (6, *shape)
  assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.int32
  assert 0.0 <= ds.train_x.min() and ds.train_x.max() <= 1.0 and ds.train_x.max() > 0
  assert ds.num_classes == 10 and np.all((0 <= ds.train_y) & (ds.train_y < 10))
  assert flat.train_x.shape == (6, int(np.prod(shape))) and ds.num_features == int(np.prod(shape))
  np.testing.assert_array_equal(flat.train_x, ds.train_x.reshape(6, -1))
  assert "tensorflow" not in sys.modules  # data_source reads ArrayRecord without TensorFlow


def test_minibatches_cover_each_epoch_once_and_repeat_by_seed():
  x, y = np.arange(10)[:, None] * 1.0, np.arange(10)
  batches = list(data.minibatches(3, (x, y), 4, num_epochs=2))
  assert [len(b[1]) for b in batches] == [4, 4, 2, 4, 4, 2]
  for epoch in (batches[:3], batches[3:]):
    assert sorted(np.concatenate([b[1] for b in epoch]).tolist()) == list(range(10))
  for bx, by in batches:
    np.testing.assert_array_equal(bx[:, 0], by)  # arrays stay aligned
  again = list(data.minibatches(3, (x, y), 4, num_epochs=2))
  assert all(np.array_equal(a[1], b[1]) for a, b in zip(batches, again))
  assert not np.array_equal(batches[0][1], batches[3][1]) or not np.array_equal(batches[1][1], batches[4][1])
  assert [len(b[0]) for b in data.minibatches(0, (x,), 4, drop_remainder=True)] == [4, 4]
  with pytest.raises(ValueError, match="batch_size"):
    next(data.minibatches(0, (x,), 0))
