"""The three learner contracts, one battery each, parametrised over the learners that follow it.

(a) The optax form (IVON): `init` / `update` are pure, run under `jit` and `vmap`, keep the state's structure and
    dtype (a `lax.cond` between the old and the new state compiles) for float16 to float64 params, and compose with
    `optax.inject_hyperparams` and `optax.MultiSteps` (after optax/contrib/_common_test.py).
(b) The step form (VON, MoG with full and diagonal components): `init(...)` / `step(key, state) -> (state, info)`,
    pure in the key, one trace, `vmap` over keys, and `fit` equal to a loop of steps (blackjax's convention).
(c) The fit drivers (IVON, AdamW-SG, MultiIVON): the posterior's structure and dtype follow the params (dicts in
    every float dtype, NNX states).

Each battery checks one step on a quadratic against its closed form, derived from the learner's equations and
computed in numpy float64.
"""

import functools
import math
from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ivon_oracle, quadratic

import bmerge
from bmerge import fit
from bmerge.optim import IVONState, find_ivon_state, ivon, ivon_sample, mog, von

DTYPES = ["float16", "bfloat16", "float32", "float64"]


def _types(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


def _stays(step, state, *args):
  """The new state of `step(state, *args)`, after checking that a lax.cond between it and `state` compiles (with a
  traced predicate both branches must agree in structure, shape and dtype) and that the types did not change."""
  new = step(state, *args)
  picked = jax.jit(lambda take, old, new: jax.lax.cond(take, lambda: new, lambda: old))(jnp.asarray(True), state, new)
  assert _types(new) == _types(state)
  return picked


# ---------------------------------------------------------------------------------------------------------------
# (a) The optax form.

# The oracle's names: lr, ess, h0 (hess_init), b1, b2, wd (weight_decay), clip (clip_radius), hess_approx, rescale_lr,
# debias. Each learner is one setting of IVON that changes its equations.
BASE = dict(lr=0.1, ess=10.0, h0=0.5, b1=0.9, b2=0.8, wd=0.1)
OPTAX_LEARNERS = {
    "ivon": BASE,
    "ivon_gradsq": dict(BASE, hess_approx="gradsq"),
    "ivon_clip_plain": dict(BASE, clip=0.2, rescale_lr=False, debias=False),
}


def _kwargs(hp):
  return dict(learning_rate=hp["lr"], ess=hp["ess"], hess_init=hp["h0"], beta1=hp["b1"], beta2=hp["b2"],
              weight_decay=hp["wd"], clip_radius=hp.get("clip", math.inf), rescale_lr=hp.get("rescale_lr", True),
              debias=hp.get("debias", True), hess_approx=hp.get("hess_approx", "price"))


def _draw(tx, hp, key, params, state):
  """Monte-Carlo noise (2 samples) from the posterior and the quadratic's gradients there."""
  samples, noise = ivon_sample(key, find_ivon_state(state), params, hp["ess"], hp["wd"], 2)
  grads = jax.vmap(jax.grad(quadratic().loss))(samples)
  return grads, noise


@pytest.mark.parametrize("name", OPTAX_LEARNERS)
def test_optax_one_step_on_a_quadratic_is_the_closed_form(name, x64):
  # Antithetic noise +-n, n = 1/sqrt(ess (h0 + delta)), so g_bar = a (m - c), and
  #   'price':  h_hat = ess (h0 + delta) mean_s n_s g_s = ess (h0 + delta) a n^2 = a;
  #   'gradsq': h_hat = ess mean_s g_s^2 = ess a^2 (m - c)^2 + a^2 / (h0 + delta).
  # Then h = b2 h0 + (1 - b2) h_hat + (1 - b2)^2 (h0 - h_hat)^2 / (2 (h0 + delta)), the momentum is (1 - b1) g_bar
  # (g_bar once debiased by 1 - b1), and the update -lr' clip((momentum / d + delta m) / (h + delta), -r, r).
  hp = OPTAX_LEARNERS[name]
  tx = ivon(**_kwargs(hp))
  q, m = quadratic(), quadratic().start(jnp.float64)
  n = 1.0 / math.sqrt(hp["ess"] * (hp["h0"] + hp["wd"]))
  noise = jax.tree.map(lambda p: jnp.stack([jnp.full_like(p, n), jnp.full_like(p, -n)]), m)
  grads = jax.vmap(jax.grad(q.loss))(jax.tree.map(lambda p, e: p + e, m, noise))
  updates, state = tx.update(grads, tx.init(m), m, noise=noise)
  lr, ess, h0, b1, b2, wd = (hp[k] for k in ("lr", "ess", "h0", "b1", "b2", "wd"))
  clipped = []
  for k in m:
    a, c, mk = q.a[k], q.c[k], np.asarray(m[k])
    h_hat = a if hp.get("hess_approx") != "gradsq" else ess * a ** 2 * (mk - c) ** 2 + a ** 2 / (h0 + wd)
    h = b2 * h0 + (1 - b2) * h_hat + 0.5 * (1 - b2) ** 2 * (h0 - h_hat) ** 2 / (h0 + wd)
    momentum = (1 - b1) * a * (mk - c)
    step = (momentum / ((1 - b1) if hp.get("debias", True) else 1.0) + wd * mk) / (h + wd)
    eta = lr * (h0 + wd) if hp.get("rescale_lr", True) else lr
    np.testing.assert_allclose(state.hess[k], h, rtol=1e-12)
    np.testing.assert_allclose(state.momentum[k], momentum, rtol=1e-12)
    np.testing.assert_allclose(updates[k], -eta * np.clip(step, -hp.get("clip", np.inf), hp.get("clip", np.inf)),
                               rtol=1e-12)
    clipped.extend(np.ravel(np.abs(step) > hp.get("clip", np.inf)))
  assert int(state.count) == 1
  assert 0 < sum(clipped) < len(clipped) if "clip" in hp else not any(clipped)  # the clip acts on some entries
  if hp.get("hess_approx") == "gradsq":  # 'gradsq' does not read the noise
    chex.assert_trees_all_equal(tx.update(grads, tx.init(m), m), (updates, state))


@pytest.mark.parametrize("name", OPTAX_LEARNERS)
def test_optax_init_and_update_are_pure_and_jit_equals_eager(name):
  hp = OPTAX_LEARNERS[name]
  tx = ivon(**_kwargs(hp))
  params = quadratic().start()
  state = tx.init(params)
  chex.assert_trees_all_equal(state, tx.init(params), jax.jit(tx.init)(params))
  grads, noise = _draw(tx, hp, jax.random.key(0), params, state)
  inputs = (grads, state, params, noise)
  copies = jax.tree.map(np.array, inputs)
  first = tx.update(grads, state, params, noise=noise)
  chex.assert_trees_all_equal(first, tx.update(grads, state, params, noise=noise))  # same inputs, same outputs
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, inputs), copies)  # inputs untouched
  chex.assert_trees_all_close(jax.jit(tx.update)(grads, state, params, noise=noise), first, rtol=1e-6, atol=1e-7)
  assert max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(first[0])) > 1e-2  # a real step


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", OPTAX_LEARNERS)
def test_optax_steps_keep_the_state_types_and_move_it(name, dtype):
  # Three steps on params of `dtype` under one jit trace: each matches the float64 hand formula on the same gradients
  # and noise (updates to an ulp of `dtype`, or its subnormal spacing); the state (float32 or wider) keeps its
  # structure and dtype, so a lax.cond between the old and the new state compiles; and it moves.
  dtype = jnp.dtype(dtype)
  with jax.enable_x64(dtype == jnp.float64):
    hp = OPTAX_LEARNERS[name]
    tx = ivon(**_kwargs(hp))
    params0 = quadratic().start(dtype)
    update = jax.jit(tx.update)
    state_dtype = jnp.promote_types(dtype, jnp.float32)
    tol = 1e-12 if state_dtype == jnp.float64 else 1e-5
    params, state = params0, tx.init(params0)
    for t, key in enumerate(jax.random.split(jax.random.key(1), 3)):
      grads, noise = _draw(tx, hp, key, params, state)
      updates, new_state = update(grads, state, params, noise=noise)
      u, h, m = ivon_oracle(hp, params, state.hess, state.momentum, t, grads, noise)
      chex.assert_trees_all_close((new_state.hess, new_state.momentum), (h, m), rtol=tol, atol=tol)
      chex.assert_trees_all_close(jax.tree.map(lambda x: np.asarray(x, np.float64), updates), u,
                                  rtol=max(float(jnp.finfo(dtype).eps), tol),
                                  atol=max(float(jnp.finfo(dtype).smallest_subnormal), 1e-12))
      assert all(x.dtype == dtype for x in jax.tree.leaves((updates, grads)))
      state = _stays(lambda s, new: new, state, new_state)
      params = optax.apply_updates(params, updates)
    assert update._cache_size() == 1
    assert _types(params) == _types(params0)
    assert isinstance(state, IVONState) and int(state.count) == 3 and state.count.dtype == jnp.int32
    assert all(x.dtype == state_dtype for x in jax.tree.leaves((state.hess, state.momentum)))
    assert min(float(jnp.max(jnp.abs(h - hp["h0"]))) for h in jax.tree.leaves(state.hess)) > 0.05
    assert min(float(jnp.max(jnp.abs(m))) for m in jax.tree.leaves(state.momentum)) > 0.05
    moved = [np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
             for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params0))]
    assert min(moved) > 0.01, moved


@pytest.mark.parametrize("name", OPTAX_LEARNERS)
def test_optax_inject_hyperparams_equals_the_plain_optimizer(name):
  hp = OPTAX_LEARNERS[name]
  kwargs = _kwargs(hp)
  numbers = {k: v for k, v in kwargs.items() if not isinstance(v, (bool, str))}
  static = {k: v for k, v in kwargs.items() if isinstance(v, (bool, str))}
  tx, injected = ivon(**kwargs), optax.inject_hyperparams(ivon, static_args=tuple(static))(**kwargs)
  update, update_inj = jax.jit(tx.update), jax.jit(injected.update)
  params = quadratic().start()
  state, state_inj = tx.init(params), injected.init(params)
  assert set(state_inj.hyperparams) == set(numbers)
  for key in jax.random.split(jax.random.key(2), 3):
    grads, noise = _draw(tx, hp, key, params, state)
    updates, state = update(grads, state, params, noise=noise)
    updates_inj, state_inj = update_inj(grads, state_inj, params, noise=noise)
    chex.assert_trees_all_close(updates_inj, updates, rtol=1e-6, atol=1e-8)
    chex.assert_trees_all_close(state_inj.inner_state, state, rtol=1e-6, atol=1e-8)
    params = optax.apply_updates(params, updates)
  # A changed injected learning rate takes effect: 0 leaves the params where they are, h still learns.
  state_inj.hyperparams["learning_rate"] = jnp.asarray(0.0)
  grads, noise = _draw(tx, hp, jax.random.key(3), params, state)
  updates, new = update_inj(grads, state_inj, params, noise=noise)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  assert not np.allclose(new.inner_state.hess["w"], state_inj.inner_state.hess["w"])


@pytest.mark.parametrize("name", OPTAX_LEARNERS)
def test_optax_multisteps_with_one_noise_equals_one_step_on_the_mean_gradient(name):
  # Under MultiSteps the S = 1 gradients of k mini-steps are averaged (one noise sample for all of them, no MC axis).
  hp = OPTAX_LEARNERS[name]
  tx = ivon(**_kwargs(hp))
  multi = optax.MultiSteps(tx, every_k_schedule=3)
  params = quadratic().start()
  grads, noise = _draw(tx, hp, jax.random.key(4), params, tx.init(params))
  noise = jax.tree.map(lambda n: n[0], noise)
  mini = [jax.tree.map(lambda g, i=i: g[0] * (1.0 + i) - i, grads) for i in range(3)]
  update, state = jax.jit(multi.update), multi.init(params)
  for i, g in enumerate(mini):
    updates, state = update(g, state, params, noise=noise)
    if i < 2:
      chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  mean = jax.tree.map(lambda *g: sum(g) / 3, *mini)
  want_updates, want_state = tx.update(mean, tx.init(params), params, noise=noise)
  chex.assert_trees_all_close(updates, want_updates, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(find_ivon_state(state), want_state, rtol=1e-5, atol=1e-7)
  assert int(find_ivon_state(state).count) == 1
  assert max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(updates)) > 1e-3  # a real step


@pytest.mark.parametrize("name", OPTAX_LEARNERS)
def test_optax_vmap_over_problems_equals_a_loop(name):
  hp = OPTAX_LEARNERS[name]
  tx = ivon(**_kwargs(hp))
  scales = jnp.array([1.0, -2.0, 0.5])
  params = jax.tree.map(lambda p: scales.reshape((3,) + (1,) * p.ndim) * p, quadratic().start())
  states = jax.vmap(tx.init)(params)
  keys = jax.random.split(jax.random.key(5), 3)
  one = lambda i: jax.tree.map(lambda x: x[i], (params, states))
  draws = [_draw(tx, hp, keys[i], *one(i)) for i in range(3)]
  grads, noise = jax.tree.map(lambda *x: jnp.stack(x), *draws)
  batched = jax.jit(jax.vmap(lambda g, s, p, n: tx.update(g, s, p, noise=n)))(grads, states, params, noise)
  for i in range(3):
    alone = tx.update(*jax.tree.map(lambda x, i=i: x[i], (grads, states, params)),
                      noise=jax.tree.map(lambda x, i=i: x[i], noise))
    chex.assert_trees_all_close(jax.tree.map(lambda x, i=i: x[i], batched), alone, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# (b) The step form: init(...) / step(key, state) -> (state, info).

# A quadratic loss-bar over a flat vector (VON, full-covariance MoG): Hessian A, minimiser C.
A = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 3.0]])
C = np.array([1.0, -1.0, 0.5])
M0 = np.array([0.3, 0.2, -0.4])
S0 = np.diag([1.0, 2.0, 0.5])
STEP = 0.4  # rho (VON), beta (MoG)
LOG_W0 = np.log([0.3, 0.7])


def _flat_quadratic(theta):
  return 0.5 * (theta - C) @ A @ (theta - C)


def _bumpy(loss):
  """`loss` plus a cosine ripple: not quadratic, so a step's result depends on the samples its key draws."""
  return lambda x: loss(x) + 0.05 * sum(jnp.sum(jnp.cos(2.0 * v)) for v in jax.tree.leaves(x))


class StepLearner(NamedTuple):
  loss: Callable  # the quadratic of its parameter type
  algorithm: Callable  # loss -> (init, jitted step(key, state) -> (state, info))
  initial: Callable  # dtype -> the arguments of init: two equal components for MoG
  closed_form: Callable  # () -> (mean, precision) of the state after one step on `loss` from `initial`
  fit: Callable  # (key, loss, initial, num_steps) -> state: the learner's compiled loop of steps


def _full_closed_form():
  # Antithetic pairs make the sample mean the mean, and the Hessian estimate of a quadratic is A, so
  # S1 = (1 - step) S0 + step A and m1 = m0 - step S1^-1 A (m0 - C) (VON: Khan & Rue 2023, Sec. 1.3.2). Two equal
  # MoG components form one Gaussian: every importance weight is 1, -hess log q = S, and each component takes the
  # VON step (Lin et al. 2019, Sec. 4.1); their weights see the same E[f] and stay.
  s1 = (1 - STEP) * S0 + STEP * A
  return M0 - STEP * np.linalg.solve(s1, A @ (M0 - C)), s1


def _diag_closed_form():
  # The diagonal form of the same step over the params pytree: h1 = (1 - beta) h0 + beta a, m1 = m0 - beta a (m0 - c)
  # / h1.
  q, m0 = quadratic(), jax.tree.map(np.asarray, quadratic().start(jnp.float64))
  h1 = jax.tree.map(lambda a: (1 - STEP) * 1.0 + STEP * a, q.a)
  return jax.tree.map(lambda m, a, c, h: m - STEP * a * (m - c) / h, m0, q.a, q.c, h1), h1


def _mog_diag(loss):
  step = functools.partial(mog.step_diag, loss_fn=loss, beta=STEP, num_samples=2, estimator="hessian",
                           antithetic=True)
  return mog.MoGAlgorithm(mog.init_diag, jax.jit(step))


STEP_LEARNERS = {
    "von": StepLearner(
        _flat_quadratic, lambda loss: von.von(loss, rho=STEP, num_samples=2, antithetic=True),
        lambda dtype: (jnp.asarray(M0, dtype), jnp.asarray(S0, dtype)), _full_closed_form,
        lambda key, loss, init, n: von.fit(key, loss, *init, n, rho=STEP, num_samples=2, antithetic=True)),
    "mog": StepLearner(
        _flat_quadratic, lambda loss: mog.mog(loss, beta=STEP, num_samples=2, antithetic=True),
        lambda dtype: (jnp.asarray(np.stack([M0, M0]), dtype), jnp.asarray(np.stack([S0, S0]), dtype),
                       jnp.asarray(LOG_W0, dtype)), _full_closed_form,
        lambda key, loss, init, n: mog.fit(key, loss, *init[:2], n, beta=STEP, num_samples=2, antithetic=True,
                                           init_log_weights=init[2])),
    "mog_diag": StepLearner(
        quadratic().loss, _mog_diag,
        lambda dtype: (jax.tree.map(lambda m: jnp.stack([m, m]), quadratic().start(dtype)),
                       jax.tree.map(lambda m: jnp.ones((2,) + m.shape, dtype), quadratic().start(dtype)),
                       jnp.asarray(LOG_W0, dtype)), _diag_closed_form,
        lambda key, loss, init, n: mog.fit_diag(key, loss, *init[:2], n, beta=STEP, num_samples=2,
                                                estimator="hessian", antithetic=True, init_log_weights=init[2])),
}


def _component(state, name):
  """(mean, precision) of the state; for MoG, of each component (asserted equal) and the log weights unchanged."""
  if name == "von":
    return state.mean, state.precision
  np.testing.assert_allclose(state.log_weights, LOG_W0, rtol=1e-12)
  first, second = (jax.tree.map(lambda x, k=k: x[k], (state.mean, state.precision)) for k in (0, 1))
  chex.assert_trees_all_close(first, second, rtol=1e-12)
  return first


@pytest.mark.parametrize("name", STEP_LEARNERS)
def test_step_one_step_on_a_quadratic_is_the_closed_form(name, x64):
  learner = STEP_LEARNERS[name]
  algo = learner.algorithm(learner.loss)
  state, info = algo.step(jax.random.key(0), algo.init(*learner.initial(jnp.float64)))
  mean, precision = learner.closed_form()
  chex.assert_trees_all_close(_component(state, name), (mean, precision), rtol=1e-10, atol=1e-12)
  assert float(info.step_size) == STEP  # no halving: the new precisions are positive definite


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", STEP_LEARNERS)
def test_step_keeps_the_state_types_under_one_trace_and_moves_it(name, dtype):
  dtype = jnp.dtype(dtype)
  with jax.enable_x64(dtype == jnp.float64):
    learner = STEP_LEARNERS[name]
    algo = learner.algorithm(_bumpy(learner.loss))
    state0 = algo.init(*learner.initial(dtype))
    assert all(jnp.result_type(x) == dtype for x in jax.tree.leaves(state0))
    state = state0
    for key in jax.random.split(jax.random.key(1), 3):
      state = _stays(lambda s, k: algo.step(k, s)[0], state, key)
    assert algo.step._cache_size() == 1
    assert type(state) is type(state0) and _types(state) == _types(state0)
    assert min(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(state.mean),
                                                              jax.tree.leaves(state0.mean))) > 1e-3


@pytest.mark.parametrize("name", STEP_LEARNERS)
def test_step_is_pure_in_its_key_and_vmaps_over_keys(name, x64):
  learner = STEP_LEARNERS[name]
  algo = learner.algorithm(_bumpy(learner.loss))
  state = algo.init(*learner.initial(jnp.float64))
  copy = jax.tree.map(np.array, state)
  keys = jax.random.split(jax.random.key(2), 3)
  looped = [algo.step(k, state) for k in keys]
  chex.assert_trees_all_equal(algo.step(keys[0], state), looped[0])  # the same key: the same step
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, state), copy)  # the state passed in is untouched
  assert not np.allclose(jax.tree.leaves(looped[0][0].mean)[0], jax.tree.leaves(looped[1][0].mean)[0])
  batched = jax.vmap(algo.step, in_axes=(0, None))(keys, state)
  for i, one in enumerate(looped):
    chex.assert_trees_all_close(jax.tree.map(lambda x, i=i: x[i], batched), one, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", STEP_LEARNERS)
def test_step_fit_equals_a_loop_of_steps(name, x64):
  # fit runs step i with the i-th key of jax.random.split(key, num_steps), in one compiled lax.scan.
  learner = STEP_LEARNERS[name]
  loss = _bumpy(learner.loss)
  algo = learner.algorithm(loss)
  state = algo.init(*learner.initial(jnp.float64))
  for key in jax.random.split(jax.random.key(3), 5):
    state, _ = algo.step(key, state)
  fitted = learner.fit(jax.random.key(3), loss, learner.initial(jnp.float64), 5)
  chex.assert_trees_all_close(fitted, state, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# (c) The fit drivers: (key, loss_fn, params, batches) -> posterior.

IVON_HP = dict(lr=0.1, ess=10.0, h0=0.5, b1=0.9, b2=0.8, wd=0.1)
IVON_ARGS = dict(learning_rate=IVON_HP["lr"], ess=IVON_HP["ess"], hess_init=IVON_HP["h0"], beta2=IVON_HP["b2"],
                 weight_decay=IVON_HP["wd"])
FISHER_X = np.array([[1.0, -0.5, 2.0], [0.3, 1.2, -1.0], [-2.0, 0.1, 0.4], [0.5, 0.5, 0.5]])
FISHER_Y = np.array([0, 1, 1, 0])
ADAMW = dict(learning_rate=0.05, weight_decay=0.02)


def _logits(params, x):
  b, w = jax.tree.leaves(params)  # pytree order: "b", then "w", for a dict and for an NNX State alike
  return x @ w + b


def _ivon_closed_form(key, params, multi):
  # One IVON step from h0 with the noise n of the step's key (fit.ivon: jax.random.split(key, num_steps); MultiIVON
  # with one seed: that seed's training key, split the same way): g = a (m + n - c), then the update of
  # `bmerge.optim.ivon` written out in float64 (conftest.ivon_oracle); the posterior is N(m + u, (ess (h + delta))^-1).
  if multi:
    key = jax.random.split(jax.random.split(key, 1)[0])[1]
  state = ivon(**_kwargs(IVON_HP)).init(params)
  _, n = ivon_sample(jax.random.split(key, 1)[0], state, params, IVON_HP["ess"], IVON_HP["wd"])
  q = quadratic()
  g = {k: q.a[k] * (np.asarray(params[k]) + np.asarray(n[k]) - q.c[k]) for k in params}
  u, h, _ = ivon_oracle(IVON_HP, params, state.hess, state.momentum, 0, jax.tree.map(lambda x: x[None], g),
                        jax.tree.map(lambda x: x[None], n))
  return {k: np.asarray(params[k]) + u[k] for k in params}, {k: IVON_HP["ess"] * (h[k] + IVON_HP["wd"]) for k in h}


def _adamw_sg_closed_form(key, params, multi):
  # One AdamW step from zero moments: m_hat = g, v_hat = g^2, so theta1 = theta - lr (g / (|g| + eps) + lambda theta)
  # with g = a (theta - c). Then the empirical Fisher of the linear softmax classifier at theta1: per example,
  # d/dW -log p(y | x) = x (p - e_y)^T and d/db = p - e_y; h = sum_i (these)^2 + N lambda (the prior of AdamW's decay).
  del key, multi
  q = quadratic()
  mean = {}
  for k in params:
    g = q.a[k] * (np.asarray(params[k]) - q.c[k])
    mean[k] = np.asarray(params[k]) - ADAMW["learning_rate"] * (g / (np.abs(g) + 1e-8)
                                                                 + ADAMW["weight_decay"] * np.asarray(params[k]))
  z = FISHER_X @ mean["w"] + mean["b"]
  r = np.exp(z - z.max(1, keepdims=True))
  r = r / r.sum(1, keepdims=True) - np.eye(2)[FISHER_Y]  # p - e_y
  prior = len(FISHER_Y) * ADAMW["weight_decay"]
  return mean, {"b": np.sum(r ** 2, 0) + prior, "w": np.einsum("nd,nc->dc", FISHER_X ** 2, r ** 2) + prior}


class Driver(NamedTuple):
  run: Callable  # (key, loss_fn, params, batches) -> posterior
  closed_form: Callable  # (key, float64 params, multi) -> (mean, precision) after one step on the quadratic
  multi: bool  # a Mixture of num_seeds x len(stop_steps) components


DRIVERS = {
    "ivon": Driver(lambda key, loss, params, batches: fit.ivon(key, loss, params, batches, **IVON_ARGS),
                   _ivon_closed_form, False),
    "adamw_sg": Driver(lambda key, loss, params, batches: fit.adamw_sg(
        key, loss, params, batches, fisher_data=(FISHER_X, FISHER_Y), logits_fn=_logits, **ADAMW),
                       _adamw_sg_closed_form, False),
    "multi_ivon": Driver(lambda key, loss, params, batches: fit.multi_ivon(
        key, loss, params, batches, num_seeds=1, stop_steps=list(range(1, batches.shape[0] + 1)), **IVON_ARGS),
                         _ivon_closed_form, True),
}


@pytest.mark.parametrize("name", DRIVERS)
def test_driver_one_step_on_a_quadratic_is_the_closed_form(name, x64):
  driver = DRIVERS[name]
  params = quadratic().start(jnp.float64)
  posterior = driver.run(jax.random.key(7), quadratic().loss, params, jnp.zeros((1, 1)))
  if driver.multi:
    np.testing.assert_allclose(posterior.log_weights, [0.0])
    posterior = jax.tree.map(lambda x: x[0], posterior.components)
  mean, precision = driver.closed_form(jax.random.key(7), params, driver.multi)
  chex.assert_trees_all_close((posterior.mean, posterior.precision), (mean, precision), rtol=1e-9, atol=1e-12)


def _nnx_params(dtype):
  from flax import nnx

  class Classifier(nnx.Module):  # a user's module with the quadratic's two entries
    def __init__(self):
      start = quadratic().start(dtype)
      self.b, self.w = nnx.Param(start["b"]), nnx.Param(start["w"])

  return nnx.split(Classifier(), nnx.Param)[1]


PARAMS = {
    "float32": lambda: quadratic().start(jnp.float32),
    "bfloat16": lambda: quadratic().start(jnp.bfloat16),
    "float16": lambda: quadratic().start(jnp.float16),
    "float64": lambda: quadratic().start(jnp.float64),
    "nnx_state": lambda: _nnx_params(jnp.float32),
}


@pytest.mark.parametrize("kind", PARAMS)
@pytest.mark.parametrize("name", DRIVERS)
def test_driver_posterior_structure_and_dtype_follow_the_params(name, kind):
  # The mean is the trained params: their structure (a dict or an NNX State), shapes and dtype. The precision has
  # their structure and shapes in float32 or wider (ess (h + delta) and summed Fishers outgrow float16).
  with jax.enable_x64(kind == "float64"):
    driver, params = DRIVERS[name], PARAMS[kind]()
    posterior = driver.run(jax.random.key(8), quadratic().loss, params, jnp.zeros((3, 1)))
    if driver.multi:
      assert isinstance(posterior, bmerge.Mixture) and posterior.log_weights.shape == (3,)
      np.testing.assert_allclose(jnp.exp(posterior.log_weights), 1 / 3, rtol=1e-6)
      chex.assert_tree_shape_prefix(posterior.components, (3,))
      posterior = jax.tree.map(lambda x: x[-1], posterior.components)
    assert isinstance(posterior, bmerge.DiagGaussian)
    assert jax.tree.structure(posterior.mean) == jax.tree.structure(params)
    assert jax.tree.structure(posterior.precision) == jax.tree.structure(params)
    assert _types(posterior.mean) == _types(params)
    wide = jax.tree.map(lambda p: (jnp.shape(p), jnp.promote_types(jnp.result_type(p), jnp.float32)), params)
    assert _types(posterior.precision) == wide
    assert all(bool(jnp.all(h > 0) & jnp.all(jnp.isfinite(h))) for h in jax.tree.leaves(posterior.precision))
    assert not all(np.array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))
                   for a, b in zip(jax.tree.leaves(posterior.mean), jax.tree.leaves(params)))  # it trained
