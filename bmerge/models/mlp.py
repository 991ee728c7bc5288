"""A multilayer perceptron classifier (Flax Linen): flatten, [Dense -> activation] per hidden layer, Dense to logits."""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bmerge.models._model import Model

__all__ = ["MLP", "make", "num_params"]


class MLP(nn.Module):
  """x [B, ...] -> logits [B, num_classes]; inputs are flattened per example."""

  hidden: Sequence[int] = (128, 128)
  num_classes: int = 10
  activation: Callable = nn.relu

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.reshape(x, (x.shape[0], -1))
    for width in self.hidden:
      x = self.activation(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


def make(hidden: Sequence[int] = (128, 128), num_classes: int = 10, activation: Callable = nn.relu) -> Model:
  """`Model(init(key, input_shape) -> Linen params dict, apply(params, x) -> logits)` for an `MLP`."""
  module = MLP(hidden=tuple(hidden), num_classes=num_classes, activation=activation)

  def init(key: jax.Array, input_shape: Sequence[int]):
    return module.init(key, jnp.zeros((1, *input_shape), jnp.float32))["params"]

  def apply(params, x: jax.Array) -> jax.Array:
    return module.apply({"params": params}, x)

  return Model(init, apply)


def num_params(input_dim: int, hidden: Sequence[int] = (128, 128), num_classes: int = 10) -> int:
  """sum over layers of (fan_in + 1) fan_out."""
  widths = [input_dim, *hidden, num_classes]
  return sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:]))
