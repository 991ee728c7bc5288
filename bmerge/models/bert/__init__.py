"""A BERT encoder in Flax NNX that loads Hugging Face safetensors, with LoRA adapters and a classification head."""

from bmerge.models.bert.model import *  # noqa: F401,F403
from bmerge.models.bert.model import __all__  # noqa: F401
