"""A BERT encoder in Flax NNX that loads Hugging Face safetensors, with LoRA adapters and a classification head.

One namespace, four modules, each one concept:

  model       the encoder (post-LayerNorm BERT), `Classifier` (a linear head on the mean-pooled last hidden states),
              `Tokens` / `Hidden` batches, and `hidden_states` (the bottom layers run once for a data set)
  params      the Hugging Face safetensors <-> NNX key table `HF_TABLE` (names and transposes), `load` (the shipped
              all-MiniLM-L6-v2 when no path is given), `from_hf_weights`, `random_hf_weights`
  tokenizer   `tokenize` (tokenizer.json through the `tokenizers` library) and `sentence_embeddings` (mean-pooled,
              L2-normalised, as sentence-transformers)
  lora        `add_lora` (PEFT's scale alpha / r), `split` into the trainable LoRA + head dict and a pure `apply`,
              `merge_trainable`, and the multitask `cross_entropy`, `task_losses`, `task_accuracies`

Every public name is re-exported here: `bert.load`, `bert.add_lora`, `bert.split`, ...

Example:
  >>> from bmerge.models import bert
  >>> bert.from_hf_key("encoder.layer.0.attention.self.query.lora_A.weight")  # a PEFT adapter's tensor -> state key
  ('encoder.layers.0.attention.query.lora.lora_a', True)
  >>> bert.to_hf_key("head.kernel")  # transposed: NNX kernel [in, out], PyTorch weight [out, in]
  ('classifier.weight', True)

References:
  Devlin, Chang, Lee, Toutanova. BERT: pre-training of deep bidirectional transformers. NAACL 2019.
  Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang, Chen. LoRA: low-rank adaptation of large language models. ICLR 2022.
"""

from bmerge.models.bert.lora import (TARGETS, TRAINABLE, LoRALinear, Split, add_lora, cross_entropy, frozen_layers,
                                     merge_trainable, split, task_accuracies, task_losses)
from bmerge.models.bert.model import (Bert, Classifier, Config, Hidden, Tokens, flatten_state, hidden_states, mean_pool,
                                      normalize, unflatten_state)
from bmerge.models.bert.params import (HF_TABLE, HF_UNUSED, MINILM_INSTALL, MINILM_PACKAGE, from_hf_key,
                                       from_hf_weights, load, map_hf_weights, model_dir, random_hf_weights,
                                       read_hf_weights, to_hf_key)
from bmerge.models.bert.tokenizer import PADDING, sentence_embeddings, tokenize

__all__ = [
    "Bert", "Classifier", "Config", "HF_TABLE", "HF_UNUSED", "Hidden", "LoRALinear", "MINILM_INSTALL", "MINILM_PACKAGE",
    "PADDING", "Split", "TARGETS", "TRAINABLE", "Tokens", "add_lora", "cross_entropy", "flatten_state", "from_hf_key",
    "from_hf_weights", "frozen_layers", "hidden_states", "load", "map_hf_weights", "mean_pool", "merge_trainable",
    "model_dir", "normalize", "random_hf_weights", "read_hf_weights", "sentence_embeddings", "split",
    "task_accuracies", "task_losses", "to_hf_key", "tokenize", "unflatten_state",
]
