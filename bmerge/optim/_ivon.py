"""IVON: the Improved Variational Online Newton optimizer as an optax transform (Shen et al. 2024).

IVON learns a diagonal Gaussian posterior q = N(m, diag(1 / (ess (h + delta)))) while training like Adam: the mean m
is the params, `h` a running Hessian estimate from Monte-Carlo samples of the params. Its posterior is what the
Hessian-weighted and mixture-weighted merges consume (paper Sec. 3.5, Fig. 3 and 7).

A training step has three parts, all pure:

1. `ivon_sample(key, state, params, ess, weight_decay, num_samples)` draws theta_s = m + n_s with
   n_s = eps_s / sqrt(ess (h + delta)), and returns the samples with a leading Monte-Carlo axis [S, ...] and the noise
   (`num_samples=None`: one sample, no MC axis);
2. the user's gradient of the minibatch-mean loss at every sample (`jax.vmap(jax.grad(loss))` over the S axis);
3. `tx.update(grads, state, params, noise=noise)` with grads and noise both [S, *param_shape] per leaf (or both
   params-shaped for one sample).

`ivon_posterior` exports N(m, diag(ess (h + delta))^-1) as a `bmerge.DiagGaussian`; `find_ivon_state` digs the
`IVONState` out of a chained, injected or accumulated optax state; `ivon_predictive` averages a model's outputs over
posterior samples. The equations are those of the authors' reference implementation `ivon-opt` 0.1.3, whose recorded
trajectories the tests replay; `bmerge.fit.ivon` runs the whole loop for a user's `loss_fn` and batches.

References:
  Shen, Daheim, Cong, Nickl, Marconi, Bazan, Yokota, Gurevych, Cremers, Khan, Möllenhoff. Variational Learning
  is Effective for Large Deep Networks. ICML 2024. https://arxiv.org/abs/2402.17641
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from bmerge import _checks
from bmerge.posteriors import DiagGaussian

__all__ = ["HESS_APPROXIMATIONS", "IVONState", "find_ivon_state", "ivon", "ivon_posterior", "ivon_predictive",
           "ivon_sample"]

PyTree = Any

HESS_APPROXIMATIONS = ("price", "gradsq")


class IVONState(NamedTuple):
  """State of `ivon`: the step count t, the momentum g~ and the Hessian estimate h; every field is an array of
  fixed shape and dtype (the posterior is N(m, diag(ess (h + delta))^-1), m the params).

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge import optim
    >>> state = optim.ivon(0.1, ess=10.0, hess_init=0.5).init({"w": jnp.zeros(2)})
    >>> int(state.count), state.momentum["w"].tolist(), state.hess["w"].tolist()
    (0, [0.0, 0.0], [0.5, 0.5])
  """

  count: jax.Array  # [] int32, number of updates done (t)
  momentum: PyTree  # params-shaped, the gradient momentum g~ (float32 or wider)
  hess: PyTree  # params-shaped, the Hessian estimate h (float32 or wider), h + delta > 0


def _state_dtype(dtype) -> jnp.dtype:
  # Low-precision params keep a float32 state: ess * (h + delta) reaches 1e6-1e10 and overflows float16.
  return jnp.promote_types(dtype, jnp.float32)


def _concrete(x) -> Optional[float]:
  """`float(x)` when x is a concrete number, None when it is traced (inside `inject_hyperparams` under `jit`)."""
  try:
    return float(x)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def _validate(learning_rate, ess, hess_init, beta1, beta2, weight_decay, clip_radius, hess_approx):
  def check(name, value, ok, expected):
    v = _concrete(value)
    if v is not None and not (ok(v) and not math.isnan(v)):
      raise ValueError(f"ivon: `{name}` = {v!r}; expected {expected}.")

  if not callable(learning_rate):
    check("learning_rate", learning_rate, lambda v: v >= 0, "a number >= 0 or an optax schedule")
  check("ess", ess, lambda v: 0 < v < math.inf, "a finite number > 0 (usually the training-set size)")
  check("hess_init", hess_init, lambda v: 0 < v < math.inf, "a finite number > 0")
  check("beta1", beta1, lambda v: 0 <= v < 1, "a number in [0, 1)")
  check("beta2", beta2, lambda v: 0 <= v < 1, "a number in [0, 1)")
  check("weight_decay", weight_decay, lambda v: 0 <= v < math.inf, "a finite number >= 0")
  check("clip_radius", clip_radius, lambda v: v > 0, "a number > 0 (float('inf') for no clipping)")
  if hess_approx not in HESS_APPROXIMATIONS:
    raise ValueError(f"ivon: `hess_approx` = {hess_approx!r}; expected one of {HESS_APPROXIMATIONS}.")


def _split_mc(name: str, tree: PyTree, params: PyTree) -> tuple[PyTree, int]:
  """Returns `tree` with a leading Monte-Carlo axis on every leaf, and S.

  Each leaf is either shaped like its param (one sample, S = 1) or [S, *param_shape] with one S for all leaves.
  """
  p_leaves, p_def = jax.tree.flatten(params)
  try:
    leaves = p_def.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(f"ivon.update: `{name}` must have the pytree structure of `params` ({p_def}); {e}") from None
  shapes = [(jnp.shape(x), jnp.shape(p)) for x, p in zip(leaves, p_leaves)]
  if all(s == ps for s, ps in shapes):
    return jax.tree.unflatten(p_def, [x[None] for x in leaves]), 1
  sizes = {s[0] for s, ps in shapes if len(s) == len(ps) + 1 and s[1:] == ps}
  if len(sizes) == 1 and all(len(s) == len(ps) + 1 and s[1:] == ps for s, ps in shapes):
    return tree, sizes.pop()
  raise ValueError(
      f"ivon.update: `{name}` leaves have shapes {[s for s, _ in shapes]}; expected either the params' shapes "
      f"{[ps for _, ps in shapes]} (one sample) or [S, *param_shape] with the same S on every leaf.")


def ivon(
    learning_rate: optax.ScalarOrSchedule,
    ess: float,
    hess_init: float = 1.0,
    beta1: float = 0.9,
    beta2: float = 0.99999,
    weight_decay: float = 1e-4,
    clip_radius: float = float("inf"),
    rescale_lr: bool = True,
    debias: bool = True,
    hess_approx: str = "price",
    axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The IVON optimizer: Adam-like training that learns a diagonal Gaussian posterior.

  With lambda = `ess`, delta = `weight_decay`, h0 = `hess_init`, r = `clip_radius`, the posterior is
  q = N(m, diag(1 / (lambda (h + delta)))), m the params. Given S samples theta_s = m + n_s with
  n_s = eps_s / sqrt(lambda (h + delta)) (see `ivon_sample`) and the minibatch-mean-loss gradients g_s there, one
  update is

  .. math::

    \bar g &= \tfrac1S \textstyle\sum_s g_s, \qquad
      \bar\nu = \tfrac1S \textstyle\sum_s n_s \odot g_s \quad (\text{'gradsq'}: \tfrac1S \textstyle\sum_s g_s^2) \\
    t &\leftarrow t + 1, \qquad \tilde g \leftarrow \beta_1 \tilde g + (1 - \beta_1) \bar g \\
    \hat h &= \lambda (h + \delta) \odot \bar\nu \quad (\text{'gradsq'}: \lambda \bar\nu) \\
    h &\leftarrow \beta_2 h + (1 - \beta_2) \hat h + \tfrac12 (1 - \beta_2)^2 (h - \hat h)^2 / (h + \delta) \\
    m &\leftarrow m - \eta' \operatorname{clip}\big((\tilde g / d + \delta m) / (h + \delta), -r, r\big)

  with eta' = eta (h0 + delta) if `rescale_lr` else eta, and d = 1 - beta1^t if `debias` else 1 (only the momentum
  is debiased). The last term of the h update keeps h + delta > 0 whatever the sign of h_hat. With `axis_name`,
  g_bar and nu_bar are averaged over that mapped axis (`jax.lax.pmean`) first, as the reference's `sync=True` does.

  Gradients and noise. `update(grads, state, params, noise=noise)` takes the S per-sample gradients and the noise
  that produced them, each leaf [S, *param_shape]; a leaf shaped like its param means S = 1. 'price' needs `noise`
  (a `ValueError` names it when missing); 'gradsq' ignores it. Under `optax.MultiSteps` pass S = 1 without the MC
  axis and keep one noise sample for all mini-steps (the accumulator is params-shaped). `params` is required.

  Choosing the hyperparameters. `ess` is the training-set size (smaller values give a wider posterior and more
  exploration noise). `hess_init` sets the first noise scale 1 / sqrt(ess (h0 + delta)) and, with `rescale_lr`, the
  effective step size: keep lr * (h0 + delta) near a good SGD step size. `beta2` sets the time scale of h: with the
  default 0.99999 h moves over ~1e5 steps, so a short finetune (hundreds to thousands of steps) exports h ≈ h0 and
  a useless posterior — use beta2 in 0.999-0.9999 there.

  Args:
    learning_rate: eta, a number or an optax schedule of the step count.
    ess: lambda > 0, the effective sample size.
    hess_init: h0 > 0, the initial Hessian estimate.
    beta1: momentum decay in [0, 1).
    beta2: Hessian decay in [0, 1).
    weight_decay: delta >= 0, the prior precision per data point (inside the preconditioned step).
    clip_radius: r > 0, elementwise clip of the preconditioned step (inf: none).
    rescale_lr: multiply the learning rate by h0 + delta.
    debias: divide the momentum by 1 - beta1^t.
    hess_approx: 'price' (the reparametrisation estimate n ⊙ g) or 'gradsq' (squared gradients).
    axis_name: a mapped axis over which to average g_bar and nu_bar, for per-device gradients of per-device
      minibatches (`pmap`, `vmap`, `shard_map(..., check_vma=False)`). Not needed under `jit` with a sharded batch:
      the gradient of the global minibatch-mean loss is already global there.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is an `IVONState`. The updates are m_new - m.

  Example:
    A quadratic with Hessian 4: IVON finds its minimiser and learns h ≈ 4 (so the precision ≈ ess * 4).

    >>> import jax, jax.numpy as jnp, optax
    >>> from bmerge import optim
    >>> loss = lambda p: 2.0 * jnp.sum((p["w"] - 1.0) ** 2)
    >>> params = {"w": jnp.zeros(3)}
    >>> tx = optim.ivon(0.1, ess=100.0, beta2=0.95)
    >>> @jax.jit
    ... def step(key, params, state):
    ...   samples, noise = optim.ivon_sample(key, state, params, 100.0, 1e-4, num_samples=2)
    ...   grads = jax.vmap(jax.grad(loss))(samples)
    ...   updates, state = tx.update(grads, state, params, noise=noise)
    ...   return optax.apply_updates(params, updates), state
    >>> state = tx.init(params)
    >>> for key in jax.random.split(jax.random.key(0), 200):
    ...   params, state = step(key, params, state)
    >>> q = optim.ivon_posterior(params, state, ess=100.0, weight_decay=1e-4)  # a bmerge.DiagGaussian
    >>> print(q.mean["w"].round(1), (q.precision["w"] / 100.0).round(0))
    [1. 1. 1.] [4. 4. 4.]

  References:
    Shen, Daheim, Cong, Nickl, Marconi, Bazan, Yokota, Gurevych, Cremers, Khan, Möllenhoff. Variational Learning
    is Effective for Large Deep Networks. ICML 2024. https://arxiv.org/abs/2402.17641
  """
  _validate(learning_rate, ess, hess_init, beta1, beta2, weight_decay, clip_radius, hess_approx)

  def init_fn(params):
    return IVONState(
        count=jnp.zeros([], jnp.int32),
        momentum=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), _state_dtype(p.dtype)), params),
        hess=jax.tree.map(lambda p: jnp.full(jnp.shape(p), hess_init, _state_dtype(p.dtype)), params),
    )

  def update_fn(grads, state, params=None, noise=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("ivon.update: `params` is required (the posterior mean enters the weight-decay term).")
    grads, num_samples = _split_mc("grads", grads, params)
    if hess_approx == "price":
      if noise is None:
        raise ValueError("ivon.update: `noise` is required for hess_approx='price' (pass the noise n_s = "
                         "theta_s - m returned by `ivon_sample`), or use hess_approx='gradsq'.")
      noise, noise_samples = _split_mc("noise", noise, params)
      if noise_samples != num_samples:
        raise ValueError(f"ivon.update: `noise` has {noise_samples} Monte-Carlo samples, `grads` {num_samples}; "
                         "expected the same leading S axis.")

    p_leaves, treedef = jax.tree.flatten(params)
    flat = treedef.flatten_up_to
    m_leaves, h_leaves, g_leaves = flat(state.momentum), flat(state.hess), flat(grads)
    n_leaves = flat(noise) if hess_approx == "price" else g_leaves

    g_bar, nu_bar = [], []
    for g, n, h in zip(g_leaves, n_leaves, h_leaves):
      g = g.astype(h.dtype)
      g_bar.append(jnp.mean(g, axis=0))
      nu_bar.append(jnp.mean(n.astype(h.dtype) * g, axis=0))  # 'gradsq': n is g
    if axis_name is not None:
      g_bar, nu_bar = jax.lax.pmean((g_bar, nu_bar), axis_name)

    count = optax.safe_increment(state.count)
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    if rescale_lr:
      lr = lr * (hess_init + weight_decay)

    updates, momentum, hess = [], [], []
    for p, m, h, gb, nb in zip(p_leaves, m_leaves, h_leaves, g_bar, nu_bar):
      dt = h.dtype
      m = beta1 * m + (1.0 - beta1) * gb
      hd = h + weight_decay
      h_hat = ess * hd * nb if hess_approx == "price" else ess * nb
      h = beta2 * h + (1.0 - beta2) * h_hat + 0.5 * (1.0 - beta2) ** 2 * (h - h_hat) ** 2 / hd
      d = 1.0 - jnp.asarray(beta1, dt) ** count.astype(dt) if debias else 1.0
      step = jnp.clip((m / d + weight_decay * p.astype(dt)) / (h + weight_decay), -clip_radius, clip_radius)
      updates.append((-jnp.asarray(lr, dt) * step).astype(p.dtype))
      momentum.append(m.astype(dt))
      hess.append(h.astype(dt))
    updates, momentum, hess = (jax.tree.unflatten(treedef, x) for x in (updates, momentum, hess))
    return updates, IVONState(count=count, momentum=momentum, hess=hess)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_ivon_state(opt_state: PyTree) -> IVONState:
  """The one `IVONState` inside an optax state (`chain`, `inject_hyperparams`, `MultiSteps`, ... wrappers).

  Args:
    opt_state: an optax state holding exactly one `IVONState`.

  Returns:
    That `IVONState`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from bmerge import optim
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0), optim.ivon(0.1, ess=10.0))
    >>> isinstance(optim.find_ivon_state(tx.init({"w": jnp.zeros(2)})), optim.IVONState)
    True
  """
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, IVONState))
           if isinstance(s, IVONState)]
  if len(found) != 1:
    raise ValueError(f"find_ivon_state: `opt_state` holds {len(found)} IVONState(s); expected exactly one.")
  return found[0]


def ivon_posterior(params: PyTree, state: PyTree, ess, weight_decay=1e-4) -> DiagGaussian:
  """The IVON posterior N(m, diag(ess (h + delta))^-1) as a `DiagGaussian(mean=params, precision)`.

  This is the diagonal Gaussian q_t = N(theta_t, diag(h_t)^-1) that Eq. 10 merges (IVON-Hess, paper Sec. 3.5).

  Args:
    params: the mean m (the trained params).
    state: an `IVONState` or any optax state holding exactly one (see `find_ivon_state`).
    ess: lambda, as given to `ivon`.
    weight_decay: delta, as given to `ivon`.

  Returns:
    `DiagGaussian(params, ess (h + weight_decay))`; the precision has the state's dtype (float32 or wider).

  Example:
    >>> import jax.numpy as jnp
    >>> from bmerge import optim
    >>> params = {"w": jnp.zeros(2)}
    >>> state = optim.ivon(0.1, ess=10.0, hess_init=0.5).init(params)
    >>> optim.ivon_posterior(params, state, ess=10.0, weight_decay=0.1).precision["w"].tolist()   # 10 (0.5 + 0.1)
    [6.0, 6.0]
  """
  state = state if isinstance(state, IVONState) else find_ivon_state(state)
  precision = jax.tree.map(lambda h: ess * (h + weight_decay), state.hess)
  return DiagGaussian(mean=params, precision=precision)


def _standard_normals(key: jax.Array, lead: tuple, specs: list) -> list:
  """Independent N(0, 1) arrays of shapes lead + shape_i and dtypes dtype_i for specs [(shape_i, dtype_i)].

  One draw per dtype, sliced per leaf: one random-number kernel to compile for the whole pytree rather than one per
  leaf (a ResNet-20 has 65 leaves).
  """
  dtypes = list(dict.fromkeys(jnp.dtype(d) for _, d in specs))
  pools, offsets = {}, dict.fromkeys(dtypes, 0)
  for k, dt in zip(jax.random.split(key, len(dtypes)), dtypes):
    total = sum(math.prod(s) for s, d in specs if jnp.dtype(d) == dt)
    pools[dt] = jax.random.normal(k, lead + (total,), dt)
  out = []
  for shape, d in specs:
    dt, size = jnp.dtype(d), math.prod(shape)
    out.append(pools[dt][..., offsets[dt]:offsets[dt] + size].reshape(lead + tuple(shape)))
    offsets[dt] += size
  return out


def ivon_sample(key: jax.Array, state: PyTree, params: PyTree, ess, weight_decay=1e-4,
                num_samples: Optional[int] = None) -> tuple[PyTree, PyTree]:
  """Draws params theta_s = m + n_s from the IVON posterior, n_s = eps_s / sqrt(ess (h + delta)), eps_s ~ N(0, I).

  Returns `(samples, noise)`: with `num_samples=S` every leaf is [S, *param_shape] (vmap the gradient over the
  leading axis); with `num_samples=None` one sample without the Monte-Carlo axis (take `jax.grad` directly; cheaper
  than a vmap over an axis of size 1). Samples have the params' dtype; noise = theta_s - m exactly (after rounding
  to the params' dtype), in the state's dtype. Feed both to `ivon`'s update.

  Args:
    key: PRNG key of the draw.
    state: an `IVONState` or any optax state holding one.
    params: the mean m.
    ess: lambda, as given to `ivon`.
    weight_decay: delta, as given to `ivon`.
    num_samples: S, or None for one sample without the Monte-Carlo axis.

  Returns:
    `(samples, noise)`, both params-shaped with a leading [S] axis when `num_samples` is given.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from bmerge import optim
    >>> params = {"w": jnp.ones(3)}
    >>> state = optim.ivon(0.1, ess=100.0).init(params)
    >>> samples, noise = optim.ivon_sample(jax.random.key(0), state, params, 100.0, num_samples=2)
    >>> samples["w"].shape, bool(jnp.allclose(samples["w"] - params["w"], noise["w"]))
    ((2, 3), True)
  """
  state = state if isinstance(state, IVONState) else find_ivon_state(state)
  if num_samples is not None:
    _checks.integer(num_samples, "num_samples")
  lead = () if num_samples is None else (num_samples,)
  leaves, treedef = jax.tree.flatten(params)
  hess = treedef.flatten_up_to(state.hess)
  samples, noise = [], []
  for p, h, eps in zip(leaves, hess, _standard_normals(key, lead, [(jnp.shape(p), h.dtype) for p, h in
                                                                  zip(leaves, hess)])):
    theta = (p.astype(h.dtype) + eps * jax.lax.rsqrt(ess * (h + weight_decay))).astype(p.dtype)
    samples.append(theta)
    noise.append(theta.astype(h.dtype) - p.astype(h.dtype))
  return jax.tree.unflatten(treedef, samples), jax.tree.unflatten(treedef, noise)


def ivon_predictive(key: jax.Array, apply_fn: Callable[..., Any], params: PyTree, state: PyTree, *args,
                    ess, weight_decay=1e-4, num_samples: int = 1,
                    transform: Optional[Callable[[Any], Any]] = jax.nn.softmax) -> Any:
  """Bayesian model average (1/S) sum_s transform(apply_fn(theta_s, *args)) over posterior samples theta_s.

  With the default `transform` and logits from `apply_fn` this is the predictive class distribution;
  `transform=None` averages `apply_fn`'s outputs (any pytree) as they are.

  Args:
    key: PRNG key of the samples.
    apply_fn: `apply_fn(params, *args)`, e.g. a model's logits.
    params: the mean m.
    state: an `IVONState` or any optax state holding one.
    *args: passed to `apply_fn` after the params.
    ess: lambda, as given to `ivon`.
    weight_decay: delta, as given to `ivon`.
    num_samples: S.
    transform: applied to every output before averaging (default softmax); None for none.

  Returns:
    The average over the S samples, shaped like one output.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from bmerge import optim
    >>> params = {"w": jnp.zeros((2, 3))}
    >>> state = optim.ivon(0.1, ess=1e6).init(params)                 # a narrow posterior
    >>> probs = optim.ivon_predictive(jax.random.key(0), lambda p, x: x @ p["w"], params, state, jnp.ones((4, 2)),
    ...                               ess=1e6, num_samples=8)
    >>> probs.shape, bool(jnp.allclose(probs, 1 / 3, atol=1e-2))
    ((4, 3), True)
  """
  samples, _ = ivon_sample(key, state, params, ess, weight_decay, num_samples)
  f = (lambda p: transform(apply_fn(p, *args))) if transform is not None else (lambda p: apply_fn(p, *args))
  outs = jax.vmap(f)(samples)
  return jax.tree.map(lambda o: jnp.mean(o, axis=0), outs)
