"""Learners that produce bmerge posteriors.

- `ivon`: the IVON optimizer (an optax transformation; `bmerge.optim.ivon` is the function, its helpers live in
  the module of the same name: `from bmerge.optim.ivon import sample_params, posterior, predictive`).
- `von`: full-covariance variational online Newton -> `FullGaussian`.
- `mog`: natural-gradient mixture-of-Gaussians VI -> `Mixture`.
- `multi_ivon`: IVON posteriors over seeds x stopping steps -> an equally weighted `Mixture`.
"""

from bmerge.optim import mog
from bmerge.optim import multi_ivon
from bmerge.optim import von
from bmerge.optim.ivon import IVONState
from bmerge.optim.ivon import ivon

__all__ = ["IVONState", "ivon", "mog", "multi_ivon", "von"]
