"""Grids of task weights and what is computed over them: the preview and the exact (joint-training) answer.

- Lattices (`bmerge.grid.lattice`): `simplex(num_tasks, spacing)`, `nested_simplex` (a preview grid and a coarser
  exact grid inside it), `line`, `pair_edges`, `dirichlet`, `refine`, and the scaled grids of task arithmetic
  (`scaled`, `scaling`, `Scaling`).
- The preview (`bmerge.grid.evaluate`): `preview(rule, posteriors, alphas, eval_fn, batches)` merges and evaluates a
  whole grid in chunks of one compiled call; `chunked_map` is its engine for any per-alpha function.
- The exact answer (`bmerge.grid.joint`): `joint_train` / `joint_train_ivon` finetune on the weighted multitask loss at
  every alpha of a grid.

Example:
  >>> from bmerge import grid
  >>> grid.simplex(3, 0.5).tolist()
  [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]]
"""

from bmerge.grid import evaluate
from bmerge.grid import joint
from bmerge.grid import lattice
from bmerge.grid.evaluate import chunked_map
from bmerge.grid.evaluate import compute_dtype
from bmerge.grid.evaluate import preview
from bmerge.grid.joint import joint_train
from bmerge.grid.joint import joint_train_ivon
from bmerge.grid.lattice import Scaling
from bmerge.grid.lattice import dirichlet
from bmerge.grid.lattice import line
from bmerge.grid.lattice import nested_simplex
from bmerge.grid.lattice import pair_edges
from bmerge.grid.lattice import refine
from bmerge.grid.lattice import scaled
from bmerge.grid.lattice import scaling
from bmerge.grid.lattice import simplex

__all__ = ["Scaling", "chunked_map", "compute_dtype", "dirichlet", "evaluate", "joint", "joint_train",
           "joint_train_ivon", "lattice", "line", "nested_simplex", "pair_edges", "preview", "refine", "scaled",
           "scaling", "simplex"]
