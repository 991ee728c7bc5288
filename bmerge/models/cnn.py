"""A small convolutional classifier (Flax Linen) for 28x28 / 32x32 images (MNIST, CIFAR-10) or 8x8 digits.

[Conv 3x3 -> ReLU -> 2x2 average pool] per stage, global average pool, Dense to logits:

  h_s = avgpool_2x2(relu(conv_3x3(h_{s-1}))),   logits = mean_{i,j} h_S[i, j] W + b.

No batch normalisation, so `apply` is a pure function of (params, x) and per-example gradients (`bmerge.curvature`)
are well defined.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from bmerge.models import cnn
  >>> model = cnn.make(features=(4,), num_classes=10, image_shape=(8, 8, 1))     # flat 8x8 digits
  >>> params = model.init(jax.random.key(0), (64,))
  >>> model.apply(params, jnp.zeros((2, 64))).shape
  (2, 10)
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bmerge.models._model import Model

__all__ = ["CNN", "make"]


class CNN(nn.Module):
  """x [B, H, W, C] (or [B, H, W], or digits [B, 64] reshaped by `make`) -> logits [B, num_classes].

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from bmerge.models import cnn
    >>> module = cnn.CNN(features=(2,), num_classes=3)
    >>> variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 4, 4)))   # grey [B, H, W]
    >>> jax.eval_shape(module.apply, variables, jnp.ones((5, 4, 4))).shape
    (5, 3)
  """

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
  """`Model(init, apply)` for a `CNN`.

  Args:
    features: channels of each convolution stage.
    num_classes: C, the width of the logits.
    image_shape: (H, W, C) to reshape flat inputs to, e.g. (8, 8, 1) for digits; None for image-shaped inputs.

  Returns:
    A `bmerge.models.Model`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from bmerge.models import cnn
    >>> model = cnn.make(features=(2, 4), num_classes=3)
    >>> params = jax.eval_shape(lambda key: model.init(key, (8, 8, 1)), jax.random.key(0))   # shapes only
    >>> params["Conv_1"]["kernel"].shape, jax.eval_shape(model.apply, params, jnp.ones((2, 8, 8, 1))).shape
    ((3, 3, 2, 4), (2, 3))
  """
  module = CNN(features=tuple(features), num_classes=num_classes)
  shape = None if image_shape is None else tuple(image_shape)

  def prep(x):
    return x if shape is None else jnp.reshape(x, (x.shape[0], *shape))

  def init(key: jax.Array, input_shape: Sequence[int]):
    return module.init(key, prep(jnp.zeros((1, *input_shape), jnp.float32)))["params"]

  def apply(params, x: jax.Array) -> jax.Array:
    return module.apply({"params": params}, prep(x))

  return Model(init, apply)
