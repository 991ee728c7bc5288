"""What the learner drivers report about their runs (FitInfo, warnings) against brute-force recomputations, and the
small usability checks around them: pytree mismatches named by path, the posteriors' dtypes."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bmerge
from bmerge import _checks
from bmerge import curvature
from bmerge import fit
from bmerge import optim

# ---------------------------------------------------------------------------------------------------------------
# A least-squares problem: the loss is a quadratic in the params.

N, STEPS, EVERY = 128, 10, 4  # 10 steps in windows of 4: [0, 4), [4, 8), [8, 10)
X = jnp.asarray(np.random.default_rng(0).normal(size=(N, 3)) * [0.5, 1.0, 2.0], jnp.float32)
Y = X @ jnp.array([1.0, -1.0, 0.5])
P0 = {"w": jnp.zeros(3), "b": jnp.zeros(())}


def _loss(p, idx):
  return 0.5 * jnp.mean((X[idx] @ p["w"] + p["b"] - Y[idx]) ** 2)


def _indices(seed=1, steps=STEPS, batch=16):
  return np.random.default_rng(seed).integers(0, N, size=(steps, batch))


def _windows(losses, every):
  """The mean of every `every` consecutive losses (the last window may be shorter)."""
  return np.array([np.mean(losses[i:i + every]) for i in range(0, len(losses), every)])


def _distance(a, b):
  return np.sqrt(sum(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)
                     for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def _stats(tree):
  flat = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])
  return np.array([flat.min(), np.median(flat), flat.max()])


def test_ivon_loss_curve_and_distance_equal_a_hand_written_loop():
  ess, lr, wd, beta2, mc = float(N), 0.05, 1e-3, 0.9, 2
  tx = optim.ivon(lr, ess, beta2=beta2, weight_decay=wd)
  params, state, losses = P0, tx.init(P0), []
  h0 = state.hess
  for k, idx in zip(jax.random.split(jax.random.key(3), STEPS), _indices()):  # fit.ivon's steps, spelled out
    samples, noise = optim.ivon_sample(k, state, params, ess, wd, mc)
    sample_losses, grads = jax.vmap(jax.value_and_grad(_loss), in_axes=(0, None))(samples, idx)
    losses.append(float(jnp.mean(sample_losses)))
    updates, state = tx.update(grads, state, params, noise=noise)
    params = optax.apply_updates(params, updates)
  q, info = fit.ivon(jax.random.key(3), _loss, P0, _indices(), ess=ess, learning_rate=lr, weight_decay=wd,
                     beta2=beta2, mc_samples=mc, log_every=EVERY, return_info=True)
  np.testing.assert_allclose(info.loss, _windows(losses, EVERY), rtol=1e-5)
  assert info.loss_steps.tolist() == [4, 8, 10]
  np.testing.assert_allclose(info.distance, _distance(q.mean, P0), rtol=1e-5)
  np.testing.assert_allclose(info.distance, _distance(params, P0), rtol=1e-4)
  np.testing.assert_allclose(info.hess_start, _stats(h0), rtol=1e-6)
  np.testing.assert_allclose(info.hess_end, _stats(jax.tree.map(lambda p: p / ess - wd, q.precision)), rtol=1e-4)
  assert int(info.nonfinite_loss) == int(info.nonfinite_update) == int(info.nonfinite_data) == 0
  assert int(info.first_nonfinite_step) == int(info.first_nonfinite_batch) == int(info.first_nonfinite_data) == -1
  # The default log_every keeps about 100 points: 250 steps -> windows of 3, the last one of 1.
  _, long = fit.ivon(jax.random.key(3), _loss, P0, _indices(steps=250), ess=ess, learning_rate=lr, return_info=True)
  assert long.loss.shape == (84,) and long.loss_steps[-2:].tolist() == [249, 250]


def test_adamw_sg_loss_curve_distance_and_fisher_statistics_equal_brute_force():
  logits_fn = lambda p, x: x @ p["w"] + p["b"]
  y = jnp.asarray(np.argmax(np.asarray(X) @ np.array([[1.0, 0, -1], [0, 1, 0], [-1, 0, 1]]), axis=1), jnp.int32)
  loss = lambda p, idx: optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, X[idx]), y[idx]).mean()
  p0 = {"w": 0.1 * jnp.ones((3, 3)), "b": jnp.zeros(3)}
  tx, params, losses = optax.adamw(0.05, weight_decay=1e-2), p0, []
  state = tx.init(params)
  for idx in _indices():
    value, grads = jax.value_and_grad(loss)(params, idx)
    losses.append(float(value))
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  q, info = fit.adamw_sg(jax.random.key(0), loss, p0, _indices(), learning_rate=0.05, weight_decay=1e-2,
                         fisher_data=(X, y), logits_fn=logits_fn, log_every=EVERY, return_info=True)
  np.testing.assert_allclose(info.loss, _windows(losses, EVERY), rtol=1e-5)
  np.testing.assert_allclose(info.distance, _distance(params, p0), rtol=1e-4)
  nll = lambda p, x, t: -jax.nn.log_softmax(logits_fn(p, x[None])[0])[t]  # the Fisher per example, by hand
  fisher = lambda p: jax.tree.map(lambda g: np.mean(np.asarray(g, np.float64) ** 2, axis=0),
                                  jax.vmap(jax.grad(nll), in_axes=(None, 0, 0))(p, X, y))
  np.testing.assert_allclose(info.hess_start, _stats(fisher(p0)), rtol=1e-4)
  np.testing.assert_allclose(info.hess_end, _stats(fisher(q.mean)), rtol=1e-3, atol=1e-6)


def test_stream_and_scanned_forms_give_the_same_info():
  kw = dict(ess=float(N), learning_rate=0.05, mc_samples=2, log_every=3, return_info=True)
  _, scanned = fit.ivon(jax.random.key(5), _loss, P0, _indices(), **kw)
  _, listed = fit.ivon(jax.random.key(5), _loss, P0, list(_indices()), **kw)
  _, streamed = fit.ivon(jax.random.key(5), _loss, P0, iter(_indices()), num_steps=STEPS, **kw)
  chex.assert_trees_all_close(listed, scanned, rtol=1e-5)
  chex.assert_trees_all_close(streamed, scanned, rtol=1e-5)
  mkw = dict(num_seeds=2, stop_steps=[4, STEPS], **kw)
  _, m_scanned = fit.multi_ivon(jax.random.key(5), _loss, P0, _indices(), **mkw)
  _, m_listed = fit.multi_ivon(jax.random.key(5), _loss, P0, list(_indices()), **mkw)
  chex.assert_trees_all_close(m_listed, m_scanned, rtol=1e-5)
  assert m_scanned.loss.shape == (2, 4) and m_scanned.distance.shape == (2,)


def test_multi_ivon_info_is_each_seeds_run_at_its_last_stop():
  kw = dict(ess=float(N), learning_rate=0.05, log_every=EVERY)
  mix, info = fit.multi_ivon(jax.random.key(2), _loss, P0, _indices(), num_seeds=2, stop_steps=[5, STEPS],
                             return_info=True, **kw)
  for j, seed_key in enumerate(jax.random.split(jax.random.key(2), 2)):
    k_init, k_train = jax.random.split(seed_key)
    order = np.asarray(jax.random.permutation(k_init, STEPS))
    q, alone = fit.ivon(k_train, _loss, P0, _indices()[order], return_info=True, **kw)
    chex.assert_trees_all_close(jax.tree.map(lambda x, j=j: x[j], info), alone, rtol=1e-5)
    np.testing.assert_allclose(info.distance[j], _distance(jax.tree.map(lambda x, j=j: x[2 * j + 1],
                                                                        mix.components.mean), P0), rtol=1e-5)


def test_vmapped_drivers_return_info_per_task_and_stay_silent():
  idx = jnp.stack([jnp.asarray(_indices(1)), jnp.asarray(_indices(2))])
  one = lambda b: fit.ivon(jax.random.key(0), _loss, P0, b, ess=float(N), learning_rate=0.05, return_info=True)
  with warnings.catch_warnings():
    warnings.simplefilter("error", fit.FitWarning)
    _, both = jax.jit(jax.vmap(one))(idx)
  _, second = one(idx[1])
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[1], both), second, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Non-finite values: counted on the device, reported with the step and the batch.


def _float_batches(bad_step=None):
  """Batches that carry their data: (x [STEPS, 16, 3], y [STEPS, 16]), with a NaN in x at `bad_step`."""
  idx = _indices()
  x, y = np.asarray(X)[idx], np.asarray(Y)[idx]
  if bad_step is not None:
    x[bad_step, 3, 1] = np.nan
  return x, y


def _data_loss(p, batch):
  x, y = batch
  return 0.5 * jnp.mean((x @ p["w"] + p["b"] - y) ** 2)


@pytest.mark.parametrize("form", ["scanned", "listed"])
def test_a_nan_in_batch_k_is_reported_at_step_k(form):
  k = 6
  x, y = _float_batches(k)
  batches = (x, y) if form == "scanned" else list(zip(x, y))
  with pytest.warns(fit.NonFiniteWarning) as record:
    _, info = fit.ivon(jax.random.key(0), _data_loss, P0, batches, ess=float(N), learning_rate=0.05,
                       return_info=True)
  assert int(info.first_nonfinite_step) == int(info.first_nonfinite_batch) == int(info.first_nonfinite_data) == k
  assert int(info.nonfinite_data) == 1
  assert int(info.nonfinite_loss) == int(info.nonfinite_update) == STEPS - k  # the NaN reaches the params, then stays
  messages = " | ".join(str(r.message) for r in record)
  assert f"1 of {STEPS} training batches hold NaN or inf (the first: batch {k})" in messages
  assert f"the loss turned non-finite at step {k} (batch {k})" in messages
  assert all(r.filename == __file__ for r in record)  # the warning points at the caller's line


def test_multi_ivon_names_the_batch_and_each_seeds_step_of_a_nan():
  k = 6
  with pytest.warns(fit.NonFiniteWarning) as record:
    _, info = fit.multi_ivon(jax.random.key(4), _data_loss, P0, _float_batches(k), num_seeds=2, stop_steps=[STEPS],
                             ess=float(N), learning_rate=0.05, return_info=True)
  messages = [str(r.message) for r in record]
  for j, seed_key in enumerate(jax.random.split(jax.random.key(4), 2)):  # seeds visit the batches in their own order
    order = np.asarray(jax.random.permutation(jax.random.split(seed_key)[0], STEPS))
    step = int(np.flatnonzero(order == k)[0])
    assert int(info.first_nonfinite_batch[j]) == int(info.first_nonfinite_data[j]) == k
    assert int(info.first_nonfinite_step[j]) == step
    assert any(m.startswith(f"fit.multi_ivon (seed {j}): the loss turned non-finite at step {step} (batch {k})")
               for m in messages)


def test_a_huge_learning_rate_warns_about_the_non_finite_loss_and_names_it():
  x, y = _float_batches()
  with pytest.warns(fit.NonFiniteWarning, match=r"the loss turned non-finite at step \d+ .*learning_rate=1e\+20: try "
                                                r"a smaller learning_rate"):
    q = fit.ivon(jax.random.key(0), _data_loss, P0, (x, y), ess=float(N), learning_rate=1e20)
  assert isinstance(q, bmerge.DiagGaussian)  # without return_info: the posterior alone, and still the warning
  with pytest.warns(fit.NonFiniteWarning, match=r"fit.adamw_sg: the loss turned non-finite.*learning_rate=1e\+30"):
    fit.adamw_sg(jax.random.key(0), _loss, P0, _indices(), learning_rate=1e30, fisher_data=(X, jnp.zeros(N, jnp.int32)),
                 logits_fn=lambda p, x: jnp.stack([x @ p["w"] + p["b"], jnp.zeros(x.shape[0])], -1))


def test_a_stream_reports_a_non_finite_loss_while_it_runs():
  x, y = (np.concatenate([a, b, b]) for a, b in zip(_float_batches(2), _float_batches()))  # 30 steps, NaN at 2
  warned_before = []  # the warnings seen when batch i is drawn

  def stream():
    for i in range(3 * STEPS):
      warned_before.append(len(record))
      yield x[i], y[i]

  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    fit.ivon(jax.random.key(0), _data_loss, P0, stream(), num_steps=3 * STEPS, ess=float(N), learning_rate=0.05,
             log_every=4)
  loss = [r for r in record if "the loss turned non-finite at step 2 (batch 2)" in str(r.message)]
  assert len(loss) == 1  # once, not again at the end
  # Read every max(log_every, 10) = 10 steps: after the 10th, while the stream still runs (data and loss warnings).
  assert warned_before[9] == 0 and warned_before[10] == 2


# ---------------------------------------------------------------------------------------------------------------
# The curvature: a Hessian estimate that collapses or explodes is named with the settings to change.


def _isotropic(c):
  return lambda p, idx: 0.5 * c * (jnp.sum(p["w"] ** 2) + p["b"] ** 2) + 0.0 * jnp.sum(idx)


def test_a_collapsing_hessian_warns_naming_beta2_hess_init_and_ess():
  kw = dict(ess=float(N), learning_rate=0.01, mc_samples=4)
  steps = _indices(steps=30)  # with beta2 = 0.5 each step keeps about 0.6 of h while it is far above the curvature
  with pytest.warns(fit.CurvatureWarning, match=r"fit.ivon: beta2=0.5, hess_init=1, ess=128, learning_rate=0.01: the "
                                                r"Hessian estimate fell from 1 to [0-9.e-]+ .*try beta2 closer to 1"
                    ) as fresh:
    _, info = fit.ivon(jax.random.key(0), _isotropic(1e-4), P0, steps, beta2=0.5, return_info=True, **kw)
  assert info.hess_end[1] < 1e-2 * info.hess_start[1]
  assert "pass their IVON posterior as init_posterior" in str(fresh[0].message)  # a fresh run: where h started
  q_pre = bmerge.DiagGaussian(P0, jax.tree.map(lambda p: jnp.full_like(p, 2.0 * N), P0))  # h = 2 - wd
  with pytest.warns(fit.CurvatureWarning, match=r"fell from 2 to") as warm:
    fit.ivon(jax.random.key(0), _isotropic(1e-4), P0, steps, beta2=0.5, init_posterior=q_pre, **kw)
  assert "init_posterior" not in str(warm[0].message)
  with pytest.warns(fit.CurvatureWarning, match=r"rose from 1 to .*try a hess_init closer to the loss's curvature"):
    fit.ivon(jax.random.key(0), _isotropic(1e4), P0, steps, beta2=0.5, **kw)
  with warnings.catch_warnings():  # beta2 close to 1 keeps the estimate: nothing to warn about
    warnings.simplefilter("error", fit.FitWarning)
    _, kept = fit.ivon(jax.random.key(0), _isotropic(1e-4), P0, steps, beta2=0.999, return_info=True, **kw)
  assert kept.hess_end[1] > 0.9 * kept.hess_start[1]


# ---------------------------------------------------------------------------------------------------------------
# Smaller checks: pytree mismatches by path, the posteriors' dtypes.


def test_mismatched_pytrees_name_their_first_differing_path():
  mean = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  precision = {"dense": {"kernel": jnp.ones((2, 2))}}
  with pytest.raises(ValueError, match=r"first differ at mean\['dense'\]\['bias'\] vs precision\['dense'\]\['kernel'\]"):
    _checks.same_structure(mean, precision, name_a="mean", name_b="precision")
  with pytest.raises(ValueError, match=r"precision\['dense'\]\['out'\] has no counterpart in `mean`"):
    _checks.same_structure(mean, {"dense": {**mean["dense"], "out": jnp.ones(1)}}, name_a="mean", name_b="precision")
  with pytest.raises(ValueError, match=r"same paths but their containers differ"):
    _checks.same_structure((1.0, 2.0), [1.0, 2.0], name_a="a", name_b="b")
  with pytest.raises(ValueError, match=r"^((?!PyTreeDef).)*$"):  # no whole PyTreeDef printed for a missing key
    _checks.same_structure(mean, precision, name_a="mean", name_b="precision")


def test_bfloat16_params_give_a_bfloat16_mean_and_a_float32_precision():
  p16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), P0)
  loss = lambda p, idx: _loss(jax.tree.map(lambda a: a.astype(jnp.float32), p), idx)
  dtypes = lambda q: jax.tree.map(lambda a: a.dtype, (q.mean, q.precision))
  want = (jax.tree.map(lambda _: jnp.bfloat16, P0), jax.tree.map(lambda _: jnp.float32, P0))
  kw = dict(ess=float(N), learning_rate=0.05)
  assert dtypes(fit.ivon(jax.random.key(0), loss, p16, _indices(), **kw)) == want
  mix = fit.multi_ivon(jax.random.key(0), loss, p16, _indices(), num_seeds=2, stop_steps=[STEPS], **kw)
  assert dtypes(mix.components) == want
  logits_fn = lambda p, x: jnp.stack([x @ p["w"].astype(x.dtype), -(x @ p["w"].astype(x.dtype))], -1) + p["b"]
  y = jnp.asarray(np.asarray(Y) > 0, jnp.int32)
  ce = lambda p, idx: optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, X[idx]), y[idx]).mean()
  q = fit.adamw_sg(jax.random.key(0), ce, p16, _indices(), learning_rate=0.05, fisher_data=(X, y),
                   logits_fn=logits_fn)
  assert dtypes(q) == want
  # The Fisher is summed in float32 at the trained bfloat16 params, widened: as from float32 params of equal values.
  wide = curvature.diagonal_fisher(None, logits_fn, jax.tree.map(lambda a: a.astype(jnp.float32), q.mean), (X, y),
                                   prior_precision=N * 1e-4)
  chex.assert_trees_all_close(q.precision, wide.precision, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The guide's IVON settings on a reduced version of its measured problem (experiments/benchmarks/ivon_settings.py):
# sized to run in well under a minute.


def test_the_guides_ivon_settings_put_the_previews_pick_within_3_points_of_the_exact_best():
  from experiments.benchmarks import ivon_settings  # pylint: disable=g-import-not-at-top
  # Digits in 3 tasks, an MLP 64-16-10 pretrained with beta2 = 0.999, each task finetuned from the pretrained posterior
  # with the default (warm-start) beta2, ess = the task size and lr (hess_init + wd) = 0.01 (the guide's settings).
  p = ivon_settings.make_problem(0, hidden=16, pretrain_steps=400, pretrain_lr=0.2, pretrain_beta2=0.999, steps=100,
                                 batch=32, hess_init=0.5)
  row = ivon_settings.measure(p, "posterior", None, 0.01, p.mean_task_size, spacing=0.5, seed=0, steps=100,
                              hess_init=0.5)
  assert row.warned == "-"  # no diagnostic warning from the finetunes
  assert row.kept > 0.9  # they keep the pretrained curvature (the default warm-start beta2 keeps 95 %)
  assert row.gap <= 3.0, row  # exact accuracy at the preview's best alpha vs the best exact accuracy, in points
