"""Full-covariance kernels: the Hessian-weighted merge (Eq. 10) and the mixture EM (Eq. 12) with [P, P] precisions.

For small models (P up to a few thousand) whose posteriors carry full precision matrices. Both are written over a
chunk of alphas; `bmerge.merge.hessian_weighted` and `bmerge.em.find_modes` validate inputs and call them.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

_LOG_2PI = math.log(2.0 * math.pi)


@partial(jax.jit, static_argnames="chunk_size")
def hessian_weighted(alphas, mean, precision, prior_mean, prior_precision, chunk_size):
  alphas = alphas.astype(mean.dtype)
  ref = jnp.mean(mean, axis=0)
  hd = jnp.einsum("tij,tj->ti", precision, mean - ref)  # [T, P]
  if prior_mean is not None:
    hd0 = prior_precision @ (prior_mean - ref)

  def one(a):
    s = jnp.tensordot(a, precision, axes=1)
    rhs = a @ hd
    if prior_mean is not None:
      gamma = 1.0 - jnp.sum(a)
      s = s + gamma * prior_precision
      rhs = rhs + gamma * hd0
    chol = jnp.linalg.cholesky(s)
    x = jax.scipy.linalg.cho_solve((chol, True), rhs)
    return ref + x, jnp.all(jnp.isfinite(chol))

  out, ok = jax.lax.map(one, alphas, batch_size=chunk_size)
  return out, jnp.all(ok)


@partial(jax.jit, static_argnames=("num_iters", "init_given", "chunk_size"))
def mixture_em(alphas, means, precisions, log_weights, prior_mean, prior_precision, init, num_iters, init_given,
             chunk_size):
  t, k, p = means.shape
  dtype = means.dtype
  log_pi = log_weights.astype(dtype)
  log_pi = log_pi - logsumexp(log_pi, axis=-1, keepdims=True)
  ref = jnp.mean(means.reshape(t * k, p), axis=0)
  d = means - ref
  hd = jnp.einsum("tkij,tkj->tki", precisions, d)
  chol = jnp.linalg.cholesky(precisions)
  half_logdet = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1) - 0.5 * p * _LOG_2PI  # [T, K]
  has_prior = prior_mean is not None
  if has_prior:
    d0 = prior_mean - ref
    hd0 = prior_precision @ d0
    prior_logdet = jnp.sum(jnp.log(jnp.diagonal(jnp.linalg.cholesky(prior_precision)))) - 0.5 * p * _LOG_2PI

  def one(args):
    a, x0 = args
    gamma = 1.0 - jnp.sum(a)

    def log_joint(x):
      diff = x - d
      lj = log_pi + half_logdet - 0.5 * jnp.einsum("tki,tkij,tkj->tk", diff, precisions, diff)
      obj = jnp.sum(a * logsumexp(lj, axis=1))
      if has_prior:
        obj = obj + gamma * (prior_logdet - 0.5 * (x - d0) @ prior_precision @ (x - d0))
      return lj, obj

    def update(w):
      s = jnp.einsum("tk,tkij->ij", w, precisions)
      rhs = jnp.einsum("tk,tki->i", w, hd)
      if has_prior:
        s = s + gamma * prior_precision
        rhs = rhs + gamma * hd0
      return jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(s), True), rhs)

    x = x0 - ref if init_given else update(a[:, None] * jnp.exp(log_pi))

    def body(x, _):
      lj, obj = log_joint(x)
      r = jnp.exp(lj - logsumexp(lj, axis=1, keepdims=True))
      x_new = update(r * a[:, None])
      return x_new, (obj, jnp.max(jnp.abs(x_new - x)))

    x, (objs, steps) = jax.lax.scan(body, x, None, length=num_iters)
    objective = jnp.concatenate([objs, log_joint(x)[1][None]])
    step = steps[-1] if num_iters > 0 else jnp.zeros((), dtype)
    return x + ref, objective, step

  x0 = init if init_given else jnp.zeros((alphas.shape[0], p), dtype)
  params, objective, step = jax.lax.map(one, (alphas.astype(dtype), x0), batch_size=chunk_size)
  return params, objective, step  # wrapped into an `EMResult` by `bmerge.em.find_modes`
