"""Small models for the experiments, each as a `Model(init, apply)` pair of pure functions.

`init(key, input_shape) -> params` (input_shape: one example, no batch axis) and `apply(params, x) -> logits [B, C]`
on a batch x [B, *input_shape]. Params are plain pytrees (a dict for logistic regression, a Linen params dict for the
MLP, the CNN and the ResNet), so they go straight into the optimizers, `bmerge.curvature` and the merge rules.

`resnet.make` returns a `ResNetModel` with the same `init` / `apply` plus `statistics` / `apply_with` for its
BatchNorm statistics (how they are handled when models are merged is described in `bmerge.models.resnet`).

`bert` is a Flax NNX BERT loaded from Hugging Face safetensors, with LoRA; `bert.split(model)` gives its pair:
the trainable LoRA + head dict and `apply(trainable, batch) -> logits`.
"""

from typing import Any, Callable, NamedTuple


class Model(NamedTuple):
  """A model as two pure functions."""

  init: Callable[..., Any]  # (key, input_shape) -> params pytree
  apply: Callable[..., Any]  # (params, x [B, ...]) -> logits [B, C]


from bmerge.models import bert  # noqa: E402
from bmerge.models import cnn  # noqa: E402  (the modules import Model from here)
from bmerge.models import logistic  # noqa: E402
from bmerge.models import mlp  # noqa: E402
from bmerge.models import resnet  # noqa: E402

__all__ = ["Model", "bert", "cnn", "logistic", "mlp", "resnet"]
