"""run_builder.build_run: the chain the trainer, the cache writer and the benchmark share."""

import jax
import numpy as np
import pytest
from tiny_models import tiny_distill_config

from clipdistill_jax import run_builder
from clipdistill_jax.models import hf


def _config(teacher_dir, **overrides):
  c = tiny_distill_config(**{"loss.weights.hidden": 0.0, "loss.weights.attention": 0.0,
                             "train.batch_size": 8, **overrides})
  c.teacher.source = teacher_dir
  return c


def test_cached_run_inherits_then_drops_the_teacher(teacher_dir):
  config = _config(teacher_dir, **{"student.arch": "teacher", "student.init": "inherit"})
  teacher = hf.load_pretrained(teacher_dir)[1]
  run = run_builder.build_run(config, cached_teacher_logit_scale=50.0)
  assert run.teacher_params is None and run.models.teacher_params is None
  assert run.loss.teacher_logit_scale == 50.0
  # a teacher-shaped student inherits every weight: it starts as the teacher
  student = jax.device_get(run.state["params"]["student"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, student, teacher)


def test_live_run_places_the_teacher_and_checks_the_batch(teacher_dir):
  run = run_builder.build_run(_config(teacher_dir))
  assert run.teacher_params is not None and run.models.teacher_params is None
  with pytest.raises(ValueError, match="train.batch_size=6 is not divisible by the 8"):
    run_builder.build_run(_config(teacher_dir, **{"train.batch_size": 6}))
