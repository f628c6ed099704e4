"""Learnable projectors from the student's feature spaces into the teacher's, trained with
the distillation losses (losses.py) and dropped at export.
"""

from __future__ import annotations

import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from clipdistill_jax.models.clip import CLIPOutput
from clipdistill_jax.models.layer_map import LayerMap

Array = jax.Array


def _rectangular_identity(key, shape, dtype=jnp.float32) -> Array:
  del key
  return jnp.eye(shape[0], shape[1], dtype=dtype)


@flax.struct.dataclass
class ProjectedFeatures:
  image_embeds: Array | None = None
  text_embeds: Array | None = None
  vision_hidden_states: tuple[Array, ...] = ()  # aligned with the vision layer map
  text_hidden_states: tuple[Array, ...] = ()    # aligned with the text layer map
  icl_logit_scale: Array | None = None           # log of ICL's logit scale, a scalar


class FeatureProjectors(nn.Module):
  """Linear maps (no bias) from the student's feature spaces into the teacher's.

  One per embedding (student projection_dim -> teacher projection_dim; only when
  `teacher_projection_dim` is set) and one per mapped layer pair (student hidden -> teacher
  hidden). With `icl_logit_scale_init` set it also holds ICL's learnable logit scale (a log,
  as CLIP's is), which belongs to the distillation, not to the student. Kernels start as the
  rectangular identity eye(d_s, d_t): the exact identity when the widths match, and for a
  width-inherited student (models/student.py keeps the teacher's first d_s channels) it maps
  each kept channel back onto the channel it came from.

  The projectors are trained with the student but are not part of it: export drops them,
  since users deploy the student alone.
  """
  teacher_projection_dim: int | None = None
  icl_logit_scale_init: float | None = None
  teacher_vision_hidden_size: int = 0
  teacher_text_hidden_size: int = 0
  vision_layer_map: LayerMap = ()
  text_layer_map: LayerMap = ()

  def _project(self, x: Array, features: int, axes: tuple[str, str], name: str) -> Array:
    return nn.Dense(features, use_bias=False, name=name,
                    kernel_init=nn.with_logical_partitioning(_rectangular_identity, axes))(
                        x.astype(jnp.float32))

  @nn.compact
  def __call__(self, student_out: CLIPOutput) -> ProjectedFeatures:
    image = text = None
    if self.teacher_projection_dim is not None:
      axes = ("student_proj", "proj")
      image = self._project(require_output(student_out.image_embeds, "student image_embeds"),
                            self.teacher_projection_dim, axes, "image_embeds")
      text = self._project(require_output(student_out.text_embeds, "student text_embeds"),
                           self.teacher_projection_dim, axes, "text_embeds")
    towers = {}
    for tower, layer_map, states, width in (
        ("vision", self.vision_layer_map, student_out.vision_hidden_states,
         self.teacher_vision_hidden_size),
        ("text", self.text_layer_map, student_out.text_hidden_states,
         self.teacher_text_hidden_size)):
      if layer_map and not states:
        raise ValueError(f"student_out has no {tower}_hidden_states: run the student with "
                         "return_hidden=True (DistillLoss.needs_hidden_states).")
      towers[tower] = tuple(
          self._project(states[i], width, ("student_embed", "embed"),
                        f"{tower}_hidden_{i}_to_{j}") for i, j in layer_map)
    icl_logit_scale = None
    if self.icl_logit_scale_init is not None:
      icl_logit_scale = self.param(
          "icl_logit_scale", nn.with_logical_partitioning(
              nn.initializers.constant(math.log(self.icl_logit_scale_init)), ()), ())
    return ProjectedFeatures(image_embeds=image, text_embeds=text,
                             vision_hidden_states=towers["vision"],
                             text_hidden_states=towers["text"],
                             icl_logit_scale=icl_logit_scale)




def require_output(x, what: str):
  """x, or ValueError naming the model output a loss needs that is missing (None)."""
  if x is None:
    raise ValueError(f"{what} is missing from the model output this loss needs.")
  return x
