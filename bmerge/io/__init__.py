"""The edges: data in, posteriors and results to disk and back, weights to and from Hugging Face / PEFT files.

- `bmerge.io.data`: data sets as numpy arrays (shipped digits, MNIST-5k and sentiment; MNIST and CIFAR-10 through
  tfds), task splits by class, seeded minibatches.
- `bmerge.io.checkpoint`: orbax save / restore of posteriors and result arrays; content-keyed posterior caches.
- `bmerge.io.peft`: safetensors in and out: PEFT LoRA adapters, fused and merged weights.

Example:
  Tasks by class, as the paper's experiments build them (App. B.2): task t keeps the examples of its classes.

  >>> import numpy as np
  >>> from bmerge import io
  >>> y = np.array([0, 1, 2, 3, 1])
  >>> io.data.task_membership(y, [(0, 1), (2, 3)]).tolist()
  [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]
"""

from bmerge.io import checkpoint
from bmerge.io import data
from bmerge.io import peft

__all__ = ["checkpoint", "data", "peft"]
