r"""The recipe ablation: one teacher, every recipe x step budget x seed, against the same
student trained without a teacher on exactly the same data.

    python -m clipdistill_jax.main --config configs/demo.py --workdir /tmp/ablation \
        --config.mode=ablation

Layout under the workdir (rerunning resumes: a finished run is read back, an unfinished one
resumes from its checkpoint):
  teacher/                          the teacher stage, as in experiment mode (if any)
  ablation/teacher.json             the teacher's zero-shot scores and predictions
  ablation/student_config.json      the student's shape, derived from the teacher
  ablation/runs/NAME-sSTEPS-seedK/  one training run each (config.json, checkpoints,
                                    metrics); result.json once evaluated
  ablation/ablation.md/.json/.png   the table, the raw runs and the figure

A run with seed K sets config.seed (init) and data.seed (data order and, for the synthetic
source, which examples make up data.num_train_examples) to K, so the three seeds vary
everything but the teacher. The no-teacher student ('no_teacher') is trained at every step
budget in ablation.baseline_steps (default: ablation.steps), so a recipe's gain is reported
both against the baseline at the same steps and against the baseline at its best budget: a
gain is never an artifact of an over- or under-trained baseline.
"""

from __future__ import annotations

import json
import re
import textwrap
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from clipdistill_jax import experiment, recipes, report, run_builder, train
from clipdistill_jax.eval.evaluators import EvalData
from clipdistill_jax.eval.metrics import teacher_agreement
from clipdistill_jax.models import hf
from clipdistill_jax.models.clip import CLIPModel

NO_TEACHER = "no_teacher"


def _run_config(config: ml_collections.ConfigDict, recipe: str, steps: int, seed: int,
                teacher_source: str, student_file: Path) -> ml_collections.ConfigDict:
  changes: dict[str, Any] = {"seed": seed, "data.seed": seed, "train.total_steps": steps,
                             "eval.every": 0, "evals": ()}  # scored once, after training
  if recipe == NO_TEACHER:
    # The experiment's baseline: the student the config derives from the teacher (its exact
    # config.json, so tokenizer, pooling and geometry match), contrastive only.
    changes.update({"teacher.source": None, "teacher.cache_dir": None,
                    "student.arch": "file", "student.file": str(student_file),
                    "student.init": "random"})
    return experiment.stage_config(config, **changes)
  changes["teacher.source"] = teacher_source
  return experiment.stage_config(recipes.apply_recipe(config, recipe), **changes)


def _dir_name(recipe: str) -> str:
  """A recipe entry as a folder name ('affinity:loss.teacher_logit_scale=50' ->
  'affinity_loss.teacher_logit_scale-50')."""
  return re.sub(r"[^A-Za-z0-9_.-]", "_", recipe.replace("=", "-").replace(":", "_"))


def _grid(config: ml_collections.ConfigDict) -> list[tuple[str, int, int]]:
  """(recipe, steps, seed) of every run. A recipe entry 'NAME@STEPS' runs at STEPS only,
  a plain 'NAME' at every budget in ablation.steps."""
  ab = config.ablation
  if not ab.seeds or not ab.steps or not ab.recipes:
    raise ValueError("ablation.recipes, ablation.steps and ablation.seeds must be non-empty.")
  budgets = []
  for entry in ab.recipes:
    recipe, at, steps = entry.rpartition("@") if "@" in entry else (entry, "", "")
    if at and not steps.isdigit():
      raise ValueError(f"ablation.recipes entry {entry!r}: write 'recipe@STEPS', e.g. "
                       "'clip_kd@1000'.")
    recipes.recipe_overrides(recipe)  # refuse an unknown name before any training
    budgets.append((recipe, (int(steps),) if at else tuple(int(s) for s in ab.steps)))
  baseline_steps = tuple(ab.baseline_steps) or tuple(ab.steps)
  runs = [(NO_TEACHER, int(s), int(seed)) for s in baseline_steps for seed in ab.seeds]
  runs += [(r, s, int(seed)) for r, steps in budgets for s in steps for seed in ab.seeds]
  return runs


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and evaluates every run of the grid (resuming), writes the report, returns it."""
  workdir_path = Path(workdir)
  out = workdir_path / "ablation"
  grid = _grid(config)
  teacher_source = experiment.prepare_teacher(config, workdir_path)

  teacher_config, teacher_params = hf.load_pretrained(teacher_source)
  student_file = out / "student_config.json"
  if not student_file.exists():  # every host writes the same file, atomically: no race
    out.mkdir(parents=True, exist_ok=True)
    tmp = student_file.with_suffix(f".tmp{jax.process_index()}")
    run_builder.make_student_config(config.student, teacher_config).to_json_file(tmp)
    tmp.replace(student_file)
  evaluator = EvalData(config, teacher_config.vision_config.image_size,
                                   teacher_config.text_config.max_position_embeddings)
  teacher_file = out / "teacher.json"
  if teacher_file.exists():
    teacher = json.loads(teacher_file.read_text())
  else:
    teacher = _zero_shot(config, evaluator, CLIPModel(teacher_config), teacher_params)
    _write_json(teacher_file, teacher)
  del teacher_params

  results = []
  for recipe, steps, seed in grid:
    run_dir = out / "runs" / f"{_dir_name(recipe)}-s{steps}-seed{seed}"
    result_file = run_dir / "result.json"
    if result_file.exists():
      results.append(json.loads(result_file.read_text()))
      continue
    logging.info("Ablation run %s (%d steps, seed %d) ...", recipe, steps, seed)
    run_config = _run_config(config, recipe, steps, seed, teacher_source, student_file)
    train.dump_config(run_config, str(run_dir))  # what this run was, for export and reruns
    start = time.time()
    trained = train.train(run_config, str(run_dir))
    wall = time.time() - start
    student = trained["models"]
    scores = _zero_shot(config, evaluator, CLIPModel(student.student_config),
                        jax.device_get(trained["student_params"]))
    result = {"recipe": recipe, "steps": steps, "seed": seed, "train_wall_s": wall,
              "top1": scores["top1"], "top5": scores["top5"],
              "teacher_agreement": teacher_agreement(scores["predictions"],
                                                              teacher["predictions"]),
              "loss": {k: v for k, v in trained["metrics"].items() if k.startswith("loss/")}}
    if jax.process_index() == 0:
      _write_json(result_file, result)
    results.append(result)

  summary = summarize(results, teacher["top1"])
  if jax.process_index() == 0:
    paths = write_report(summary, results, teacher, out, dataset=config.eval.zero_shot[0])
    print(f"\nRecipe ablation ({config.eval.zero_shot[0]} held-out zero-shot, "
          f"{len(config.ablation.seeds)} seeds; teacher top-1 {100 * teacher['top1']:.1f}%):\n\n"
          f"{format_table(summary)}\n\nReport files: "
          + ", ".join(str(p) for p in paths.values()))
  return {"summary": summary, "runs": results, "teacher": teacher}


def _zero_shot(config, evaluator: EvalData, model: CLIPModel, params) -> dict:
  main = evaluator.zero_shot_scores(model, params)[config.eval.zero_shot[0]]
  return {"top1": float(main["top1"]), "top5": float(main["top5"]),
          "num_examples": int(main["num_examples"]),
          "predictions": np.asarray(main["predictions"]).astype(int).tolist(),
          "subset": main.get("subset")}


def _write_json(path: Path, data: Any) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(data, indent=1))
  tmp.replace(path)  # a killed run never leaves half a result that would be read back


# --- summary ----------------------------------------------------------------------------------

def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def summarize(results: Sequence[Mapping[str, Any]], teacher_top1: float) -> list[dict]:
  """One row per (recipe, steps): mean and std over seeds of top-1, % of the teacher, gain
  over the no-teacher student at the same steps (paired by seed) and over its best budget
  (the step count with the highest mean top-1), teacher agreement and wall time."""
  groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
  for r in results:
    groups.setdefault((r["recipe"], int(r["steps"])), []).append(r)
  baseline = {steps: {r["seed"]: r["top1"] for r in rs}
              for (name, steps), rs in groups.items() if name == NO_TEACHER}
  best_steps = max(baseline, key=lambda s: np.mean(list(baseline[s].values())), default=None)
  rows = []
  for (name, steps), rs in groups.items():
    top1 = [r["top1"] for r in rs]
    row = {"recipe": name, "steps": steps, "seeds": len(rs),
           "top1": _mean_std(top1),
           "of_teacher": _mean_std([t / teacher_top1 if teacher_top1 else np.nan
                                    for t in top1]),
           "agreement": _mean_std([r["teacher_agreement"] for r in rs]),
           "wall_s": _mean_std([r["train_wall_s"] for r in rs])}
    same = baseline.get(steps, {})
    paired = [r["top1"] - same[r["seed"]] for r in rs if r["seed"] in same]
    if paired and name != NO_TEACHER:
      row["gain_same_steps"] = _mean_std(paired)
    if best_steps is not None and name != NO_TEACHER:
      row["gain_best_baseline"] = _mean_std(
          [r["top1"] - baseline[best_steps][r["seed"]] for r in rs
           if r["seed"] in baseline[best_steps]])
      row["best_baseline_steps"] = best_steps
    rows.append(row)
  rows.sort(key=lambda r: (r["recipe"] != NO_TEACHER, r["steps"], -r["top1"][0]))
  return rows


def _pm(value: tuple[float, float] | None, scale: float = 100.0, digits: int = 1) -> str:
  if value is None:
    return report.MISSING
  return f"{scale * value[0]:.{digits}f} ± {scale * value[1]:.{digits}f}"


def format_table(summary: Sequence[Mapping[str, Any]]) -> str:
  """The ablation as Markdown: mean ± std over seeds, rates in percent."""
  header = ["Recipe", "Steps", "Seeds", "Zero-shot top-1 (%)", "% of teacher",
            "Gain vs no-teacher, same steps (pt)", "Gain vs best no-teacher (pt)",
            "Teacher agreement (%)", "Train wall time (s)"]
  body = [[str(r["recipe"]), str(r["steps"]), str(r["seeds"]), _pm(r["top1"]),
           _pm(r["of_teacher"]), _pm(r.get("gain_same_steps")),
           _pm(r.get("gain_best_baseline")) + (f" (at {r['best_baseline_steps']})"
                                               if r.get("best_baseline_steps") else ""),
           _pm(r["agreement"]), _pm(r["wall_s"], scale=1.0, digits=0)] for r in summary]
  return report._markdown(header, body, left=1)


def write_report(summary: Sequence[Mapping[str, Any]], results: Sequence[Mapping[str, Any]],
                 teacher: Mapping[str, Any], out: Path, dataset: str) -> dict[str, Path]:
  """ablation.md, ablation.json (summary, every run, the teacher's scores) and ablation.png."""
  out.mkdir(parents=True, exist_ok=True)
  paths = {"markdown": out / "ablation.md", "json": out / "ablation.json",
           "figure": out / "ablation.png"}
  notes = [f"Zero-shot on {dataset} (held out), {teacher['num_examples']} images; teacher "
           f"top-1 {100 * teacher['top1']:.1f}%. Mean ± sample std over seeds. Gains are "
           "paired by seed. Wall time: training only, this machine."]
  if teacher.get("subset"):  # eval.max_examples left part of the set out
    notes.append(f"Zero-shot evaluated on {teacher['subset']}.")
  paths["markdown"].write_text("\n".join(["# Recipe ablation", "", *notes, "",
                                          format_table(summary), "",
                                          "![Ablation](ablation.png)", ""]), encoding="utf-8")
  teacher_scores = {k: v for k, v in teacher.items() if k != "predictions"}
  _write_json(paths["json"], {"teacher": teacher_scores, "summary": list(summary),
                              "runs": list(results)})
  plot(summary, teacher["top1"], paths["figure"])
  return paths


def plot(summary: Sequence[Mapping[str, Any]], teacher_top1: float, path: Path) -> None:
  """Bars of mean zero-shot top-1 (error bars: std over seeds), the teacher as a line."""
  plt = report._pyplot()
  labels = ["\n".join(textwrap.wrap(str(r["recipe"]).replace(":", " "), 18))
            + f"\n{r['steps']} steps" for r in summary]
  means = [100 * r["top1"][0] for r in summary]
  stds = [100 * r["top1"][1] for r in summary]
  colours = ["0.6" if r["recipe"] == NO_TEACHER else "tab:blue" for r in summary]
  fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(summary)), 5.0))
  ax.bar(range(len(summary)), means, yerr=stds, color=colours, capsize=4)
  ax.axhline(100 * teacher_top1, color="tab:red", linestyle="--",
             label=f"teacher {100 * teacher_top1:.1f}%")
  ax.axhline(95 * teacher_top1, color="tab:red", linestyle=":", label="95% of teacher")
  for i, (m, s) in enumerate(zip(means, stds, strict=True)):
    ax.text(i, m + s + 0.3, f"{m:.1f}", ha="center", va="bottom", fontsize=8)
  ax.set_xticks(range(len(summary)), labels, fontsize=7)
  ax.set_ylabel("Zero-shot top-1 (%)")
  ax.set_title("Distillation recipes: mean ± std over seeds")
  ax.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
