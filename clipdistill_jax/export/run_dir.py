"""Which training run a --workdir names, and what that run says about itself.

`python -m clipdistill_jax.main --workdir WORKDIR` writes one of three layouts (and
WORKDIR/config.json, the full config, in all of them):

  mode 'train'        WORKDIR/checkpoints
  mode 'experiment'   WORKDIR/distilled/checkpoints, WORKDIR/no_teacher/checkpoints,
                      WORKDIR/teacher/ (only with experiment.teacher_steps > 0; teacher/hf is
                      the trained teacher as an HF directory), WORKDIR/report/results.json
  mode 'ablation'     WORKDIR/ablation/runs/NAME-sSTEPS-seedK/checkpoints (and teacher/)

`resolve_run` maps (WORKDIR, stage) to the folder holding the checkpoints to export:
an experiment's distilled student by default, `stage` 'no_teacher' or 'teacher' for the
others, an ablation run by its folder name. A stage folder given directly as WORKDIR
(WORKDIR/distilled) is understood too. Anything else raises RunNotFoundError listing what
the folder holds.

Only the standard library and numpy here; JAX is imported by the loaders that need it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"
STAGES = ("distilled", "no_teacher", "teacher")
DEFAULT_STAGE = "distilled"
ABLATION_RUNS = Path("ablation") / "runs"
TEACHER_HF = Path("teacher") / "hf"
RESULTS = Path("report") / "results.json"
RUN_CONFIG = "config.json"
# experiment.py's row names, in the order a results table lists them.
RESULT_ROWS = (("Teacher", "teacher"), ("Student-Distilled", "distilled"),
               ("Student-NoTeacher", "no_teacher"))


class RunNotFoundError(FileNotFoundError):
  """--workdir (with --stage) names no training run that has checkpoints."""


@dataclasses.dataclass(frozen=True)
class RunDir:
  """A resolved run. `checkpoints_dir` is None only for an experiment's teacher stage that
  was kept as an HF directory alone (then `hf_dir` is set)."""
  root: Path                      # the --workdir given (the experiment's root for a stage)
  kind: str                       # "train", "experiment" or "ablation"
  stage: str | None               # "distilled", "no_teacher", "teacher", an ablation run, None
  run_dir: Path                   # the folder whose checkpoints/ (or hf/) is exported
  config: dict[str, Any] | None   # WORKDIR/config.json, None if the run has none
  hf_dir: Path | None = None      # teacher stage: the HF directory the experiment wrote

  @property
  def has_checkpoints(self) -> bool:
    return (self.run_dir / CHECKPOINTS).is_dir()

  @property
  def label(self) -> str:
    return f"{self.root} ({self.kind}" + (f", {self.stage})" if self.stage else ")")

  def results(self) -> list[dict[str, Any]] | None:
    """The rows of WORKDIR/report/results.json (experiment mode), or None."""
    path = self.root / RESULTS
    if not path.is_file():
      return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data.get("rows", data) if isinstance(data, dict) else data

  def run_config(self) -> dict[str, Any] | None:
    """The config this run trained with, as far as the workdir tells: WORKDIR/config.json,
    with an ablation run's recipe, steps and seed (from its folder name) applied, since the
    ablation writes only the root config. A recipe whose name the folder mangled (knob
    changes after a colon) keeps its name and loses its weights (None: unknown)."""
    if self.kind != "ablation" or not self.config or self.stage is None:
      return self.config
    match = re.fullmatch(r"(.+)-s(\d+)-seed(\d+)", self.stage)
    if not match:
      return self.config
    recipe, steps, seed = match.group(1), int(match.group(2)), int(match.group(3))
    config = copy.deepcopy(self.config)
    config.setdefault("train", {})["total_steps"] = steps
    config["seed"] = seed
    loss = config.setdefault("loss", {})
    if recipe == "no_teacher":
      loss.update(recipe="none: no teacher, contrastive loss only", weights=None)
      config.setdefault("teacher", {})["source"] = None
      return config
    from clipdistill_jax import recipes
    try:
      overrides = recipes.recipe_overrides(recipe)
    except ValueError:
      loss.update(recipe=f"{recipe} (the ablation folder's name)", weights=None)
      return config
    for dotted, value in overrides.items():
      *parents, last = dotted.split(".")
      node = config
      for key in parents:
        node = node.setdefault(key, {})
      node[last] = value
    loss["recipe"] = recipe
    return config

  def teacher_source(self) -> str | None:
    """The teacher this run distilled from: the experiment's trained teacher (teacher/hf)
    when there is one, else config.json's teacher.source; None when neither exists."""
    hf_dir = self.root / TEACHER_HF
    if (hf_dir / "config.json").is_file():
      return str(hf_dir)
    return config_value(self.config, "teacher.source")


def config_value(config: dict[str, Any] | None, dotted: str, default: Any = None) -> Any:
  """config['a']['b'] for 'a.b'; `default` when any level is missing or None."""
  node: Any = config
  for key in dotted.split("."):
    if not isinstance(node, dict) or node.get(key) is None:
      return default
    node = node[key]
  return node


def read_run_config(directory: Path) -> dict[str, Any] | None:
  path = directory / RUN_CONFIG
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise RunNotFoundError(f"{path} is not valid JSON ({e}); it should be the config the "
                           "run dumped, restore or delete it.") from e


def _ablation_runs(root: Path) -> list[str]:
  runs = root / ABLATION_RUNS
  return sorted(p.name for p in runs.iterdir() if (p / CHECKPOINTS).is_dir()) \
      if runs.is_dir() else []


def _listing(root: Path, limit: int = 12) -> str:
  if not root.is_dir():
    return "it does not exist"
  names = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
  if not names:
    return "it is empty"
  shown = ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit
                                      else "")
  return f"it holds {shown}"


def _no_run(root: Path, config: dict[str, Any] | None) -> RunNotFoundError:
  mode = config_value(config, "mode")
  started = f" (config.json says mode {mode!r}: has it saved a checkpoint yet?)" if mode else ""
  return RunNotFoundError(
      f"no training run in {root}: {_listing(root)}{started}. Expected checkpoints/ (mode "
      f"'train'), distilled/ no_teacher/ teacher/ (mode 'experiment') or {ABLATION_RUNS}/ (mode "
      f"'ablation'); train first with `python -m clipdistill_jax.main --config "
      f"configs/small.py --workdir {root}`.")


def resolve_run(workdir: str | Path, stage: str | None = None) -> RunDir:
  """The run to export from `workdir`; see the module docstring for the layouts.

  stage: None (a train run, or an experiment's distilled student), 'distilled',
    'no_teacher', 'teacher', or an ablation run's folder name (NAME-sSTEPS-seedK).
  Raises RunNotFoundError naming what was found and what to pass instead.
  """
  root = Path(workdir).expanduser()
  if not root.is_dir():
    raise RunNotFoundError(f"--workdir {root} does not exist; give the --workdir the "
                           "training command used.")
  # A stage folder given directly: treat it as that stage of its experiment.
  if stage is None and root.name in STAGES and (root.parent / RUN_CONFIG).is_file() \
      and not (root / RUN_CONFIG).is_file():
    return resolve_run(root.parent, root.name)
  config = read_run_config(root)
  if (root / CHECKPOINTS).is_dir():
    if stage is not None:
      raise RunNotFoundError(f"{root} is a single training run (mode 'train'); --stage "
                             f"{stage} applies to experiment and ablation workdirs, drop it.")
    return RunDir(root, "train", None, root, config)

  ablation_runs = _ablation_runs(root)
  is_experiment = any((root / s).is_dir() for s in STAGES) or (root / RESULTS).is_file()
  if is_experiment and not (ablation_runs and stage not in (None, *STAGES)):
    stage = stage or DEFAULT_STAGE
    if stage not in STAGES:
      raise RunNotFoundError(f"--stage {stage}: an experiment workdir has stages "
                             f"{', '.join(STAGES)}; pick one.")
    run_dir = root / stage
    hf_dir = root / TEACHER_HF if stage == "teacher" else None
    if hf_dir is not None and not (hf_dir / "config.json").is_file():
      hf_dir = None
    if not (run_dir / CHECKPOINTS).is_dir() and hf_dir is None:
      found = [s for s in STAGES if (root / s / CHECKPOINTS).is_dir()]
      have = f"stages with checkpoints: {', '.join(found)}" if found else \
          "no stage has checkpoints yet"
      raise RunNotFoundError(f"{root} is an experiment workdir but {stage}/{CHECKPOINTS} "
                             f"does not exist ({have}); pass --stage with one of those, or "
                             "let the experiment finish.")
    return RunDir(root, "experiment", stage, run_dir, config, hf_dir)

  if ablation_runs:
    if stage is None or stage not in ablation_runs:
      shown = ", ".join(ablation_runs[:8]) + (", ..." if len(ablation_runs) > 8 else "")
      what = "pick one" if stage is None else f"--stage {stage} is not one of them"
      raise RunNotFoundError(f"{root} is an ablation workdir with {len(ablation_runs)} runs "
                             f"({shown}); {what} with --stage RUN.")
    return RunDir(root, "ablation", stage, root / ABLATION_RUNS / stage, config)
  raise _no_run(root, config)


def load_run_student(run: RunDir, step: int | None = None):
  """(CLIPConfig, params as numpy, step or None) of the resolved run: its latest (or `step`)
  checkpoint, or an experiment teacher's HF directory when it has no checkpoints."""
  if run.has_checkpoints:
    from clipdistill_jax.checkpoints import load_student
    return load_student(str(run.run_dir), step)
  if run.hf_dir is None:
    raise RunNotFoundError(f"{run.run_dir / CHECKPOINTS} does not exist.")
  if step is not None:
    raise RunNotFoundError(f"{run.label} keeps only its final HF directory {run.hf_dir}; "
                           "drop --step.")
  import jax
  import numpy as np

  from clipdistill_jax.models import hf
  config, params = hf.load_pretrained(str(run.hf_dir))
  return config, jax.tree_util.tree_map(np.asarray, params), None
