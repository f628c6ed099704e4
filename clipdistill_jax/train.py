"""The distillation trainer: one CLIP module, one loss, one jitted step over a device mesh.

Reads top to bottom: models, mesh, init (sharded), restore, update step, loop. Every knob
comes from the ml_collections config (configs/*.py document them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions

from clipdistill_jax import checkpoints, losses, optim, sharding, teacher_cache
from clipdistill_jax.data import pipeline
from clipdistill_jax.data.tokenizer import load_tokenizer
from clipdistill_jax.models import hf, student
from clipdistill_jax.models.clip import CLIPModel, CLIPOutput, dummy_inputs
from clipdistill_jax.models.config import CLIPConfig, tiny_config
from clipdistill_jax.writers import JsonlWriter

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Models:
  """Teacher (frozen, optional) and student of one run."""
  student_config: CLIPConfig
  student: CLIPModel
  teacher_config: CLIPConfig | None = None
  teacher: CLIPModel | None = None
  teacher_params: Any = None  # host numpy; never optimized, never checkpointed
  context_length: int = 77    # tokens both text towers take (the shorter one)


class NonFiniteLossError(FloatingPointError):
  pass


class ConfigError(ValueError):
  """A config that cannot run as written; the message says which fields to change."""


# ----------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------

def build_models(config: ml_collections.ConfigDict) -> Models:
  """Loads the teacher from its source and derives the student's config from it."""
  teacher_config = teacher_params = teacher = None
  if config.teacher.get("source"):
    try:
      teacher_config, teacher_params = hf.load_pretrained(
          config.teacher.source, allow_pickle=config.teacher.get("allow_pickle", False))
    except FileNotFoundError as e:
      raise FileNotFoundError(
          f"{e}\nThe teacher could not be loaded. Point at a local copy with "
          "--config.teacher.source=/path/to/clip-vit-base-patch32, or run the offline demo, "
          "which needs no download: python -m clipdistill_jax.main --config configs/demo.py "
          "--workdir /tmp/demo") from e
    dtype = DTYPES[config.teacher.get("dtype", "float32")]
    teacher = CLIPModel(teacher_config, dtype=dtype, param_dtype=dtype)
    teacher_params = jax.tree_util.tree_map(lambda a: np.asarray(a, dtype), teacher_params)
  student_config = make_student_config(config.student, teacher_config)
  dtype = DTYPES[config.student.get("dtype", "float32")]
  model = CLIPModel(student_config, dtype=dtype,
                    remat_policy=config.student.get("remat_policy", "none"))
  context_length = student_config.text_config.max_position_embeddings
  if teacher_config is not None:
    context_length = pipeline.check_compatible(teacher_config, student_config).context_length
  return Models(student_config, model, teacher_config, teacher, teacher_params, context_length)


def make_student_config(cfg: ml_collections.ConfigDict, teacher: CLIPConfig | None
                        ) -> CLIPConfig:
  """The student's CLIPConfig from config.student.

  arch: 'article' (the seed article's student), 'teacher' (the teacher's shape), 'custom'
  (the widths/depths in student.custom) or 'file' (student.file, an HF config.json). Shapes
  are derived from the teacher's config; without a teacher, from student.base ('vit_b32' or
  'tiny') with student.image_size / patch_size / context_length where set.
  """
  if cfg.arch == "file":
    return CLIPConfig.from_json_file(cfg.file)
  base = teacher or _base_config(cfg)
  if cfg.arch == "article":
    return student.article_student_config(base)
  if cfg.arch == "teacher":
    return base
  if cfg.arch == "custom":
    return student.student_config(base, **cfg.custom.to_dict())
  raise ValueError(f"student.arch={cfg.arch!r}: use 'article', 'teacher', 'custom' or 'file'.")


def _base_config(cfg: ml_collections.ConfigDict) -> CLIPConfig:
  if cfg.base not in ("vit_b32", "tiny"):
    raise ValueError(f"student.base={cfg.base!r}: use 'vit_b32' or 'tiny'.")
  base = CLIPConfig() if cfg.base == "vit_b32" else tiny_config()
  vision = dataclasses.replace(base.vision_config,
                               image_size=cfg.image_size or base.vision_config.image_size,
                               patch_size=cfg.patch_size or base.vision_config.patch_size)
  text = dataclasses.replace(
      base.text_config,
      max_position_embeddings=cfg.context_length or base.text_config.max_position_embeddings)
  return base.replace(vision_config=vision, text_config=text)


def make_loss(config: ml_collections.ConfigDict, models: Models) -> losses.DistillLoss:
  lc, s, t = config.loss, models.student_config, models.teacher_config
  if t is None:
    return losses.DistillLoss(s, None, weights={"contrastive": 1.0})

  weights = {k: float(lc.weights[k]) for k in losses.COMPONENTS if lc.weights.get(k)}

  def layers(component, spec, tower):  # a switched-off loss maps no layers (any spec)
    if component not in weights:
      return ()
    return losses.resolve_layer_map(spec, getattr(s, tower).num_hidden_layers,
                                    getattr(t, tower).num_hidden_layers)
  return losses.DistillLoss(
      s, t, weights=weights, temperature=lc.temperature,
      kd_teacher_logit_scale=lc.teacher_logit_scale, embed_projector=lc.embed_projector,
      icl_logit_scale_init=lc.icl_logit_scale_init,
      vision_hidden_layers=layers("hidden", lc.hidden_layers, "vision_config"),
      text_hidden_layers=layers("hidden", lc.hidden_layers, "text_config"),
      vision_attention_layers=layers("attention", lc.attention_layers, "vision_config"),
      text_attention_layers=layers("attention", lc.attention_layers, "text_config"))


# ----------------------------------------------------------------------------------------
# Train state: init, shardings, restore
# ----------------------------------------------------------------------------------------

def init_state(config, models: Models, loss: losses.DistillLoss, tx, mesh, rng):
  """Sharded train state {step, params: {student, projectors}, opt_state}.

  Shardings come from the logical axis names on every weight (rules in config.mesh.rules);
  a random init is jitted straight into them, inherited weights are placed into them.
  """
  rules = [tuple(r) for r in config.mesh.rules]
  student_rng, projector_rng = jax.random.split(rng)
  if config.student.init == "inherit" and models.teacher_params is None:
    raise ConfigError(
        f"student.init='inherit' (loss.recipe={config.loss.recipe!r}) cuts the student from "
        "the teacher's weights, but this run has no teacher: set --config.teacher.source, run "
        "mode 'experiment' (its teacher stage trains one), or --config.student.init=random.")

  def init_boxed(rng_s, rng_p):
    params = {"student": models.student.init(rng_s, *dummy_inputs(models.student_config))[
        "params"]}
    module = loss.projectors
    params["projectors"] = ({} if module is None else
                            module.init(rng_p, loss.projector_dummy_input())["params"])
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": tx.init(params)}

  abstract = jax.eval_shape(init_boxed, student_rng, projector_rng)
  shardings = sharding.param_shardings(abstract, mesh, rules)
  if config.student.get("init", "random") == "inherit":
    inherited = student.inherit_params(
        models.teacher_params, models.teacher_config, models.student_config,
        vision_layers=config.student.get("inherit_vision_layers"),
        text_layers=config.student.get("inherit_text_layers"))
    state = jax.jit(lambda s, r: _with_params(init_boxed(student_rng, r), s),
                    out_shardings=shardings)(inherited, projector_rng)
  else:
    state = jax.jit(lambda a, b: nn.unbox(init_boxed(a, b)), out_shardings=shardings)(
        student_rng, projector_rng)
  return state, shardings


def _with_params(boxed_state, student_params):
  """The boxed init with the student's params replaced (and the optimizer re-initialized)."""
  state = nn.unbox(boxed_state)
  state["params"]["student"] = student_params
  return state


def place_teacher(models: Models, mesh, rules) -> tuple[Any, Any]:
  """The frozen teacher's host params onto the mesh by its logical axes: (params, shardings).
  Drops the host copy (models.teacher_params): the device copy is the one used."""
  abstract = jax.eval_shape(models.teacher.init, jax.random.key(0),
                            *dummy_inputs(models.teacher_config))["params"]
  shardings = sharding.param_shardings(abstract, mesh, [tuple(r) for r in rules])
  params = sharding.put_tree(models.teacher_params, shardings)
  models.teacher_params = None
  return params, shardings


# ----------------------------------------------------------------------------------------
# The update step
# ----------------------------------------------------------------------------------------

def make_train_step(models: Models, loss: losses.DistillLoss, tx, schedule,
                    max_logit_scale: float, cached_teacher: bool = False) -> Callable:
  need_hidden, need_attention = loss.needs_hidden_states, loss.needs_attentions

  def teacher_outputs(teacher_params, batch) -> CLIPOutput | None:
    if cached_teacher:
      return CLIPOutput(image_embeds=batch["teacher_image_embeds"],
                        text_embeds=batch["teacher_text_embeds"])
    if models.teacher is None or not loss.active_components or loss.teacher_config is None:
      return None
    return models.teacher.apply({"params": teacher_params}, batch["image"], batch["input_ids"],
                                batch["attention_mask"], return_hidden=need_hidden,
                                return_attention=need_attention)

  def train_step(state, batch, teacher_params):
    teacher_out = teacher_outputs(teacher_params, batch)

    def loss_fn(params):
      student_out = models.student.apply(
          {"params": params["student"]}, batch["image"], batch["input_ids"],
          batch["attention_mask"], return_hidden=need_hidden, return_attention=need_attention)
      return loss(params["projectors"], student_out, teacher_out, batch["attention_mask"])

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    params["student"] = optim.clamp_logit_scale(params["student"], max_logit_scale)
    metrics.update({
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state["step"]),
        "logit_scale": jnp.exp(params["student"]["logit_scale"]),
    })
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  return train_step


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------

def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """Multi-host: every host runs the same command; jax.distributed wires them up.

  On Cloud TPU pods `jax.distributed.initialize()` finds its peers by itself; elsewhere set
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or config.distributed).
  """
  wanted = config.get("distributed", "auto")
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


def train(config: ml_collections.ConfigDict, workdir: str,
          eval_fn: Callable[[int, Models, Any], dict] | None = None) -> dict:
  """Runs (or resumes) one training run in `workdir`; returns the final metrics.

  eval_fn(step, models, student_params) -> scalars, called every config.eval.every steps and
  at the end; its results are logged with the training metrics.
  """
  maybe_initialize_distributed(config)
  workdir = str(workdir)
  Path(workdir).mkdir(parents=True, exist_ok=True)
  tc = config.train

  # --- models, loss, optimizer ----------------------------------------------------------
  models = build_models(config)
  loss = make_loss(config, models)
  steps_per_update = config.optim.get("grad_accum_steps", 1)
  tx, schedule = optim.make_optimizer(config.optim, tc.total_steps // steps_per_update)
  if jax.process_index() == 0:
    models.student_config.to_json_file(Path(workdir) / "student_config.json")

  # --- mesh and sharded state -----------------------------------------------------------
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  if tc.batch_size % sharding.data_parallel_size(mesh):
    raise ValueError(f"train.batch_size={tc.batch_size} is not divisible by the "
                     f"{sharding.data_parallel_size(mesh)} data-parallel devices of mesh "
                     f"{dict(mesh.shape)}.")
  rng = jax.random.key(config.seed)
  state, state_shardings = init_state(config, models, loss, tx, mesh, rng)
  cache = None
  if config.teacher.get("cache_dir"):
    # The teacher's embeddings come from disk (teacher_cache.py): it never runs here.
    cache = teacher_cache.TeacherCache(config.teacher.cache_dir)
    cache.check_config(config, jax.process_count(),
                       image_size=models.student_config.vision_config.image_size,
                       context_length=models.context_length)
    loss = dataclasses.replace(loss, teacher_logit_scale=cache.teacher_logit_scale)
    models.teacher_params = None
  teacher_params = None
  if models.teacher is not None and cache is None:
    teacher_params, teacher_shardings = place_teacher(models, mesh, config.mesh.rules)

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
          "teacher_source": config.teacher.get("source"), "global_batch_size": tc.batch_size}

  # --- the jitted step -------------------------------------------------------------------
  batch_shard = sharding.batch_sharding(mesh)
  step_fn = jax.jit(
      make_train_step(models, loss, tx, schedule, config.optim.max_logit_scale,
                      cached_teacher=cache is not None),
      in_shardings=(state_shardings, batch_shard,
                    None if teacher_params is None else teacher_shardings),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,))

  # --- data ------------------------------------------------------------------------------
  tokenizer = load_tokenizer(config.get("tokenizer"))
  batches = pipeline.make_train_iterator(
      config.data, global_batch_size=tc.batch_size,
      image_size=models.student_config.vision_config.image_size,
      context_length=models.context_length, tokenizer=tokenizer, process_index=jax.process_index(),
      process_count=jax.process_count(), start_step=start_step, reader_state=reader_state)
  merge_cached = (None if cache is None else
                  cache.merger(start_step, process_index=jax.process_index()))

  # --- loop ------------------------------------------------------------------------------
  writer = make_writer(workdir)
  if start_step == 0:
    writer.write_hparams({k: str(v) for k, v in _flat(config.to_dict()).items()})
  progress = periodic_actions.ReportProgress(num_train_steps=tc.total_steps, writer=writer,
                                             every_steps=tc.log_every)
  last_metrics: dict = {}
  timer = time.perf_counter()
  with jax.set_mesh(mesh):
    for step in range(start_step + 1, tc.total_steps + 1):
      host_batch = next(batches)
      if merge_cached is not None:
        host_batch = merge_cached(host_batch, step - 1)
      batch = sharding.shard_host_batch(pipeline.without_example_fields(host_batch), mesh)
      state, metrics = step_fn(state, batch, teacher_params)
      metrics = jax.device_get(metrics)
      checkpoints.check_saves(manager)  # a background save that failed stops the run now
      _check_finite(metrics, step, manager)
      progress(step)
      if step % tc.log_every == 0 or step == tc.total_steps:
        elapsed = time.perf_counter() - timer
        steps_done = (tc.log_every if step % tc.log_every == 0 else
                      step - (step // tc.log_every) * tc.log_every) or 1
        metrics["images_per_second"] = steps_done * tc.batch_size / max(elapsed, 1e-9)
        metrics.update(batches.metrics())  # this host's read / skipped image counts
        writer.write_scalars(step, {k: float(v) for k, v in metrics.items()})
        timer = time.perf_counter()
      if eval_fn is not None and (step % config.eval.every == 0 or step == tc.total_steps):
        writer.write_scalars(step, eval_fn(step, models, state["params"]["student"]))
      if step == tc.total_steps or manager.should_save(step):
        checkpoints.save(manager, step, state, {**meta, "step": step,
                                                "reader": _reader_states(batches)},
                         force=True)
      last_metrics = metrics
  checkpoints.finish(manager)
  writer.flush()
  return {"step": int(state["step"]), "metrics": {k: float(v) for k, v in
                                                  last_metrics.items()}, "models": models,
          "student_params": state["params"]["student"]}


def _reader_states(batches) -> dict:
  """Every host's reader state ({position, num_read, num_skipped}) for the checkpoint's
  meta, which host 0 writes: gathered from all hosts (a collective; save steps only)."""
  mine = batches.state()
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


def _check_finite(metrics: dict, step: int, manager) -> None:
  """A NaN/inf loss stops the run before anything of this step is saved.

  The loss of `step` comes from the state saved as step - 1: when that checkpoint is the
  latest, resuming from it replays the same loss, so the message says which one to move
  away. Nothing is deleted: the files are the user's.
  """
  total = float(metrics["loss/total"])
  if np.isfinite(total):
    return
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
  raise NonFiniteLossError(
      f"loss is {total} at step {step} ({ {k: float(v) for k, v in metrics.items()} }). "
      f"Nothing from this step was saved; the latest checkpoint is step "
      f"{manager.latest_step()} in {manager.directory}. {advice}")


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
