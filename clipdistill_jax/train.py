"""The distillation trainer: one CLIP module, one loss, one jitted step over a device mesh.

Reads top to bottom: models, mesh, init (sharded), restore, update step, loop. Every knob
comes from the ml_collections config (configs/*.py document them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from clipdistill_jax import checkpoints, config_lib, teacher_cache_reader, train_loop
from clipdistill_jax.data import pipeline
from clipdistill_jax.data.tokenizer import load_tokenizer
from clipdistill_jax.errors import UserError
from clipdistill_jax.eval.evaluators import build_evaluators
from clipdistill_jax.run_builder import build_models, build_run
from clipdistill_jax.writers import JsonlWriter


class NonFiniteLossError(UserError, FloatingPointError):
  pass


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------

def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """Multi-host: every host runs the same command; jax.distributed wires them up.

  On Cloud TPU pods `jax.distributed.initialize()` finds its peers by itself; elsewhere set
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or config.distributed).
  """
  wanted = config.distributed
  if wanted == "auto":
    wanted = bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or (
        len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1)
  if wanted and not jax.distributed.is_initialized():
    # jax reads JAX_COORDINATOR_ADDRESS itself, but not the process count and id (0.10.2).
    count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    jax.distributed.initialize(num_processes=int(count) if count else None,
                               process_id=int(index) if index else None)


def make_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard events + log lines (clu) and metrics.jsonl (read by report.py); host 0 only."""
  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(workdir, asynchronous=False),
      JsonlWriter(Path(workdir) / "metrics.jsonl")])


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) one training run in `workdir`; returns the final metrics.

  The evaluators config.evals names (eval/evaluators.py) are built, their data opened,
  before step 1; they run at their steps and at the end, logged with the training metrics.
  """
  config_lib.resolve(config)  # data.seed None -> config.seed; 'None' strings -> None
  maybe_initialize_distributed(config)
  workdir = str(workdir)
  Path(workdir).mkdir(parents=True, exist_ok=True)
  tc = config.train

  # --- models, teacher cache, then the run: loss, optimizer, mesh, state, step -----------
  models = build_models(config)
  if jax.process_index() == 0:
    models.student_config.to_json_file(Path(workdir) / "student_config.json")
  evaluators = build_evaluators(config, models)  # before build_run takes the teacher's params
  cache = None
  if config.teacher.cache_dir:
    # The teacher's embeddings come from disk (teacher_cache.py): it never runs here.
    cache = teacher_cache_reader.TeacherCache(config.teacher.cache_dir)
    cache.check_config(config, jax.process_count(),
                       image_size=models.student_config.vision_config.image_size,
                       context_length=models.context_length)
  run = build_run(config, models,
                  cached_teacher_logit_scale=None if cache is None else cache.teacher_logit_scale)
  mesh, state, state_shardings = run.mesh, run.state, run.state_shardings
  step_fn, teacher_params = run.step_fn, run.teacher_params

  # --- restore ---------------------------------------------------------------------------
  manager = checkpoints.make_manager(workdir, save_every=tc.checkpoint_every,
                                     keep=tc.keep_checkpoints,
                                     async_save=tc.get("async_checkpoints", True))
  abstract_state = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings)
  restored = checkpoints.restore_latest(manager, abstract_state)
  start_step, reader_state = 0, None
  if restored is not None:
    state, meta = restored
    start_step = int(meta["step"])
    reader_state = _host_reader_state(meta, start_step)
    logging.info("Resumed from %s at step %d.", manager.directory, start_step)

  meta = {"student_config": models.student_config.to_dict(),
          "teacher_source": config.teacher.source, "global_batch_size": tc.batch_size}

  # --- data ------------------------------------------------------------------------------
  tokenizer = load_tokenizer(config.tokenizer)
  batches = pipeline.make_train_iterator(
      config.data, global_batch_size=tc.batch_size,
      image_size=models.student_config.vision_config.image_size,
      context_length=models.context_length, tokenizer=tokenizer, process_index=jax.process_index(),
      process_count=jax.process_count(), start_step=start_step, reader_state=reader_state)
  merge_cached = (None if cache is None else
                  cache.merger(start_step, process_index=jax.process_index()))

  # --- loop ------------------------------------------------------------------------------
  # The host runs ahead of the devices (train_loop.py): it waits for a step only at log,
  # evaluation and save steps, and places each batch while the step before it runs.
  writer = make_writer(workdir)
  if start_step == 0:
    writer.write_hparams({k: str(v) for k, v in _flat(config.to_dict()).items()})
  progress = periodic_actions.ReportProgress(num_train_steps=tc.total_steps, writer=writer,
                                             every_steps=tc.log_every)
  placed_batches = train_loop.prefetch_to_mesh(
      batches, mesh, start_step=start_step, end_step=tc.total_steps, size=tc.prefetch,
      transform=merge_cached)
  accumulated, in_flight = train_loop.MetricsAccumulator(), train_loop.InFlight()
  clock = train_loop.StepClock()
  last_metrics: dict = {}
  with jax.set_mesh(mesh):
    for step in range(start_step + 1, tc.total_steps + 1):
      with clock.waiting():
        placed = next(placed_batches)
      state, metrics = step_fn(state, placed.batch, teacher_params)
      accumulated.add(metrics, state["step"])
      in_flight.add(metrics["loss/total"])
      checkpoints.check_saves(manager)  # a background save that failed stops the run now
      progress(step)
      if step % tc.log_every == 0 or step == tc.total_steps:
        steps_done = accumulated.count
        _check_finite(accumulated, manager)
        last_metrics = accumulated.mean()  # waits for the interval's steps
        train_s, waited_s = clock.lap()
        last_metrics["images_per_second"] = steps_done * tc.batch_size / train_s
        last_metrics["data/wait_fraction"] = waited_s / train_s
        last_metrics.update(placed.data_metrics)  # this host's read / skipped image counts
        writer.write_scalars(step, last_metrics)
      evaluate = evaluators.due(step)
      save = step == tc.total_steps or manager.should_save(step)
      if evaluate or save:
        accumulated.block_until_ready()  # the steps before count as training time
        with clock.paused():
          _check_finite(accumulated, manager)  # nothing of a non-finite step is used
          if evaluate:
            writer.write_scalars(step, evaluators(step, state["params"]["student"]))
          if save:
            checkpoints.save(manager, step, state,
                             {**meta, "step": step, "reader": _reader_states(placed)},
                             force=True)
  checkpoints.finish(manager)
  writer.flush()
  return {"step": int(state["step"]), "metrics": last_metrics, "models": models,
          "student_params": state["params"]["student"]}


def _reader_states(placed: train_loop.PlacedBatch) -> dict:
  """Every host's reader state ({position, num_read, num_skipped}) after the batch the
  saved state last trained on (not after the batches read ahead), for the checkpoint's
  meta, which host 0 writes: gathered from all hosts (a collective; save steps only)."""
  mine = placed.reader_state
  keys = sorted(mine)
  if jax.process_count() == 1:
    return {"process_count": 1, "hosts": [mine]}
  from jax.experimental import multihost_utils
  rows = multihost_utils.process_allgather(np.asarray([mine[k] for k in keys], np.int64))
  return {"process_count": jax.process_count(),
          "hosts": [dict(zip(keys, (int(v) for v in row), strict=True)) for row in rows]}


def _host_reader_state(meta: dict, step: int) -> dict | None:
  """This host's reader state from a checkpoint's meta; None (resume at step x batch, exact
  only if no image was dropped) for checkpoints without one or from another host count."""
  reader = meta.get("reader")
  if reader and reader.get("process_count") == jax.process_count():
    return reader["hosts"][jax.process_index()]
  logging.warning("Checkpoint %d has no reader position for %d host(s): the data resumes at "
                  "step x batch, which repeats as many records as were skipped before it.",
                  step, jax.process_count())
  return None


def _check_finite(accumulated: train_loop.MetricsAccumulator, manager) -> None:
  """A NaN/inf loss stops the run before anything of it, or of a later step, is saved.

  Checked (on the devices, fetched here) at log, evaluation and save steps; the error names
  the first step whose loss was NaN/inf. That loss comes from the state saved as step - 1:
  when that checkpoint is the latest, resuming from it replays the same loss, so the message
  says which one to move away. Nothing is deleted: the files are the user's.
  """
  bad = accumulated.first_non_finite()
  if bad is None:
    return
  step, metrics = bad
  total = metrics["loss/total"]
  manager.wait_until_finished()
  steps = sorted(manager.all_steps())
  advice = ("Lower optim.lr, set optim.grad_clip_norm, or check the data, then rerun the same "
            "command to resume from it.")
  if steps and steps[-1] == step - 1:
    older = steps[-2] if len(steps) > 1 else None
    advice = (f"Checkpoint {step - 1} holds the parameters this loss came from, so resuming "
              f"from it repeats the loss: move {manager.directory}/{step - 1} away"
              + (f" to resume from step {older}" if older is not None else
                 " and start over") + ", and lower optim.lr or set optim.grad_clip_norm.")
  latest = manager.latest_step()
  kept = (f"the latest checkpoint is step {latest} in {manager.directory}" if latest is not None
          else f"no checkpoint was saved before it in {manager.directory}")
  raise NonFiniteLossError(
      f"loss is {total} at step {step} ({metrics}). Nothing from this step or after it was "
      f"saved; {kept}. {advice}")


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def dump_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    Path(workdir).mkdir(parents=True, exist_ok=True)
    (Path(workdir) / "config.json").write_text(json.dumps(config.to_dict(), indent=2,
                                                          default=str))
