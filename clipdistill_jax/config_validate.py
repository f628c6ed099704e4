"""validate(config): every problem of a config at once, before any device work or download.

The entry points call it after config_lib.resolve and the recipe, before the teacher is loaded
or a step compiles: a run that cannot work fails in seconds with one line per problem
(run_builder.ConfigError, printed by errors.boundary), not hours later at its first evaluation.
Checked: mode and the enumerations (dtypes, student.arch / init, loss.embed_projector), numbers
in range (loss weights >= 0, temperature > 0, learning rate > 0, steps, batch sizes), the
recipe name, local paths (the teacher directory with its config.json, data.path, data.data_dir,
student.file, folder: zero-shot sets, the tokenizer), what each data source needs, zero-shot set
names and template names, and with `num_devices` the mesh against the devices and the batch
against the data-parallel size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import ml_collections

from clipdistill_jax import losses, recipes
from clipdistill_jax.data import defaults
from clipdistill_jax.run_builder import DTYPES, ConfigError

MODES = ("train", "experiment", "ablation")
ARCHS = ("article", "teacher", "custom", "file")
INITS = ("random", "inherit")
PROJECTORS = ("auto", "linear")
_PATH_STARTS = ("/", ".", "~")


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
             process_count: int = 1) -> None:
  """Raises ConfigError listing every problem of `config`, one line each; None if it can run.

  num_devices: the devices the mesh spans (jax.device_count(); None skips the mesh and batch
  checks). process_count: hosts (the global batch is split evenly over them).
  """
  problems: list[str] = []
  for check in (_check_modes, _check_numbers, _check_recipe, _check_teacher, _check_data,
                _check_eval):
    check(config, problems.append)
  if num_devices is not None:
    _check_mesh(config, num_devices, process_count, problems.append)
  if problems:
    raise ConfigError("\n".join(problems))


def _local_path(value: str | None) -> bool:
  """A path the user meant as local (not a hub id, not gs://...): checkable here."""
  return bool(value) and "://" not in value and (
      value.startswith(_PATH_STARTS) or os.path.exists(value))


def _check_modes(c: ml_collections.ConfigDict, bad: Callable[[str], None]) -> None:
  choices = [("mode", c.mode, MODES), ("teacher.dtype", c.teacher.dtype, tuple(DTYPES)),
             ("student.dtype", c.student.dtype, tuple(DTYPES)),
             ("student.arch", c.student.arch, ARCHS), ("student.init", c.student.init, INITS),
             ("student.base", c.student.base, ("vit_b32", "tiny")),
             ("loss.embed_projector", c.loss.embed_projector, PROJECTORS)]
  for name, value, allowed in choices:
    if value not in allowed:
      bad(f"{name}={value!r}: use one of {', '.join(map(repr, allowed))}.")
  if c.student.arch == "file":
    if not c.student.file:
      bad("student.arch='file' needs --config.student.file=PATH/config.json.")
    elif not os.path.isfile(os.path.expanduser(c.student.file)):
      bad(f"student.file={c.student.file!r} does not exist.")


def _positive(bad: Callable[[str], None], name: str, value: Any, *, zero_ok: bool = False,
              integer: bool = False) -> None:
  ok = isinstance(value, (int, float)) and math.isfinite(value) and (
      value >= 0 if zero_ok else value > 0) and (not integer or float(value).is_integer())
  if not ok:
    kind = "an integer" if integer else "a number"
    bad(f"{name}={value!r} must be {kind} {'>= 0' if zero_ok else '> 0'}.")


def _check_numbers(c: ml_collections.ConfigDict, bad: Callable[[str], None]) -> None:
  for name in losses.COMPONENTS:
    weight = c.loss.weights.get(name, 0.0)
    _positive(bad, f"loss.weights.{name}", weight, zero_ok=True)
  unknown = sorted(set(c.loss.weights.keys()) - set(losses.COMPONENTS))
  if unknown:
    bad(f"loss.weights has unknown terms {unknown}; the terms are "
        f"{', '.join(losses.COMPONENTS)}.")
  _positive(bad, "loss.temperature", c.loss.temperature)
  _positive(bad, "loss.icl_logit_scale_init", c.loss.icl_logit_scale_init)
  if c.loss.teacher_logit_scale is not None:
    _positive(bad, "loss.teacher_logit_scale", c.loss.teacher_logit_scale)
  o, t = c.optim, c.train
  _positive(bad, "optim.lr", o.lr)
  _positive(bad, "optim.weight_decay", o.weight_decay, zero_ok=True)
  _positive(bad, "optim.warmup_steps", o.warmup_steps, zero_ok=True, integer=True)
  _positive(bad, "optim.grad_clip_norm", o.grad_clip_norm, zero_ok=True)
  _positive(bad, "optim.max_logit_scale", o.max_logit_scale)
  for name in ("b1", "b2"):
    if not 0.0 <= o[name] < 1.0:
      bad(f"optim.{name}={o[name]!r} must be in [0, 1).")
  for name in ("total_steps", "batch_size", "log_every", "checkpoint_every",
               "keep_checkpoints", "prefetch"):
    _positive(bad, f"train.{name}", t[name], integer=True)
  _positive(bad, "optim.grad_accum_steps", o.grad_accum_steps, integer=True)
  if o.grad_accum_steps >= 1 and t.batch_size >= 1 and t.batch_size % o.grad_accum_steps:
    bad(f"train.batch_size={t.batch_size} is not a multiple of optim.grad_accum_steps="
        f"{o.grad_accum_steps}: each micro-batch must be whole.")
  _positive(bad, "eval.batch_size", c.eval.batch_size, integer=True)
  if c.eval.max_examples is not None:
    _positive(bad, "eval.max_examples", c.eval.max_examples, integer=True)
  _positive(bad, "eval.every", c.eval.every, zero_ok=True, integer=True)


def _check_recipe(c: ml_collections.ConfigDict, bad: Callable[[str], None]) -> None:
  name = c.loss.recipe
  if name:
    try:
      recipes.recipe_overrides(name)
    except (KeyError, ValueError) as e:
      bad(str(e).strip("'\""))


def _check_teacher(c: ml_collections.ConfigDict, bad: Callable[[str], None]) -> None:
  source = c.teacher.source
  if _local_path(source):
    path = os.path.expanduser(source)
    if not os.path.isdir(path):
      bad(f"teacher.source={source!r} does not exist; point at a directory with config.json "
          "and model.safetensors, or None for no teacher.")
    elif not os.path.isfile(os.path.join(path, "config.json")):
      bad(f"teacher.source={source!r} has no config.json; point at a directory written by "
          "transformers' save_pretrained.")
  has_teacher = bool(source) or (c.mode != "train" and c.experiment.teacher_steps > 0)
  if c.mode in ("experiment", "ablation") and not has_teacher:
    bad(f"mode {c.mode!r} needs a teacher: set --config.teacher.source, or "
        "experiment.teacher_steps > 0 to train one first.")
  if c.mode == "train" and not source and c.student.init == "inherit":
    bad(f"student.init='inherit' (loss.recipe={c.loss.recipe!r}) cuts the student from the "
        "teacher's weights, but this run has no teacher: set --config.teacher.source, or "
        "--config.student.init=random.")
  if c.tokenizer and not os.path.isdir(os.path.expanduser(c.tokenizer)):
    bad(f"tokenizer={c.tokenizer!r} is not a directory of CLIP tokenizer files.")


def _check_data(c: ml_collections.ConfigDict, bad: Callable[[str], None]) -> None:
  data = c.data.to_dict()
  if data.get("seed") is None:
    data["seed"] = c.seed
  try:
    cfg = defaults.resolve_data_config(data)
  except (KeyError, ValueError) as e:
    bad(str(e).strip("'\""))
    return
  if cfg.source == "tfds" and not cfg.name:
    bad("data.source='tfds' needs data.name (e.g. coco_captions).")
  for name in ("path", "eval_path", "data_dir"):
    value = getattr(cfg, name)
    if value and "://" not in value and not any(ch in value for ch in "*?[") and (
        not os.path.exists(os.path.expanduser(value))):
      bad(f"data.{name}={value!r} does not exist.")


def _check_eval(c: ml_collections.ConfigDict, bad: Callable[[str], None]) -> None:
  from clipdistill_jax.eval import datasets, prompts

  for name in c.eval.zero_shot or ():
    if name.startswith(datasets.FOLDER_PREFIX):
      root = os.path.expanduser(name[len(datasets.FOLDER_PREFIX):])
      if not os.path.isdir(root):
        bad(f"eval.zero_shot {name!r}: {root} is not a directory of <class>/<image> folders.")
    elif name != datasets.SYNTHETIC_NAME and not _tfds_known(name):
      bad(f"eval.zero_shot {name!r} is neither a tfds dataset nor 'folder:PATH' / "
          "'synthetic'.")
  try:  # a set name, a '{}' template or a list of them (eval.prompts.eval_templates)
    prompts.eval_templates(c.eval.templates)
  except ValueError as e:
    bad(str(e))


def _tfds_known(name: str) -> bool:
  """Whether tfds has a builder of that name (no data is read or downloaded)."""
  import tensorflow_datasets as tfds

  try:
    tfds.builder_cls(name.split(":", 1)[0].split("/", 1)[0])
  except Exception:  # DatasetNotFoundError and friends
    return False
  return True


def _check_mesh(c: ml_collections.ConfigDict, num_devices: int, process_count: int,
                bad: Callable[[str], None]) -> None:
  shape = [int(s) for s in c.mesh.shape]
  axes = tuple(c.mesh.axes)
  if len(shape) != len(axes) or shape.count(-1) > 1 or any(s < 1 and s != -1 for s in shape):
    bad(f"mesh.shape={tuple(shape)}: give one size per axis {axes}, each >= 1, at most one -1.")
    return
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      bad(f"mesh.shape={tuple(shape)} does not divide the {num_devices} devices: make the "
          f"fixed sizes multiply to a divisor of {num_devices}.")
      return
    shape[shape.index(-1)] = num_devices // known
  elif known != num_devices:
    bad(f"mesh.shape={tuple(shape)} needs {known} devices; there are {num_devices}. Use -1 "
        "for the data axis to fill the rest, e.g. --config.mesh.shape='(-1, 1, 1)'.")
    return
  sizes = dict(zip(axes, shape, strict=True))
  parallel = sizes.get("data", 1) * sizes.get("fsdp", 1)
  batch = c.train.batch_size
  if batch >= 1 and batch % parallel:
    bad(f"train.batch_size={batch} does not divide over the {parallel} data-parallel devices "
        f"(mesh data x fsdp): use a multiple of {parallel}, e.g. "
        f"--config.train.batch_size={max(parallel, batch // parallel * parallel)}.")
  if batch >= 1 and batch % process_count:
    bad(f"train.batch_size={batch} does not split evenly over {process_count} hosts.")
