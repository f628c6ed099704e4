"""Tiny random CLIPs for tests, drawn with numpy (jit-compiling init costs ~20 s here)."""

import jax
import numpy as np

from clipdistill_jax import config_lib
from clipdistill_jax.models import hf
from clipdistill_jax.models.config import CLIPConfig, tiny_config


def tiny_student(eos_token_id: int, seed: int = 0) -> tuple[CLIPConfig, dict]:
  """Random tiny weights drawn with numpy (jit-compiling init costs ~20 s on 2 busy cores),
  layer norms and logit_scale off their (1, 0) init so a swapped tensor cannot hide."""
  config = tiny_config(eos_token_id=eos_token_id)
  rng = np.random.default_rng(seed)

  def draw(path, spec):
    noise = rng.standard_normal(spec.shape).astype(np.float32)
    name = path[-1].key
    if name == "scale":
      return 1 + 0.1 * noise
    if name == "logit_scale":
      return np.float32(2.6592) + 0.1 * noise
    return (0.1 if name == "bias" else 0.05) * noise
  return config, jax.tree_util.tree_map_with_path(draw, hf.param_shapes(config))


TINY_STUDENT = dict(projection_dim=16, text_hidden_size=24, text_intermediate_size=48,
                    text_layers=1, text_heads=2, vision_hidden_size=32,
                    vision_intermediate_size=64, vision_layers=1, vision_heads=2)


def tiny_distill_config(**overrides):
  """base_config() with a one-layer custom student, all five losses, synthetic data;
  overrides as {"a.b": value}."""
  c = config_lib.base_config()
  c.student.arch = "custom"
  c.student.custom = TINY_STUDENT
  c.loss.hidden_layers = "uniform"  # all five losses on, as in the article
  c.data.source = "synthetic"
  c.update_from_flattened_dict(overrides)
  return c
