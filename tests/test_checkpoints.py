"""Checkpoints that survive: fingerprints checked at restore, the newest intact checkpoint
used when the latest is damaged (the damaged one kept aside, never deleted or overwritten),
a stop with one line when none is intact, no non-finite state ever saved.

Damage is real: bytes flipped and files removed or truncated in checkpoints that a tiny
training run (configs/tiny_train.py, 10 steps, a checkpoint every 5) wrote, aimed at the
stored bytes of the student's largest array (found through the checkpoint's own OCDBT store),
so that it lands on what every reader reads whichever data file the writer put them in.
"""

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_trainer import load_tiny_config, max_abs_diff
from trainer_procs import TOTAL_STEPS, run_main, tail

from clipdistill_jax import checkpoints, run_builder, train

STEPS, EVERY = 10, 5


def tiny_config():
  config = load_tiny_config()
  config.eval.every = 0
  config.train.update(dict(total_steps=STEPS, log_every=1, checkpoint_every=EVERY,
                           keep_checkpoints=5))
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished run with checkpoints 5 and 10: (workdir, student params of step 10)."""
  workdir = tmp_path_factory.mktemp("ckpt") / "run"
  train.train(tiny_config(), workdir)
  _, params, step = checkpoints.load_student(workdir)
  assert step == STEPS
  return workdir, params


@pytest.fixture(scope="module")
def abstract_state():
  """The run's train state as shapes and shardings: what the trainer restores into."""
  run = run_builder.build_run(tiny_config())
  state, shardings = run.state, run.state_shardings
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def copy_run(trained, tmp_path) -> Path:
  workdir = tmp_path / "run"
  shutil.copytree(trained[0], workdir)
  return workdir


def _student_kvstore(step_dir: Path):
  """The checkpoint's OCDBT key-value store, opened fresh (no cache shared with orbax)."""
  import tensorstore as ts

  return ts.KvStore.open({"driver": "ocdbt", "base": f"file://{step_dir / 'state'}/"},
                         context=ts.Context()).result()


def student_bytes(step_dir: Path) -> tuple[bytes, bytes, list[tuple[Path, int]]]:
  """(key, stored bytes, [(data file, offset)]) of the student's largest stored array chunk
  (zstd-compressed; the token embedding): bytes that exporting the student reads. Damage
  aimed there is seen by every reader, whichever data files the writer's threads filled."""
  kv = _student_kvstore(step_dir)
  keys = [k for k in kv.list().result()
          if k.startswith(b"params.student.") and not k.endswith(b"/.zarray")]
  values = {k: kv.read(k).result().value for k in keys}
  key = max(values, key=lambda k: len(values[k]))
  value = values[key]
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  where = [(p, p.read_bytes().find(value)) for p in files]
  where = [(p, offset) for p, offset in where if offset >= 0]
  assert len(value) > 4096 and where, f"{key!r} not found in the data files of {step_dir}"
  return key, value, where


def flip_bytes(step_dir: Path, count: int = 64) -> None:
  """Inverts `count` bytes in the middle of the student's largest stored array, wherever it
  lies, and checks that the store now reads other bytes there (the damage landed)."""
  key, value, where = student_bytes(step_dir)
  for path, offset in where:
    data = bytearray(path.read_bytes())
    middle = offset + len(value) // 2
    for i in range(middle, middle + count):
      data[i] ^= 0xFF
    path.write_bytes(bytes(data))
  assert _student_kvstore(step_dir).read(key).result().value != value


def truncate_student_file(step_dir: Path) -> None:
  """Cuts the data file holding the student's largest array in the middle of that array."""
  _, value, where = student_bytes(step_dir)
  for path, offset in where:
    path.write_bytes(path.read_bytes()[: offset + len(value) // 2])


def remove_student_file(step_dir: Path) -> None:
  for path, _ in student_bytes(step_dir)[2]:
    path.unlink()


def truncate(path: Path) -> None:
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def remove(path: Path) -> None:
  shutil.rmtree(path) if path.is_dir() else path.unlink()


DAMAGE = {
    "64 bytes flipped in an array file": flip_bytes,
    "an array file truncated": truncate_student_file,
    "an array file deleted": remove_student_file,
    "_METADATA deleted": lambda d: remove(d / "state" / "_METADATA"),
    "manifest.ocdbt deleted": lambda d: remove(d / "state" / "manifest.ocdbt"),
    "state/ deleted": lambda d: remove(d / "state"),
    "meta truncated": lambda d: truncate(d / "meta" / "metadata"),
}


EXPORT_READS_AROUND = {"_METADATA deleted"}


def tree_digest(directory: Path) -> dict[str, str]:
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob("*")) if p.is_file()}


def test_fingerprint_ignores_sharding_and_sees_one_changed_element():
  x = jnp.arange(64 * 48, dtype=jnp.float32).reshape(64, 48) / 7
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
  for spec in (("a", "b"), ("b", None), (None, "a")):
    placed = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))
    assert int(checkpoints.fingerprint(placed)) == int(checkpoints.fingerprint(x))
  one_ulp = x.at[17, 3].set(jnp.nextafter(x[17, 3], jnp.inf))  # the lowest bit of one element
  assert int(checkpoints.fingerprint(one_ulp)) != int(checkpoints.fingerprint(x))
  # Same values in another order, or another dtype of the same bits, differ too.
  assert int(checkpoints.fingerprint(x.T)) != int(checkpoints.fingerprint(x))
  assert int(checkpoints.fingerprint(x.astype(jnp.bfloat16))) != int(
      checkpoints.fingerprint(x.astype(jnp.float16)))


def test_non_finite_state_is_never_saved(tmp_path):
  manager = checkpoints.make_manager(tmp_path, save_every=1, keep=2, async_save=False)
  state = {"step": jnp.int32(3), "params": {"w": jnp.ones((4, 4))},
           "opt_state": {"mu": jnp.ones((4, 4)).at[1, 2].set(jnp.inf)}}
  with pytest.raises(checkpoints.NonFiniteStateError) as error:
    checkpoints.save(manager, 3, state, {"step": 3})
  message = str(error.value)
  print(message)
  assert "['opt_state']['mu']" in message and "Nothing of this step was saved" in message
  assert "no checkpoint was saved before it" in message
  assert "\n" not in message
  manager.reload()
  assert manager.all_steps() == []
  state["opt_state"]["mu"] = jnp.ones((4, 4))
  assert checkpoints.save(manager, 3, state, {"step": 3})
  manager.close()


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_latest_checkpoint_falls_back_and_is_kept(trained, abstract_state, tmp_path,
                                                         damage):
  workdir = copy_run(trained, tmp_path)
  latest = workdir / "checkpoints" / str(STEPS)
  DAMAGE[damage](latest)
  damaged = tree_digest(latest)

  if damage in EXPORT_READS_AROUND:
    # Export reads the student's arrays by name, without _METADATA: they are intact, and
    # their fingerprints say so.
    _, params, step = checkpoints.load_student(workdir)
    assert step == STEPS and max_abs_diff(params, trained[1]) == 0.0
    return
  # Export names the path and the reason in one line, and the step to use instead.
  with pytest.raises(checkpoints.DamagedCheckpointError) as error:
    checkpoints.load_student(workdir)
  print(f"{damage}: {error.value}")
  assert str(latest) in str(error.value) and "\n" not in str(error.value)
  assert f"Export another one with --step (this run also has steps [{EVERY}, 1])" in str(
      error.value)  # orbax also keeps the first step's
  if damage.startswith("64 bytes"):  # read without complaint: only the fingerprint sees it
    assert "does not match its fingerprints" in str(error.value)

  manager = checkpoints.make_manager(workdir, save_every=EVERY, keep=5)
  state, meta = checkpoints.restore_latest(manager, abstract_state)
  assert meta["step"] == EVERY and int(state["step"]) == EVERY
  # The damaged checkpoint is kept, byte for byte, out of orbax's way: its step number is
  # free for the resumed run, and keep_checkpoints never deletes it.
  kept = workdir / checkpoints.DAMAGED_DIR / str(STEPS)
  assert not latest.exists() and tree_digest(kept) == damaged
  assert sorted(manager.all_steps()) == [1, EVERY]
  manager.close()


def test_no_intact_checkpoint_stops_and_moves_nothing(trained, abstract_state, tmp_path):
  workdir = copy_run(trained, tmp_path)
  for step in (1, EVERY, STEPS):
    flip_bytes(workdir / "checkpoints" / str(step))
  before = tree_digest(workdir / "checkpoints")
  manager = checkpoints.make_manager(workdir, save_every=EVERY, keep=5)
  with pytest.raises(checkpoints.DamagedCheckpointError) as error:
    checkpoints.restore_latest(manager, abstract_state)
  message = str(error.value)
  print(message)
  assert message.startswith(f"no intact checkpoint in {workdir / 'checkpoints'}")
  assert all(f"{workdir / 'checkpoints' / str(s)} " in message for s in (1, EVERY, STEPS))
  assert tree_digest(workdir / "checkpoints") == before
  assert not (workdir / checkpoints.DAMAGED_DIR).exists()
  manager.close()


def test_run_resumes_from_the_newest_intact_checkpoint(trained, tmp_path):
  workdir = copy_run(trained, tmp_path)
  latest = workdir / "checkpoints" / str(STEPS)
  flip_bytes(latest)
  damaged = tree_digest(latest)
  # Same command: resumes from step 5, retrains 6..10 and saves step 10 anew, equal to the
  # uninterrupted run's (the damaged one moved aside, not overwritten).
  train.train(tiny_config(), workdir)
  _, params, step = checkpoints.load_student(workdir)
  assert step == STEPS and max_abs_diff(params, trained[1]) == 0.0
  assert tree_digest(workdir / checkpoints.DAMAGED_DIR / str(STEPS)) == damaged


def test_export_of_a_damaged_checkpoint_is_one_line(trained, tmp_path, capsys):
  import importlib.util

  workdir = copy_run(trained, tmp_path)
  remove(workdir / "checkpoints" / str(STEPS) / "state" / "manifest.ocdbt")
  spec = importlib.util.spec_from_file_location(
      "convert_to_pytorch", Path(__file__).parents[1] / "scripts" / "convert_to_pytorch.py")
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  assert script.main(["--workdir", str(workdir), "--out", str(tmp_path / "out"),
                      "--no-benchmark"]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  print(err)
  assert err[-1].startswith(f"error: checkpoint {workdir / 'checkpoints' / str(STEPS)} ")
  assert "--step" in err[-1] and not any("Traceback" in line for line in err)


# --- a full disk ---------------------------------------------------------------------------

# keep_checkpoints=10: every checkpoint (~7 MiB of the tiny run's params and Adam moments)
# stays, so a 20 MiB disk fills up at the third one (steps 1, 5, then 10).
KEEP_ALL = "--config.train.keep_checkpoints=10"
SAVE_ERROR = re.compile(r"^error: saving checkpoint (\d+) to (\S+) failed: (.+)\. The last "
                        r"intact checkpoint is step (\d+) \((\S+)\); .* rerun the same "
                        r"command to resume from step (\d+)\.$")

# Checkpoints fill the disk from step 10 on: with RLIMIT_FSIZE, after checkpoint 5 is
# finished, no file may grow past 1 MiB (the array files of a checkpoint are ~3 MiB), so
# the background write of checkpoint 10 fails with EFBIG, as a full disk fails with ENOSPC.
# Works without root or a tmpfs.
FILE_SIZE_LIMITED_MAIN = """
import resource, signal
from clipdistill_jax import checkpoints, main
save = checkpoints.save
def save_then_limit(manager, step, *args, **kwargs):
  saved = save(manager, step, *args, **kwargs)
  if step == 5:
    manager.wait_until_finished()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
  return saved
checkpoints.save = save_then_limit
main.run()
"""


def last_step(workdir) -> int:
  from clipdistill_jax.writers import read_jsonl
  return max(r["step"] for r in read_jsonl(workdir / "metrics.jsonl"))


def check_failed_save(code, log, workdir, errno_text):
  """One 'error:' line naming the failed save, the cause, the intact checkpoint and what
  to do; no traceback; stopped before the next save; older checkpoints intact."""
  assert code == 1, tail(log)
  # On a line of its own, though tensorstore's threads may still be printing tracebacks.
  errors = [line for line in log.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, tail(log, 80)
  message = errors[0]
  tracebacks = log.count("Traceback")
  print(f"{len(log.splitlines())} lines of output, {tracebacks} tracebacks; {message}")
  # tensorstore may still print a callback's "Event loop is closed" for orbax's finished
  # event loop (not through logging); nothing else. Those come from several threads at once
  # and their pieces interleave ("RuntimeError: " and its message can be lines apart), so the
  # message is counted on its own: once per such traceback, besides its `raise` line.
  closed = log.count("Event loop is closed")
  closed -= log.count("raise RuntimeError('Event loop is closed')")
  assert tracebacks == closed, tail(log, 80)
  match = SAVE_ERROR.match(message)
  assert match, message
  failed, intact = int(match.group(1)), int(match.group(4))
  assert match.group(2) == str(workdir / "checkpoints") and errno_text in match.group(3)
  assert intact == failed - 5 and int(match.group(6)) == intact
  # Noticed as soon as orbax's commit thread gave up, at the latest when the next save was
  # due: no step after it was trained, and no later save was started.
  assert last_step(workdir) <= failed + 5
  assert not [p for p in (workdir / "checkpoints").iterdir()
              if p.name.split(".")[0].isdigit() and int(p.name.split(".")[0]) > failed]
  _, _, step = checkpoints.load_student(workdir, step=intact)  # verified by fingerprints
  assert step == intact
  return failed, intact


def test_failed_background_save_stops_the_run_in_one_line(tmp_path):
  workdir = tmp_path / "run"
  code, log = run_main(workdir, KEEP_ALL, log=tmp_path / "run.log",
                       python_code=FILE_SIZE_LIMITED_MAIN)
  failed, _ = check_failed_save(code, log, workdir, "[Errno 27] File too large")
  assert failed == 10


@pytest.fixture
def small_tmpfs(tmp_path):
  mount = tmp_path / "disk"
  mount.mkdir()
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
  if result.returncode:
    pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not root'}); the "
                "file-size-limited variant covers the same path")
  try:
    yield mount
  finally:
    subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_stops_in_one_line_and_resumes_once_there_is_room(small_tmpfs, tmp_path):
  workdir = small_tmpfs / "run"
  code, log = run_main(workdir, KEEP_ALL, log=tmp_path / "full.log")
  failed, intact = check_failed_save(code, log, workdir, "[Errno 28] No space left on device")
  # Room again (as after deleting files or moving to a larger disk): the same command
  # resumes from the last intact checkpoint and finishes.
  subprocess.run(["mount", "-o", "remount,size=80m", str(small_tmpfs)], check=True)
  code, log = run_main(workdir, KEEP_ALL, log=tmp_path / "resumed.log")
  assert code == 0, tail(log)
  assert f"at step {intact}." in log
  assert checkpoints.load_student(workdir)[2] == TOTAL_STEPS
