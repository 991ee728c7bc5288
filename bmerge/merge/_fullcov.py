"""Full-covariance kernels: the Hessian-weighted merge (Eq. 10) and the mixture EM (Eq. 12) with [P, P] precisions.

For small models (P up to a few thousand) whose posteriors carry full precision matrices. Both work on a chunk of C
alphas at a time, written as matrix products over the chunk; `bmerge.merge.hessian_weighted` and
`bmerge.em.find_modes` validate inputs and call them. With several devices each device loops over its own share of
the alphas (`_by_chunks`).

With x = theta - ref and d_n = theta_n - ref (centred on the mean component, so float32 keeps the small
differences between finetuned models) and N precisions H_n (the T K components, plus the prior's H_0 as one more
with weight gamma = 1 - sum alpha), one step for a chunk is

  weighted precisions   S_c   = sum_n W_cn H_n                  [C, N] x [N, P*P]
  right-hand sides      b_c   = sum_n W_cn H_n d_n              [C, N] x [N, P]
  solve                 x_c   = S_c^-1 b_c                      one batched Cholesky, two triangular solves
  quadratic forms       q_cn  = x_c^T H_n x_c - 2 x_c . H_n d_n + d_n^T H_n d_n    [C, P] x [P, N*P]

with W = alpha (Eq. 10), or W_ctk = r_ctk alpha_ct from responsibilities r = softmax_k(log pi_tk + log N_tk) of the
quadratic forms (Eq. 12, Algorithm 1). Two things halve the work of the GEMM form: only the lower block columns of
S are formed (the diagonal tiles hold their strict lower part and half their diagonal, so x^T H x is twice the sum
over those blocks and a tile is recovered as T + T^T), and the Cholesky factorisation is our own left-looking
blocked one, batched over the chunk: its work is GEMMs of [C, rows, cols] blocks, with LAPACK nowhere (one LAPACK
call per alpha, what `jnp.linalg.cholesky` does on the CPU, keeps the matrix units far from their peak). On a CPU the
factorisations run a few alphas at a time so that each one's factor stays in cache (`solve_cap`, `factor_solve`).

Example:
  The blocked Cholesky of a batch of SPD matrices solves like LAPACK's:

  >>> import jax, jax.numpy as jnp
  >>> from bmerge.merge import _fullcov
  >>> a = jax.random.normal(jax.random.key(0), (2, 20, 20))
  >>> s = a @ jnp.swapaxes(a, 1, 2) + 20 * jnp.eye(20)                 # two SPD matrices, P = 20
  >>> bounds = _fullcov._bounds(20, block=8)                           # block columns (0, 4), (4, 12), (12, 20)
  >>> solve = jax.jit(lambda s, b: _fullcov.factor_solve(_fullcov.half_panels(s, bounds), b, bounds))
  >>> x, diag = solve(s, jnp.ones((2, 20)))
  >>> bool(jnp.allclose(x, jnp.linalg.solve(s, jnp.ones((2, 20, 1)))[..., 0], rtol=1e-4)), bool(jnp.all(diag > 0))
  (True, True)

References:
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
  Bayesian Model-Merging. 2024. Eqs. 10 and 12, Algorithm 1.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp
from jax.sharding import PartitionSpec

from bmerge import _sharding

_LOG_2PI = math.log(2.0 * math.pi)
BLOCK = 128  # columns per block of the blocked Cholesky for P > 1024 (64 below): see `_bounds`
_BASE = 16  # tiles up to this size are factorised column by column
CHUNK_BYTES = 512 * 2 ** 20  # working memory per chunk of alphas
# On a CPU each chunk's factorisations run in sub-chunks whose matrices stay near the size of a last-level cache
# (32 MB), at least 4 alphas (see `solve_rows`). Accelerators factorise the whole chunk at once.
CPU_SOLVE_BYTES = 32 * 2 ** 20
CPU_SOLVE_MIN = 4


def _mt(x):
  return jnp.swapaxes(x, -1, -2)


def _mv(a, v):
  """Batched matrix-vector product [..., m, n] x [..., n] -> [..., m]."""
  return jnp.einsum("...ij,...j->...i", a, v)


def _bounds(p: int, block: Optional[int] = None) -> tuple[tuple[int, int], ...]:
  """Block columns `block` wide (default 64 up to P = 1024, 128 above), the remainder first.

  Why these widths: the panel products A L_tile^-T are [rows, m] x [m, m] per alpha, and the CPU's GEMM library
  splits a product across threads only when one alpha's output is big enough (the alpha batch itself runs on one
  thread), so for P ~ 650 the narrower block keeps that single-threaded share small; for larger P the rows alone
  are enough. GEMM kernels tile by multiples of 64, and a thin last block would make products of a handful of rows,
  hence the remainder first.

  Example:
    >>> from bmerge.merge import _fullcov
    >>> _fullcov._bounds(150, block=64)
    ((0, 22), (22, 86), (86, 150))
  """
  block = block or (64 if p <= 1024 else BLOCK)
  first = p % block
  return ((0, first),) * bool(first) + tuple((s, s + block) for s in range(first, p, block))


def chunk_alphas(g: int, p: int, chunk_size: int, itemsize: int = 4, budget: int = CHUNK_BYTES) -> int:
  """Alphas per chunk: at most `chunk_size`, within `budget` bytes (each alpha holds about 2 P^2 floats: the half
  panels of its S and of its factor), spread evenly so the last chunk pads few rows."""
  return _sharding.even_chunk(g, max(1, min(chunk_size, g, budget // (2 * p * p * itemsize))))


def solve_cap(p: int, itemsize: int = 4, platform: str = "cpu") -> Optional[int]:
  """The most alphas factorised at once on a CPU: those whose matrices fit `CPU_SOLVE_BYTES` (2 P^2 floats each),
  at least `CPU_SOLVE_MIN`; None (no limit) on other platforms.

  Why: the factorisation re-reads its factor once per block column. With 128 alphas at P = 650 (430 MB) that
  streams from memory, and devices sharing the memory bus then run no faster than one; a few alphas at a time stay
  in cache.

  Example:
    >>> from bmerge.merge import _fullcov
    >>> _fullcov.solve_cap(650), _fullcov.solve_cap(4000), _fullcov.solve_cap(650, platform="gpu")
    (9, 4, None)
  """
  if platform != "cpu":
    return None
  return max(CPU_SOLVE_MIN, CPU_SOLVE_BYTES // (2 * p * p * itemsize))


def solve_rows(c: int, p: int, itemsize: int = 4, platform: str = "cpu") -> int:
  """Alphas per factorisation within a chunk of `c`: all of them up to `solve_cap`, else the sub-chunk size in
  [CPU_SOLVE_MIN, solve_cap] that pads the chunk least (the larger on a tie).

  Example:
    >>> from bmerge.merge import _fullcov
    >>> _fullcov.solve_rows(8, 650), _fullcov.solve_rows(128, 650)     # cap 9 at P = 650: 128 = 16 x 8
    (8, 8)
  """
  cap = solve_cap(p, itemsize, platform)
  if cap is None or c <= cap:
    return c
  return min(range(CPU_SOLVE_MIN, cap + 1), key=lambda s: (-(-c // s) * s - c, -s))


def half_panels(h, bounds):
  """Symmetric matrices [N, P, P] as lower block columns: per block (s, e) the rows s: of its columns, [N, P - s, m],
  the diagonal tile keeping its strict lower part and half its diagonal (so tile + tile^T is the full tile)."""
  h = 0.5 * (h + _mt(h))
  out = []
  for s, e in bounds:
    m = e - s
    keep = jnp.tril(jnp.ones((m, m), h.dtype), -1) + 0.5 * jnp.eye(m, dtype=h.dtype)
    out.append(jnp.concatenate([h[:, s:e, s:e] * keep, h[:, e:, s:e]], axis=1))
  return out


def _by_rows(panels):
  """The same panels laid out for products with vectors from the left: [P - s, N m]."""
  return [jnp.moveaxis(x, 0, 1).reshape(x.shape[1], x.shape[0] * x.shape[2]) for x in panels]


def _base_cholesky(a):
  """Column by column: the Cholesky factor L of SPD tiles [..., m, m] (small m) and L^-1, one row per column step.

  Step k writes column k of L, (A[:, k] - L[:, :k] L[k, :k]) / L[k, k] (left-looking: two matrix-vector products
  and one column written per step, not a rank-1 update of the whole tile); row k of L is then complete, which gives
  row k of L^-1 = (e_k - L[k, :k] L^-1[:k]) / L[k, k].
  """
  m = a.shape[-1]
  idx = jnp.arange(m)
  eye = jnp.eye(m, dtype=a.dtype)
  pick = lambda x, k, axis: jax.lax.dynamic_index_in_dim(x, k, axis=x.ndim + axis, keepdims=False)

  def step(k, carry):
    l, inv = carry  # columns (rows) >= k still 0, so full products are the sums over j < k
    col = jnp.where(idx >= k, pick(a, k, -1) - _mv(l, pick(l, k, -2)), 0.0)
    col = col * jax.lax.rsqrt(pick(col, k, -1))[..., None]
    l = jax.lax.dynamic_update_slice_in_dim(l, col[..., :, None], k, axis=l.ndim - 1)
    row = pick(l, k, -2)
    inv_k = (eye[k] - jnp.einsum("...j,...jk->...k", row, inv)) / pick(row, k, -1)[..., None]
    return l, jax.lax.dynamic_update_slice_in_dim(inv, inv_k[..., None, :], k, axis=inv.ndim - 2)

  return jax.lax.fori_loop(0, m, step, (jnp.zeros_like(a), jnp.zeros_like(a)))


def _tile_cholesky(a):
  """(L, L^-1) of SPD tiles [..., m, m], recursively on halves: L21 = A21 L11^-T, L22 = chol(A22 - L21 L21^T)."""
  m = a.shape[-1]
  if m <= _BASE:
    return _base_cholesky(a)
  h = m // 2
  l11, i11 = _tile_cholesky(a[..., :h, :h])
  l21 = a[..., h:, :h] @ _mt(i11)
  l22, i22 = _tile_cholesky(a[..., h:, h:] - l21 @ _mt(l21))
  zero = jnp.zeros(a.shape[:-2] + (h, m - h), a.dtype)
  l = jnp.concatenate([jnp.concatenate([l11, zero], -1), jnp.concatenate([l21, l22], -1)], -2)
  inv = jnp.concatenate([jnp.concatenate([i11, zero], -1), jnp.concatenate([-(i22 @ (l21 @ i11)), i22], -1)], -2)
  return l, inv


def cholesky(panels, bounds):
  """Left-looking blocked Cholesky of a batch of SPD matrices given as `half_panels` (leading batch axes [...]).

  Returns per block column (s, e): the factor's rows s: of those columns, L[..., s:, s:e] (its first e - s rows are
  the diagonal tile up to rounding: A[s:, s:e] L_tile^-T is computed whole, cheaper than slicing off the tile), the
  tile L[s:e, s:e] itself and its inverse. A matrix that is not positive definite gets a non-positive or NaN
  diagonal entry (`factor_solve` returns the diagonal).
  """
  out = []
  for j, ((s, e), a) in enumerate(zip(bounds, panels)):
    m = e - s
    a = a.at[..., :m, :].add(_mt(a[..., :m, :]))  # A[s:, s:e]
    if j:  # A[s:, s:e] -= L[s:, :s] L[s:e, :s]^T: one GEMM over all earlier block columns (its rows split across
      # threads; the tile's rows alone would make a product too small to split)
      left = jnp.concatenate([l[..., s - s_i:, :] for (s_i, _), (l, _, _) in zip(bounds, out)], axis=-1)
      a = a - left @ _mt(left[..., :m, :])
    l_jj, inv = _tile_cholesky(a[..., :m, :])
    out.append((a @ _mt(inv), l_jj, inv))
  return out


def _diagonal(factor):
  return jnp.concatenate([jnp.diagonal(l_jj, axis1=-2, axis2=-1) for _, l_jj, _ in factor], axis=-1)


def solve(factor, rhs):
  """x with L L^T x = rhs [..., P]: blocked forward then back substitution with the inverted diagonal tiles.

  Products with whole panels L[s:, s:e] (tile rows included) rather than slices of them: a slice would be a copy.
  """
  ys, r = [], rhs
  for l, l_jj, inv in factor:  # r holds rows s: of the forward substitution's right-hand side
    y = _mv(inv, r[..., :l_jj.shape[-1]])
    ys.append(y)
    r = (r - _mv(l, y))[..., l_jj.shape[-1]:]
  x = rhs[..., :0]
  for (l, l_jj, inv), y in reversed(list(zip(factor, ys))):  # x holds rows e: of the solution
    below = _mv(_mt(l), jnp.concatenate([jnp.zeros_like(y), x], axis=-1))  # L[e:, s:e]^T x[e:]
    x = jnp.concatenate([_mv(_mt(inv), y - below), x], axis=-1)
  return x


def factor_solve(panels, rhs, bounds):
  """(x with S x = rhs, the factor's diagonal) for a chunk of SPD matrices S given as half panels [C, ...]; on a CPU
  in cache-sized sub-chunks (`solve_rows`; the chunk padded with its first row to a multiple of them)."""
  c, p = rhs.shape
  sub = solve_rows(c, p, rhs.dtype.itemsize, _platform())

  def one(*xs):
    factor = cholesky(xs[:-1], bounds)
    return solve(factor, xs[-1]), _diagonal(factor)

  return one(*panels, rhs) if sub == c else _map_chunks(one, lambda _: sub, *panels, rhs)


def _solve_chunks(p: int, chunk_size: int, itemsize: int):
  """size(G) of `_map_chunks` for chunks that are factorised whole: within `solve_cap` on a CPU."""
  cap = solve_cap(p, itemsize, _platform())
  return lambda g: chunk_alphas(g, p, chunk_size if cap is None else min(chunk_size, cap), itemsize)


def _weighted(w, panels):
  """The half panels of S_c = sum_n w_cn H_n: [C, N] x [N, (P - s) m] per block column."""
  return [(w @ x.reshape(x.shape[0], -1)).reshape(w.shape[:1] + x.shape[1:]) for x in panels]


def _quad(x, by_rows, bounds):
  """[C, N]: x_c^T H_n x_c as twice the sum over the half blocks, [C, P - s] x [P - s, N m] per block column."""
  q = 0.0
  for (s, e), h in zip(bounds, by_rows):
    q = q + jnp.einsum("cnb,cb->cn", (x[:, s:] @ h).reshape(x.shape[0], -1, e - s), x[:, s:e])
  return 2.0 * q


def _stacked(precisions, centred_means, prior_precision, prior_mean, ref, bounds):
  """Half panels, H d and d^T H d of the N = (components, prior) precisions."""
  h, d = precisions, centred_means
  if prior_mean is not None:
    h = jnp.concatenate([h, prior_precision.astype(h.dtype)[None]], axis=0)
    d = jnp.concatenate([d, (prior_mean.astype(d.dtype) - ref)[None]], axis=0)
  hd = jnp.einsum("nij,nj->ni", h, d)
  return half_panels(h, bounds), hd, jnp.sum(d * hd, axis=1)


def _map_chunks(fn, size, *rows):
  """fn over chunks of size(G) rows of each [G, ...] array (padded with the first row), one compiled body."""
  g = rows[0].shape[0]
  c = size(g)
  num = -(-g // c)
  rows = [_sharding.pad_rows(r, c) for r in rows]
  out = jax.lax.map(lambda xs: fn(*xs), tuple(r.reshape((num, c) + r.shape[1:]) for r in rows))
  return jax.tree.map(lambda y: y.reshape((num * c,) + y.shape[2:])[:g], out)


def _platform() -> str:
  """The platform the kernels run on: that of the grid's devices (all of `jax.devices()`)."""
  return jax.devices()[0].platform


def _by_chunks(fn, size, *rows):
  """`_map_chunks` on one device; with several, each device maps over its own 1 / n of the rows (`jax.shard_map`).

  Sharding propagation alone does not split a loop over chunks: every device would compute every chunk. `fn`
  returns arrays with a leading row axis; the rows are padded to a multiple of the devices with the first row.
  Inside a caller's `shard_map` (or under a context mesh) the rows are already the caller's share: mapped as they are.
  """
  mesh = _sharding.grid_mesh()
  n = _sharding.grid_size(mesh)
  if n == 1 or not jax.sharding.get_abstract_mesh().empty:  # inside the caller's shard_map or mesh: theirs decides
    return _map_chunks(fn, size, *rows)
  g = rows[0].shape[0]
  rows = tuple(_sharding.pad_rows(r, n) for r in rows)
  spec = PartitionSpec(_sharding.GRID_AXIS)
  out = jax.shard_map(lambda *rs: _map_chunks(fn, size, *rs), mesh=mesh, in_specs=(spec,) * len(rows),
                      out_specs=spec)(*rows)
  return jax.tree.map(lambda y: y[:g], out)


@partial(jax.jit, static_argnames=("chunk_size", "block"))
def hessian_weighted(alphas, mean, precision, prior_mean, prior_precision, chunk_size, block=None):
  """Eq. 10 for every alpha [G, T]: (sum_t a_t H_t + gamma H_0)^-1 (sum_t a_t H_t theta_t + gamma H_0 theta_0).

  Returns (merged [G, P], whether every merged precision was positive definite).
  """
  dtype = mean.dtype
  t, p = mean.shape
  bounds = _bounds(p, block)
  ref = jnp.mean(mean, axis=0)
  panels, hd, _ = _stacked(precision.astype(dtype), mean - ref, prior_precision, prior_mean, ref, bounds)
  alphas = alphas.astype(dtype)
  has_prior = prior_mean is not None

  def chunk(a):
    w = jnp.concatenate([a, 1.0 - jnp.sum(a, axis=1, keepdims=True)], axis=1) if has_prior else a
    x, diagonal = factor_solve(_weighted(w, panels), w @ hd, bounds)
    return ref + x, jnp.all(diagonal > 0, axis=-1)

  # Chunks no larger than one factorisation's share on a CPU: S is formed per small chunk (cheap here, T + 1
  # precisions), not for a large chunk that would then be copied into sub-chunks.
  out, ok = _by_chunks(chunk, _solve_chunks(p, chunk_size, jnp.dtype(dtype).itemsize), alphas)
  return out, jnp.all(ok)


@partial(jax.jit, static_argnames=("num_iters", "init_given", "chunk_size", "block"))
def mixture_em(alphas, means, precisions, log_weights, prior_mean, prior_precision, init, num_iters, init_given,
               chunk_size, block=None):
  """Algorithm 1 with full precisions for every alpha [G, T].

  Returns (params [G, P], objective [G, num_iters + 1]: F(theta^(i)), non-decreasing, step [G]: max |theta^(n) -
  theta^(n-1)| of the last iteration).
  """
  t, k, p = means.shape
  tk = t * k
  dtype = means.dtype
  bounds = _bounds(p, block)
  log_pi = log_weights.astype(dtype)
  log_pi = (log_pi - logsumexp(log_pi, axis=-1, keepdims=True)).reshape(tk)
  flat = means.reshape(tk, p)
  ref = jnp.mean(flat, axis=0)
  has_prior = prior_mean is not None
  panels, hd, const = _stacked(precisions.reshape(tk, p, p).astype(dtype), flat - ref, prior_precision, prior_mean,
                               ref, bounds)
  by_rows = _by_rows(panels)
  itemsize = jnp.dtype(dtype).itemsize
  # 1/2 log det H_n - P/2 log 2 pi of the N = TK (+1) precisions, by the same blocked Cholesky in chunks.
  half_logdet = lambda *pan: jnp.sum(jnp.log(_diagonal(cholesky(pan, bounds))), axis=-1)
  logdet = _by_chunks(half_logdet, _solve_chunks(p, chunk_size, itemsize), *panels) - 0.5 * p * _LOG_2PI
  size = lambda g: chunk_alphas(g, p, chunk_size, itemsize)
  alphas = alphas.astype(dtype)

  def chunk(a, x0):
    gamma = 1.0 - jnp.sum(a, axis=1, keepdims=True)

    def weights(r):  # [C, N]: r alpha for the components, gamma for the prior
      w = (r * a[:, :, None]).reshape(-1, tk)
      return jnp.concatenate([w, gamma], axis=1) if has_prior else w

    def m_step(w):
      return factor_solve(_weighted(w, panels), w @ hd, bounds)[0]

    def e_step(x):
      """log pi + log N [C, T, K] and F [C] at x."""
      quad = _quad(x, by_rows, bounds) - 2.0 * (x @ hd.T) + const
      lj = (log_pi + logdet[:tk] - 0.5 * quad[:, :tk]).reshape(-1, t, k)
      obj = jnp.sum(a * logsumexp(lj, axis=2), axis=1)
      if has_prior:
        obj = obj + gamma[:, 0] * (logdet[tk] - 0.5 * quad[:, tk])
      return lj, obj

    def body(carry, _):  # one M-step then the E-step at its result: the only Cholesky in the compiled loop
      x_prev, w = carry
      x = m_step(w)
      lj, obj = e_step(x)
      return (x, weights(jnp.exp(lj - logsumexp(lj, axis=2, keepdims=True)))), (obj, jnp.max(jnp.abs(x - x_prev), 1))

    if init_given:
      x = x0 - ref
      lj, obj0 = e_step(x)
      (x, _), (objs, steps) = jax.lax.scan(body, (x, weights(jnp.exp(lj - logsumexp(lj, axis=2, keepdims=True)))),
                                           None, length=num_iters)
      objs = jnp.concatenate([obj0[None], objs], axis=0)
    else:  # responsibilities = mixture weights: the Hessian-weighted merge of all components (Eq. 10 when K = 1)
      w0 = weights(jnp.broadcast_to(jnp.exp(log_pi).reshape(t, k), a.shape + (k,)))
      (x, _), (objs, steps) = jax.lax.scan(body, (x0, w0), None, length=num_iters + 1)
      steps = steps[1:]  # the first M-step has no previous iterate
    step = steps[-1] if num_iters > 0 else jnp.zeros((a.shape[0],), dtype)
    return x + ref, objs.T, step

  x0 = init.astype(dtype) if init_given else jnp.zeros((alphas.shape[0], p), dtype)
  return _by_chunks(chunk, size, alphas, x0)  # wrapped into an `EMResult` by `bmerge.em.find_modes`


# ---------------------------------------------------------------------------------------------------------------
# The per-alpha formulation (a `lax.map` over alphas, einsums and a LAPACK Cholesky per alpha): the tests' oracle
# and the benchmarks' baseline.


@partial(jax.jit, static_argnames="chunk_size")
def reference_hessian_weighted(alphas, mean, precision, prior_mean, prior_precision, chunk_size):
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
def reference_mixture_em(alphas, means, precisions, log_weights, prior_mean, prior_precision, init, num_iters,
                         init_given, chunk_size):
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
  return jax.lax.map(one, (alphas.astype(dtype), x0), batch_size=chunk_size)
