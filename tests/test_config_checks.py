"""Configs are checked before any work: a locked base config, 'None' strings, the seed rule,
and validate() listing every problem at once (no devices, no teacher, no data read)."""

import textwrap

import pytest
from trainer_procs import TINY_CONFIG

from clipdistill_jax import config_lib, main
from clipdistill_jax.config_validate import validate
from clipdistill_jax.errors import UserError
from clipdistill_jax.run_builder import ConfigError


def tiny_config():
  return main.load_config_file(str(TINY_CONFIG))


def problems(config, **kwargs) -> list[str]:
  with pytest.raises(ConfigError) as error:
    validate(config, **kwargs)
  return str(error.value).splitlines()


def test_base_config_is_locked_and_every_config_file_loads():
  config = config_lib.base_config()
  assert config.is_locked
  with pytest.raises(AttributeError, match="checkpoint_every"):
    config.train.checkpoint_evry = 1
  for name in ("demo", "digits", "inherit", "small", "tiny_train"):
    loaded = main.load_config_file(str(TINY_CONFIG.parent / f"{name}.py"))
    assert loaded.is_locked, name


def test_typo_in_a_config_file_is_refused_with_the_closest_field(tmp_path):
  path = tmp_path / "typo.py"
  path.write_text(textwrap.dedent("""\
      from clipdistill_jax import config_lib


      def get_config():
        c = config_lib.base_config()
        c.train.checkpoint_evry = 1
        return c
      """))
  with pytest.raises(UserError) as error:
    main.load_config_file(str(path))
  message = str(error.value)
  assert message.startswith(f"{path}:6: no config field 'checkpoint_evry'")
  assert "did you mean 'checkpoint_every'?" in message
  assert "\n" not in message


def test_a_bug_in_a_config_file_keeps_its_traceback(tmp_path):
  path = tmp_path / "bug.py"
  path.write_text("def get_config():\n  return undefined_name\n")
  with pytest.raises(NameError):
    main.load_config_file(str(path))


@pytest.mark.parametrize("text", ["None", "none", "", " "])
def test_none_strings_mean_no_teacher(text):
  config = config_lib.base_config()
  config.teacher.source = text
  config.loss.recipe = text
  config_lib.resolve(config)
  assert config.teacher.source is None and config.loss.recipe is None
  # Fields where 'none' is a real value keep it.
  config.student.remat_policy = "none"
  config_lib.resolve(config)
  assert config.student.remat_policy == "none"


def test_data_seed_follows_seed_unless_set():
  config = config_lib.base_config()
  assert config.data.seed is None
  config.seed = 7
  assert config_lib.resolve(config).data.seed == 7
  config.seed = 8  # resolved once: a later change of seed no longer moves the data order
  assert config_lib.resolve(config).data.seed == 7
  explicit = config_lib.base_config()
  explicit.seed, explicit.data.seed = 3, 11
  assert config_lib.resolve(explicit).data.seed == 11


def test_validate_accepts_the_shipped_configs():
  for name in ("demo", "digits", "tiny_train"):
    config = config_lib.resolve(main.load_config_file(str(TINY_CONFIG.parent / f"{name}.py")))
    validate(config, num_devices=1)


def test_validate_lists_every_problem_at_once():
  config = config_lib.resolve(tiny_config())
  config.loss.temperature = 0.0
  config.loss.weights.fd = -1.0
  config.optim.lr = 0.0
  config.train.batch_size = 16
  config.train.prefetch = 0
  config.student.arch = "article2"
  config.eval.templates = "openai_imagenett"
  config.eval.zero_shot = ("folder:/no/such/dir", "cifar10")
  config.data.source, config.data.path = "manifest", "/no/such/manifest.tsv"
  found = problems(config, num_devices=3)
  expected = ["loss.temperature=0.0 must be a number > 0.",
              "loss.weights.fd=-1.0 must be a number >= 0.",
              "optim.lr=0.0 must be a number > 0.",
              "train.prefetch=0 must be",
              "student.arch='article2': use one of",
              "eval.templates='openai_imagenett' is neither a template set",
              "eval.zero_shot 'folder:/no/such/dir': /no/such/dir is not a directory",
              "data.path='/no/such/manifest.tsv' does not exist.",
              "train.batch_size=16 does not divide over the 3 data-parallel devices",
              ]
  for start in expected:
    assert sum(line.startswith(start) for line in found) == 1, (start, found)
  assert len(found) == len(expected), found
  assert "--config.train.batch_size=15" in found[-1]


def test_validate_mesh_against_the_devices():
  config = config_lib.resolve(tiny_config())
  config.mesh.shape = (3, 1, 1)
  (line,) = problems(config, num_devices=2)
  assert line.startswith("mesh.shape=(3, 1, 1) needs 3 devices; there are 2.")
  config.mesh.shape = (-1, 3, 1)
  (line,) = problems(config, num_devices=4)
  assert "does not divide the 4 devices" in line
  config.mesh.shape = (-1, 2, 1)
  validate(config, num_devices=4)  # 2 x 2: batch 16 divides


def test_validate_teacher_and_recipe(tmp_path):
  config = config_lib.resolve(tiny_config())
  config.teacher.source = str(tmp_path / "missing")
  config.loss.recipe = "clip-kd"
  found = problems(config)
  assert any(line.startswith(f"teacher.source='{tmp_path}/missing' does not exist")
             for line in found), found
  assert any("is not a recipe; choose one of" in line for line in found), found
  no_teacher = config_lib.resolve(tiny_config())
  no_teacher.student.init = "inherit"
  (line,) = problems(no_teacher)
  assert "has no teacher" in line
  experiment = config_lib.resolve(tiny_config())
  experiment.mode = "experiment"
  (line,) = problems(experiment)
  assert line.startswith("mode 'experiment' needs a teacher")
