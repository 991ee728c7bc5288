"""The one structure every data source returns (`bmerge.io.data.load`, `bmerge.io.data.load_sentiment`)."""

from typing import NamedTuple

import numpy as np


class Dataset(NamedTuple):
  """Train and test arrays (numpy) and the number of classes.

  Example:
    >>> import numpy as np
    >>> from bmerge.io._dataset import Dataset
    >>> ds = Dataset(np.zeros((4, 8, 8)), np.zeros(4, np.int32), np.zeros((2, 8, 8)), np.zeros(2, np.int32), 10)
    >>> ds.num_features, ds.num_classes
    (64, 10)
  """

  train_x: np.ndarray  # [N_train, ...] float32 in [0, 1]
  train_y: np.ndarray  # [N_train] int32 class ids
  test_x: np.ndarray  # [N_test, ...] float32
  test_y: np.ndarray  # [N_test] int32
  num_classes: int

  @property
  def num_features(self) -> int:
    """Features per example once flattened (64 for digits, 784 for MNIST, 3072 for CIFAR-10)."""
    return int(np.prod(self.train_x.shape[1:]))
