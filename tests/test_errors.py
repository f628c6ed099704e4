"""User errors are one `error:` line naming the thing and the fix, exit 1, no traceback
(errors.boundary); bugs keep their traceback; CLIPDISTILL_TRACEBACK=1 shows it for both."""

import json
import subprocess

import numpy as np
import pytest
from tiny_models import tiny_student
from trainer_procs import main_command, main_env

from clipdistill_jax import errors
from clipdistill_jax.models import hf
from clipdistill_jax.models.config import tiny_config


def test_boundary_prints_user_errors_and_passes_bugs(capsys, monkeypatch):
  monkeypatch.delenv(errors.TRACEBACK_ENV, raising=False)
  with pytest.raises(SystemExit) as exit_:
    with errors.boundary():
      raise errors.UserError("first problem\nsecond problem")
  assert exit_.value.code == 1
  assert capsys.readouterr().err == "error: first problem\nerror: second problem\n"
  with pytest.raises(SystemExit):
    with errors.boundary("tool"):
      raise FileNotFoundError("no such file x")
  assert capsys.readouterr().err == "tool: error: no such file x\n"
  # A failed background save is reported while other threads may still print: it starts on
  # a line of its own.
  from clipdistill_jax.checkpoints import CheckpointSaveError
  with pytest.raises(SystemExit):
    with errors.boundary():
      raise CheckpointSaveError("saving checkpoint 10 failed")
  assert capsys.readouterr().err == "\nerror: saving checkpoint 10 failed\n"
  with pytest.raises(KeyError):  # a bug: its traceback, untouched
    with errors.boundary():
      raise KeyError("bug")
  monkeypatch.setenv(errors.TRACEBACK_ENV, "1")
  with pytest.raises(errors.UserError):
    with errors.boundary():
      raise errors.UserError("shown with its traceback")
  assert capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  config, params = tiny_student(eos_token_id=tiny_config().text_config.eos_token_id)
  out = tmp_path_factory.mktemp("teacher")
  hf.save_pretrained(config, params, out)
  return out


def damaged_copy(teacher, tmp_path, name):
  out = tmp_path / name
  out.mkdir()
  for f in teacher.iterdir():
    (out / f.name).write_bytes(f.read_bytes())
  return out


def test_damaged_teacher_checkpoints_name_the_file(teacher, tmp_path):
  truncated = damaged_copy(teacher, tmp_path, "truncated")
  weights = truncated / hf.SAFETENSORS
  weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
  with pytest.raises(hf.CheckpointError, match=f"could not read {weights}: .* damaged"):
    hf.load_pretrained(truncated)

  bad_json = damaged_copy(teacher, tmp_path, "bad_json")
  (bad_json / hf.CONFIG).write_text('{"text_config": {')
  with pytest.raises(hf.CheckpointError, match=f"{bad_json / hf.CONFIG} is not valid JSON"):
    hf.load_pretrained(bad_json)

  not_clip = damaged_copy(teacher, tmp_path, "not_clip")
  (not_clip / hf.CONFIG).write_text(json.dumps({"text_config": 3}))
  with pytest.raises(hf.CheckpointError, match=f"{not_clip / hf.CONFIG} is not a CLIP"):
    hf.load_pretrained(not_clip)


def test_teacher_with_a_missing_or_misshapen_tensor_names_it(teacher, tmp_path):
  from safetensors.numpy import load_file, save_file

  state = load_file(str(teacher / hf.SAFETENSORS))
  missing = damaged_copy(teacher, tmp_path, "missing")
  save_file({k: v for k, v in state.items() if k != "text_projection.weight"},
            str(missing / hf.SAFETENSORS))
  with pytest.raises(hf.CheckpointError,
                     match=f"^{missing}: .*missing \\['text_projection.weight'\\]"):
    hf.load_pretrained(missing)

  misshapen = damaged_copy(teacher, tmp_path, "misshapen")
  state["logit_scale"] = np.zeros((2,), np.float32)
  save_file(state, str(misshapen / hf.SAFETENSORS))
  with pytest.raises(hf.CheckpointError, match=f"^{misshapen}: logit_scale: checkpoint shape"):
    hf.load_pretrained(misshapen)


def run_main(tmp_path, *flags, devices=2, **env):
  result = subprocess.run([*main_command(tmp_path / "run"), *flags], capture_output=True,
                          text=True, env=main_env(devices, **env), timeout=300)
  return result.returncode, result.stderr


def test_main_lists_config_problems_before_any_work(tmp_path):
  # batch 16 on 3 data-parallel devices and a zero temperature: both, one line each.
  code, err = run_main(tmp_path, "--config.train.batch_size=16", "--config.loss.temperature=0",
                       devices=3)
  lines = [line for line in err.splitlines() if line.startswith("error: ")]
  assert code == 1 and "Traceback" not in err, err[-3000:]
  assert len(lines) == 2, err[-3000:]
  assert lines[0].startswith("error: loss.temperature=0.0 must be a number > 0")
  assert lines[1].startswith("error: train.batch_size=16 does not divide over the 3 "
                             "data-parallel devices")
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_main_refuses_a_mesh_larger_than_the_devices(tmp_path):
  code, err = run_main(tmp_path, "--config.mesh.shape=(3, 1, 1)")
  assert code == 1 and "Traceback" not in err, err[-3000:]
  assert "error: mesh.shape=(3, 1, 1) needs 3 devices; there are 2." in err


def test_main_truncated_teacher_is_one_line_and_traceback_on_request(teacher, tmp_path):
  truncated = damaged_copy(teacher, tmp_path, "truncated")
  weights = truncated / hf.SAFETENSORS
  weights.write_bytes(weights.read_bytes()[:1000])
  flags = (f"--config.teacher.source={truncated}", "--config.loss.recipe=clip_kd")
  code, err = run_main(tmp_path, *flags)
  assert code == 1 and "Traceback" not in err, err[-3000:]
  assert f"error: could not read {weights}" in err
  code, err = run_main(tmp_path, *flags, CLIPDISTILL_TRACEBACK="1")
  assert code == 1 and "Traceback" in err and "CheckpointError" in err
