"""Optax optimizer from a config: AdamW with a decay mask, schedules, clipping, accumulation."""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

# CLIP's convention: no weight decay on biases, norms (LayerNorm `scale`), embeddings
# (token/position/class embeddings) and the logit scale.
_NO_DECAY = re.compile(r"(^|/)(bias|scale|embedding|class_embedding|logit_scale)$")


def decay_mask(params: Any) -> Any:
  def keep(path, _):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    return not _NO_DECAY.search(name)
  return jax.tree_util.tree_map_with_path(keep, params)


def make_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """'warmup_cosine' | 'warmup_linear' | 'constant', warmup from 0 to `lr`."""
  lr, warmup = config.lr, min(config.warmup_steps, max(total_steps - 1, 0))
  end = lr * config.end_lr_ratio
  name = config.schedule
  if name == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1),
                                              end_value=end)
  if name == "warmup_linear":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup),
         optax.linear_schedule(lr, end, max(total_steps - warmup, 1))], [warmup])
  if name == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                 optax.constant_schedule(lr)], [warmup])
  raise ValueError(f"optim.schedule={name!r}: use 'warmup_cosine', 'warmup_linear' or "
                   "'constant'.")


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer, schedule). `total_steps` counts optimizer updates, not micro-batches."""
  schedule = make_schedule(config, total_steps)
  if config.name != "adamw":
    raise ValueError(f"optim.name={config.name!r}: only 'adamw' is implemented.")
  parts = []
  if config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay, mask=decay_mask))
  tx = optax.chain(*parts)
  if config.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
  return tx, schedule


def clamp_logit_scale(params: Any, max_logit_scale: float) -> Any:
  """CLIP clamps exp(logit_scale) at 100 so the contrastive temperature cannot collapse."""
  limit = math.log(max_logit_scale)

  def clamp(path, x):
    if str(getattr(path[-1], "key", path[-1])) == "logit_scale":
      return jnp.minimum(x, limit)
    return x
  return jax.tree_util.tree_map_with_path(clamp, params)
