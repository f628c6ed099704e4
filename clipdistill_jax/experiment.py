"""The article's experiment, measured: Teacher vs Student-Distilled vs Student-NoTeacher.

    python -m clipdistill_jax.main --config configs/demo.py --workdir /tmp/demo

Stages, each its own resumable run under the workdir (rerunning skips what is finished):
  teacher/      only when experiment.teacher_steps > 0: a teacher trained contrastively on
                all of the training data (the offline demo has no hub), exported as an HF
                directory; the students see data.num_train_examples of it
  distilled/    the student distilled from the teacher (config.loss)
  no_teacher/   the same student, same steps, data, schedule and seed: contrastive loss only
  report/       results.md/json/csv, comparison.png, training_curves.png

Evaluation (also used every config.eval.every steps during training, via make_eval_fn):
zero-shot top-1/top-5 on config.eval.zero_shot[0], retrieval R@k on the data's held-out
captions, top-1 agreement of each student's zero-shot predictions with the teacher's, and
measured size / latency / memory (evaluate.model_stats).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from clipdistill_jax import recipes, report, run_builder, train
from clipdistill_jax.data import pipeline
from clipdistill_jax.data.tokenizer import load_tokenizer
from clipdistill_jax.eval import evaluate
from clipdistill_jax.eval.datasets import load_zero_shot_dataset
from clipdistill_jax.eval.metrics import teacher_agreement
from clipdistill_jax.eval.stats import model_stats
from clipdistill_jax.models import hf
from clipdistill_jax.models.clip import CLIPModel
from clipdistill_jax.writers import read_jsonl

TEACHER, DISTILLED, NO_TEACHER = "Teacher", "Student-Distilled", "Student-NoTeacher"


# ----------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------

class Evaluator:
  """Evaluates any CLIP (teacher or student) on the config's eval data; caches datasets."""

  def __init__(self, config: ml_collections.ConfigDict, image_size: int, context_length: int):
    self.config = config
    self.image_size, self.context_length = image_size, context_length
    self.tokenizer = load_tokenizer(config.get("tokenizer"))
    ec = config.eval
    self.zero_shot = [load_zero_shot_dataset(
        name, ec.get("zero_shot_split", "test"), image_size, data_dir=config.data.data_dir,
        max_examples=ec.max_examples) for name in ec.zero_shot]
    self.templates = ec.templates

  def zero_shot_scores(self, model: CLIPModel, params: Any) -> dict[str, dict]:
    out = {}
    for name, dataset in zip(self.config.eval.zero_shot, self.zero_shot, strict=True):
      out[name] = evaluate.evaluate_zero_shot(
          model, params, self.tokenizer, dataset, context_length=self.context_length,
          batch_size=self.config.eval.batch_size, templates=self.templates)
    return out

  def retrieval(self, model: CLIPModel, params: Any) -> dict | None:
    if not self.config.eval.get("retrieval"):
      return None
    dataset = pipeline.make_eval_dataset(
        self.config.data, batch_size=self.config.eval.batch_size, image_size=self.image_size,
        context_length=self.context_length, tokenizer=self.tokenizer)
    return evaluate.evaluate_retrieval(model, params, dataset,
                                       batch_size=self.config.eval.batch_size)


def make_eval_fn(config: ml_collections.ConfigDict
                 ) -> Callable[[int, run_builder.Models, Any], dict] | None:
  """The trainer's periodic hook: zero-shot top-1/top-5 of the student on each dataset."""
  if not config.eval.get("zero_shot") or not config.eval.get("every"):
    return None
  evaluator: list[Evaluator] = []

  def eval_fn(step: int, models: run_builder.Models, student_params: Any) -> dict:
    if not evaluator:
      s = models.student_config
      evaluator.append(Evaluator(config, s.vision_config.image_size,
                                 s.text_config.max_position_embeddings))
    scores = evaluator[0].zero_shot_scores(models.student, student_params)
    return {f"eval/{name}/{k}": float(v[k]) for name, v in scores.items()
            for k in ("top1", "top5")}
  return eval_fn


def evaluate_models(config: ml_collections.ConfigDict,
                    models: dict[str, tuple[CLIPModel, Any]]) -> list[dict]:
  """One results row per model; agreement is measured against the model named Teacher."""
  first = next(iter(models.values()))[0].config
  evaluator = Evaluator(config, first.vision_config.image_size,
                        first.text_config.max_position_embeddings)
  rows, predictions = [], {}
  for name, (model, params) in models.items():
    logging.info("Evaluating %s ...", name)
    row: dict[str, Any] = {"model": name}
    zero_shot = evaluator.zero_shot_scores(model, params)
    if zero_shot:
      main = zero_shot[config.eval.zero_shot[0]]
      row.update(zero_shot_top1=main["top1"], zero_shot_top5=main["top5"],
                 zero_shot_examples=main["num_examples"])
      predictions[name] = main["predictions"]
    retrieval = evaluator.retrieval(model, params)
    if retrieval:
      row.update({f"retrieval_{k}": retrieval[k] for k in
                  ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")})
    stats = model_stats(model, params, batch_sizes=(1, 32),
                                 repeats=config.eval.get("stats_repeats", 5))
    row.update({k: stats[k] for k in ("params_m", "size_mb_fp32", "size_mb_bf16",
                                      "latency_ms_b1", "throughput_b32", "peak_memory_mb",
                                      "text_latency_ms_b1")})
    rows.append(row)
  if TEACHER in predictions:
    for row in rows:
      if row["model"] in predictions:
        row["teacher_agreement"] = teacher_agreement(predictions[row["model"]],
                                                              predictions[TEACHER])
  return rows


# ----------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------

def stage_config(config: ml_collections.ConfigDict, **changes: Any) -> ml_collections.ConfigDict:
  """A copy of `config` (unlocked) with dotted fields changed: {'train.total_steps': 10}."""
  stage = copy.deepcopy(config)
  stage.unlock()
  for dotted, value in changes.items():
    recipes.set_dotted(stage, dotted, value)
  return stage


def _train_teacher(config: ml_collections.ConfigDict, workdir: Path) -> str:
  """Trains the demo teacher contrastively and exports it as an HF directory."""
  hf_dir = workdir / "teacher" / "hf"
  if (hf_dir / hf.SAFETENSORS).exists():
    return str(hf_dir)
  ex = config.experiment
  # The teacher reads ALL of the training data (data.num_train_examples=None): like the real
  # teacher, it has seen more than the students, who get data.num_train_examples.
  stage = stage_config(
      config, **{"teacher.source": None, "teacher.cache_dir": None, "student.arch": "custom",
                 "student.init": "random",
                 "student.custom": ex.teacher_arch.to_dict(),
                 "data.num_train_examples": None,
                 "train.total_steps": ex.teacher_steps, "optim.lr": ex.teacher_lr})
  result = train.train(stage, str(workdir / "teacher"), eval_fn=make_eval_fn(stage))
  hf.save_pretrained(result["models"].student_config,
                     jax.device_get(result["student_params"]), hf_dir)
  return str(hf_dir)


def prepare_teacher(config: ml_collections.ConfigDict, workdir: Path) -> str:
  """The teacher's source: config.teacher.source, or the teacher stage's HF directory when
  experiment.teacher_steps > 0 (trained first, or found finished in workdir/teacher)."""
  teacher_source = config.teacher.source
  if config.experiment.teacher_steps > 0:
    teacher_source = _train_teacher(config, workdir)
  if not teacher_source:
    raise ValueError(f"mode {config.mode!r} needs a teacher: set teacher.source, or "
                     "experiment.teacher_steps > 0 to train one first.")
  return teacher_source


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Runs every stage (resuming finished ones) and writes the report; returns the rows."""
  workdir_path = Path(workdir)
  start = time.time()
  teacher_source = prepare_teacher(config, workdir_path)

  distilled_cfg = stage_config(config, **{"teacher.source": teacher_source})
  distilled = train.train(distilled_cfg, str(workdir_path / "distilled"),
                          eval_fn=make_eval_fn(distilled_cfg))
  # The baseline: same student, steps, data, schedule, seed; no teacher, contrastive only.
  baseline_cfg = stage_config(
      config, **{"teacher.source": None, "teacher.cache_dir": None, "student.arch": "file",
                 "student.init": "random",
                 "student.file": str(workdir_path / "distilled" / "student_config.json")})
  no_teacher = train.train(baseline_cfg, str(workdir_path / "no_teacher"),
                           eval_fn=make_eval_fn(baseline_cfg))

  teacher_config, teacher_params = hf.load_pretrained(teacher_source)
  student_config = distilled["models"].student_config
  models = {
      TEACHER: (CLIPModel(teacher_config), teacher_params),
      DISTILLED: (CLIPModel(student_config), jax.device_get(distilled["student_params"])),
      NO_TEACHER: (CLIPModel(no_teacher["models"].student_config),
                   jax.device_get(no_teacher["student_params"])),
  }
  rows = evaluate_models(config, models)
  curves = {}
  for name, sub in ((TEACHER, "teacher"), (DISTILLED, "distilled"),
                    (NO_TEACHER, "no_teacher")):
    metrics = read_jsonl(workdir_path / sub / "metrics.jsonl")
    if metrics:
      curves[name] = report.curves_from_metrics(metrics)
  if jax.process_index() == 0:
    paths = report.write_report(rows, curves, workdir_path / "report")
    table = report.format_table(rows)
    print(f"\nTeacher vs distilled vs no-teacher student ({config.eval.zero_shot[0]} "
          f"held-out zero-shot, measured on {jax.devices()[0].platform}; total wall time "
          f"{time.time() - start:.0f} s):\n\n{table}\n")
    print("Report files: " + ", ".join(str(p) for p in paths.values()))
  return rows


def summarize(rows: list[dict]) -> dict[str, float]:
  """{model: zero-shot top-1} for quick checks."""
  return {row["model"]: float(row.get("zero_shot_top1", np.nan)) for row in rows}
