"""Student models: a config derived from the teacher's, and weights inherited from it.

`student_config` changes only the widths/depths a student shrinks; everything else
(vocabulary, context length, activation, layer-norm eps, EOS id and pooling rule, init
scales, logit-scale init) comes from the teacher, so both read the same token ids and
preprocessed images. `article_student_config` is the seed article's student.

Weight inheritance (TinyCLIP-style "manual inheritance"; deterministic, nothing random):

  depth  student layer i (1..L_s) copies teacher layer `vision_layers[i-1]` /
         `text_layers[i-1]` (1-based, layer j = `layers_{j-1}`). By default the teacher layers
         of `uniform_layer_map` (8 of 12 -> 1, 3, 4, 6, 7, 9, 10, 12), the same pairs the
         hidden-state loss uses, so an inherited layer starts out matching its target.
  width  every parameter axis carries a logical name in clip.py; each name has one rule:
           embed, norm   the first d_s channels of the residual stream (embeddings, layer
                         norms, attention/MLP in- and outputs, projection inputs)
           heads         the first h_s heads, and within each the first head_dim_s dims
                         (the whole head when the head dims match, as in the article)
           mlp           the first intermediate_size_s MLP channels
           proj          the first projection_dim_s output channels of both projections
           positions     text: the first max_position_embeddings_s rows; vision: the same
                         count (image_size and patch_size must match the teacher's)
           vocab, conv_* must match the teacher's (same tokenizer, same patch size)
         logit_scale is copied. A student wider than its teacher on any axis, or differing
         where sizes must match, raises a ValueError that says what to change.

With all layers at full width this reproduces the teacher exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from clipdistill_jax.models.clip import CLIPModel, dummy_inputs, init_params
from clipdistill_jax.models.config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from clipdistill_jax.models.layer_map import uniform_layer_map

Array = jax.Array

# The seed article's student: projection 256; text 384 wide / 1536 MLP / 8 layers / 6 heads;
# vision 512 / 2048 / 8 / 8 heads at patch 32, 224 px. From ViT-B/32: 60,248,193 parameters.
ARTICLE_STUDENT = dict(
    projection_dim=256,
    text_hidden_size=384, text_intermediate_size=1536, text_layers=8, text_heads=6,
    vision_hidden_size=512, vision_intermediate_size=2048, vision_layers=8, vision_heads=8,
    patch_size=32, image_size=224)


def student_config(teacher: CLIPConfig, *, projection_dim: int, text_hidden_size: int,
                   text_intermediate_size: int, text_layers: int, text_heads: int,
                   vision_hidden_size: int, vision_intermediate_size: int, vision_layers: int,
                   vision_heads: int, patch_size: int | None = None,
                   image_size: int | None = None) -> CLIPConfig:
  """The teacher's config with the student's widths and depths (see module docstring)."""
  text = dataclasses.replace(
      teacher.text_config, hidden_size=text_hidden_size,
      intermediate_size=text_intermediate_size, num_hidden_layers=text_layers,
      num_attention_heads=text_heads, projection_dim=projection_dim)
  vision = dataclasses.replace(
      teacher.vision_config, hidden_size=vision_hidden_size,
      intermediate_size=vision_intermediate_size, num_hidden_layers=vision_layers,
      num_attention_heads=vision_heads, projection_dim=projection_dim,
      patch_size=patch_size or teacher.vision_config.patch_size,
      image_size=image_size or teacher.vision_config.image_size)
  return teacher.replace(text_config=text, vision_config=vision, projection_dim=projection_dim)


def article_student_config(teacher: CLIPConfig) -> CLIPConfig:
  """The seed article's student (ARTICLE_STUDENT) derived from `teacher`."""
  return student_config(teacher, **ARTICLE_STUDENT)


# ----------------------------------------------------------------------------------------
# Weight inheritance
# ----------------------------------------------------------------------------------------


def _param_specs(config: CLIPConfig) -> dict[tuple[str, ...], Any]:
  """path -> LogicallyPartitioned(ShapeDtypeStruct, names), without allocating anything."""
  boxed = jax.eval_shape(CLIPModel(config).init, jax.random.key(0), *dummy_inputs(config))
  return flatten_dict(boxed["params"])


def _source_layers(layers: Sequence[int] | None, n_student: int, n_teacher: int,
                   tower: str) -> list[int]:
  if layers is None:
    return [j for _, j in uniform_layer_map(n_student, n_teacher)]
  layers = [int(j) for j in layers]
  if len(layers) != n_student:
    raise ValueError(f"{tower}_layers has {len(layers)} entries; the student's {tower} tower "
                     f"has {n_student} layers: give one teacher layer per student layer.")
  bad = [j for j in layers if not 1 <= j <= n_teacher]
  if bad:
    raise ValueError(f"{tower}_layers {bad} out of range: teacher layers are numbered "
                     f"1..{n_teacher} (layer j is `layers_{{j-1}}` in the param tree).")
  return layers


def _slice_prefix(x: Array, axis: int, size: int) -> Array:
  return jax.lax.slice_in_dim(x, 0, size, axis=axis)


def _slice_heads(x: Array, axis: int, teacher: CLIPTextConfig | CLIPVisionConfig,
                 student: CLIPTextConfig | CLIPVisionConfig) -> Array:
  shape = x.shape
  x = x.reshape(shape[:axis] + (teacher.num_attention_heads, teacher.head_dim)
                + shape[axis + 1:])
  x = _slice_prefix(x, axis, student.num_attention_heads)
  x = _slice_prefix(x, axis + 1, student.head_dim)
  return x.reshape(shape[:axis] + (student.hidden_size,) + shape[axis + 1:])


def _inherit_leaf(path: str, x: Array, names: Sequence[str], want_shape: tuple[int, ...],
                  teacher: CLIPTextConfig | CLIPVisionConfig,
                  student: CLIPTextConfig | CLIPVisionConfig) -> Array:
  """Slices one teacher parameter down to the student's shape, axis by axis."""
  for axis, (name, have, want) in enumerate(zip(names, x.shape, want_shape, strict=True)):
    if name in ("vocab", "conv_h", "conv_w", "conv_in") or (
        name == "positions" and isinstance(student, CLIPVisionConfig)):
      if want != have:
        raise ValueError(
            f"cannot inherit {path}: its '{name}' axis is {want} in the student and {have} in "
            "the teacher. The student must keep the teacher's vocabulary, image_size and "
            "patch_size to inherit; change those, or use init='random'.")
    elif want > have:
      raise ValueError(
          f"cannot inherit {path}: the student is larger than the teacher on its '{name}' axis "
          f"({want} > {have}). Shrink the student there, or use init='random'.")
    elif name in ("embed", "norm", "mlp", "proj", "positions"):
      x = _slice_prefix(x, axis, want)
    elif name == "heads":
      if (student.num_attention_heads > teacher.num_attention_heads
          or student.head_dim > teacher.head_dim):
        raise ValueError(
            f"cannot inherit {path}: the student has {student.num_attention_heads} heads of "
            f"{student.head_dim} dims, the teacher {teacher.num_attention_heads} of "
            f"{teacher.head_dim}; inheriting needs at most as many heads, each at most as "
            "wide. Change the student's hidden_size/heads, or use init='random'.")
      x = _slice_heads(x, axis, teacher, student)
    else:
      raise ValueError(f"cannot inherit {path}: no inheritance rule for the logical axis "
                       f"{name!r} (a new parameter in clip.py? add a rule in student.py).")
  return x


def inherit_params(teacher_params: Any, teacher_config: CLIPConfig, student_config: CLIPConfig,
                   *, vision_layers: Sequence[int] | None = None,
                   text_layers: Sequence[int] | None = None) -> dict:
  """Student params cut from the teacher's (rule in the module docstring).

  `vision_layers` / `text_layers`: the teacher layer (1-based) each student layer copies, in
  order; None picks `uniform_layer_map`'s. Returns a plain param dict in the student's
  param dtype, with exactly the tree `init_params(CLIPModel(student_config), rng)` has.
  """
  student_specs = _param_specs(student_config)
  teacher_specs = _param_specs(teacher_config)
  teacher_flat = flatten_dict(nn.unbox(teacher_params))
  missing = sorted("/".join(p) for p in set(teacher_specs) - set(teacher_flat))
  if missing:
    raise ValueError(f"teacher_params lack {len(missing)} parameters of teacher_config's model "
                     f"(first: {missing[0]}); pass CLIP params from init_params/load_pretrained.")
  for path, spec in teacher_specs.items():
    if tuple(teacher_flat[path].shape) != spec.value.shape:
      raise ValueError(f"teacher_params do not match teacher_config at {'/'.join(path)}: "
                       f"{tuple(teacher_flat[path].shape)} vs {spec.value.shape}.")

  towers = {"vision": (teacher_config.vision_config, student_config.vision_config),
            "text": (teacher_config.text_config, student_config.text_config)}
  sources = {
      "vision_model": _source_layers(vision_layers, towers["vision"][1].num_hidden_layers,
                                     towers["vision"][0].num_hidden_layers, "vision"),
      "text_model": _source_layers(text_layers, towers["text"][1].num_hidden_layers,
                                   towers["text"][0].num_hidden_layers, "text")}
  out = {}
  for path, spec in student_specs.items():
    source = list(path)
    if len(path) > 2 and path[1] == "encoder" and path[2].startswith("layers_"):
      source[2] = f"layers_{sources[path[0]][int(path[2][len('layers_'):])] - 1}"
    tower = "vision" if path[0] in ("vision_model", "visual_projection") else "text"
    x = _inherit_leaf("/".join(path), jnp.asarray(teacher_flat[tuple(source)]), spec.names,
                      spec.value.shape, *towers[tower])
    out[path] = x.astype(spec.value.dtype)
  return unflatten_dict(out)


def init_student(student_config: CLIPConfig, rng: Array,
                 init: Literal["random", "inherit"] = "random", teacher_params: Any = None,
                 teacher_config: CLIPConfig | None = None, **inherit_kw: Any) -> dict:
  """Student params: HF's random init, or inherited from the teacher (`inherit_params`;
  `inherit_kw` takes vision_layers/text_layers). `rng` is used by the random init only."""
  if init == "random":
    return init_params(CLIPModel(student_config), rng)
  if init == "inherit":
    if teacher_params is None or teacher_config is None:
      raise ValueError("init='inherit' needs teacher_params and teacher_config (load them "
                       "with models.hf.load_pretrained), or use init='random'.")
    return inherit_params(teacher_params, teacher_config, student_config, **inherit_kw)
  raise ValueError(f"init={init!r}: use 'random' or 'inherit'.")
