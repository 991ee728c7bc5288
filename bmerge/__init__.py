"""bmerge: fast previews of weighted multitask finetuning by Bayesian model merging.

The pipeline, one folder a stage:

- `bmerge.optim`   learners and drivers: a task's training run in, its posterior out (IVON, AdamW + squared
                   gradients, MultiIVON, VON, mixtures); `bmerge.fit` runs them on a user's loss and batches.
- `bmerge.merge`   merging rules over a whole alpha grid (simple averaging, task arithmetic, Hessian-weighted,
                   mixture-weighted with a batched EM).
- `bmerge.grid`    alpha grids, `preview` (merge + evaluate every alpha, chunked and compiled) and the exact answer
                   (`joint_train`).
- `bmerge.assess`  metrics, figures, reports, `compare`, and `pareto.estimate` (the Pareto front from a preview
                   and a few real runs).
- `bmerge.io`      the edges: data, checkpoints, PEFT / safetensors.

Posterior types (`DiagGaussian`, `FullGaussian`, `IsoGaussian`, `Mixture`, `Beta`) live in `bmerge.posteriors` and are
exported here.

The preview of weighted multitask finetuning argmin_theta sum_t alpha_t loss_t(theta) (paper Eq. 1) at every alpha
of a grid is the mode of p0^gamma prod_t q_t^alpha_t (Eqs. 5-8) for task posteriors q_t; for Gaussians
q_t = N(theta_t, H_t^-1) it is theta_alpha = (sum_t alpha_t H_t)^-1 sum_t alpha_t H_t theta_t (Eq. 10).

Example:
  Two one-parameter tasks with precisions 1 and 3, previewed on the line alpha = (a, 1 - a):

  >>> import jax.numpy as jnp
  >>> import bmerge
  >>> q = bmerge.stack([bmerge.DiagGaussian(jnp.array([0.0]), jnp.array([1.0])),
  ...                   bmerge.DiagGaussian(jnp.array([4.0]), jnp.array([3.0]))])
  >>> theta = bmerge.preview(bmerge.merge.hessian_weighted, q, bmerge.grid.line(0.5), lambda p, _: p[0], None,
  ...                        progress=False)
  >>> theta.tolist()                                   # 3 (1 - a) 4 / (a + 3 (1 - a)) at a = 0, 1/2, 1
  [4.0, 3.0, 0.0]

References:
  Monzón Maldonado, Möllenhoff, Daheim, Gurevych, Khan. How to Weight Multitask Finetuning? Fast Previews via
  Bayesian Model-Merging. 2024.
"""

from bmerge import assess
from bmerge import io
from bmerge import merge
from bmerge import models
from bmerge import optim
from bmerge import timing
from bmerge import grid
from bmerge.assess import comparison
from bmerge.assess import metrics
from bmerge.assess import pareto
from bmerge.assess import plot
from bmerge.assess import report
from bmerge.assess.comparison import CompareOptions
from bmerge.assess.comparison import Comparison
from bmerge.assess.comparison import Entry
from bmerge.assess.comparison import compare
from bmerge.assess.comparison import train_at
from bmerge.assess.pareto import ParetoEstimate
from bmerge.grid import joint as exact
from bmerge.grid.evaluate import chunked_map
from bmerge.grid.evaluate import preview
from bmerge.io import checkpoint
from bmerge.io import data
from bmerge.io import peft as interop
from bmerge.merge import em
from bmerge.optim import curvature
from bmerge.optim import fit
from bmerge.posteriors import Beta
from bmerge.posteriors import DiagGaussian
from bmerge.posteriors import FullGaussian
from bmerge.posteriors import IsoGaussian
from bmerge.posteriors import Mixture
from bmerge.posteriors import stack
from bmerge.posteriors import unstack

__all__ = [
    "Beta",
    "CompareOptions",
    "Comparison",
    "DiagGaussian",
    "Entry",
    "FullGaussian",
    "IsoGaussian",
    "Mixture",
    "ParetoEstimate",
    "assess",
    "checkpoint",
    "chunked_map",
    "compare",
    "comparison",
    "curvature",
    "data",
    "em",
    "exact",
    "fit",
    "grid",
    "interop",
    "io",
    "merge",
    "metrics",
    "models",
    "optim",
    "pareto",
    "plot",
    "preview",
    "report",
    "stack",
    "timing",
    "train_at",
    "unstack",
]
