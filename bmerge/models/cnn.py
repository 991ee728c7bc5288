"""A small convolutional classifier (Flax Linen) for 28x28 / 32x32 images (MNIST, CIFAR-10) or 8x8 digits.

[Conv 3x3 -> ReLU -> 2x2 average pool] per stage, global average pool, Dense to logits. No batch normalisation, so
`apply` is a pure function of (params, x) and per-example gradients (`bmerge.curvature`) are well defined.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bmerge.models._model import Model

__all__ = ["CNN", "make"]


class CNN(nn.Module):
  """x [B, H, W, C] (or [B, H, W], or digits [B, 64] reshaped by `make`) -> logits [B, num_classes]."""

  features: Sequence[int] = (32, 64)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim == 3:  # [B, H, W] grey images
      x = x[..., None]
    for width in self.features:
      x = nn.relu(nn.Conv(width, (3, 3), padding="SAME")(x))
      if x.shape[1] >= 2 and x.shape[2] >= 2:
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


def make(features: Sequence[int] = (32, 64), num_classes: int = 10, image_shape: Sequence[int] | None = None) -> Model:
  """`Model(init, apply)` for a `CNN`. `image_shape` (H, W, C) reshapes flat inputs, e.g. (8, 8, 1) for digits."""
  module = CNN(features=tuple(features), num_classes=num_classes)
  shape = None if image_shape is None else tuple(image_shape)

  def prep(x):
    return x if shape is None else jnp.reshape(x, (x.shape[0], *shape))

  def init(key: jax.Array, input_shape: Sequence[int]):
    return module.init(key, prep(jnp.zeros((1, *input_shape), jnp.float32)))["params"]

  def apply(params, x: jax.Array) -> jax.Array:
    return module.apply({"params": params}, prep(x))

  return Model(init, apply)
