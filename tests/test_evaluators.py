"""Evaluators by name (config.evals): built with their data before step 1, run at their steps."""

import pytest
from tiny_models import tiny_distill_config

from clipdistill_jax import run_builder, train
from clipdistill_jax.eval import evaluators
from clipdistill_jax.writers import read_jsonl


def _config(teacher_dir, **overrides):
  c = tiny_distill_config(**{"loss.weights.hidden": 0.0, "loss.weights.attention": 0.0,
                             "train.batch_size": 8, "train.total_steps": 4,
                             "train.log_every": 1, "train.checkpoint_every": 100,
                             "eval.zero_shot": ("synthetic",), "eval.max_examples": 16,
                             "eval.batch_size": 8, "data.num_eval_examples": 16, **overrides})
  c.teacher.source = teacher_dir
  return c


def test_missing_zero_shot_set_fails_before_the_first_step(teacher_dir, tmp_path):
  # configs/small.py's CIFAR-10 where it was never prepared: found at build, not step 5,000.
  config = _config(teacher_dir, **{"eval.zero_shot": ("cifar10",),
                                   "data.data_dir": str(tmp_path / "tfds")})
  workdir = tmp_path / "run"
  with pytest.raises(FileNotFoundError) as error:
    train.train(config, str(workdir))
  message = str(error.value)
  assert "tfds build cifar10" in message and "\n" not in message
  assert not (workdir / "metrics.jsonl").exists()  # no step ran, none was logged
  assert not (workdir / "checkpoints").exists() and not list(workdir.glob("[0-9]*"))


def test_unknown_evaluator_is_refused_with_the_known_names(teacher_dir):
  config = _config(teacher_dir, evals=("zero_shot", "recall@10"))
  with pytest.raises(run_builder.ConfigError, match="'recall'.*zero_shot, agreement, retrieval"):
    evaluators.parse_evals(config)
  config = _config(teacher_dir, evals=("zero_shot@ten",))
  with pytest.raises(run_builder.ConfigError, match="whole number"):
    evaluators.parse_evals(config)


def test_evaluators_run_at_their_steps(teacher_dir, tmp_path):
  config = _config(teacher_dir, **{"eval.every": 4,
                                   "evals": ("zero_shot", "agreement@2", "retrieval")})
  assert evaluators.parse_evals(config) == {"zero_shot": 4, "agreement": 2, "retrieval": 4}
  train.train(config, str(tmp_path / "run"))
  logged = {}
  for row in read_jsonl(tmp_path / "run" / "metrics.jsonl"):
    for key in row:
      if key.startswith("eval/"):
        logged.setdefault(key, []).append(row["step"])
  assert logged["eval/synthetic/teacher_agreement"] == [2, 4]
  for key in ("eval/synthetic/top1", "eval/synthetic/top5", "eval/retrieval/i2t_r1",
              "eval/retrieval/t2i_r5"):
    assert logged[key] == [4], key
  rows = {r["step"]: r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")
          if "eval/synthetic/teacher_agreement" in r}
  assert 0.0 <= rows[2]["eval/synthetic/teacher_agreement"] <= 1.0


def test_agreement_is_skipped_without_a_teacher(teacher_dir):
  config = _config(teacher_dir, **{"evals": ("agreement",)})
  config.teacher.source = None
  built = evaluators.build_evaluators(config, run_builder.build_models(config))
  assert built.scheduled == {} and built(config.train.total_steps, None) == {}
