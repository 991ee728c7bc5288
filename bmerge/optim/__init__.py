"""Learners that produce bmerge posteriors.

Flat exports (as optax does), implementation in private modules:

- `ivon(learning_rate, ess, ...)`: the IVON optimizer as an optax transformation, with `IVONState`, `ivon_sample`
  (posterior samples and the noise that made them), `ivon_posterior` (export as a `DiagGaussian`),
  `ivon_predictive` (Bayesian model average) and `find_ivon_state` (the IVON state inside a wrapped optax state).
- `von`: full-covariance variational online Newton -> `FullGaussian` (a module: `von.fit`, `von.step`, ...).
- `mog`: natural-gradient mixture-of-Gaussians VI -> `Mixture` (a module: `mog.fit`, `mog.fit_diag`, ...).
- `multi_ivon`: IVON posteriors over seeds x stopping steps -> an equally weighted `Mixture` (a module).
- `fit`: drivers that run these learners on a user's `(key, loss_fn, params, batches)` and return the posteriors
  (`fit.ivon`, `fit.adamw_sg`, `fit.multi_ivon`, `fit.von`, `fit.mog`; also `bmerge.fit`), and `FitInfo`, what a
  run of the first three saw (`return_info=True`).
- `curvature`: squared-gradient Fisher diagonals from per-example gradients (also `bmerge.curvature`).

Example:
  >>> import jax.numpy as jnp
  >>> from bmerge import optim
  >>> tx = optim.ivon(learning_rate=0.1, ess=1000.0)
  >>> state = tx.init({"w": jnp.zeros(3)})
  >>> isinstance(state, optim.IVONState)
  True
"""

from bmerge.optim import curvature
from bmerge.optim import fit
from bmerge.optim import mog
from bmerge.optim import multi_ivon
from bmerge.optim import von
from bmerge.optim._ivon import IVONState
from bmerge.optim._ivon import find_ivon_state
from bmerge.optim._ivon import ivon
from bmerge.optim._ivon import ivon_posterior
from bmerge.optim._ivon import ivon_predictive
from bmerge.optim._ivon import ivon_sample
from bmerge.optim._learner import FitInfo

__all__ = [
    "FitInfo",
    "IVONState",
    "curvature",
    "fit",
    "find_ivon_state",
    "ivon",
    "ivon_posterior",
    "ivon_predictive",
    "ivon_sample",
    "mog",
    "multi_ivon",
    "von",
]
