"""Assembling a run: models -> loss -> optimizer -> mesh -> sharded state -> teacher
placement -> jitted update step.

The trainer (train.py), the teacher-cache writer (teacher_cache.py), the step benchmark
(perf/ours.py) and the tests build their runs here, so what they time, cache and test is
what trains.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from clipdistill_jax import losses, optim, sharding
from clipdistill_jax.data.compat import check_compatible
from clipdistill_jax.errors import UserError
from clipdistill_jax.models import hf, student
from clipdistill_jax.models.clip import CLIPModel, CLIPOutput, dummy_inputs
from clipdistill_jax.models.config import CLIPConfig, tiny_config
from clipdistill_jax.models.layer_map import resolve_layer_map

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


class ConfigError(UserError, ValueError):
  """A config that cannot run as written; the message says which fields to change."""


# ----------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------

def build_models(config: ml_collections.ConfigDict) -> Models:
  """Loads the teacher from its source and derives the student's config from it."""
  teacher_config = teacher_params = teacher = None
  if config.teacher.source:
    try:
      teacher_config, teacher_params = hf.load_pretrained(
          config.teacher.source, allow_pickle=config.teacher.allow_pickle)
    except FileNotFoundError as e:
      raise FileNotFoundError(
          f"{e}\nThe teacher could not be loaded. Point at a local copy with "
          "--config.teacher.source=/path/to/clip-vit-base-patch32, or run the offline demo, "
          "which needs no download: python -m clipdistill_jax.main --config configs/demo.py "
          "--workdir /tmp/demo") from e
    dtype = DTYPES[config.teacher.dtype]
    teacher = CLIPModel(teacher_config, dtype=dtype, param_dtype=dtype)
    teacher_params = jax.tree_util.tree_map(lambda a: np.asarray(a, dtype), teacher_params)
  student_config = make_student_config(config.student, teacher_config)
  dtype = DTYPES[config.student.dtype]
  model = CLIPModel(student_config, dtype=dtype,
                    remat_policy=config.student.remat_policy)
  context_length = student_config.text_config.max_position_embeddings
  if teacher_config is not None:
    context_length = check_compatible(teacher_config, student_config).context_length
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
    return resolve_layer_map(spec, getattr(s, tower).num_hidden_layers,
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
  if config.student.init == "inherit":
    inherited = student.inherit_params(
        models.teacher_params, models.teacher_config, models.student_config,
        vision_layers=config.student.inherit_vision_layers,
        text_layers=config.student.inherit_text_layers)
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
                    max_logit_scale: float, cached_teacher: bool = False,
                    grad_accum_steps: int = 1) -> Callable:
  """The update step (state, batch, teacher_params) -> (state, metrics).

  state["step"] counts micro-batches; with grad_accum_steps = k the optimizer (optax.MultiSteps)
  applies one update per k of them, at schedule(update index), so the learning rate logged
  for micro-batch s is schedule(s // k): the rate its gradient is applied with.
  """
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
        "learning_rate": schedule(state["step"] // grad_accum_steps),
        "logit_scale": jnp.exp(params["student"]["logit_scale"]),
    })
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  return train_step


# ----------------------------------------------------------------------------------------
# The whole chain
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
  """One assembled run, ready to step.

  step_fn(state, batch, teacher_params) -> (state, metrics) is jitted with the state's
  shardings, the batch split over the mesh's ('data', 'fsdp') axes and the metrics
  replicated; it donates `state`. teacher_params is the frozen teacher on the mesh, None
  where the teacher does not run (no teacher, or its embeddings come from a cache).
  """
  models: Models
  loss: losses.DistillLoss
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  mesh: jax.sharding.Mesh
  state: dict[str, Any]
  state_shardings: Any
  teacher_params: Any
  teacher_shardings: Any
  step_fn: Callable


def build_run(config: ml_collections.ConfigDict, models: Models | None = None, *,
              mesh: jax.sharding.Mesh | None = None, rng: jax.Array | None = None,
              cached_teacher_logit_scale: float | None = None) -> Run:
  """models -> loss -> optimizer -> mesh -> sharded state -> teacher placement -> jitted step.

  models: build_models(config) unless given (the trainer builds them first, for its
  evaluators). mesh: config.mesh over all devices unless given. rng: the init key,
  jax.random.key(config.seed) unless given. cached_teacher_logit_scale: the teacher's
  embeddings come from a cache (teacher_cache.py) instead of running it; the loss rebuilds
  its logits at this scale and its weights are dropped, never placed. The optimizer's
  schedule spans train.total_steps // optim.grad_accum_steps updates.
  Raises ValueError when train.batch_size does not split over the data-parallel devices, and
  ConfigError for a config that cannot run (init_state).
  """
  models = build_models(config) if models is None else models
  loss = make_loss(config, models)
  cached = cached_teacher_logit_scale is not None
  if cached:
    loss = dataclasses.replace(loss, teacher_logit_scale=cached_teacher_logit_scale)
  tx, schedule = optim.make_optimizer(
      config.optim, config.train.total_steps // config.optim.grad_accum_steps)

  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes) if mesh is None else mesh
  batch_size, parallel = config.train.batch_size, sharding.data_parallel_size(mesh)
  if batch_size % parallel:
    raise ValueError(f"train.batch_size={batch_size} is not divisible by the {parallel} "
                     f"data-parallel devices of mesh {dict(mesh.shape)}.")
  rng = jax.random.key(config.seed) if rng is None else rng
  state, state_shardings = init_state(config, models, loss, tx, mesh, rng)  # may inherit
  teacher_params = teacher_shardings = None
  if cached:  # the teacher never runs: its weights served init_state only
    models.teacher_params = None
  if models.teacher_params is not None:
    teacher_params, teacher_shardings = place_teacher(models, mesh, config.mesh.rules)

  step_fn = jax.jit(
      make_train_step(models, loss, tx, schedule, config.optim.max_logit_scale,
                      cached_teacher=cached, grad_accum_steps=config.optim.grad_accum_steps),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh), teacher_shardings),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,))
  return Run(models, loss, tx, schedule, mesh, state, state_shardings, teacher_params,
             teacher_shardings, step_fn)
