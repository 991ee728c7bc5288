"""Fig. 9: the balanced split {0,1,2}, {3,4,5,6}, {7,8,9}; everything else as `digits_imbalanced`."""

from configs import digits_imbalanced


def get_config(arg=None):
  c = digits_imbalanced.get_config(arg)
  c.tasks = ((0, 1, 2), (3, 4, 5, 6), (7, 8, 9))
  c.task_names = ("{0,1,2}", "{3,4,5,6}", "{7,8,9}")
  return c
