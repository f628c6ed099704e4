"""Recipes and the recipe ablation: named recipes set the loss, the ablation trains one
teacher and every recipe x steps x seed against the no-teacher student, resumes, reports."""

import json

import numpy as np
import pytest
from ml_collections import config_dict

from clipdistill_jax import ablation, config_lib, recipes, train
from clipdistill_jax.config_lib import base_config

DEMO = config_lib.__file__.replace("clipdistill_jax/config_lib.py", "configs/demo.py")


def test_recipes_set_the_loss_and_the_student_init():
  config = base_config()
  config.lock()
  clip_kd = recipes.apply_recipe(config, "clip_kd")
  assert clip_kd.loss.recipe == "clip_kd" and clip_kd.student.init == "random"
  assert {k: v for k, v in clip_kd.loss.weights.items() if v} == {
      "fd": 2000 / 512, "icl": 1.0, "contrastive": 1.0}
  affinity = recipes.apply_recipe(config, "affinity_inherit")
  assert {k: v for k, v in affinity.loss.weights.items() if v} == {"logit_kl": 1.0}
  assert affinity.loss.teacher_logit_scale is None and affinity.student.init == "inherit"
  assert affinity.loss.temperature == 1.0
  tuned = recipes.apply_recipe(config, "affinity:loss.teacher_logit_scale=50")
  article = recipes.apply_recipe(tuned, "article")  # a recipe replaces every loss field
  assert article.loss.teacher_logit_scale is None and article.loss.weights.attention == 0.2
  # No recipe: the config as written; the input is never modified.
  assert recipes.apply_recipe(config).loss.weights == config.loss.weights
  assert config.loss.recipe is None and config.loss.weights.fd == 0.0
  with pytest.raises(ValueError, match="not a recipe; choose one of .*clip_kd"):
    recipes.apply_recipe(config, "clip-kd")


def test_recipe_knobs_after_a_colon():
  config = base_config()
  tuned = recipes.apply_recipe(
      config, "affinity_fd:loss.teacher_logit_scale=50,loss.weights.fd=20,student.init=inherit")
  assert tuned.loss.teacher_logit_scale == 50 and tuned.student.init == "inherit"
  assert tuned.loss.weights.fd == 20 and tuned.loss.weights.logit_kl == 1.0
  assert recipes.RECIPES["affinity_fd"]["loss.weights"]["fd"] == 2000 / 512  # not mutated
  assert recipes.apply_recipe(config, "affinity_fd").loss.weights.fd == 2000 / 512
  with pytest.raises(ValueError, match="recipe:field=value"):
    recipes.recipe_overrides("clip_kd:fd")
  assert ablation._dir_name("affinity:loss.teacher_logit_scale=50") == (
      "affinity_loss.teacher_logit_scale-50")


def summary_row(summary, recipe, steps):
  (row,) = [r for r in summary if r["recipe"] == recipe and r["steps"] == steps]
  return row


def test_summary_statistics_by_hand():
  runs = [{"recipe": "no_teacher", "steps": 10, "seed": s, "top1": t, "teacher_agreement": 0.5,
           "train_wall_s": 1.0} for s, t in ((0, 0.40), (1, 0.44))]
  runs += [{"recipe": "no_teacher", "steps": 20, "seed": s, "top1": t,
            "teacher_agreement": 0.5, "train_wall_s": 2.0} for s, t in ((0, 0.46), (1, 0.50))]
  runs += [{"recipe": "affinity", "steps": 10, "seed": s, "top1": t, "teacher_agreement": a,
            "train_wall_s": 3.0} for s, t, a in ((0, 0.60, 0.9), (1, 0.56, 0.8))]
  summary = ablation.summarize(runs, teacher_top1=0.64)
  row = summary_row(summary, "affinity", 10)
  np.testing.assert_allclose(row["top1"], (0.58, np.std([0.60, 0.56], ddof=1)))
  np.testing.assert_allclose(row["of_teacher"][0], 0.58 / 0.64)
  # Paired by seed: 0.60 - 0.40 and 0.56 - 0.44.
  np.testing.assert_allclose(row["gain_same_steps"], (0.16, np.std([0.20, 0.12], ddof=1)))
  assert row["best_baseline_steps"] == 20  # the baseline's best budget, not the same steps
  np.testing.assert_allclose(row["gain_best_baseline"], (0.10, np.std([0.14, 0.06], ddof=1)))
  np.testing.assert_allclose(row["agreement"][0], 0.85)
  assert "gain_same_steps" not in summary_row(summary, "no_teacher", 10)
  table = ablation.format_table(summary)
  assert ("| affinity | 10 | 2 | 58.0 ± 2.8 | 90.6 ± 4.4 | 16.0 ± 5.7 | 10.0 ± 5.7 (at 20) |"
          in table)


def tiny_ablation_config():
  """configs/demo.py shrunk to seconds: a 6-step teacher, 2 recipes x 2 seeds, 3 steps, the
  no-teacher student at the same budget."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("demo_config", DEMO)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.mode = "ablation"
  c.experiment.teacher_steps = 6
  c.train.update(dict(batch_size=16, checkpoint_every=2, log_every=2))
  c.data.update(dict(num_train_examples=32, num_eval_examples=48))
  c.eval.update(dict(max_examples=48, batch_size=48))
  c.ablation.update(dict(recipes=("clip_kd", "affinity_inherit"), steps=(3,), seeds=(0, 1),
                         baseline_steps=()))
  return c


def test_tiny_ablation_end_to_end_and_resume(tmp_path, monkeypatch):
  config = tiny_ablation_config()
  out = ablation.run(config, str(tmp_path))
  summary = out["summary"]
  assert {(r["recipe"], r["steps"], r["seeds"]) for r in summary} == {
      ("no_teacher", 3, 2), ("clip_kd", 3, 2), ("affinity_inherit", 3, 2)}
  for name in ("ablation.md", "ablation.json", "ablation.png", "teacher.json"):
    assert (tmp_path / "ablation" / name).stat().st_size > 0
  saved = json.loads((tmp_path / "ablation" / "ablation.json").read_text())
  assert len(saved["runs"]) == 6 and saved["teacher"]["num_examples"] == 48
  # The teacher saw the whole stream; each student its 32 examples.
  teacher_rows = [json.loads(line) for line in open(tmp_path / "teacher" / "metrics.jsonl")]
  assert max(r.get("data/num_read", 0) for r in teacher_rows) == 6 * 16
  run = json.loads((tmp_path / "ablation" / "runs" / "clip_kd-s3-seed1" / "result.json")
                   .read_text())
  assert run["loss"]["loss/fd"] > 0 and run["loss"]["loss/icl"] > 0
  assert run["loss"]["loss/hidden"] == 0.0
  inherit = json.loads((tmp_path / "ablation" / "runs" / "affinity_inherit-s3-seed0" /
                        "result.json").read_text())
  assert inherit["loss"]["loss/contrastive"] == 0.0 and inherit["loss"]["loss/logit_kl"] > 0
  for row in summary:
    assert 0.0 <= row["top1"][0] <= 1.0
  # The baseline is exactly the distilled student's shape, and every run keeps its config.
  runs_dir = tmp_path / "ablation" / "runs"
  assert ((runs_dir / "no_teacher-s3-seed0" / "student_config.json").read_text()
          == (runs_dir / "clip_kd-s3-seed0" / "student_config.json").read_text())
  dumped = json.loads((runs_dir / "clip_kd-s3-seed1" / "config.json").read_text())
  assert dumped["loss"]["recipe"] == "clip_kd" and dumped["seed"] == 1
  # Rerunning trains nothing: every run is read back from its result.json.
  monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("retrained a finished run"))
  again = ablation.run(config, str(tmp_path))
  assert ablation.format_table(again["summary"]) == ablation.format_table(summary)


def test_grid_with_per_recipe_budgets():
  config = tiny_ablation_config()
  config.ablation.update(dict(recipes=("article", "clip_kd_inherit@7"), steps=(3, 5),
                              seeds=(0, 1), baseline_steps=(5, 9)))
  grid = ablation._grid(config)
  assert sorted({(r, s) for r, s, _ in grid}) == [
      ("article", 3), ("article", 5), ("clip_kd_inherit", 7), ("no_teacher", 5),
      ("no_teacher", 9)]
  assert len(grid) == 10
  config.ablation.recipes = ("clip_kd@many",)
  with pytest.raises(ValueError, match="recipe@STEPS"):
    ablation._grid(config)


def test_unknown_recipe_is_refused_before_training(tmp_path):
  config = tiny_ablation_config()
  config.ablation.recipes = ("affinity", "fd_only")
  with pytest.raises(ValueError, match="'fd_only' is not a recipe"):
    ablation.run(config, str(tmp_path))
  assert not (tmp_path / "teacher").exists()


def test_base_config_knobs_are_settable_from_the_command_line():
  # Fields that default to None must still take a value from --config.x=... (placeholders).
  c = base_config()
  for field, value in (("loss.recipe", "clip_kd"), ("loss.teacher_logit_scale", 70.0),
                       ("data.num_train_examples", 100)):
    node, leaf = c, field.split(".")
    for part in leaf[:-1]:
      node = node[part]
    node[leaf[-1]] = value
    assert node[leaf[-1]] == value
  assert isinstance(c.loss.get_ref("teacher_logit_scale"), config_dict.FieldReference)
