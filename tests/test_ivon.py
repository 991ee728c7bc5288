"""Tests of bmerge.optim.ivon: the reference trajectories, closed forms over many steps, errors, wrappers, devices.

The optax contract (one step against its closed form, purity, jit, vmap, dtypes, inject_hyperparams, MultiSteps) is
checked for every IVON setting by the battery in test_learner_contracts.py.
"""

import json
import math
import os
import shutil
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO, ivon_step, quadratic, run_python

import bmerge
from bmerge import checkpoint
from bmerge.optim import IVONState, find_ivon_state, ivon, ivon_posterior, ivon_predictive, ivon_sample

DATA = os.path.join(os.path.dirname(__file__), "data")
SETTINGS = ("defaults", "mc3_clip", "norescale_nodebias", "gradsq")


# ---------------------------------------------------------------------------------------------------------------
# 1. The reference implementation (ivon-opt 0.1.3), replayed from tests/data/ivon_*.json (tests/data/record_ivon.py).


def _load(setting):
  with open(os.path.join(DATA, f"ivon_{setting}.json")) as f:
    return json.load(f)


def _tx_from(hp):
  clip = math.inf if hp["clip_radius"] is None else hp["clip_radius"]
  return ivon(hp["lr"], hp["ess"], hp["hess_init"], hp["beta1"], hp["beta2"], hp["weight_decay"],
                       clip, hp["rescale_lr"], hp["debias"], hp["hess_approx"])


@pytest.mark.parametrize("setting", SETTINGS)
def test_replays_reference_trajectory(setting, x64):
  data = _load(setting)
  hp = data["hyperparameters"]
  tx = _tx_from(hp)
  arr = lambda t: {k: jnp.asarray(v, jnp.float64) for k, v in t.items()}
  params = arr(data["steps"][0]["params_before"])
  state = tx.init(params)
  update = jax.jit(tx.update)
  h0 = hp["hess_init"]
  max_h_move, neg_h_hat, clipped = 0.0, 0, 0
  for t, step in enumerate(data["steps"]):
    chex.assert_trees_all_close(params, arr(step["params_before"]), atol=1e-10, rtol=0)
    noise, grads = arr(step["noise"]), arr(step["grads"])
    assert all(g.shape[0] == hp["mc_samples"] for g in grads.values())
    if hp["hess_approx"] == "price":  # the correction term of the h update only matters when h_hat < 0
      neg_h_hat += sum(int(jnp.sum(hp["ess"] * (state.hess[k] + hp["weight_decay"])
                                   * jnp.mean(noise[k] * grads[k], 0) < 0)) for k in grads)
    updates, state = update(grads, state, params, noise=noise)
    params = optax.apply_updates(params, updates)
    if hp["clip_radius"] is not None:
      lr = hp["lr"] * (h0 + hp["weight_decay"])
      clipped += sum(int(jnp.sum(jnp.abs(u) >= lr * hp["clip_radius"] * (1 - 1e-12))) for u in updates.values())
    chex.assert_trees_all_close(params, arr(step["params_after"]), atol=1e-10, rtol=0)
    chex.assert_trees_all_close(state.hess, arr(step["hess_after"]), atol=1e-10, rtol=0)
    chex.assert_trees_all_close(state.momentum, arr(step["momentum_after"]), atol=1e-10, rtol=0)
    assert int(state.count) == t + 1
    max_h_move = max(max_h_move, max(float(jnp.max(jnp.abs(h - h0))) for h in state.hess.values()))
  # The recordings are only worth replaying if every term is exercised.
  assert max_h_move > 0.05, "h barely moved: the Hessian update is untested"
  if hp["hess_approx"] == "price":
    assert neg_h_hat > 0
  if hp["clip_radius"] is not None:
    n = sum(np.size(v) for v in updates.values()) * len(data["steps"])
    assert 0 < clipped < n, "clipping must be active for some entries and not all"


def test_reference_settings_differ_in_what_they_test():
  hps = {s: _load(s)["hyperparameters"] for s in SETTINGS}
  assert hps["mc3_clip"]["mc_samples"] == 3 and hps["mc3_clip"]["clip_radius"] is not None
  assert not hps["norescale_nodebias"]["rescale_lr"] and not hps["norescale_nodebias"]["debias"]
  assert hps["gradsq"]["hess_approx"] == "gradsq"
  assert hps["defaults"]["mc_samples"] == 1 and hps["defaults"]["rescale_lr"] and hps["defaults"]["debias"]


# ---------------------------------------------------------------------------------------------------------------
# 2. Closed forms over many steps (one step of each setting: test_learner_contracts.py).


def test_fixed_point_is_the_exact_gaussian_posterior_of_a_quadratic(x64):
  # loss(theta) = 1/2 sum a (theta - c)^2 per example, so the exact posterior of ess * loss with the prior
  # N(0, 1/(ess delta)) is N(a c / (a + delta), 1/(ess (a + delta))). With antithetic noise +-1/sqrt(ess (h + delta))
  # the price estimate is exactly h_hat = a and g_bar is the gradient at the mean, so IVON must converge to it.
  (a, c), loss = quadratic(), quadratic().loss
  ess, wd = 50.0, 0.1
  tx = ivon(0.05, ess, hess_init=0.3, beta2=0.99, weight_decay=wd)
  params = jax.tree.map(jnp.zeros_like, c)
  signs = jnp.array([1.0, -1.0])

  def step(carry, _):
    params, state = carry
    noise = jax.tree.map(lambda h: signs.reshape((2,) + (1,) * h.ndim) / jnp.sqrt(ess * (h + wd)), state.hess)
    samples = jax.tree.map(lambda p, n: p + n, params, noise)
    grads = jax.vmap(jax.grad(loss))(samples)
    updates, state = tx.update(grads, state, params, noise=noise)
    return (optax.apply_updates(params, updates), state), None

  (params, state), _ = jax.lax.scan(step, (params, tx.init(params)), length=3000)
  q = ivon_posterior(params, state, ess, wd)
  chex.assert_trees_all_close(state.hess, a, atol=1e-8)
  chex.assert_trees_all_close(q.mean, jax.tree.map(lambda a, c: a * c / (a + wd), a, c), atol=1e-8)
  chex.assert_trees_all_close(q.precision, jax.tree.map(lambda a: ess * (a + wd), a), atol=1e-6)


def test_random_sampling_estimates_the_curvature_without_bias():
  # E[n g] = a / (ess (h + delta)) for g = a (m + n - c), so h_hat is unbiased for a; time-averaged h ≈ a.
  (a, c), loss = quadratic(), quadratic().loss
  ess, wd = 100.0, 1e-4
  tx = ivon(0.05, ess, hess_init=1.0, beta2=0.995, weight_decay=wd)
  params = jax.tree.map(jnp.zeros_like, c)

  def step(carry, key):
    params, state = carry
    samples, noise = ivon_sample(key, state, params, ess, wd, num_samples=4)
    grads = jax.vmap(jax.grad(loss))(samples)
    updates, state = tx.update(grads, state, params, noise=noise)
    return (optax.apply_updates(params, updates), state), state.hess

  keys = jax.random.split(jax.random.key(0), 2000)
  (params, _), hs = jax.lax.scan(step, (params, tx.init(params)), keys)
  h_avg = jax.tree.map(lambda h: jnp.mean(h[1000:], axis=0), hs)
  chex.assert_trees_all_close(h_avg, a, rtol=0.1)
  chex.assert_trees_all_close(params, jax.tree.map(lambda a, c: a * c / (a + wd), a, c), atol=0.05)


def test_grads_without_mc_axis_mean_one_sample():
  tx = ivon(0.1, 10.0, beta2=0.9)
  params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
  grads = {"a": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([[0.5, 1.0], [-1.0, 2.0]])}
  noise = {"a": jnp.array([0.1, 0.2, -0.1]), "b": jnp.array([[0.3, -0.2], [0.1, 0.05]])}
  state = tx.init(params)
  plain = tx.update(grads, state, params, noise=noise)
  with_axis = tx.update(jax.tree.map(lambda x: x[None], grads), state, params,
                        noise=jax.tree.map(lambda x: x[None], noise))
  chex.assert_trees_all_equal(plain, with_axis)


# ---------------------------------------------------------------------------------------------------------------
# 3. Boundary errors.


@pytest.mark.parametrize("kwargs, name", [
    (dict(ess=0.0), "ess"), (dict(ess=-1.0), "ess"), (dict(hess_init=0.0), "hess_init"),
    (dict(beta1=1.0), "beta1"), (dict(beta1=-0.1), "beta1"), (dict(beta2=1.0), "beta2"),
    (dict(clip_radius=0.0), "clip_radius"), (dict(weight_decay=-1e-3), "weight_decay"),
    (dict(learning_rate=-0.1), "learning_rate"), (dict(hess_approx="fisher"), "hess_approx"),
    (dict(ess=float("nan")), "ess"),
])
def test_invalid_hyperparameters_name_the_argument(kwargs, name):
  args = dict(learning_rate=0.1, ess=10.0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=f"`{name}`"):
    ivon(**args)


def test_update_errors_name_the_argument():
  tx = ivon(0.1, 10.0)
  params = {"a": jnp.ones(3)}
  state = tx.init(params)
  g = {"a": jnp.ones((2, 3))}
  with pytest.raises(ValueError, match="`noise`"):
    tx.update(g, state, params)
  with pytest.raises(ValueError, match="`noise`"):
    tx.update(g, state, params, noise={"a": jnp.ones((3, 3))})
  with pytest.raises(ValueError, match="`params`"):
    tx.update(g, state, None, noise=g)
  with pytest.raises(ValueError, match="`grads`"):
    tx.update({"a": jnp.ones((2, 4))}, state, params, noise=g)
  with pytest.raises(ValueError, match="`grads`"):
    tx.update({"b": jnp.ones((2, 3))}, state, params, noise=g)


# ---------------------------------------------------------------------------------------------------------------
# 4. Schedules, wrappers and Flax params (the optax battery: test_learner_contracts.py).


def test_learning_rate_schedule_uses_the_step_count():
  params, loss = quadratic().start(), quadratic().loss
  sched = optax.linear_schedule(0.2, 0.0, 4)
  tx = ivon(sched, 10.0, beta2=0.99)
  state, update = tx.init(params), jax.jit(tx.update)
  for t, key in enumerate(jax.random.split(jax.random.key(4), 5)):
    samples, noise = ivon_sample(key, state, params, 10.0, 1e-4, 2)
    grads = jax.vmap(jax.grad(loss))(samples)
    u, new_state = update(grads, state, params, noise=noise)
    u_ref, ref_state = jax.jit(ivon(float(sched(t)), 10.0, beta2=0.99).update)(grads, state, params,
                                                                                       noise=noise)
    chex.assert_trees_all_close(u, u_ref, rtol=1e-6)
    chex.assert_trees_all_close(new_state, ref_state)
    params, state = optax.apply_updates(params, u), new_state
  chex.assert_trees_all_close(u, jax.tree.map(jnp.zeros_like, u))  # schedule at 0 after 4 steps


def test_chain_passes_noise_and_find_ivon_state_digs_it_out():
  params, loss = quadratic().start(), quadratic().loss
  tx = ivon(0.1, 10.0)
  chained = optax.chain(optax.identity(), tx, optax.scale(0.5))
  state, cstate = tx.init(params), chained.init(params)
  samples, noise = ivon_sample(jax.random.key(5), cstate, params, 10.0, 1e-4, 2)
  grads = jax.vmap(jax.grad(loss))(samples)
  u, state = tx.update(grads, state, params, noise=noise)
  cu, cstate = jax.jit(chained.update)(grads, cstate, params, noise=noise)
  chex.assert_trees_all_close(cu, jax.tree.map(lambda x: 0.5 * x, u), rtol=1e-6)
  chex.assert_trees_all_close(find_ivon_state(cstate), state, rtol=1e-6)
  wrapped = optax.inject_hyperparams(ivon)(learning_rate=0.1, ess=10.0).init(params)
  assert isinstance(find_ivon_state(wrapped), IVONState)
  with pytest.raises(ValueError, match="`opt_state`"):
    find_ivon_state(optax.adam(0.1).init(params))


def test_flax_linen_params_and_nnx_state():
  import flax.linen as nn
  from flax import nnx

  x = jax.random.normal(jax.random.key(0), (64, 3))
  y = x @ jnp.array([1.0, -2.0, 0.5]) + 0.3
  ess, wd = 64.0, 1e-4
  tx = ivon(0.05, ess, beta2=0.999, weight_decay=wd)

  def fit(params, apply_fn):
    loss = lambda p: jnp.mean((apply_fn(p, x)[:, 0] - y) ** 2)
    step = jax.jit(ivon_step(tx, loss, ess, wd))
    state, start = tx.init(params), loss(params)
    for key in jax.random.split(jax.random.key(1), 200):
      params, state = step(key, params, state)
    q = ivon_posterior(params, state, ess, wd)
    assert jax.tree.structure(q.precision) == jax.tree.structure(params)
    chex.assert_trees_all_close(q.precision, jax.tree.map(lambda h: ess * (h + wd), state.hess))
    assert loss(q.mean) < 0.05 * start  # IVON fits the linear regression
    return q

  linen = nn.Dense(1)
  q = fit(linen.init(jax.random.key(2), x)["params"], lambda p, x: linen.apply({"params": p}, x))
  np.testing.assert_allclose(q.mean["kernel"][:, 0], [1.0, -2.0, 0.5], atol=0.1)

  graphdef, nnx_params = nnx.split(nnx.Linear(3, 1, rngs=nnx.Rngs(3)), nnx.Param)
  q = fit(nnx_params, lambda p, x: nnx.merge(graphdef, p)(x))
  assert isinstance(q.mean, nnx.State)
  np.testing.assert_allclose(q.mean["kernel"][...][:, 0], [1.0, -2.0, 0.5], atol=0.1)


# ---------------------------------------------------------------------------------------------------------------
# 5. Devices: axis_name averages g_bar and nu_bar; jit with a sharded batch needs nothing.


def _regression():
  x = jax.random.normal(jax.random.key(0), (8, 3))
  y = jnp.sin(x.sum(1))
  params = {"w": jnp.array([0.3, -0.2, 0.5]), "b": jnp.array(0.1)}
  loss = lambda p, x, y: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)
  return params, loss, x, y


def test_axis_name_averages_over_a_mapped_axis():
  params, loss, x, y = _regression()
  tx = ivon(0.1, 10.0, beta2=0.9)
  tx_ax = ivon(0.1, 10.0, beta2=0.9, axis_name="data")
  state = tx.init(params)
  samples, noise = ivon_sample(jax.random.key(1), state, params, 10.0, 1e-4, 3)
  grad = jax.vmap(jax.grad(loss), in_axes=(0, None, None))
  full = jax.jit(tx.update)(grad(samples, x, y), state, params, noise=noise)
  shard_grads = jax.vmap(grad, in_axes=(None, 0, 0))(samples, x.reshape(2, 4, 3), y.reshape(2, 4))
  per_shard = jax.jit(jax.vmap(lambda g: tx_ax.update(g, state, params, noise=noise), axis_name="data"))(shard_grads)
  for i in range(2):
    chex.assert_trees_all_close(jax.tree.map(lambda z: z[i], per_shard), full, rtol=1e-5, atol=1e-7)


def test_two_host_devices_shard_map_and_sharded_jit():
  script = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np, optax
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from bmerge.optim import ivon, ivon_sample
      assert jax.device_count() == 2, jax.devices()
      x = jax.random.normal(jax.random.key(0), (8, 3)); y = jnp.sin(x.sum(1))
      params = {"w": jnp.array([0.3, -0.2, 0.5]), "b": jnp.array(0.1)}
      loss = lambda p, x, y: jnp.mean((x @ p["w"] + p["b"] - y) ** 2)
      grad = jax.vmap(jax.grad(loss), in_axes=(0, None, None))
      tx = ivon(0.1, 10.0, beta2=0.9)
      state = tx.init(params)
      samples, noise = ivon_sample(jax.random.key(1), state, params, 10.0, 1e-4, 3)
      ref = tx.update(grad(samples, x, y), state, params, noise=noise)
      mesh = Mesh(np.array(jax.devices()), ("data",))

      tx_ax = ivon(0.1, 10.0, beta2=0.9, axis_name="data")
      f = jax.shard_map(lambda s, n, x, y: tx_ax.update(grad(s, x, y), state, params, noise=n), mesh=mesh,
                        in_specs=(P(), P(), P("data"), P("data")), out_specs=P(),
                        check_vma=False)  # per-device gradients, as under pmap
      out = jax.jit(f)(samples, noise, x, y)
      np.testing.assert_allclose(out[0]["w"], ref[0]["w"], rtol=1e-5)
      np.testing.assert_allclose(out[1].hess["w"], ref[1].hess["w"], rtol=1e-5)

      xs = jax.device_put(x, NamedSharding(mesh, P("data")))
      ys = jax.device_put(y, NamedSharding(mesh, P("data")))
      out = jax.jit(lambda s, n, x, y: tx.update(grad(s, x, y), state, params, noise=n))(samples, noise, xs, ys)
      np.testing.assert_allclose(out[0]["w"], ref[0]["w"], rtol=1e-5)
      np.testing.assert_allclose(out[1].hess["b"], ref[1].hess["b"], rtol=1e-5)
      print("OK")
  """)
  assert "OK" in run_python(script, devices=2, timeout=120)


# ---------------------------------------------------------------------------------------------------------------
# 6. Sampling, posterior and predictive helpers.


def test_ivon_sample_noise_has_the_posterior_scale():
  params = {"a": jnp.zeros(3), "b": jnp.ones((2, 2))}
  tx = ivon(0.1, 25.0, hess_init=0.5)
  state = tx.init(params)
  state = state._replace(hess={"a": jnp.array([0.5, 2.0, 8.0]), "b": jnp.full((2, 2), 3.0)})
  samples, noise = ivon_sample(jax.random.key(0), state, params, 25.0, 0.1, num_samples=20000)
  chex.assert_tree_shape_prefix(samples, (20000,))
  chex.assert_trees_all_close(jax.tree.map(lambda s, p: s - p, samples, params), noise)
  var = jax.tree.map(lambda n: jnp.var(n, axis=0), noise)
  expected = jax.tree.map(lambda h: 1.0 / (25.0 * (h + 0.1)), state.hess)
  chex.assert_trees_all_close(var, expected, rtol=0.05)
  # Leaves draw independent noise even when shaped alike.
  one, one_noise = ivon_sample(jax.random.key(1), state, params, 25.0, 0.1)  # no MC axis
  chex.assert_trees_all_equal_shapes(one, params, one_noise)
  with pytest.raises(ValueError, match="`num_samples`"):
    ivon_sample(jax.random.key(1), state, params, 25.0, 0.1, 0)
  twins = {"a": jnp.zeros(3), "c": jnp.zeros(3)}
  _, n2 = ivon_sample(jax.random.key(0), tx.init(twins), twins, 25.0, 0.1, 2)
  assert not np.allclose(n2["a"], n2["c"])
  q = ivon_posterior(params, state, 25.0, 0.1)
  assert isinstance(q, bmerge.DiagGaussian)
  chex.assert_trees_all_close(q.precision, jax.tree.map(lambda h: 1.0 / h, expected), rtol=1e-6)


def test_predictive_averages_over_posterior_samples():
  params = {"w": jnp.array([[1.0, -1.0, 0.5], [0.2, 0.3, -0.4]])}
  tx = ivon(0.1, 5.0)
  state = tx.init(params)
  x = jnp.array([[1.0, 2.0], [-1.0, 0.5]])
  apply_fn = lambda p, x: x @ p["w"]
  key = jax.random.key(7)
  probs = ivon_predictive(key, apply_fn, params, state, x, ess=5.0, weight_decay=1e-4, num_samples=16)
  samples, _ = ivon_sample(key, state, params, 5.0, 1e-4, 16)
  brute = jnp.mean(jnp.stack([jax.nn.softmax(apply_fn(jax.tree.map(lambda s: s[i], samples), x))
                              for i in range(16)]), 0)
  chex.assert_trees_all_close(probs, brute, rtol=1e-5)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
  raw = ivon_predictive(key, apply_fn, params, state, x, ess=5.0, num_samples=16, transform=None)
  chex.assert_trees_all_close(raw, jnp.mean(jax.vmap(apply_fn, in_axes=(0, None))(samples, x), 0), rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# 7. The IVON block of bmerge/GUIDE.md, verbatim, and its merge.


def test_readme_example():
  guide = open(os.path.join(REPO, "bmerge", "GUIDE.md")).read()
  code = guide.split("<!-- guide-code:")[1].split("```python\n", 1)[1].split("```", 1)[0]
  scope = {"__name__": "guide_ivon"}
  exec(compile(code, "bmerge/GUIDE.md (IVON)", "exec"), scope)
  posteriors, workdir, alphas, merged, stacked, preview = (scope[k] for k in (
      "posteriors", "workdir", "alphas", "merged", "stacked", "preview"))
  ESS, WD = scope["ESS"], scope["WD"]
  assert isinstance(posteriors[0], bmerge.DiagGaussian)
  assert checkpoint.restore_posterior(os.path.join(workdir, "task1"))[1]["task"] == 1
  shutil.rmtree(workdir)

  # One-hot alphas return each task's IVON mean (the merge is exact at the vertices of the simplex).
  for g, alpha in enumerate(np.asarray(alphas)):
    if alpha.max() == 1.0:
      t = int(alpha.argmax())
      chex.assert_trees_all_close(jax.tree.map(lambda m, g=g: m[g], merged), posteriors[t].mean, atol=1e-5, rtol=1e-5)
  # The mid point is the precision-weighted average of the two IVON means (Eq. 10).
  mid = int(np.argmin(np.abs(np.asarray(alphas)[:, 0] - 0.5)))
  h = stacked.precision
  expected = jax.tree.map(lambda m, h: (h[0] * m[0] + h[1] * m[1]) / (h[0] + h[1]), stacked.mean, h)
  chex.assert_trees_all_close(jax.tree.map(lambda m: m[mid], merged), expected, rtol=1e-4, atol=1e-5)
  # IVON learnt curvature: the exported precisions differ from the initial ess * (h0 + delta).
  assert float(jnp.max(jnp.abs(h["Dense_0"]["kernel"] - ESS * (0.5 + WD)))) > 1.0
  assert preview.shape == (alphas.shape[0],) and float(preview.max()) > 0.8
