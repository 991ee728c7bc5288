"""Data sets as numpy arrays, task splits by class, and a seeded minibatch iterator (the IO edge for data).

`load(name)` returns one `Dataset` structure for every source:

  'digits'   scikit-learn's `load_digits`: 1,797 real 8x8 handwritten digits that ship inside the package (no
             network). Features are the 64 pixel intensities / 16, in [0, 1]; a fixed, seeded, stratified
             train/test split (`test_fraction` of every class held out).
  'mnist', 'cifar10'
             through `tfds.data_source` (ArrayRecord files read with `array_record`; TensorFlow is never imported),
             for users with the prepared data set on disk or a network: the official train / test splits, images
             scaled to [0, 1] as float32 [N, H, W, C].

Labels are int32 global class ids everywhere; `split_by_classes` keeps them global, so every task is a C-way problem
with the same output layer (the paper's setting, App. B.2).
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np

NAMES = ("digits", "mnist", "cifar10")
_TFDS_NAMES = {"mnist": "mnist", "cifar10": "cifar10"}


class Dataset(NamedTuple):
  """Train and test arrays (numpy) and the number of classes."""

  train_x: np.ndarray  # [N_train, ...] float32 in [0, 1]
  train_y: np.ndarray  # [N_train] int32 class ids
  test_x: np.ndarray  # [N_test, ...] float32
  test_y: np.ndarray  # [N_test] int32
  num_classes: int

  @property
  def num_features(self) -> int:
    """Features per example once flattened (64 for digits, 784 for MNIST, 3072 for CIFAR-10)."""
    return int(np.prod(self.train_x.shape[1:]))


def load(name: str, *, seed: int = 0, test_fraction: float = 0.2, data_dir: Optional[str] = None,
         flatten: bool = False) -> Dataset:
  """Loads a data set as numpy arrays.

  Args:
    name: 'digits', 'mnist' or 'cifar10'.
    seed: seed of the stratified train/test split ('digits' only; tfds data sets have official splits).
    test_fraction: fraction of every class held out for testing ('digits' only), in (0, 1).
    data_dir: tfds data directory (default: tfds's own, usually ~/tensorflow_datasets).
    flatten: return images as [N, H * W * C] (the digits are always flat [N, 64]).

  Returns:
    A `Dataset`.
  """
  if name == "digits":
    return _load_digits(seed, test_fraction)
  if name in _TFDS_NAMES:
    ds = _load_tfds(_TFDS_NAMES[name], data_dir)
    if flatten:
      ds = ds._replace(train_x=ds.train_x.reshape(len(ds.train_x), -1), test_x=ds.test_x.reshape(len(ds.test_x), -1))
    return ds
  raise ValueError(f"`name` must be one of {NAMES}, got {name!r}.")


def _load_digits(seed: int, test_fraction: float) -> Dataset:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top

  if not isinstance(test_fraction, (float, int)) or not 0.0 < test_fraction < 1.0:
    raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction!r}.")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise ValueError(f"`seed` must be an integer, got {seed!r}.")
  bunch = load_digits()
  x = (bunch.data / 16.0).astype(np.float32)
  y = bunch.target.astype(np.int32)
  train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=test_fraction, random_state=int(seed),
                                                      stratify=y)
  return Dataset(train_x, train_y, test_x, test_y, 10)


def _load_tfds(name: str, data_dir: Optional[str]) -> Dataset:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  arrays = {}
  num_classes = None
  for split in ("train", "test"):
    source = tfds.data_source(name, split=split, data_dir=data_dir)
    num_classes = source.dataset_info.features["label"].num_classes
    # One record at a time: tfds 4.9.10's mock data source breaks the batched `__getitems__`.
    images = np.empty((len(source),) + tuple(source.dataset_info.features["image"].shape), np.uint8)
    labels = np.empty((len(source),), np.int32)
    for i in range(len(source)):
      example = source[i]
      images[i] = example["image"]
      labels[i] = example["label"]
    arrays[split] = ((images / np.float32(255.0)).astype(np.float32), labels)
  (train_x, train_y), (test_x, test_y) = arrays["train"], arrays["test"]
  return Dataset(train_x, train_y, test_x, test_y, int(num_classes))


# ---------------------------------------------------------------------------------------------------------------
# Tasks by class.

IMBALANCED = ((0, 1), (2, 3, 4), (5, 6, 7, 8, 9))  # the paper's MNIST splits (App. B.2)
BALANCED = ((0, 1, 2), (3, 4, 5, 6), (7, 8, 9))


def split_by_classes(x: np.ndarray, y: np.ndarray,
                     groups: Sequence[Sequence[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
  """One (x_t, y_t) per group of classes: the examples whose label is in group t, labels kept as global ids.

  Args:
    x: inputs [N, ...].
    y: integer labels [N].
    groups: T disjoint collections of class ids, e.g. `IMBALANCED` = ((0, 1), (2, 3, 4), (5, ..., 9)).

  Returns:
    A list of T pairs (x_t, y_t), in the data's order. If the groups cover every class, the tasks partition the data.
  """
  x, y = np.asarray(x), np.asarray(y)
  if y.ndim != 1 or len(x) != len(y):
    raise ValueError(f"`x` and `y` must share the leading axis N with `y` of shape [N]; got x {x.shape}, y {y.shape}.")
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"`y` must hold integer class ids, got dtype {y.dtype}.")
  groups = [tuple(int(c) for c in g) for g in groups]
  if not groups or any(len(g) == 0 for g in groups):
    raise ValueError(f"`groups` must be a non-empty list of non-empty class groups, got {groups}.")
  seen = {}
  for t, g in enumerate(groups):
    for c in g:
      if c in seen:
        raise ValueError(f"`groups` must be disjoint; class {c} is in group {seen[c]} and group {t}.")
      seen[c] = t
  out = []
  for t, g in enumerate(groups):
    keep = np.isin(y, g)
    if not keep.any():
      raise ValueError(f"`groups[{t}]` = {g} selects no example; labels present are {sorted(set(y.tolist()))}.")
    out.append((x[keep], y[keep]))
  return out


# ---------------------------------------------------------------------------------------------------------------
# Minibatches.


def minibatches(seed: int, arrays: Sequence[np.ndarray], batch_size: int, *, num_epochs: int = 1,
                shuffle: bool = True, drop_remainder: bool = False) -> Iterator[tuple[np.ndarray, ...]]:
  """Yields tuples of minibatches of `arrays` (all [N, ...]), epoch after epoch, reshuffled per epoch.

  The order depends only on `seed` (numpy's `default_rng(seed)`): the same seed gives the same batches. Each
  epoch visits every example exactly once (the last batch is smaller unless `drop_remainder`).
  """
  arrays = tuple(np.asarray(a) for a in arrays)
  if not arrays:
    raise ValueError("`arrays` is empty; expected at least one array [N, ...].")
  n = len(arrays[0])
  if any(len(a) != n for a in arrays):
    raise ValueError(f"`arrays` must share the leading axis N; got lengths {[len(a) for a in arrays]}.")
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
  if isinstance(num_epochs, bool) or not isinstance(num_epochs, (int, np.integer)) or num_epochs < 0:
    raise ValueError(f"`num_epochs` must be a non-negative integer, got {num_epochs!r}.")
  rng = np.random.default_rng(seed)
  for _ in range(num_epochs):
    order = rng.permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
      idx = order[start:start + batch_size]
      yield tuple(a[idx] for a in arrays)
