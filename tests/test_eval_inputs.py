"""Evaluation inputs a user gets wrong: custom zero-shot prompt lists (config files and the
command line, checked before training) and a zero-shot set cut short by eval.max_examples
(said in the log and in the report's caption)."""

import logging
import subprocess

import numpy as np
import PIL.Image
import pytest
from absl import flags
from ml_collections import config_flags
from trainer_procs import TINY_CONFIG, main_command, main_env

from clipdistill_jax.eval import prompts
from clipdistill_jax.eval.datasets import load_zero_shot_dataset
from clipdistill_jax.report import write_report

TWO_TEMPLATES = "('a photo of a {}.', 'a picture of a {}.')"


def parse_command_line(*overrides: str):
  """configs/tiny_train.py as main.py's --config flag parses it, with overrides."""
  argv = ["main", f"--config={TINY_CONFIG}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_templates_list_from_the_command_line_is_a_list():
  # Fault: this exact flag was taken as one string and failed at the first evaluation.
  config = parse_command_line(f"--config.eval.templates={TWO_TEMPLATES}")
  assert prompts.eval_templates(config.eval.templates) == ("a photo of a {}.",
                                                           "a picture of a {}.")
  # A set name and a single template still read as before.
  config = parse_command_line("--config.eval.templates=simple_imagenet")
  assert prompts.eval_templates(config.eval.templates) == prompts.SIMPLE_IMAGENET_TEMPLATES
  config = parse_command_line("--config.eval.templates=a sketch of a {}.")
  assert prompts.eval_templates(config.eval.templates) == ("a sketch of a {}.",)


def test_templates_tuple_in_a_config_file():
  # Fault: a tuple in a config file raised TypeError (the field was typed str).
  config = parse_command_line()
  config.eval.templates = ("a photo of a {}.", "a picture of a {}.")
  assert prompts.eval_templates(config.eval.templates) == ("a photo of a {}.",
                                                           "a picture of a {}.")
  config.eval.templates = ["itap of a {}."]
  assert prompts.eval_templates(config.eval.templates) == ("itap of a {}.",)
  assert prompts.eval_templates(None) is None


@pytest.mark.parametrize("value, expected", [
    ("simple_imagnet", "neither a template set nor a template"),  # a typo, not 'photo'
    ("a photo of a {}, a picture of a {}", "exactly one"),  # two templates in one string
    ("a {} photo in {style}", "no other braces"),
    (("a photo of a {}.", "no slot"), "'no slot' must be a string with exactly one"),
    ((), "non-empty list"),
    (3, "non-empty list"),
])
def test_bad_templates_name_the_problem(value, expected):
  with pytest.raises(ValueError, match=expected):
    prompts.eval_templates(value)


def test_bad_templates_fail_before_training(tmp_path):
  config = parse_command_line("--config.eval.templates=('a photo of a {}.', 'no slot')")
  with pytest.raises(ValueError, match="no slot"):
    prompts.eval_templates(config.eval.templates)  # what main and the evaluators check first
  result = subprocess.run(
      [*main_command(tmp_path / "run"), "--config.eval.templates=('a {}.', 'no slot')"],
      capture_output=True, text=True, env=main_env(), timeout=300)
  assert result.returncode != 0
  assert "error: eval.templates: Template 'no slot'" in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture()
def class_folder(tmp_path):
  """6 images in 2 class folders."""
  rng = np.random.default_rng(0)
  for name in ("cat", "dog"):
    (tmp_path / name).mkdir()
    for i in range(3):
      PIL.Image.fromarray(rng.integers(0, 255, (8, 8, 3), np.uint8)).save(
          tmp_path / name / f"{i}.png")
  return tmp_path


def test_max_examples_subset_is_said_in_the_log_and_the_report(class_folder, tmp_path, caplog):
  # Fault: eval.max_examples silently evaluated a random subset of a larger folder set.
  with caplog.at_level(logging.WARNING):
    dataset = load_zero_shot_dataset(f"folder:{class_folder}", "test", 16, max_examples=4)
  expected = (f"a fixed random subset of 4 of the 6 images under {class_folder} "
              "(eval.max_examples=4)")
  assert dataset.subset == expected and dataset.num_examples == 4
  assert expected in caplog.text
  assert sum(len(labels) for _, labels in dataset.batches(8)) == 4
  # All of it: nothing to say.
  assert load_zero_shot_dataset(f"folder:{class_folder}", "test", 16, max_examples=6).subset is None

  rows = [{"model": name, "zero_shot_top1": 0.5, "zero_shot_examples": 4,
           "zero_shot_subset": f"folder:{class_folder}: {expected}"}
          for name in ("Teacher", "Student-Distilled")]
  paths = write_report(rows, {}, tmp_path / "report")
  markdown = paths["markdown"].read_text()
  caption = f"Zero-shot evaluated on folder:{class_folder}: {expected}."
  assert markdown.count(caption) == 1  # said once, above the table
  assert markdown.index(caption) < markdown.index("| Model")
  assert "zero_shot_subset" not in markdown  # a caption, not a table cell
