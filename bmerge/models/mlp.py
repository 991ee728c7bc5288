"""A multilayer perceptron classifier (Flax Linen): flatten, [Dense -> activation] per hidden layer, Dense to logits.

  h_0 = flatten(x),   h_l = act(h_{l-1} W_l + b_l) for each hidden width,   logits = h_L W + b.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from bmerge.models import mlp
  >>> model = mlp.make(hidden=(16,), num_classes=10)
  >>> params = model.init(jax.random.key(0), (8, 8))
  >>> model.apply(params, jnp.zeros((3, 8, 8))).shape, sum(x.size for x in jax.tree.leaves(params))
  ((3, 10), 1210)
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bmerge.models._model import Model

__all__ = ["MLP", "make", "num_params"]


class MLP(nn.Module):
  """x [B, ...] -> logits [B, num_classes]; inputs are flattened per example.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from bmerge.models import mlp
    >>> module = mlp.MLP(hidden=(4,), num_classes=2)
    >>> variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 3)))   # shapes only
    >>> jax.eval_shape(module.apply, variables, jnp.ones((5, 3))).shape
    (5, 2)
  """

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
  """`Model(init(key, input_shape) -> Linen params dict, apply(params, x) -> logits)` for an `MLP`.

  Args:
    hidden: widths of the hidden layers.
    num_classes: C, the width of the logits.
    activation: the nonlinearity after every hidden layer.

  Returns:
    A `bmerge.models.Model`; `init(key, input_shape)` takes the shape of one example (no batch axis).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from bmerge.models import mlp
    >>> model = mlp.make(hidden=(4,), num_classes=2)
    >>> params = jax.eval_shape(lambda key: model.init(key, (3,)), jax.random.key(0))   # shapes only
    >>> params["Dense_0"]["kernel"].shape, params["Dense_1"]["kernel"].shape
    ((3, 4), (4, 2))
  """
  module = MLP(hidden=tuple(hidden), num_classes=num_classes, activation=activation)

  def init(key: jax.Array, input_shape: Sequence[int]):
    return module.init(key, jnp.zeros((1, *input_shape), jnp.float32))["params"]

  def apply(params, x: jax.Array) -> jax.Array:
    return module.apply({"params": params}, x)

  return Model(init, apply)


def num_params(input_dim: int, hidden: Sequence[int] = (128, 128), num_classes: int = 10) -> int:
  """P = sum over layers of (fan_in + 1) fan_out (weights and biases).

  Args:
    input_dim: D, features per example once flattened.
    hidden: widths of the hidden layers.
    num_classes: C.

  Returns:
    The number of parameters of `make(hidden, num_classes)` on D features.

  Example:
    >>> from bmerge.models import mlp
    >>> mlp.num_params(64, (128, 128), 10)       # (64 + 1) 128 + (128 + 1) 128 + (128 + 1) 10
    26122
  """
  widths = [input_dim, *hidden, num_classes]
  return sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:]))
