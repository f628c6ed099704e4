"""Orbax checkpoints in `workdir/checkpoints`: async, keep-K, verified, restored automatically.

A checkpoint holds two items: `state` (student params, projector params, optimizer state,
step) and `meta` (JSON: step, each host's reader state, the student's HF config, the
teacher's source, and a fingerprint of every array of `state`). The teacher is never saved:
it is reloaded from its source on restart.

What can go wrong, and what happens:
  * non-finite params or optimizer state at a save step: nothing is saved, the run stops
    (NonFiniteStateError), so a blown-up state never becomes the checkpoint a rerun resumes;
  * a save that fails (disk full, quota, permissions), synchronously or in orbax's
    background thread: noticed at the next step (check_saves), the run stops with one
    message naming the path, the error, the last intact checkpoint and how to resume
    (CheckpointSaveError);
  * a damaged checkpoint (flipped bytes, missing or truncated files): the restore recomputes
    every array's fingerprint and compares it with the one saved beside it; a checkpoint
    that cannot be read or does not match is reported by path and reason, moved aside to
    `workdir/damaged_checkpoints/STEP` (kept, never deleted or overwritten, and its step
    number is free again for the resumed run) and the newest intact one is used instead.
    With no intact checkpoint nothing is moved and the run stops (DamagedCheckpointError):
    it never starts over silently.
orbax 0.12 has no checksum of array data (zarr3's crc32c covers only the shard index), hence
the fingerprint: a sum over all elements of a 32-bit hash of (element bits, element index),
computed on device in one jitted pass. Integer addition wraps and commutes, so the value is
the same whatever the mesh or host count that writes or reads the array.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from clipdistill_jax.errors import UserError
from clipdistill_jax.models.config import CLIPConfig

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "damaged_checkpoints"
_TMP_STEP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


class CheckpointError(UserError, RuntimeError):
  """A checkpoint that cannot be written or used; the message says what to do."""


class DamagedCheckpointError(CheckpointError):
  """No intact checkpoint to restore (or export): each one is named with its reason."""


class CheckpointSaveError(CheckpointError):
  """A save failed (e.g. the disk is full); the message names the last intact checkpoint."""

  starts_fresh_line = True  # tensorstore may still be printing its callbacks' tracebacks


class NonFiniteStateError(CheckpointError, FloatingPointError):
  """Params or optimizer state hold NaN/inf at a save step; nothing was saved."""


def make_manager(workdir: str | os.PathLike, *, save_every: int, keep: int,
                 async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_every, max_to_keep=keep,
      enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(Path(workdir).absolute() / CHECKPOINT_DIR, options=options,
                               item_names=("state", "meta"))


# ----------------------------------------------------------------------------------------
# Fingerprints and the finiteness check
# ----------------------------------------------------------------------------------------

def _mix(h: jax.Array) -> jax.Array:
  """murmur3's 32-bit finalizer: every input bit flips each output bit with p ~ 1/2."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _bits(x: jax.Array) -> jax.Array:
  """The array's raw bits as uint32 (8-byte elements as two words)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size in (1, 2):
    unsigned = jnp.uint8 if size == 1 else jnp.uint16
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32)


def fingerprint(x: jax.Array) -> jax.Array:
  """uint32 scalar: sum_i mix(bits_i ^ mix(i * golden + c)) mod 2^32 over the elements i
  in row-major order. Any change of one element changes it with probability 1 - 2^-32; the
  value does not depend on how the array is sharded."""
  bits = _bits(x)
  index = jnp.arange(bits.size, dtype=jnp.uint32).reshape(bits.shape)
  salt = _mix(index * jnp.uint32(0x9E3779B9) + jnp.uint32(0x7F4A7C15))
  return jnp.sum(_mix(bits ^ salt), dtype=jnp.uint32)


@jax.jit
def _audit(tree: Any) -> tuple[Any, Any]:
  def finite(x):
    return (jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
            else jnp.array(True))
  return jax.tree_util.tree_map(fingerprint, tree), jax.tree_util.tree_map(finite, tree)


def audit(tree: Any) -> tuple[dict[str, int], list[str]]:
  """({leaf path: fingerprint}, [paths of leaves holding NaN or inf]) of a pytree of arrays
  (sharded or not; one jitted pass on the devices that hold it)."""
  prints, finite = jax.device_get(_audit(tree))
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
  prints = [int(v) for v in jax.tree_util.tree_leaves(prints)]
  bad = [p for p, ok in zip(paths, jax.tree_util.tree_leaves(finite), strict=True) if not ok]
  return dict(zip(paths, prints, strict=True)), bad


def _mismatches(tree: Any, expected: dict[str, int]) -> list[str]:
  """Leaves of `tree` whose fingerprint differs from (or is missing in) `expected`."""
  actual, _ = audit(tree)
  return [p for p, v in actual.items() if expected.get(p) != v]


# ----------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------

def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict,
         force: bool = False) -> bool:
  """Saves when the interval says so (or `force`); orbax coordinates the hosts.

  Before saving, the state's arrays are fingerprinted (stored in meta) and checked for
  NaN/inf. Raises NonFiniteStateError (nothing saved) or CheckpointSaveError (the write
  could not start, e.g. the disk is full). Returns whether a save was started.
  """
  if not (force or manager.should_save(step)):
    return False
  # orbax waits for the previous save before starting this one anyway; waiting here reports
  # its failure as that step's, not this one's.
  check_saves(manager)
  try:
    manager.wait_until_finished()
  except Exception as e:  # noqa: BLE001
    raise CheckpointSaveError(save_failure_message(manager, e)) from e
  prints, non_finite = audit(state)
  if non_finite:
    shown = ", ".join(non_finite[:3]) + (f" and {len(non_finite) - 3} more"
                                         if len(non_finite) > 3 else "")
    latest = _latest_on_disk(manager)
    kept = (f"the latest checkpoint is step {latest} in {manager.directory}" if latest is not None
            else f"no checkpoint was saved before it in {manager.directory}")
    raise NonFiniteStateError(
        f"the train state holds NaN/inf at step {step} ({shown}), though the loss was finite. "
        f"Nothing of this step was saved; {kept}. Lower optim.lr or set optim.grad_clip_norm, "
        "then rerun the same command to resume from it.")
  try:
    return manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({**meta, "fingerprints": prints})), force=True)
  except Exception as e:  # noqa: BLE001  (whatever orbax raises, the user needs the cause)
    raise CheckpointSaveError(save_failure_message(manager, e, step)) from e


def check_saves(manager: ocp.CheckpointManager) -> None:
  """Raises CheckpointSaveError if a background save has failed; call it every step.

  orbax's finalize thread takes a failed commit's error for itself (it logs it and skips
  the step), so check_for_errors alone misses it until the next save; once no save is in
  progress, wait_until_finished returns at once, or re-raises that thread's error.
  """
  try:
    manager.check_for_errors()
    if not manager.is_saving_in_progress():
      manager.wait_until_finished()
  except Exception as e:  # noqa: BLE001
    raise CheckpointSaveError(save_failure_message(manager, e)) from e


def finish(manager: ocp.CheckpointManager) -> None:
  """Waits for the last save, raising CheckpointSaveError if it failed, and closes."""
  try:
    manager.wait_until_finished()
    manager.check_for_errors()
  except Exception as e:  # noqa: BLE001
    raise CheckpointSaveError(save_failure_message(manager, e)) from e
  manager.close()


def save_failure_message(manager: ocp.CheckpointManager, error: BaseException,
                         step: int | None = None) -> str:
  """One line: which save failed where, why, the last intact checkpoint, how to resume."""
  directory = Path(manager.directory)
  if step is None:
    pending = [int(m.group(1)) for p in _listdir(directory) if (m := _TMP_STEP.match(p))]
    step = max(pending) if pending else None
  latest = _latest_on_disk(manager)
  what = f"saving checkpoint {step}" if step is not None else "saving a checkpoint"
  if latest is None:
    resume = ("No checkpoint of this run was finished, so rerunning starts over: free space "
              "on that disk (or set --workdir to a larger one) first.")
  else:
    resume = (f"The last intact checkpoint is step {latest} ({directory / str(latest)}); "
              "earlier checkpoints are untouched. Free space on that disk (or raise the quota), "
              f"then rerun the same command to resume from step {latest}.")
  return f"{what} to {directory} failed: {_reason(error)}. {resume}"


def _latest_on_disk(manager: ocp.CheckpointManager) -> int | None:
  try:
    manager.reload()  # finished steps only: an interrupted write stays a tmp directory
  except Exception:  # noqa: BLE001  (a failing disk may fail this too; the cache is next best)
    pass
  return manager.latest_step()


def _listdir(directory: Path) -> list[str]:
  try:
    return os.listdir(directory)
  except OSError:
    return []


def _reason(error: BaseException) -> str:
  """The root cause in one line: an OSError's strerror and file, else the deepest message."""
  chain, seen = [], set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    chain.append(error)
    error = error.__cause__ or error.__context__
  for e in reversed(chain):
    if isinstance(e, OSError) and e.errno:
      where = f" ({e.filename})" if e.filename else ""
      return f"[Errno {e.errno}] {e.strerror or os.strerror(e.errno)}{where}"
  text = " ".join(str(chain[-1]).split()) or type(chain[-1]).__name__
  # tensorstore puts the OS error inside its own message: '... Failed writing: "FILE": ...
  # No space left on device [os_error_code='28']'. Lead with it.
  code = re.search(r"os_error_code='?(\d+)", text)
  if code:
    number = int(code.group(1))
    file = (re.search(r'Failed (?:writing|reading):? "([^"]+)"', text)
            or re.search(r'local file "([^"]+)"', text))
    where = f" ({file.group(1)})" if file else ""
    return f"[Errno {number}] {os.strerror(number)}{where}"
  return text[:300] + ("..." if len(text) > 300 else "")


# ----------------------------------------------------------------------------------------
# Restoring
# ----------------------------------------------------------------------------------------

def _restore_verified(manager: ocp.CheckpointManager, step: int, abstract_state: Any
                      ) -> tuple[Any, dict]:
  """(state, meta) of one step, checked against its fingerprints; raises
  DamagedCheckpointError with the reason otherwise."""
  where = Path(manager.directory) / str(step)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    state, meta = restored["state"], restored["meta"]
  except Exception as e:  # noqa: BLE001  (orbax/tensorstore raise many types for bad files)
    raise DamagedCheckpointError(f"{where} cannot be read ({_reason(e)})") from e
  expected = (meta or {}).get("fingerprints")
  if expected is None:
    logging.warning("Checkpoint %s has no fingerprints (written before they were added): "
                    "restored unverified.", where)
    _, non_finite = audit(state)
    if non_finite:
      raise DamagedCheckpointError(f"{where} holds NaN/inf in {non_finite[:3]}")
    return state, meta
  wrong = _mismatches(state, expected)
  if wrong:
    raise DamagedCheckpointError(
        f"{where} does not match its fingerprints in {len(wrong)} array(s) ({wrong[0]}"
        + (", ..." if len(wrong) > 1 else "") + "): its files were changed or damaged")
  return state, meta


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any
                   ) -> tuple[Any, dict] | None:
  """(state, meta) of the newest intact checkpoint, placed like `abstract_state`; None if
  there is no checkpoint at all.

  Newer checkpoints that fail verification are logged by path and reason and moved to
  workdir/damaged_checkpoints (never deleted). Raises DamagedCheckpointError, moving
  nothing, when every checkpoint fails.
  """
  manager.reload()
  damaged: list[tuple[int, str]] = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state, meta = _restore_verified(manager, step, abstract_state)
    except DamagedCheckpointError as e:
      logging.warning("Checkpoint %s is damaged, trying the one before it: %s",
                      Path(manager.directory) / str(step), e)
      damaged.append((step, str(e)))
      continue
    for bad_step, reason in damaged:
      kept = _set_aside(Path(manager.directory), bad_step)
      logging.warning("Resuming from step %d instead of damaged step %d (%s); the damaged "
                      "checkpoint is kept at %s.", step, bad_step, reason, kept)
    if damaged:
      manager.reload()
    return state, meta
  if damaged:
    listed = "; ".join(reason for _, reason in damaged)
    raise DamagedCheckpointError(
        f"no intact checkpoint in {manager.directory}: {listed}. Nothing was trained or "
        "changed. If the config changed since they were written (e.g. another student "
        "shape), use a new --workdir; to start over here, move that folder away.")
  return None


def _set_aside(directory: Path, step: int) -> Path:
  """Moves checkpoint `step` to ../damaged_checkpoints/STEP[-k] (process 0; all wait)."""
  target_dir = directory.parent / DAMAGED_DIR
  target = target_dir / str(step)
  k = 1
  while target.exists():
    k += 1
    target = target_dir / f"{step}-{k}"
  if jax.process_index() == 0:
    target_dir.mkdir(parents=True, exist_ok=True)
    shutil.move(str(directory / str(step)), str(target))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
  return target


# ----------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------

def load_student(workdir: str | os.PathLike, step: int | None = None
                 ) -> tuple[CLIPConfig, dict, int]:
  """(student config, student params as numpy, step) from a training workdir.

  Projectors and optimizer state are not returned: the student alone is what gets exported.
  The params are checked against the fingerprints saved with them. Raises FileNotFoundError
  (no checkpoint, or no such step) or DamagedCheckpointError (one line: the path, the reason
  and the other steps to try with --step).
  """
  directory = Path(workdir).absolute() / CHECKPOINT_DIR
  if not directory.is_dir():
    raise FileNotFoundError(f"no checkpoints in {directory}: train first with "
                            f"`python -m clipdistill_jax.main --config ... --workdir {workdir}`.")
  manager = ocp.CheckpointManager(directory, item_names=("state", "meta"))
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f"{directory} holds no finished checkpoint.")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; there are "
                            f"{sorted(steps)}.")
  others = sorted((s for s in steps if s != step), reverse=True)
  hint = (f" Export another one with --step (this run also has steps {others})." if others
          else " It is this run's only checkpoint.")
  try:
    config, params, meta = _read_student(manager, directory, step)
  except Exception as e:  # noqa: BLE001
    raise DamagedCheckpointError(
        f"checkpoint {directory / str(step)} cannot be read ({_reason(e)}).{hint}") from e
  finally:
    manager.close()
  expected = meta.get("fingerprints")
  if expected is not None:
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
      wrong = _mismatches({"params": {"student": params}}, expected)
    if wrong:
      raise DamagedCheckpointError(
          f"checkpoint {directory / str(step)} does not match its fingerprints in "
          f"{len(wrong)} array(s) ({wrong[0]}): its files were changed or damaged.{hint}")
  return config, params, step


def _read_student(manager, directory: Path, step: int) -> tuple[CLIPConfig, dict, dict]:
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  config = CLIPConfig.from_dict(meta["student_config"])
  # Restore only the student's params, on the local CPU, whatever mesh wrote them.
  from clipdistill_jax.models.hf import param_shapes
  cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
  target = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=cpu), param_shapes(config))
  handler = ocp.PyTreeCheckpointer()
  restored = handler.restore(
      directory / str(step) / "state",
      args=ocp.args.PyTreeRestore(
          item={"params": {"student": target}},
          restore_args=ocp.checkpoint_utils.construct_restore_args(
              {"params": {"student": target}}),
          partial_restore=True))
  params = jax.tree_util.tree_map(np.asarray, restored["params"]["student"])
  return config, params, meta
