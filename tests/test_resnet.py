"""bmerge.models.resnet: ResNet-20's parameter count by hand, a float64 numpy forward pass as the oracle, and the
BatchNorm policy for merged models (statistics recomputed per merged model on a calibration batch)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bmerge
from bmerge import data
from bmerge import merge
from bmerge.models import resnet


def count_by_hand(in_channels, widths, blocks, num_classes):
  """3x3 conv kernels (no bias) + a BatchNorm scale and bias per conv output channel + the dense layer."""
  count = 9 * in_channels * widths[0] + 2 * widths[0]  # stem conv and its BN
  c_in = widths[0]
  for w in widths:
    for _ in range(blocks):  # two convs and two BNs per block; the shortcuts have no parameters
      count += 9 * c_in * w + 9 * w * w + 2 * (2 * w)
      c_in = w
  return count + widths[-1] * num_classes + num_classes


def test_resnet20_for_cifar10_has_269722_parameters():
  model = resnet.make(num_classes=10)
  shapes = lambda m, input_shape: jax.eval_shape(functools.partial(m.init, input_shape=input_shape), jax.random.key(0))
  params = shapes(model, (32, 32, 3))
  # stem 3x3x3x16 + BN; stage 1: 6 convs 3x3x16x16; stage 2: 3x3x16x32 + 5 x 3x3x32x32; stage 3: 3x3x32x64 +
  # 5 x 3x3x64x64; 19 BNs of 2 x width; dense 64 x 10 + 10.
  by_hand = (9 * 3 * 16 + 6 * 9 * 16 * 16 + 9 * 16 * 32 + 5 * 9 * 32 * 32 + 9 * 32 * 64 + 5 * 9 * 64 * 64
             + 2 * (16 + 6 * 16 + 6 * 32 + 6 * 64) + 64 * 10 + 10)
  assert resnet.num_params(params) == by_hand == count_by_hand(3, (16, 32, 64), 3, 10) == 269_722
  kinds = [path[-1].key for path, _ in jax.tree.flatten_with_path(params)[0]]
  assert kinds.count("kernel") == 19 + 1 and kinds.count("scale") == 19  # 19 conv + BN layers, one dense
  # The narrower CPU variants: the count depends on the input channels only, not on H x W.
  half = resnet.make(num_classes=10, width=0.5)
  assert half.widths == (8, 16, 32)
  n28, n14 = resnet.num_params(shapes(half, (28, 28, 1))), resnet.num_params(shapes(half, (14, 14)))
  assert n28 == n14 == count_by_hand(1, (8, 16, 32), 3, 10)
  assert jax.eval_shape(half.apply, shapes(half, (14, 14, 1)), jnp.zeros((5, 14, 14, 1))).shape == (5, 10)


def test_init_draws_he_normal_kernels_and_identity_batchnorm():
  model = resnet.make(width=1.0)
  params = model.init(jax.random.key(3), (8, 8, 3))
  kernel = np.asarray(params["stage3_block2"]["conv2"]["kernel"])  # 3x3x64x64: 36,864 draws
  assert abs(kernel.mean()) < 4 * np.sqrt(2 / 576) / np.sqrt(kernel.size)
  assert kernel.std() == pytest.approx(np.sqrt(2 / 576), rel=0.02)  # N(0, 2 / fan_in), fan_in = 3 x 3 x 64
  np.testing.assert_array_equal(params["stage1_block1"]["bn2"]["scale"], 1.0)
  np.testing.assert_array_equal(params["head"]["bias"], 0.0)
  again = model.init(jax.random.key(3), (8, 8, 3))
  other = model.init(jax.random.key(4), (8, 8, 3))
  np.testing.assert_array_equal(again["stem_conv"]["kernel"], params["stem_conv"]["kernel"])
  assert not np.array_equal(other["stem_conv"]["kernel"], params["stem_conv"]["kernel"])


# ---------------------------------------------------------------------------------------------------------------
# An independent forward pass: numpy, float64, im2col convolutions.


def conv_np(x, kernel, stride):
  """3x3 cross-correlation with one zero on every side, then every stride-th output row and column."""
  n, h, w, c = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  patches = np.stack([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=3)  # [N, H, W, 9, C]
  return np.einsum("nhwkc,kco->nhwo", patches, kernel.reshape(9, c, -1))[:, ::stride, ::stride]


def resnet_np(params, x, stats=None):
  """Logits of the ResNet and the BatchNorm statistics it used ({layer: {'mean', 'var'}}, nested like Flax's).

  stats None: every BN uses its input's batch mean and biased variance over (N, H, W); else the given ones.
  """
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  used = {}

  def bn(z, p, *path):
    if stats is None:
      mean, var = z.mean(axis=(0, 1, 2)), z.var(axis=(0, 1, 2))
    else:
      node = stats
      for k in path:
        node = node[k]
      mean, var = np.asarray(node["mean"], np.float64), np.asarray(node["var"], np.float64)
    node = used
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = {"mean": mean, "var": var}
    return (z - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]

  relu = lambda z: np.maximum(z, 0.0)
  x = np.asarray(x, np.float64)
  x = relu(bn(conv_np(x, params["stem_conv"]["kernel"], 1), params["stem_bn"], "stem_bn"))
  num_blocks = sum(k.startswith("stage1_") for k in params)
  for s in (1, 2, 3):
    for b in range(1, num_blocks + 1):
      name, stride = f"stage{s}_block{b}", (2 if s > 1 and b == 1 else 1)
      p = params[name]
      y = relu(bn(conv_np(x, p["conv1"]["kernel"], stride), p["bn1"], name, "bn1"))
      y = bn(conv_np(y, p["conv2"]["kernel"], 1), p["bn2"], name, "bn2")
      shortcut = x[:, ::stride, ::stride]
      pad = y.shape[-1] - shortcut.shape[-1]
      x = relu(y + np.concatenate([shortcut, np.zeros(shortcut.shape[:-1] + (pad,))], axis=-1))
  return x.mean(axis=(1, 2)) @ params["head"]["kernel"] + params["head"]["bias"], used


def _all_modes(model, params, x, calibration_x):
  """(training-mode logits, statistics of x, logits of x with the statistics of calibration_x, and with x's own)."""
  stats = model.statistics(params, x)
  calibrated = model.apply_with(params, model.statistics(params, calibration_x), x)
  return model.apply(params, x), stats, calibrated, model.apply_with(params, stats, x)


def _perturbed(rng, params, scale):
  """params + scale N(0, 1) noise, float32, drawn by numpy (no random-number kernel to compile per leaf)."""
  return jax.tree.map(lambda p: (p + scale * rng.normal(size=p.shape)).astype(np.float32), params)


@pytest.fixture(scope="module")
def tiny():
  """2 blocks per stage (every kind of block ResNet-20 has) at width 1/8 (2, 4, 8 channels), BN not (1, 0)."""
  model = resnet.make(num_classes=3, width=0.125, blocks_per_stage=2)
  rng = np.random.default_rng(0)
  params = _perturbed(rng, model.init(jax.random.key(0), (9, 9, 2)), 0.3)
  # 9 x 9 inputs: odd sizes (9 -> 5 -> 3) check that stride 2 keeps rows 0, 2, 4, ... in the convs and shortcuts.
  x = rng.uniform(size=(5, 9, 9, 2))
  calibration_x = rng.uniform(size=(7, 9, 9, 2)) * 1.5 + 0.2
  return model, params, x, calibration_x


def test_forward_statistics_and_evaluation_mode_equal_a_float64_numpy_reference(tiny, x64):
  model, params, x, calibration_x = tiny
  logits_ref, stats_ref = resnet_np(params, x)
  _, calibration_stats = resnet_np(params, calibration_x)
  calibrated_ref, _ = resnet_np(params, x, stats=calibration_stats)
  assert np.abs(calibrated_ref - logits_ref).max() > 1e-2  # the statistics matter for this check
  # float64 here; float32 against this reference in the merging test below.
  p = jax.tree.map(lambda a: a.astype(jnp.float64), params)
  train, stats, calibrated, own = jax.jit(_all_modes, static_argnums=0)(model, p, x, calibration_x)
  np.testing.assert_allclose(train, logits_ref, rtol=1e-10, atol=1e-10)
  # The statistics are those of each BN's input on the batch, computed layer after layer in training mode.
  assert jax.tree.structure(stats) == jax.tree.structure(stats_ref)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), stats, stats_ref)
  # Evaluation mode uses the given statistics; with the batch's own ones it is training mode again.
  np.testing.assert_allclose(calibrated, calibrated_ref, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(own, train, rtol=1e-10, atol=1e-10)


def test_training_losses_use_the_batch_statistics_of_the_whole_batch(tiny, x64):
  model, params, x, _ = tiny
  y = np.array([0, 1, 2, 1, 0])
  membership = np.array([[1, 0], [0, 1], [1, 1], [0, 1], [1, 0]], np.float64)  # example 2 is in both tasks
  logits, _ = resnet_np(params, x)  # one pass over all 5 examples: statistics of the whole batch
  ce = -(logits - np.log(np.exp(logits).sum(axis=1, keepdims=True)))[np.arange(5), y]
  p = jax.tree.map(lambda a: a.astype(jnp.float64), params)
  losses = jax.jit(lambda p, b: (resnet.mean_cross_entropy(model, p, b[:2]), resnet.task_cross_entropies(model, p, b)))
  mean, per_task = losses(p, (x, y, membership))
  np.testing.assert_allclose(mean, ce.mean(), rtol=1e-10)
  np.testing.assert_allclose(per_task, [ce[[0, 2, 4]].mean(), ce[[1, 2, 3]].mean()], rtol=1e-10)


def test_each_merged_model_is_evaluated_with_its_own_recomputed_statistics(tiny):
  model, base, x, calibration_x = tiny
  rng = np.random.default_rng(5)
  means = [_perturbed(rng, base, 0.2) for _ in range(3)]
  precisions = [jax.tree.map(lambda p: np.exp(rng.normal(size=p.shape)).astype(np.float32), base) for _ in range(3)]
  posteriors = bmerge.stack([bmerge.DiagGaussian(m, h) for m, h in zip(means, precisions)])
  alphas = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], np.float32)
  eval_fn = resnet.make_eval_fn(model, lambda logits: logits)  # the logits themselves: the strictest metric
  batch = (jnp.asarray(calibration_x, jnp.float32), jnp.asarray(x, jnp.float32))
  out = bmerge.preview(merge.hessian_weighted, posteriors, alphas, eval_fn, batch, chunk_size=4, progress=False)
  assert out.shape == (5, 5, 3)
  # Batching the convolutions over models instead of mapping over them gives the same numbers.
  batched = resnet.make_eval_fn(model, lambda logits: logits, map_over_models=False)
  params = merge.hessian_weighted(posteriors, alphas[3:])
  np.testing.assert_allclose(jax.jit(jax.vmap(batched, in_axes=(0, None)))(params, batch), out[3:], rtol=1e-4,
                             atol=1e-4)
  # A one-hot alpha is that task's model, statistics included: evaluated alone, by the same rule.
  for t in range(3):
    np.testing.assert_allclose(out[t], jax.jit(eval_fn)(means[t], batch), rtol=1e-5, atol=1e-5)
  # Inside the vmapped chunk every merged model gets the statistics of its own weights on the calibration batch:
  # the float64 reference merges (Eq. 10 with a diagonal H) and recomputes them for that merged model alone.
  for g in (3, 4):
    a = alphas[g].astype(np.float64)[:, None]
    merged = jax.tree.map(lambda *mh: ((a * np.stack(mh[3:]).reshape(3, -1) * np.stack(mh[:3]).reshape(3, -1)).sum(0)
                                       / (a * np.stack(mh[3:]).reshape(3, -1)).sum(0)).reshape(mh[0].shape),
                          *means, *precisions)
    _, own_stats = resnet_np(merged, calibration_x)
    expect, _ = resnet_np(merged, x, stats=own_stats)
    np.testing.assert_allclose(out[g], expect, rtol=2e-4, atol=2e-4)
    # Statistics of another model (task 1's) give other logits: the policy is what the test pins down.
    _, task1_stats = resnet_np(means[0], calibration_x)
    assert np.abs(resnet_np(merged, x, stats=task1_stats)[0] - expect).max() > 1e-2


def test_vmap_of_a_one_model_at_a_time_function_is_a_map_with_the_same_values():
  fn = lambda a, b: {"s": jnp.sin(a["w"]) @ b, "t": jnp.sum(b) * a["v"]}
  mapped = resnet._one_model_at_a_time(fn)
  rng = np.random.default_rng(0)
  a = {"w": jnp.asarray(rng.normal(size=(4, 2, 3))), "v": jnp.asarray(rng.normal(size=(4,)))}
  b = jnp.asarray(rng.normal(size=(4, 3)))
  for in_axes, args in [((0, None), (a, b[0])), ((None, 0), (jax.tree.map(lambda x: x[0], a), b)), ((0, 0), (a, b))]:
    expect = jax.vmap(fn, in_axes=in_axes)(*args)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), jax.vmap(mapped, in_axes=in_axes)(*args),
                 expect)
    assert "scan" in str(jax.make_jaxpr(jax.vmap(mapped, in_axes=in_axes))(*args))  # lax.map, not a batched body


def test_accuracies_count_a_shared_class_in_both_of_its_tasks():
  y = np.array([0, 5, 5, 3, 4, 9])
  logits = jax.nn.one_hot(np.array([0, 5, 1, 3, 7, 9]), 10)  # wrong on examples 2 and 4
  membership = data.task_membership(y, data.CIFAR10_TASKS)  # class 5 is in tasks 2 and 3
  acc = resnet.accuracies(logits, jnp.asarray(y), jnp.asarray(membership))
  # Overall 4/6; task 1 {0, 1, 8, 9}: examples 0 and 5, both right; task 2 {3, 5}: examples 1, 2, 3 -> 2/3;
  # task 3 {4, 5, 6, 7}: examples 1, 2, 4 -> 1/3.
  np.testing.assert_allclose(acc, [4 / 6, 1.0, 2 / 3, 1 / 3], rtol=1e-6)


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="width"):
    resnet.make(width=0)
  with pytest.raises(ValueError, match="num_classes"):
    resnet.make(num_classes=0)
  with pytest.raises(ValueError, match="blocks_per_stage"):
    resnet.make(blocks_per_stage=2.5)
  with pytest.raises(ValueError, match="num_classes"):
    resnet.make(num_classes=True)
  # numpy integers (a config read from an array) are integers, stored as Python ints
  m = resnet.make(num_classes=np.int64(4), blocks_per_stage=np.int32(1))
  assert (m.num_classes, m.blocks_per_stage) == (4, 1) and type(m.num_classes) is int
  with pytest.raises(TypeError, match="model"):
    resnet.make_eval_fn(lambda p, x: x, resnet.accuracies)
  with pytest.raises(TypeError, match="metric_fn"):
    resnet.make_eval_fn(resnet.make(), None)
