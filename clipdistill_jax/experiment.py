"""The article's experiment, measured: Teacher vs Student-Distilled vs Student-NoTeacher.

    python -m clipdistill_jax.main --config configs/demo.py --workdir /tmp/demo

Stages, each its own resumable run under the workdir (rerunning skips what is finished):
  teacher/      only when experiment.teacher_steps > 0: a teacher trained contrastively on
                all of the training data (the offline demo has no hub), exported as an HF
                directory; the students see data.num_train_examples of it
  distilled/    the student distilled from the teacher (config.loss)
  no_teacher/   the same student, same steps, data, schedule and seed: contrastive loss only
  report/       results.md/json/csv, comparison.png, training_curves.png

Evaluation (eval/evaluators.py, whose evaluators also run during training as config.evals
names them): zero-shot top-1/top-5 on config.eval.zero_shot[0], retrieval R@k on the data's
held-out captions (eval.retrieval), top-1 agreement of each student's zero-shot predictions
with the teacher's, and measured size / latency / memory (eval/stats.py).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from clipdistill_jax import recipes, report, train
from clipdistill_jax.eval import evaluators
from clipdistill_jax.models import hf
from clipdistill_jax.models.clip import CLIPModel
from clipdistill_jax.writers import read_jsonl

TEACHER, DISTILLED, NO_TEACHER = evaluators.TEACHER, "Student-Distilled", "Student-NoTeacher"


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
  result = train.train(stage, str(workdir / "teacher"))
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
  distilled = train.train(distilled_cfg, str(workdir_path / "distilled"))
  # The baseline: same student, steps, data, schedule, seed; no teacher, contrastive only.
  baseline_cfg = stage_config(
      config, **{"teacher.source": None, "teacher.cache_dir": None, "student.arch": "file",
                 "student.init": "random",
                 "student.file": str(workdir_path / "distilled" / "student_config.json")})
  no_teacher = train.train(baseline_cfg, str(workdir_path / "no_teacher"))

  teacher_config, teacher_params = hf.load_pretrained(teacher_source)
  student_config = distilled["models"].student_config
  models = {
      TEACHER: (CLIPModel(teacher_config), teacher_params),
      DISTILLED: (CLIPModel(student_config), jax.device_get(distilled["student_params"])),
      NO_TEACHER: (CLIPModel(no_teacher["models"].student_config),
                   jax.device_get(no_teacher["student_params"])),
  }
  rows = evaluators.evaluate_models(config, models)
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
    for subset in dict.fromkeys(row["zero_shot_subset"] for row in rows
                                if row.get("zero_shot_subset")):
      print(f"Zero-shot evaluated on {subset}.\n")
    print("Report files: " + ", ".join(str(p) for p in paths.values()))
  return rows


def summarize(rows: list[dict]) -> dict[str, float]:
  """{model: zero-shot top-1} for quick checks."""
  return {row["model"]: float(row.get("zero_shot_top1", np.nan)) for row in rows}
