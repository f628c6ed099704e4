"""The trainer end to end: preemption and resume, command-line typos, the NaN guard, what a
finished run leaves in its workdir, corrupt images.

Runs are real: `python -m clipdistill_jax.main` with configs/tiny_train.py in subprocesses on
2 simulated CPU devices (trainer_procs.py), 30 steps of a tiny CLIP on synthetic captions.
"""

import importlib.util
import io
import json
import signal
import subprocess

import jax
import numpy as np
import pytest
from PIL import Image
from trainer_procs import (
  CHECKPOINT_EVERY,
  TINY_CONFIG,
  TOTAL_STEPS,
  main_command,
  main_env,
  run_main,
  tail,
)

from clipdistill_jax import checkpoints, train
from clipdistill_jax.data.synthetic import SyntheticCaptions
from clipdistill_jax.writers import read_jsonl

# Same program, same data, same state: a resumed run repeats the uninterrupted one bit for
# bit on CPU (measured: max |param diff| = 0). The bound leaves room for nothing but rounding.
RESUME_ATOL = 1e-6
PREEMPT_AFTER_SAVE_OF = 3 * CHECKPOINT_EVERY

# `python -m clipdistill_jax.main`, SIGKILLed right after it asks orbax to save step
# {step}: no exit handlers run and the async write may still be in flight, as when a VM is
# preempted mid-checkpoint. A hook inside the process makes the kill point deterministic.
PREEMPTED_MAIN = """
import os, signal
from clipdistill_jax import checkpoints, main
save = checkpoints.save
def save_then_die(manager, step, *args, **kwargs):
  saved = save(manager, step, *args, **kwargs)
  if step == {step}:
    os.kill(os.getpid(), signal.SIGKILL)
  return saved
checkpoints.save = save_then_die
main.run()
"""


def max_abs_diff(a, b) -> float:
  return max(float(np.max(np.abs(x - y))) for x, y in
             zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def losses(workdir) -> dict[int, float]:
  return {r["step"]: r["loss/total"] for r in read_jsonl(workdir / "metrics.jsonl")
          if "loss/total" in r}


def finished_steps(workdir) -> list[int]:
  """Checkpoints orbax finalized (an interrupted write stays a `*.orbax-checkpoint-tmp*`)."""
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return tmp_path_factory.mktemp("trainer")


@pytest.fixture(scope="module")
def finished_run(runs):
  """The uninterrupted run: (workdir, student params, step) as it finished."""
  workdir = runs / "uninterrupted"
  code, log = run_main(workdir, log=runs / "uninterrupted.log")
  assert code == 0, tail(log)
  _, params, step = checkpoints.load_student(workdir)
  return workdir, params, step


def test_preempted_run_resumes_to_the_uninterrupted_result(runs, finished_run):
  reference_dir, reference_params, _ = finished_run
  workdir = runs / "preempted"
  code, log = run_main(workdir, log=runs / "preempted.log",
                       python_code=PREEMPTED_MAIN.format(step=PREEMPT_AFTER_SAVE_OF))
  assert code == -signal.SIGKILL, tail(log)
  saved = finished_steps(workdir)
  unfinished = sorted(p.name for p in (workdir / "checkpoints").iterdir()
                      if not p.name.isdigit())
  assert saved, "not even the first checkpoint was finalized before the kill"
  resume_step = saved[-1]
  # The save of step 15 waits for the one before it, so at least step 10 is on disk.
  assert PREEMPT_AFTER_SAVE_OF - CHECKPOINT_EVERY <= resume_step <= PREEMPT_AFTER_SAVE_OF

  code, log = run_main(workdir, log=runs / "resumed.log")  # the same command, rerun
  assert code == 0, tail(log)
  assert f"at step {resume_step}." in log, "the rerun did not resume from the last checkpoint"
  _, params, step = checkpoints.load_student(workdir)
  assert step == TOTAL_STEPS
  diff = max_abs_diff(params, reference_params)
  print(f"preempted after asking for checkpoint {PREEMPT_AFTER_SAVE_OF} (finalized: {saved}, "
        f"left unfinished: {unfinished}); resumed from {resume_step}; "
        f"max |param diff| vs uninterrupted = {diff:.1e}")
  assert diff <= RESUME_ATOL
  # Every step's loss (the killed run's, then the resumed run's) is the uninterrupted one's:
  # the data stream resumed at the right position, not just the parameters.
  resumed_losses, reference_losses = losses(workdir), losses(reference_dir)
  assert sorted(resumed_losses) == list(range(1, TOTAL_STEPS + 1))
  np.testing.assert_allclose([resumed_losses[s] for s in sorted(resumed_losses)],
                             [reference_losses[s] for s in sorted(resumed_losses)],
                             rtol=0, atol=RESUME_ATOL)


def test_config_typo_names_the_closest_field(tmp_path):
  result = subprocess.run(
      [*main_command(tmp_path / "run"), "--config.train.total_stepz=3"], capture_output=True,
      text=True, env=main_env(), timeout=300)
  assert result.returncode != 0
  assert "--config.train.total_steps" in result.stderr, result.stderr[-2000:]
  assert "total_stepz" in result.stderr
  assert not (tmp_path / "run").exists()  # rejected before anything ran


def test_recipe_errors_are_one_line(tmp_path):
  # An unknown recipe, and weight inheritance without a teacher: one 'error:' line each,
  # before anything is trained.
  for flag, expected in (("--config.loss.recipe=clip-kd", "is not a recipe; choose one of"),
                         ("--config.loss.recipe=affinity_inherit", "has no teacher")):
    result = subprocess.run([*main_command(tmp_path / "run"), flag], capture_output=True,
                            text=True, env=main_env(), timeout=300)
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
  assert not (tmp_path / "run" / "checkpoints").exists()


def load_tiny_config():
  spec = importlib.util.spec_from_file_location("tiny_train", TINY_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# Warmup makes step 1's learning rate 0; step 2's (2e29) throws the weights to ~1e29, whose
# forward pass at step 3 overflows.
FIRST_NON_FINITE_STEP = 3


@pytest.mark.parametrize("log_every, checkpoint_every", [(1, 1), (5, 2)])
def test_non_finite_loss_stops_the_run_and_keeps_a_finite_checkpoint(
    tmp_path, log_every, checkpoint_every):
  # (1, 1): metrics read and a checkpoint saved every step, the worst case for the guard,
  # since checkpoint 2 holds the weights that produce the non-finite loss. (5, 2): the loss
  # stays on the devices until the guard is read before the save of step 4, a step after
  # the blow-up: the error still names step 3 and nothing from step 3 on is saved.
  config = load_tiny_config()
  config.eval.every = 0
  config.optim.lr = 1e30
  config.train.update(dict(total_steps=10, log_every=log_every,
                           checkpoint_every=checkpoint_every))
  with pytest.raises(train.NonFiniteLossError) as error:
    train.train(config, tmp_path)
  message = str(error.value)
  print(message)
  failed_step = int(message.split(" at step ")[1].split(" ")[0])
  assert failed_step == FIRST_NON_FINITE_STEP
  assert message.startswith(("loss is nan", "loss is inf", "loss is -inf"))
  assert "optim.lr" in message  # says what to change

  logged = losses(tmp_path)  # the log steps before the failed one, all finite
  assert sorted(logged) == list(range(log_every, failed_step, log_every))
  assert all(np.isfinite(v) for v in logged.values())
  # Nothing of the failed step or after it is saved. The state whose loss it was
  # (checkpoint failed_step - 1) is kept (files are never deleted) and the message says to
  # move it away; the one before it (orbax saves the first step whatever the interval) is
  # finite.
  assert max(finished_steps(tmp_path)) == failed_step - 1
  _, _, latest = checkpoints.load_student(tmp_path)
  assert latest == failed_step - 1
  assert f"the latest checkpoint is step {latest} " in message
  assert f"move {tmp_path.absolute()}/checkpoints/{latest} away" in message
  _, params, kept_step = checkpoints.load_student(tmp_path, step=failed_step - 2)
  leaves = jax.tree_util.tree_leaves(params)
  assert all(np.isfinite(leaf).all() for leaf in leaves)
  largest = max(float(np.max(np.abs(leaf))) for leaf in leaves)
  print(f"non-finite loss at step {failed_step}; kept checkpoint {kept_step}, "
        f"max |param| {largest:.3g}")
  assert largest < 1e3  # the weights before the blow-up, not the ~1e29 ones


def test_finished_run_has_falling_loss_events_checkpoints_and_reruns_as_a_no_op(
    runs, finished_run):
  workdir, params, step = finished_run
  assert step == TOTAL_STEPS
  curve = losses(workdir)
  assert sorted(curve) == list(range(1, TOTAL_STEPS + 1))
  assert all(np.isfinite(v) for v in curve.values())
  first, last = np.mean([curve[s] for s in range(1, 6)]), np.mean(
      [curve[s] for s in range(TOTAL_STEPS - 4, TOTAL_STEPS + 1)])
  print(f"loss/total: mean of steps 1-5 {first:.3f}, of the last 5 steps {last:.3f}")
  assert last < first
  assert list(workdir.glob("events.out.tfevents.*")), "no TensorBoard events file"
  assert (workdir / "student_config.json").exists() and (workdir / "config.json").exists()
  assert finished_steps(workdir)[-1] == TOTAL_STEPS

  metrics_before = (workdir / "metrics.jsonl").read_text()
  code, log = run_main(workdir, log=runs / "rerun_finished.log")
  assert code == 0, tail(log)
  assert f"at step {TOTAL_STEPS}." in log
  _, again, step = checkpoints.load_student(workdir)
  assert step == TOTAL_STEPS and max_abs_diff(again, params) == 0.0
  assert finished_steps(workdir)[-1] == TOTAL_STEPS
  assert (workdir / "metrics.jsonl").read_text() == metrics_before  # no step was retrained


MANIFEST_CONFIG = """
import importlib.util

_spec = importlib.util.spec_from_file_location("tiny_train", {tiny!r})
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)


def get_config():
  c = _tiny.get_config()
  c.data.source, c.data.path = "manifest", {manifest!r}
  c.data.caption_key = None  # the base config's is COCO's tfds feature, 'captions/text'
  return c
"""


def png_bytes(pixels) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


@pytest.fixture(scope="module")
def manifest_run(runs):
  """40 PNGs and a text file named broken.png in a manifest, trained uninterrupted:
  (config file, workdir)."""
  images = runs / "images"
  images.mkdir()
  synthetic = SyntheticCaptions(image_size=32, seed=3)
  rows = []
  for i in range(40):
    pixels, caption, _ = synthetic.example(i)
    (images / f"{i}.png").write_bytes(png_bytes(pixels))
    rows.append({"image": f"{i}.png", "caption": caption})
  (images / "broken.png").write_text("not an image, whatever the name says")
  rows.insert(5, {"image": "broken.png", "caption": "a broken file"})
  manifest = images / "manifest.jsonl"
  manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))

  # A config file, as for any local data set: data.path defaults to None, a type that
  # ml_collections cannot override from the command line (--config.data.path=... fails).
  config = runs / "manifest_config.py"
  config.write_text(MANIFEST_CONFIG.format(tiny=str(TINY_CONFIG), manifest=str(manifest)))
  workdir = runs / "manifest"
  code, log = run_main(workdir, config=config, log=runs / "manifest.log")
  assert code == 0, tail(log)
  return config, workdir


def skip_counts(workdir) -> dict[int, float]:
  return {r["step"]: r["data/num_skipped"] for r in read_jsonl(workdir / "metrics.jsonl")
          if "data/num_skipped" in r}


def test_corrupt_image_is_skipped_and_counted(manifest_run):
  _, workdir = manifest_run
  rows = [r for r in read_jsonl(workdir / "metrics.jsonl") if "data/num_skipped" in r]
  last = rows[-1]
  print(f"manifest run: {last['data/num_read']:.0f} images read, "
        f"{last['data/num_skipped']:.0f} skipped by step {last['step']}")
  assert last["step"] == TOTAL_STEPS
  # 30 steps x 16 images of 40 good ones: 12 epochs, each reading broken.png once (the
  # last epoch's unless it comes after its last good image).
  assert last["data/num_skipped"] in (11, 12)
  assert last["data/num_read"] == TOTAL_STEPS * 16 + last["data/num_skipped"]
  assert all(np.isfinite(r["loss/total"]) for r in rows)
  assert finished_steps(workdir)[-1] == TOTAL_STEPS


def test_resume_after_a_skipped_image_is_exact(runs, manifest_run):
  # Preempted after asking for checkpoint 10, by which broken.png was dropped 4 times: the
  # rerun must read on from each host's true position (stored in the checkpoint), not from
  # step x batch, which would repeat 4 records and shift every later batch.
  config, reference_dir = manifest_run
  workdir = runs / "manifest_preempted"
  code, log = run_main(workdir, config=config, log=runs / "manifest_preempted.log",
                       python_code=PREEMPTED_MAIN.format(step=2 * CHECKPOINT_EVERY))
  assert code == -signal.SIGKILL, tail(log)
  resume_step = finished_steps(workdir)[-1]
  assert resume_step >= CHECKPOINT_EVERY
  code, log = run_main(workdir, config=config, log=runs / "manifest_resumed.log")
  assert code == 0, tail(log)
  assert f"at step {resume_step}." in log
  resumed, reference = losses(workdir), losses(reference_dir)
  assert sorted(resumed) == list(range(1, TOTAL_STEPS + 1))
  np.testing.assert_array_equal([resumed[s] for s in sorted(resumed)],
                                [reference[s] for s in sorted(resumed)])
  _, params, _ = checkpoints.load_student(workdir)
  _, reference_params, _ = checkpoints.load_student(reference_dir)
  diff = max_abs_diff(params, reference_params)
  print(f"resumed from {resume_step} after {skip_counts(workdir)[resume_step]:.0f} skipped "
        f"images: max |param diff| vs uninterrupted = {diff:.1e}")
  assert diff == 0.0
  # The skip count is the run's, not the resumed process's.
  assert skip_counts(workdir) == skip_counts(reference_dir)
