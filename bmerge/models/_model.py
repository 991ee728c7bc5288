"""`Model`: a model as a pair of pure functions (what every small model of `bmerge.models` returns)."""

from typing import Any, Callable, NamedTuple


class Model(NamedTuple):
  """A model as two pure functions."""

  init: Callable[..., Any]  # (key, input_shape) -> params pytree
  apply: Callable[..., Any]  # (params, x [B, ...]) -> logits [B, C]
