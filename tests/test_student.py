"""Student configs (parameter counts vs transformers) and weight inheritance."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipdistill_jax.models.clip import CLIPModel, count_params, init_params
from clipdistill_jax.models.config import CLIPConfig, tiny_config
from clipdistill_jax.models.student import (
  article_student_config,
  inherit_params,
  init_student,
  student_config,
)

TEACHER = tiny_config()  # text 32 wide / 4 heads / 2 layers; vision 48 / 4 heads / 3 layers
SMALL = dict(projection_dim=16, text_hidden_size=16, text_intermediate_size=40, text_layers=1,
             text_heads=2, vision_hidden_size=32, vision_intermediate_size=64,
             vision_layers=2, vision_heads=4)


def shapes(config):
  return jax.eval_shape(lambda: init_params(CLIPModel(config), jax.random.key(0)))


def random_params(config, seed):
  """Random params with the model's exact tree, filled by numpy (no init compile)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if path[-1].key == "scale":
      return jnp.asarray(1 + 0.1 * rng.normal(size=leaf.shape), leaf.dtype)
    return jnp.asarray(0.05 * rng.normal(size=leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes(config))


@pytest.fixture(scope="module")
def teacher_params():
  return random_params(TEACHER, 0)


@functools.cache
def jitted_apply(config, return_hidden):
  return jax.jit(functools.partial(CLIPModel(config).apply, return_hidden=return_hidden))


def forward(config, params, return_hidden=False):
  pixels = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
  ids = np.zeros((2, 16), np.int32)
  ids[:, :4] = [49406, 320, 1125, 49407]
  ids[1, 3:6] = [539, 320, 49407]
  mask = jnp.asarray((ids != 0).astype(np.int32))
  return jitted_apply(config, return_hidden)({"params": params}, pixels, jnp.asarray(ids), mask)


# -------------------------------------------------------------------------------- configs


def test_article_student_parameter_count_matches_transformers():
  import torch
  import transformers

  teacher = CLIPConfig()
  student = article_student_config(teacher)
  assert count_params(shapes(teacher)) == 151_277_313
  assert count_params(shapes(student)) == 60_248_193
  with torch.device("meta"):  # shapes only, no 60M-parameter allocation
    for config, want in ((teacher, 151_277_313), (student, 60_248_193)):
      hf = transformers.CLIPModel(transformers.CLIPConfig(**config.to_dict()))
      assert sum(p.numel() for p in hf.parameters()) == want


def test_student_config_keeps_everything_but_the_shrunk_sizes():
  teacher = CLIPConfig()
  student = article_student_config(teacher)
  s_text, t_text = student.text_config, teacher.text_config
  s_vis, t_vis = student.vision_config, teacher.vision_config
  assert (s_text.hidden_size, s_text.intermediate_size, s_text.num_hidden_layers,
          s_text.num_attention_heads) == (384, 1536, 8, 6)
  assert (s_vis.hidden_size, s_vis.intermediate_size, s_vis.num_hidden_layers,
          s_vis.num_attention_heads, s_vis.patch_size, s_vis.image_size) == (
              512, 2048, 8, 8, 32, 224)
  assert student.projection_dim == s_text.projection_dim == s_vis.projection_dim == 256
  for field in ("vocab_size", "max_position_embeddings", "hidden_act", "layer_norm_eps",
                "eos_token_id", "bos_token_id", "pad_token_id", "initializer_factor"):
    assert getattr(s_text, field) == getattr(t_text, field), field
  assert (s_vis.hidden_act, s_vis.layer_norm_eps) == (t_vis.hidden_act, t_vis.layer_norm_eps)
  assert student.logit_scale_init_value == teacher.logit_scale_init_value
  legacy = teacher.replace(text_config=dataclasses.replace(t_text, eos_token_id=2))
  assert article_student_config(legacy).text_config.pools_at_argmax
  with pytest.raises(ValueError, match="divisible"):
    student_config(teacher, **{**SMALL, "text_hidden_size": 30, "text_heads": 4})


# ---------------------------------------------------------------------------- inheritance


def test_full_inheritance_reproduces_the_teacher_exactly(teacher_params):
  inherited = inherit_params(teacher_params, TEACHER, TEACHER)
  jax.tree_util.tree_map(np.testing.assert_array_equal, inherited, teacher_params)
  want = forward(TEACHER, teacher_params)
  got = forward(TEACHER, inherited)
  np.testing.assert_array_equal(got.logits_per_image, want.logits_per_image)
  np.testing.assert_array_equal(got.image_embeds, want.image_embeds)


def test_shrunk_inheritance_has_the_students_tree_and_runs(teacher_params):
  config = student_config(TEACHER, **SMALL)
  params = init_student(config, jax.random.key(0), "inherit", teacher_params, TEACHER)
  want = shapes(config)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(want)
  jax.tree_util.tree_map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype) or
                         pytest.fail(f"{a.shape} vs {b.shape}"), params, want)
  out = forward(config, params)
  assert out.logits_per_image.shape == (2, 2)
  assert np.isfinite(np.asarray(out.logits_per_image)).all()


def test_width_and_depth_slicing_rule(teacher_params):
  # Text: 4 heads of 8 -> 2 heads of 8 (head dims equal: whole heads kept).
  # Vision: 4 heads of 12 -> 4 heads of 8 (first 8 dims of every head).
  config = student_config(TEACHER, **SMALL)
  params = inherit_params(teacher_params, TEACHER, config, text_layers=[2])
  tp = jax.tree_util.tree_map(np.asarray, teacher_params)

  text_q = params["text_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"]
  teacher_q = tp["text_model"]["encoder"]["layers_1"]["self_attn"]["q_proj"]
  np.testing.assert_array_equal(text_q["kernel"], teacher_q["kernel"][:16, :16])
  np.testing.assert_array_equal(text_q["bias"], teacher_q["bias"][:16])

  # Vision layers default to uniform_layer_map(2, 3): teacher layers 1 and 3.
  vis = params["vision_model"]["encoder"]["layers_1"]
  teacher_vis = tp["vision_model"]["encoder"]["layers_2"]
  heads = np.concatenate([np.arange(h * 12, h * 12 + 8) for h in range(4)])
  np.testing.assert_array_equal(vis["self_attn"]["k_proj"]["kernel"],
                                teacher_vis["self_attn"]["k_proj"]["kernel"][:32][:, heads])
  np.testing.assert_array_equal(vis["self_attn"]["out_proj"]["kernel"],
                                teacher_vis["self_attn"]["out_proj"]["kernel"][heads][:, :32])
  np.testing.assert_array_equal(vis["mlp"]["fc2"]["kernel"],
                                teacher_vis["mlp"]["fc2"]["kernel"][:64, :32])
  np.testing.assert_array_equal(vis["layer_norm1"]["scale"],
                                teacher_vis["layer_norm1"]["scale"][:32])
  np.testing.assert_array_equal(params["visual_projection"]["kernel"],
                                tp["visual_projection"]["kernel"][:32, :16])
  emb = params["vision_model"]["embeddings"]
  np.testing.assert_array_equal(emb["position_embedding"]["embedding"],
                                tp["vision_model"]["embeddings"]["position_embedding"]
                                ["embedding"][:, :32])
  assert float(params["logit_scale"]) == float(tp["logit_scale"])


def test_inherited_layers_are_the_teachers_layers(teacher_params):
  # Same widths, 2 of 3 vision layers [1, 3]: the student's first layer IS teacher layer 1.
  config = TEACHER.replace(
      vision_config=dataclasses.replace(TEACHER.vision_config, num_hidden_layers=2))
  params = inherit_params(teacher_params, TEACHER, config, vision_layers=[1, 3])
  student_hidden = forward(config, params, return_hidden=True).vision_hidden_states
  teacher_hidden = forward(TEACHER, teacher_params, return_hidden=True).vision_hidden_states
  np.testing.assert_allclose(student_hidden[1], teacher_hidden[1], rtol=1e-6)


def test_inheritance_errors(teacher_params):
  wider = student_config(TEACHER, **{**SMALL, "vision_hidden_size": 64})
  with pytest.raises(ValueError, match="larger than the teacher"):
    inherit_params(teacher_params, TEACHER, wider)
  more_heads = student_config(TEACHER, **{**SMALL, "text_heads": 8})  # 8 heads of 2 dims
  with pytest.raises(ValueError, match="heads"):
    inherit_params(teacher_params, TEACHER, more_heads)
  other_patch = student_config(TEACHER, **SMALL, patch_size=16)
  with pytest.raises(ValueError, match="patch_size"):
    inherit_params(teacher_params, TEACHER, other_patch)
  small = student_config(TEACHER, **SMALL)
  with pytest.raises(ValueError, match="one teacher layer per student layer"):
    inherit_params(teacher_params, TEACHER, small, vision_layers=[1, 2, 3])
  with pytest.raises(ValueError, match="out of range"):
    inherit_params(teacher_params, TEACHER, small, text_layers=[3])
  with pytest.raises(ValueError, match="do not match teacher_config"):
    inherit_params(teacher_params, student_config(TEACHER, **{**SMALL, "text_layers": 2,
                                                               "vision_layers": 3}), small)
  with pytest.raises(ValueError, match="needs teacher_params"):
    init_student(small, jax.random.key(0), "inherit")
  with pytest.raises(ValueError, match="'random' or 'inherit'"):
    init_student(small, jax.random.key(0), "distill")


def test_random_init_student_has_the_same_tree():
  config = student_config(TEACHER, **SMALL)
  params = jax.eval_shape(lambda: init_student(config, jax.random.key(0)))
  assert params == shapes(config)
