r"""Entry point: `python -m clipdistill_jax.main --config configs/demo.py --workdir DIR`.

Any config field can be overridden on the command line, e.g. `--config.train.total_steps=100`.
The config's `mode` picks what runs: 'train' (one distillation run), 'experiment' (teacher
vs distilled student vs no-teacher student, evaluated into a results table; configs/demo.py)
or 'ablation' (every loss recipe x step budget x seed against the no-teacher student).
`loss.recipe` names a recipe (clipdistill_jax/recipes.py) that sets the loss weights.
Rerunning the same command resumes from the workdir's latest checkpoint.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging as pylogging
import os
import re
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from clipdistill_jax import errors  # noqa: E402
from clipdistill_jax.errors import UserError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, results.")
flags.mark_flags_as_required(["config", "workdir"])


def _all_keys(config, prefix: str = "") -> list[str]:
  keys = []
  for k, v in config.items():
    if hasattr(v, "items"):
      keys.extend(_all_keys(v, f"{prefix}{k}."))
    keys.append(f"{prefix}{k}")
  return keys


def check_overrides(argv: list[str]) -> None:
  """Rejects `--config.some.typo=...` with the closest valid key, before absl's traceback."""
  path = None
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
  if path is None:
    return
  file, _, config_arg = path.partition(":")
  if not os.path.exists(file):
    raise UserError(f"config file {file!r} not found (try configs/demo.py).")
  config = load_config_file(file, config_arg)
  valid = _all_keys(config)
  for arg in argv:
    match = re.match(r"--config\.([\w.]+)", arg)
    if match and match.group(1) not in valid:
      close = difflib.get_close_matches(match.group(1), valid, n=1, cutoff=0.5)
      hint = f" Did you mean --config.{close[0]}?" if close else ""
      raise UserError(f"{file} has no field {match.group(1)!r}.{hint} "
                      f"Valid top-level fields: {', '.join(sorted(config.keys()))}.")


def load_config_file(file: str, config_arg: str = ""):
  """get_config() of a configs/*.py file; UserError naming the file and line where it sets a
  field the (locked) base config lacks, or gives a field a value of the wrong type."""
  spec = importlib.util.spec_from_file_location("_clipdistill_config", file)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    return module.get_config(config_arg) if config_arg else module.get_config()
  except (AttributeError, KeyError, TypeError) as e:
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if os.path.abspath(f.filename) == os.path.abspath(file)]
    message = str(e).strip("'\"")
    locked = re.match(r'Key "(\w+)" does not exist and cannot be added', message)
    if not frames or not (locked or "Could not override" in message
                          or "Cannot update" in message):
      raise  # a bug in the file's Python or in ours: keep the traceback
    where = f"{file}:{frames[-1].lineno}"
    if locked:
      close = re.search(r'Did you mean "(\w+)"', message)
      hint = f"; did you mean {close.group(1)!r}?" if close else ""
      raise UserError(f"{where}: no config field {locked.group(1)!r}{hint} (config_lib."
                      "base_config() defines every field; add new ones there)") from None
    raise UserError(f"{where}: {message.splitlines()[0]}") from None


class _QuietCheckpointLogs(pylogging.Filter):
  """Orbax logs a dozen INFO lines per checkpoint; keep its warnings, drop the chatter.

  A failed save makes orbax log the same error with a traceback from several threads; the
  trainer reports it once, with what to do (checkpoints.check_saves), so orbax's records
  keep one line each and no traceback.
  """

  def filter(self, record: pylogging.LogRecord) -> bool:
    if record.name == "asyncio" and "exception was never retrieved" in str(record.msg):
      return False  # orbax's abandoned write futures, garbage-collected after the error
    if "/orbax/" not in record.pathname:
      return True
    if record.levelno < pylogging.WARNING:
      return False
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config and --workdir only.")
  logging.get_absl_handler().addFilter(_QuietCheckpointLogs())
  with errors.boundary():  # user errors: `error:` lines, exit 1 (errors.py)
    _run(_CONFIG.value, _WORKDIR.value)


def _run(config, workdir: str) -> None:
  logging.info("Config:\n%s", config)
  import jax

  from clipdistill_jax import ablation, config_lib, experiment, recipes, train
  from clipdistill_jax.config_validate import validate

  config_lib.resolve(config)  # 'None' strings, data.seed
  try:
    config = recipes.apply_recipe(config)
  except ValueError:  # an unknown recipe: listed by validate with every other problem
    validate(config)
    raise
  train.maybe_initialize_distributed(config)  # before anything (dump_config) touches jax
  # Every problem at once, before a teacher loads or a step compiles.
  validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
  train.dump_config(config, workdir)
  if config.mode == "experiment":
    experiment.run(config, workdir)
  elif config.mode == "ablation":
    ablation.run(config, workdir)
  else:
    train.train(config, workdir)


def run() -> None:
  with errors.boundary():
    check_overrides(sys.argv)
  app.run(main)


if __name__ == "__main__":
  run()
