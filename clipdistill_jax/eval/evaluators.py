"""Evaluators by name, configured as big_vision's are: `config.evals` names the ones the
trainer runs, and each is built, its data opened, before step 1, so a missing dataset fails
in seconds, not at the first evaluation.

  zero_shot  the student's zero-shot top-1 / top-5 on each of eval.zero_shot
             (eval/{dataset}/top1, eval/{dataset}/top5)
  agreement  top-1 agreement of the student's zero-shot predictions with the teacher's on
             eval.zero_shot[0] (eval/{dataset}/teacher_agreement); the teacher's predictions
             are computed once, when it is built; a run without a teacher skips it
  retrieval  image<->text R@1 / R@5 on the data's held-out split, data.eval_split
             (eval/retrieval/i2t_r1, ...)

An entry is 'name' (every eval.every steps) or 'name@STEPS' (every STEPS steps); each runs
at the last step too; every 0 runs it never. EvalData holds the opened datasets and scores
any CLIP (teacher or student) on them: the experiment's results table (evaluate_models) and
the ablation use it too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
from absl import logging

from clipdistill_jax.data import pipeline
from clipdistill_jax.data.tokenizer import load_tokenizer
from clipdistill_jax.eval import evaluate
from clipdistill_jax.eval.datasets import ZeroShotDataset, load_zero_shot_dataset
from clipdistill_jax.eval.metrics import teacher_agreement
from clipdistill_jax.eval.prompts import eval_templates
from clipdistill_jax.eval.stats import model_stats
from clipdistill_jax.models.clip import CLIPModel
from clipdistill_jax.run_builder import ConfigError, Models

TEACHER = "Teacher"
STATS_KEYS = ("params_m", "size_mb_fp32", "size_mb_bf16", "latency_ms_b1", "throughput_b32",
              "peak_memory_mb", "text_latency_ms_b1")

Scores = Callable[[Any], dict[str, float]]  # student params -> scalars to log


def _open(batches) -> None:
  """Reads the first batch and lets go: a set that is missing, not prepared or unreadable
  fails here, before training, not at the first evaluation."""
  iterator = iter(batches)
  next(iterator, None)
  close = getattr(iterator, "close", None)
  if close is not None:
    close()


class EvalData:
  """The config's evaluation data, opened once; scores any CLIP (teacher or student) on it.

  zero_shot: eval.zero_shot's datasets (eval.zero_shot_split, at most eval.max_examples
  each); retrieval: the data's held-out captions (data.eval_split), opened only where
  `retrieval` is true. Raises FileNotFoundError / ValueError for a set that cannot be read.
  """

  def __init__(self, config: ml_collections.ConfigDict, image_size: int, context_length: int,
               *, retrieval: bool = False):
    self.config = config
    self.image_size, self.context_length = image_size, context_length
    self.tokenizer = load_tokenizer(config.tokenizer)
    ec = config.eval
    self.names = tuple(ec.zero_shot)
    self.templates = eval_templates(ec.templates)  # a bad prompt list fails here (ValueError)
    self.zero_shot: list[ZeroShotDataset] = []
    for name in self.names:
      dataset = load_zero_shot_dataset(name, ec.zero_shot_split, image_size,
                                       data_dir=config.data.data_dir,
                                       max_examples=ec.max_examples)
      _open(dataset.batches(1))
      self.zero_shot.append(dataset)
    self.retrieval_data = None
    if retrieval:
      self.retrieval_data = pipeline.make_eval_dataset(
          config.data, batch_size=ec.batch_size, image_size=image_size,
          context_length=context_length, tokenizer=self.tokenizer)
      _open(self.retrieval_data)

  def zero_shot_scores(self, model: CLIPModel, params: Any) -> dict[str, dict]:
    """{dataset name: evaluate_zero_shot's result} for each of eval.zero_shot."""
    return {name: evaluate.evaluate_zero_shot(
        model, params, self.tokenizer, dataset, context_length=self.context_length,
        batch_size=self.config.eval.batch_size, templates=self.templates)
        for name, dataset in zip(self.names, self.zero_shot, strict=True)}

  def retrieval(self, model: CLIPModel, params: Any) -> dict | None:
    """evaluate_retrieval's result on the held-out captions; None where not opened."""
    if self.retrieval_data is None:
      return None
    return evaluate.evaluate_retrieval(model, params, self.retrieval_data,
                                       batch_size=self.config.eval.batch_size)


# ----------------------------------------------------------------------------------------
# The registry: name -> builder(config, models, data) -> scores(student_params), or None
# where the evaluator does not apply to this run
# ----------------------------------------------------------------------------------------

def _zero_shot(config, models: Models, data: EvalData) -> Scores | None:
  if not data.names:
    return None

  def scores(params):
    return {f"eval/{name}/{k}": float(v[k])
            for name, v in data.zero_shot_scores(models.student, params).items()
            for k in ("top1", "top5")}
  return scores


def _agreement(config, models: Models, data: EvalData) -> Scores | None:
  if models.teacher is None or models.teacher_params is None or not data.names:
    logging.info("Evaluator 'agreement' skipped: the run has no teacher or no zero-shot set.")
    return None
  name, dataset = data.names[0], data.zero_shot[0]
  context_length = models.context_length
  teacher = evaluate.evaluate_zero_shot(
      models.teacher, models.teacher_params, data.tokenizer, dataset,
      context_length=context_length, batch_size=config.eval.batch_size,
      templates=data.templates)["predictions"]

  def scores(params):
    student = evaluate.evaluate_zero_shot(
        models.student, params, data.tokenizer, dataset, context_length=context_length,
        batch_size=config.eval.batch_size, templates=data.templates)["predictions"]
    return {f"eval/{name}/teacher_agreement": teacher_agreement(student, teacher)}
  return scores


def _retrieval(config, models: Models, data: EvalData) -> Scores | None:
  def scores(params):
    result = data.retrieval(models.student, params)
    return {f"eval/retrieval/{k}": float(result[k])
            for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")}
  return scores


EVALUATORS: dict[str, Callable[[ml_collections.ConfigDict, Models, EvalData], Scores | None]]
EVALUATORS = {"zero_shot": _zero_shot, "agreement": _agreement, "retrieval": _retrieval}


def parse_evals(config: ml_collections.ConfigDict) -> dict[str, int]:
  """config.evals as {name: every}; raises ConfigError for an unknown name or a bad STEPS."""
  schedule = {}
  for entry in config.evals:
    name, _, every = str(entry).partition("@")
    if name not in EVALUATORS:
      raise ConfigError(f"config.evals names {name!r}; known evaluators: "
                        f"{', '.join(EVALUATORS)} (optionally 'name@STEPS').")
    if every and not every.isdigit():
      raise ConfigError(f"config.evals entry {entry!r}: STEPS in 'name@STEPS' must be a "
                        "whole number of steps.")
    schedule[name] = int(every) if every else int(config.eval.every)
  return schedule


@dataclasses.dataclass
class Evaluators:
  """The run's evaluators, built: call with (step, student params) at every step; those
  due (every `every` steps, and at the last step) run and their scalars come back."""
  scheduled: dict[str, tuple[int, Scores]]
  total_steps: int

  def due(self, step: int) -> list[str]:
    return [name for name, (every, _) in self.scheduled.items()
            if every and (step % every == 0 or step == self.total_steps)]

  def __call__(self, step: int, student_params: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in self.due(step):
      out.update(self.scheduled[name][1](student_params))
    return out


def build_evaluators(config: ml_collections.ConfigDict, models: Models) -> Evaluators:
  """Every evaluator config.evals names, built and its data opened now (before step 1).

  Needs the teacher's host params for 'agreement': build before run_builder.build_run,
  which moves them onto the mesh. Raises ConfigError for an unknown evaluator, and
  FileNotFoundError / ValueError for evaluation data that cannot be read.
  """
  schedule = {name: every for name, every in parse_evals(config).items() if every}
  if not schedule:
    return Evaluators({}, config.train.total_steps)
  s = models.student_config
  data = EvalData(config, s.vision_config.image_size, s.text_config.max_position_embeddings,
                  retrieval="retrieval" in schedule)
  scheduled = {}
  for name, every in schedule.items():
    scores = EVALUATORS[name](config, models, data)
    if scores is not None:
      scheduled[name] = (every, scores)
  return Evaluators(scheduled, config.train.total_steps)


# ----------------------------------------------------------------------------------------
# The results table
# ----------------------------------------------------------------------------------------

def evaluate_models(config: ml_collections.ConfigDict,
                    models: Mapping[str, tuple[CLIPModel, Any]]) -> list[dict]:
  """One results row per model (zero-shot on eval.zero_shot[0], retrieval where
  eval.retrieval, size / speed / memory); agreement is measured against the model named
  Teacher."""
  first = next(iter(models.values()))[0].config
  data = EvalData(config, first.vision_config.image_size,
                  first.text_config.max_position_embeddings, retrieval=config.eval.retrieval)
  rows, predictions = [], {}
  for name, (model, params) in models.items():
    logging.info("Evaluating %s ...", name)
    row: dict[str, Any] = {"model": name}
    zero_shot = data.zero_shot_scores(model, params)
    if zero_shot:
      main = zero_shot[config.eval.zero_shot[0]]
      row.update(zero_shot_top1=main["top1"], zero_shot_top5=main["top5"],
                 zero_shot_examples=main["num_examples"])
      if main.get("subset"):  # the report's caption says it (report.NOTE_KEYS)
        row["zero_shot_subset"] = f"{config.eval.zero_shot[0]}: {main['subset']}"
      predictions[name] = main["predictions"]
    retrieval = data.retrieval(model, params)
    if retrieval:
      row.update({f"retrieval_{k}": retrieval[k] for k in
                  ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")})
    stats = model_stats(model, params, batch_sizes=(1, 32), repeats=config.eval.stats_repeats)
    row.update({k: stats[k] for k in STATS_KEYS})
    rows.append(row)
  if TEACHER in predictions:
    for row in rows:
      if row["model"] in predictions:
        row["teacher_agreement"] = teacher_agreement(predictions[row["model"]],
                                                     predictions[TEACHER])
  return rows

