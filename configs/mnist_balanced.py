"""Fig. 9 / Tables 1-2 on real MNIST-5k: the balanced split {0,1,2}, {3,4,5,6}, {7,8,9}; all else as
`mnist_imbalanced` (same variants: default 14x14 with every posterior, :diag28, :paper, :small)."""

from configs import mnist_imbalanced


def get_config(arg=None):
  c = mnist_imbalanced.get_config(arg)
  c.tasks = ((0, 1, 2), (3, 4, 5, 6), (7, 8, 9))
  c.task_names = ("{0,1,2}", "{3,4,5,6}", "{7,8,9}")
  return c
