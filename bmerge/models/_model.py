"""`Model`: a model as a pair of pure functions (what every small model of `bmerge.models` returns)."""

from typing import Any, Callable, NamedTuple


class Model(NamedTuple):
  """A model as two pure functions: `init(key, input_shape) -> params` and `apply(params, x [B, ...]) -> logits`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from bmerge.models import Model
    >>> model = Model(init=lambda key, shape: {"w": jnp.zeros((*shape, 2))}, apply=lambda p, x: x @ p["w"])
    >>> model.apply(model.init(jax.random.key(0), (3,)), jnp.ones((5, 3))).shape
    (5, 2)
  """

  init: Callable[..., Any]  # (key, input_shape) -> params pytree
  apply: Callable[..., Any]  # (params, x [B, ...]) -> logits [B, C]
