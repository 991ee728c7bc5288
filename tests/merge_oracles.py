"""Float64 numpy oracles of the merge rules: Eq. 10 and Algorithm 1 (EM) written alpha by alpha, as in the paper.

Shared by the kernel tests (`test_fullcov`) and the experiments' tests, which check the previews of `:small` runs
against the merged models these give from the saved posteriors.
"""

import numpy as np
from scipy.special import logsumexp

import bmerge


def eq10(alphas, means, precs, prior=None):
  """Eq. 10 alpha by alpha with np.linalg.solve, float64."""
  out = []
  for a in alphas:
    s, b = np.einsum("t,tij->ij", a, precs), np.einsum("t,tij,tj->i", a, precs, means)
    if prior is not None:
      s, b = s + (1 - a.sum()) * prior[1], b + (1 - a.sum()) * prior[1] @ prior[0]
    out.append(np.linalg.solve(s, b))
  return np.stack(out)


def em(alpha, means, precs, log_weights, num_iters, prior=None, x0=None, log_det=None):
  """Algorithm 1 for one alpha as written, float64 numpy: (theta, F per iterate, last step)."""
  logpi = log_weights - logsumexp(log_weights, axis=1, keepdims=True)
  gamma = 1.0 - alpha.sum()
  p = means.shape[-1]
  log_det = np.linalg.slogdet(precs)[1] if log_det is None else log_det  # [T, K], the same for every alpha
  log_norm = 0.5 * log_det - 0.5 * p * np.log(2 * np.pi)

  def m_step(w):
    s, b = np.einsum("tk,tkij->ij", w, precs), np.einsum("tk,tkij,tkj->i", w, precs, means)
    if prior is not None:
      s, b = s + gamma * prior[1], b + gamma * prior[1] @ prior[0]
    return np.linalg.solve(s, b)

  def log_joint(x):
    diff = x - means
    lj = logpi + log_norm - 0.5 * np.einsum("tki,tkij,tkj->tk", diff, precs, diff)
    f = np.sum(alpha * logsumexp(lj, axis=1))
    if prior is not None:
      f += gamma * (0.5 * np.linalg.slogdet(prior[1])[1] - 0.5 * p * np.log(2 * np.pi)
                    - 0.5 * (x - prior[0]) @ prior[1] @ (x - prior[0]))
    return lj, f

  x = m_step(alpha[:, None] * np.exp(logpi)) if x0 is None else x0
  objective, step = [], 0.0
  for _ in range(num_iters):
    lj, f = log_joint(x)
    objective.append(f)
    x_new = m_step(np.exp(lj - logsumexp(lj, axis=1, keepdims=True)) * alpha[:, None])
    x, step = x_new, np.max(np.abs(x_new - x))
  return x, np.array(objective + [log_joint(x)[1]]), step


def merged(posterior, alphas, em_iters: int) -> np.ndarray:
  """The merged model [G, P] at every alpha [G, T] from stacked posteriors, in float64: simple averaging (Eq. 2) of
  plain means [T, P]; Eq. 10 for a `DiagGaussian` (elementwise) or `FullGaussian` (one solve per alpha); `em` with
  `em_iters` iterations for a `Mixture` of full Gaussians."""
  f64 = lambda x: np.asarray(x, np.float64)
  a = f64(alphas)
  if isinstance(posterior, bmerge.Mixture):
    means, precs = f64(posterior.components.mean), f64(posterior.components.precision)
    log_det = np.linalg.slogdet(precs)[1]
    return np.stack([em(row, means, precs, f64(posterior.log_weights), em_iters, log_det=log_det)[0] for row in a])
  if isinstance(posterior, bmerge.FullGaussian):
    return eq10(a, f64(posterior.mean), f64(posterior.precision))
  if isinstance(posterior, bmerge.DiagGaussian):
    h = f64(posterior.precision)
    return (a @ (h * f64(posterior.mean))) / (a @ h)
  if isinstance(posterior, bmerge.IsoGaussian):
    return a @ f64(posterior.mean)
  return a @ f64(posterior)
