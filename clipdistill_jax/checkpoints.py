"""Orbax checkpoints in `workdir/checkpoints`: async, keep-K, restored automatically.

A checkpoint holds two items: `state` (student params, projector params, optimizer state,
step) and `meta` (JSON: step, input position, the student's HF config, the teacher's source).
The teacher is never saved: it is reloaded from its source on restart.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from clipdistill_jax.models.config import CLIPConfig

CHECKPOINT_DIR = "checkpoints"


def make_manager(workdir: str | os.PathLike, *, save_every: int, keep: int,
                 async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_every, max_to_keep=keep,
      enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(Path(workdir).absolute() / CHECKPOINT_DIR, options=options,
                               item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict,
         force: bool = False) -> bool:
  """Saves when the interval says so (or `force`); orbax coordinates the hosts."""
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any
                   ) -> tuple[Any, dict] | None:
  """(state, meta) of the newest checkpoint, placed like `abstract_state`; None if none."""
  step = manager.latest_step()
  if step is None:
    return None
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  return restored["state"], restored["meta"]


def load_student(workdir: str | os.PathLike, step: int | None = None
                 ) -> tuple[CLIPConfig, dict, int]:
  """(student config, student params as numpy, step) from a training workdir.

  Projectors and optimizer state are not returned: the student alone is what gets exported.
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
  manager.close()
  return config, params, step
