"""Small models for the experiments, each as a `Model(init, apply)` pair of pure functions.

`init(key, input_shape) -> params` (input_shape: one example, no batch axis) and `apply(params, x) -> logits [B, C]`
on a batch x [B, *input_shape]. Params are plain pytrees (a dict for logistic regression, a Linen params dict for the
MLP, the CNN and the ResNet), so they go straight into the optimizers, `bmerge.curvature` and the merge rules.

`resnet.make` returns a `ResNetModel` with the same `init` / `apply` plus `statistics` / `apply_with` for its
BatchNorm statistics (how they are handled when models are merged is described in `bmerge.models.resnet`).

`bert` is a Flax NNX BERT loaded from Hugging Face safetensors, with LoRA; `bert.split(model)` gives its pair:
the trainable LoRA + head dict and `apply(trainable, batch) -> logits`.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from bmerge import models
  >>> model = models.mlp.make(hidden=(8,), num_classes=3)
  >>> params = model.init(jax.random.key(0), (4,))
  >>> model.apply(params, jnp.ones((2, 4))).shape
  (2, 3)
"""

from bmerge.models import bert
from bmerge.models import cnn
from bmerge.models import logistic
from bmerge.models import mlp
from bmerge.models import resnet
from bmerge.models._model import Model

__all__ = ["Model", "bert", "cnn", "logistic", "mlp", "resnet"]
