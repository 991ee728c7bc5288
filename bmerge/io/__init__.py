"""The edges: data in, posteriors and results to disk and back, weights to and from Hugging Face / PEFT files.

- `bmerge.io.data`: data sets as numpy arrays (shipped digits, MNIST-5k and sentiment; MNIST and CIFAR-10 through
  tfds), task splits by class, seeded minibatches.
- `bmerge.io.checkpoint`: orbax save / restore of posteriors and result arrays; content-keyed posterior caches.
- `bmerge.io.peft`: safetensors in and out: PEFT LoRA adapters, fused and merged weights.
"""

from bmerge.io import checkpoint
from bmerge.io import data
from bmerge.io import peft

__all__ = ["checkpoint", "data", "peft"]
