r"""A TinyCLIP-style student initialized by weight inheritance from the teacher.

    python -m clipdistill_jax.main --config configs/inherit.py --workdir /tmp/inherit

The article's student shape and multi-task loss (recipe 'article_inherit'; configs/small.py
runs 'clip_kd_inherit'), but every student weight starts as a slice of the teacher's
(models/student.py documents the rule: the teacher layers of the uniform layer map, the
first channels of every width, the first heads): the student starts close to the teacher
instead of from noise, and the feature projectors start at the matching identity.
"""

import importlib.util
import os


def get_config():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "small.py")
  spec = importlib.util.spec_from_file_location("clipdistill_small_config", path)
  small = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(small)
  c = small.get_config()
  c.mode = "train"
  c.loss.recipe = "article_inherit"  # the article's multi-task loss, inherited weights
  # Inherited weights are already trained: a shorter warmup and a gentler schedule.
  c.optim.update(dict(lr=1e-5, warmup_steps=500))
  c.train.total_steps = 20_000
  return c
