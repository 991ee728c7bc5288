"""Texts in: the tokenizer of a Hugging Face BERT folder, and sentence-transformers' sentence embeddings.

`tokenize` runs the `tokenizers` library on the folder's `tokenizer.json` (WordPiece for BERT): [CLS] tokens [SEP],
truncated and padded on the right, as sentence-transformers does. `sentence_embeddings` follows all-MiniLM-L6-v2's
`modules.json`: the mean of the last hidden states over the tokens the attention mask keeps, then L2 normalisation,

    e = m / max(||m||, 1e-12),    m = sum_l mask_l h_l / max(sum_l mask_l, 1e-9).

References:
  Reimers, Gurevych. Sentence-BERT: sentence embeddings using Siamese BERT-networks. EMNLP 2019.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Optional, Sequence, Union

import jax
import numpy as np

from bmerge import _checks
from bmerge.models.bert.model import Tokens, _build, _chunked, _parts, _Stack, mean_pool, normalize
from bmerge.models.bert.params import load, model_dir

__all__ = ["PADDING", "sentence_embeddings", "tokenize"]

PathLike = Union[str, pathlib.Path]

def _max_length(folder: pathlib.Path) -> int:
  st = folder / "sentence_bert_config.json"  # sentence-transformers' max_seq_length wins over the model's limit
  config = json.loads((folder / "config.json").read_text())
  limit = int(config.get("max_position_embeddings", 512))
  return min(int(json.loads(st.read_text())["max_seq_length"]), limit) if st.is_file() else limit


@functools.lru_cache(maxsize=8)
def _tokenizer(tokenizer_file: str):
  tokenizers = _checks.optional_import("tokenizers", "text", "bmerge.models.bert.tokenize")
  return tokenizers.Tokenizer.from_file(tokenizer_file)


PADDING = ("longest", "max_length")


def tokenize(texts: Sequence[str], path: Optional[PathLike] = None, *, max_length: Optional[int] = None,
             padding: str = "longest") -> Tokens:
  """Tokenises texts with the `tokenizers` library from the folder's `tokenizer.json`.

  Each text becomes [CLS] tokens [SEP], truncated to `max_length` tokens (specials included) and padded on the right
  to the longest text ('longest') or to `max_length` ('max_length', fixed shapes for training).

  Args:
    texts: a sequence of strings.
    path: the model folder (None: the shipped MiniLM).
    max_length: the truncation length; default: `max_seq_length` of sentence_bert_config.json if present (256 for
      MiniLM, what sentence-transformers uses), else `max_position_embeddings`.
    padding: 'longest' or 'max_length'.

  Returns:
    `Tokens(input_ids [N, L] int32, attention_mask [N, L] int32)`.

  Example:
    >>> from bmerge.models import bert
    >>> tokens = bert.tokenize(["Great movie!", "meh"], max_length=4)  # the shipped MiniLM's tokenizer
    >>> tokens.input_ids
    array([[ 101, 2307, 3185,  102],
           [ 101, 2033, 2232,  102]], dtype=int32)
  """
  if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
    raise TypeError("`texts` must be a sequence of strings (a list, not one string).")
  if padding not in PADDING:
    raise ValueError(f"`padding` must be one of {PADDING}, got {padding!r}.")
  folder = model_dir(path)
  limit = _max_length(folder)
  if max_length is None:
    max_length = limit
  if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or not 2 < max_length <= limit:
    raise ValueError(f"`max_length` must be an integer in [3, {limit}] (room for [CLS], a token and [SEP]), "
                     f"got {max_length!r}.")
  tokenizer = _tokenizer(str(folder / "tokenizer.json"))
  # tokenizer.json carries its own truncation and padding (MiniLM's: 128, fixed); set both explicitly every call.
  tokenizer.enable_truncation(int(max_length))
  tokenizer.no_padding()
  encodings = tokenizer.encode_batch(list(texts))
  length = int(max_length) if padding == "max_length" else max([len(e.ids) for e in encodings], default=2)
  ids = np.zeros((len(encodings), length), np.int32)
  mask = np.zeros((len(encodings), length), np.int32)
  for row, encoding in enumerate(encodings):
    ids[row, :len(encoding.ids)] = encoding.ids
    mask[row, :len(encoding.ids)] = 1
  pad_id = tokenizer.token_to_id("[PAD]")
  ids[mask == 0] = 0 if pad_id is None else pad_id
  return Tokens(ids, mask)


# ----------------------------------------------------------------------------------------------------------------
# Sentence embeddings.


@functools.partial(jax.jit, static_argnums=0)
def _run_embed(stack: _Stack, frozen: dict, batch):
  return normalize(mean_pool(stack(frozen, {}, batch), batch.attention_mask))


@functools.lru_cache(maxsize=2)
def _embedder(folder: str) -> tuple[_Stack, dict]:
  encoder = load(folder)
  stack, frozen, _ = _build(_parts(encoder, 0, len(encoder.layers), True, False), True, False)
  return stack, frozen


def sentence_embeddings(texts: Sequence[str], path: Optional[PathLike] = None, *, max_length: Optional[int] = None,
                        batch_size: int = 32) -> np.ndarray:
  """Mean-pooled, L2-normalised sentence embeddings, as sentence-transformers computes them for all-MiniLM-L6-v2.

    e = m / max(||m||, 1e-12),   m = sum_l mask_l h_l / sum_l mask_l   (h: the last hidden states)

  Args:
    texts: a sequence of strings.
    path: a Hugging Face BERT folder; None: the shipped MiniLM.
    max_length: truncation length (default as `tokenize`: 256 for MiniLM).
    batch_size: texts per compiled call.

  Returns:
    float32 numpy [N, hidden_size], rows of unit norm.
  """
  folder = model_dir(path)
  tokens = tokenize(texts, folder, max_length=max_length)
  stack, frozen = _embedder(str(folder.resolve()))
  return _chunked(lambda chunk: _run_embed(stack, frozen, chunk), tokens, batch_size).astype(np.float32)
