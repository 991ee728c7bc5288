"""Fig. 9 (paper App. B.2): the balanced split {0,1,2}, {3,4,5,6}, {7,8,9}; everything else as `digits_imbalanced`.

Task t's loss is the summed cross-entropy over the examples whose label lies in its group of classes; the previews
estimate the weighted multitask optimum argmin_theta sum_t alpha_t loss_t(theta) (Eq. 1) over the simplex.

Example:
  >>> from configs import digits_balanced
  >>> digits_balanced.get_config().tasks
  ((0, 1, 2), (3, 4, 5, 6), (7, 8, 9))
"""

from configs import digits_imbalanced


def get_config(arg=None):
  c = digits_imbalanced.get_config(arg)
  c.tasks = ((0, 1, 2), (3, 4, 5, 6), (7, 8, 9))
  c.task_names = ("{0,1,2}", "{3,4,5,6}", "{7,8,9}")
  return c
