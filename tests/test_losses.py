"""Distillation losses against hand (numpy) computations, and DistillLoss end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from clipdistill_jax import losses
from clipdistill_jax.losses import (
  DistillLoss,
  attention_loss,
  contrastive_loss,
  embedding_feature_loss,
  hidden_state_loss,
  logit_kl_loss,
)
from clipdistill_jax.models.clip import CLIPModel, CLIPOutput, init_params
from clipdistill_jax.models.config import tiny_config
from clipdistill_jax.models.layer_map import (
  layer_map_from_teacher_layers,
  resolve_layer_map,
  uniform_layer_map,
)
from clipdistill_jax.models.projectors import FeatureProjectors
from clipdistill_jax.models.student import student_config

RNG = np.random.default_rng(0)


def np_log_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def padding_mask(batch, length, lengths):
  return (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.int32)


# ---------------------------------------------------------------------------- layer maps


def test_uniform_layer_map_values():
  assert uniform_layer_map(8, 12) == ((1, 1), (2, 3), (3, 4), (4, 6), (5, 7), (6, 9), (7, 10),
                                      (8, 12))
  assert uniform_layer_map(4, 12) == ((1, 3), (2, 6), (3, 9), (4, 12))
  assert uniform_layer_map(3, 3) == ((1, 1), (2, 2), (3, 3))
  assert uniform_layer_map(4, 2) == ((1, 1), (2, 1), (3, 1), (4, 2))
  with pytest.raises(ValueError, match=">= 1"):
    uniform_layer_map(0, 12)


def test_layer_map_from_teacher_layers_rounds_to_nearest_depth():
  # The article's feature_layers [4, 8, 12] for an 8-layer student of a 12-layer teacher.
  assert layer_map_from_teacher_layers([4, 8, 12], 8, 12) == ((3, 4), (5, 8), (8, 12))
  assert layer_map_from_teacher_layers([6], 4, 12) == ((2, 6),)
  assert layer_map_from_teacher_layers([3], 2, 4) == ((2, 3),)  # 1.5 rounds half up
  assert layer_map_from_teacher_layers([1], 2, 12) == ((1, 1),)  # never layer 0
  with pytest.raises(ValueError, match="out of range"):
    layer_map_from_teacher_layers([13], 8, 12)
  with pytest.raises(ValueError, match="out of range"):
    layer_map_from_teacher_layers([0], 8, 12)


def test_resolve_layer_map_specs():
  assert resolve_layer_map(None, 8, 12) == ()
  assert resolve_layer_map("none", 8, 12) == ()
  assert resolve_layer_map("all", 8, 12) == uniform_layer_map(8, 12)
  assert resolve_layer_map([4, 8, 12], 8, 12) == ((3, 4), (5, 8), (8, 12))
  assert resolve_layer_map([[1, 2], (8, 12)], 8, 12) == ((1, 2), (8, 12))
  with pytest.raises(ValueError, match="out of range"):
    resolve_layer_map([(9, 12)], 8, 12)
  with pytest.raises(ValueError, match="pair"):
    resolve_layer_map([(1, 2, 3)], 8, 12)
  with pytest.raises(ValueError, match="uniform"):
    resolve_layer_map("every_other", 8, 12)


# ----------------------------------------------------------------------------- the losses


def test_contrastive_loss_matches_numpy_cross_entropy():
  logits = RNG.normal(size=(5, 5)).astype(np.float32) * 3
  labels = np.arange(5)
  ce_rows = -np_log_softmax(logits, 1)[labels, labels].mean()
  ce_cols = -np_log_softmax(logits.T, 1)[labels, labels].mean()
  np.testing.assert_allclose(contrastive_loss(jnp.asarray(logits)), (ce_rows + ce_cols) / 2,
                             rtol=1e-5)
  with pytest.raises(ValueError, match="square"):
    contrastive_loss(jnp.zeros((4, 3)))


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_logit_kl_matches_numpy(temperature):
  student = RNG.normal(size=(4, 4)).astype(np.float32) * 5
  teacher = RNG.normal(size=(4, 4)).astype(np.float32) * 20

  def kl_rows(t, s):
    log_p, log_q = np_log_softmax(t / temperature, 1), np_log_softmax(s / temperature, 1)
    return (np.exp(log_p) * (log_p - log_q)).sum(1).mean()

  want = 0.5 * (kl_rows(teacher, student) + kl_rows(teacher.T, student.T)) * temperature ** 2
  got = logit_kl_loss(jnp.asarray(student), jnp.asarray(teacher), temperature)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert float(logit_kl_loss(jnp.asarray(teacher), jnp.asarray(teacher), temperature)) == (
      pytest.approx(0.0, abs=1e-6))


def test_embedding_feature_loss_is_cosine_distance():
  s, t = RNG.normal(size=(2, 3, 6)).astype(np.float32)
  cos = (s * t).sum(1) / np.linalg.norm(s, axis=1) / np.linalg.norm(t, axis=1)
  np.testing.assert_allclose(embedding_feature_loss(s, t), np.mean(1 - cos), rtol=1e-5)
  assert float(embedding_feature_loss(s, 7 * s)) == pytest.approx(0.0, abs=1e-6)
  with pytest.raises(ValueError, match="FeatureProjectors"):
    embedding_feature_loss(jnp.zeros((3, 4)), jnp.zeros((3, 6)))


def test_hidden_state_loss_masked_mse():
  s = RNG.normal(size=(2, 3, 5, 4)).astype(np.float32)  # 2 layers of [B=3, T=5, H=4]
  t = RNG.normal(size=(2, 3, 5, 4)).astype(np.float32)
  mask = padding_mask(3, 5, [5, 2, 3])
  per_layer = [((s[k] - t[k]) ** 2).mean(-1)[mask.astype(bool)].mean() for k in range(2)]
  got = hidden_state_loss(list(s), list(t), jnp.asarray(mask))
  np.testing.assert_allclose(got, np.mean(per_layer), rtol=1e-5)
  np.testing.assert_allclose(hidden_state_loss(list(s), list(t)),
                             ((s - t) ** 2).mean(), rtol=1e-5)
  # Padded positions do not matter.
  s2 = s.copy()
  s2[:, ~mask.astype(bool)] = 1e3
  np.testing.assert_allclose(hidden_state_loss(list(s2), list(t), jnp.asarray(mask)), got,
                             rtol=1e-6)
  with pytest.raises(ValueError, match="Token counts must match"):
    hidden_state_loss([jnp.zeros((1, 50, 4))], [jnp.zeros((1, 197, 4))])


def random_attention(batch, heads, length, mask=None, causal=False, rng=RNG):
  scores = rng.normal(size=(batch, heads, length, length)) * 2
  allowed = np.ones((batch, 1, length, length), bool)
  if causal:
    allowed &= np.tril(np.ones((length, length), bool))
  if mask is not None:
    allowed &= mask.astype(bool)[:, None, None, :]
  scores = np.where(allowed, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  return (probs / probs.sum(-1, keepdims=True)).astype(np.float32)


def test_attention_loss_head_averaged_kl():
  mask = padding_mask(2, 6, [6, 4])
  student = random_attention(2, 2, 6, mask, causal=True)  # 2 heads vs 3: heads may differ
  teacher = random_attention(2, 3, 6, mask, causal=True)
  p, q = teacher.mean(1), student.mean(1)
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
  kl_rows = (terms * mask[:, None, :]).sum(-1)
  want = kl_rows[mask.astype(bool)].mean()
  got = attention_loss([student], [teacher], jnp.asarray(mask))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert float(attention_loss([teacher], [teacher], jnp.asarray(mask))) == pytest.approx(
      0.0, abs=1e-6)
  # Garbage in padded query rows and padded key columns does not change the loss.
  s2, t2 = student.copy(), teacher.copy()
  s2[1, :, 4:, :] = 0.5
  t2[1, :, :, 4:] = 0.25
  t2[1, :, 4:, :] = 0.1
  np.testing.assert_allclose(attention_loss([s2], [t2], jnp.asarray(mask)), got, rtol=1e-5)
  # Vision maps (no mask): plain mean over all rows, averaged over layers.
  sv, tv = random_attention(2, 2, 5), random_attention(2, 4, 5)
  pv, qv = tv.mean(1), sv.mean(1)
  want_v = (pv * (np.log(pv) - np.log(qv))).sum(-1).mean()
  np.testing.assert_allclose(attention_loss([sv, sv], [tv, tv]), want_v, rtol=1e-5)


def test_feature_projectors_start_as_rectangular_identity_with_logical_axes():
  module = FeatureProjectors(teacher_projection_dim=6, teacher_vision_hidden_size=8,
                             teacher_text_hidden_size=5, vision_layer_map=((2, 3),),
                             text_layer_map=((1, 1),))
  out = CLIPOutput(image_embeds=jnp.ones((2, 4)), text_embeds=jnp.ones((2, 4)),
                   vision_hidden_states=tuple(jnp.ones((2, 3, 8)) for _ in range(3)),
                   text_hidden_states=tuple(jnp.ones((2, 3, 5)) for _ in range(2)))
  boxed = module.init(jax.random.key(0), out)["params"]
  assert boxed["vision_hidden_2_to_3"]["kernel"].names == ("student_embed", "embed")
  assert boxed["image_embeds"]["kernel"].names == ("student_proj", "proj")
  params = nn.unbox(boxed)
  np.testing.assert_array_equal(params["image_embeds"]["kernel"], np.eye(4, 6))
  np.testing.assert_array_equal(params["vision_hidden_2_to_3"]["kernel"], np.eye(8))
  projected = module.apply({"params": params}, out)
  assert projected.image_embeds.shape == (2, 6)
  np.testing.assert_array_equal(projected.vision_hidden_states[0], out.vision_hidden_states[2])
  np.testing.assert_array_equal(projected.image_embeds[:, 4:], 0)


# ---------------------------------------------------------------------- DistillLoss end to end

TEACHER = tiny_config()
STUDENT = student_config(TEACHER, projection_dim=16, text_hidden_size=24,
                         text_intermediate_size=48, text_layers=1, text_heads=3,
                         vision_hidden_size=32, vision_intermediate_size=64, vision_layers=2,
                         vision_heads=2)
ALL_WEIGHTS = {"feature": 1.0, "hidden": 0.5, "logit_kl": 2.0, "attention": 0.25,
               "contrastive": 0.1}
LENGTHS = [5, 16, 9]  # text lengths (BOS ... EOT) of the 3 examples; the rest is padding
MASK = padding_mask(3, 16, LENGTHS)


def full_loss(weights=ALL_WEIGHTS, teacher_config=TEACHER, temperature=2.0):
  return DistillLoss(
      STUDENT, teacher_config, weights, temperature=temperature,
      vision_hidden_layers=resolve_layer_map([3], 2, 3),
      text_hidden_layers=resolve_layer_map("uniform", 1, 2),
      vision_attention_layers=resolve_layer_map("all", 2, 3),
      text_attention_layers=((1, 2),))


def fake_output(config, seed, scale, pad_value=None):
  """A CLIPOutput shaped like `config`'s forward pass on 3 examples of 16 tokens; with
  `pad_value`, everything at padded text positions is overwritten with it."""
  rng = np.random.default_rng(seed)
  v, t = config.vision_config, config.text_config

  def unit(n):
    x = rng.normal(size=(3, n))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

  def states(tower, length):
    return tuple(rng.normal(size=(3, length, tower.hidden_size)).astype(np.float32)
                 for _ in range(tower.num_hidden_layers + 1))

  image, text = unit(config.projection_dim), unit(config.projection_dim)
  text_states = states(t, 16)
  text_maps = tuple(random_attention(3, t.num_attention_heads, 16, MASK, causal=True, rng=rng)
                    for _ in range(t.num_hidden_layers))
  if pad_value is not None:
    pad = ~MASK.astype(bool)
    for x in text_states:
      x[pad] = pad_value
    for x in text_maps:
      x.transpose(0, 2, 1, 3)[pad] = pad_value  # padded query rows
      x.transpose(0, 3, 1, 2)[pad] = pad_value  # padded key columns
  return jax.tree_util.tree_map(jnp.asarray, CLIPOutput(
      image_embeds=image, text_embeds=text, logits_per_image=scale * image @ text.T,
      logits_per_text=scale * text @ image.T, logit_scale=np.float32(scale),
      vision_hidden_states=states(v, v.num_positions), text_hidden_states=text_states,
      vision_attentions=tuple(random_attention(3, v.num_attention_heads, v.num_positions,
                                               rng=rng)
                              for _ in range(v.num_hidden_layers)),
      text_attentions=text_maps))


STUDENT_OUT = fake_output(STUDENT, seed=1, scale=14.3)
TEACHER_OUT = fake_output(TEACHER, seed=2, scale=100.0)
PROJECTORS = full_loss().init_projectors(jax.random.key(3))


def test_total_is_weighted_sum_of_components():
  total, metrics = full_loss()(PROJECTORS, STUDENT_OUT, TEACHER_OUT, jnp.asarray(MASK))
  want = sum(w * float(metrics[f"loss/{c}"]) for c, w in ALL_WEIGHTS.items())
  assert float(total) == pytest.approx(want, rel=1e-5)
  assert float(metrics["loss/total"]) == float(total)
  assert all(float(metrics[f"loss/{c}"]) > 0 for c in ALL_WEIGHTS)
  np.testing.assert_allclose(
      metrics["loss/hidden"], (metrics["loss/hidden_vision"] + metrics["loss/hidden_text"]) / 2,
      rtol=1e-6)
  np.testing.assert_allclose(
      metrics["loss/feature"],
      (metrics["loss/feature_image"] + metrics["loss/feature_text"]) / 2, rtol=1e-6)


def test_components_match_the_pure_functions():
  s, t, mask = STUDENT_OUT, TEACHER_OUT, jnp.asarray(MASK)
  _, metrics = full_loss()(PROJECTORS, s, t, mask)
  kernel = lambda name: PROJECTORS[name]["kernel"]
  np.testing.assert_allclose(metrics["loss/contrastive"], contrastive_loss(s.logits_per_image),
                             rtol=1e-6)
  np.testing.assert_allclose(metrics["loss/logit_kl"],
                             logit_kl_loss(s.logits_per_image, t.logits_per_image, 2.0),
                             rtol=1e-6)
  np.testing.assert_allclose(
      metrics["loss/feature_image"],
      embedding_feature_loss(s.image_embeds @ kernel("image_embeds"), t.image_embeds), rtol=1e-6)
  # Vision hidden: teacher layer 3 -> student layer round(3*2/3) = 2.
  np.testing.assert_allclose(
      metrics["loss/hidden_vision"],
      hidden_state_loss([s.vision_hidden_states[2] @ kernel("vision_hidden_2_to_3")],
                        [t.vision_hidden_states[3]]), rtol=1e-6)
  np.testing.assert_allclose(
      metrics["loss/hidden_text"],
      hidden_state_loss([s.text_hidden_states[1] @ kernel("text_hidden_1_to_2")],
                        [t.text_hidden_states[2]], mask), rtol=1e-6)
  # Attention: student layers 1, 2 vs teacher layers 1, 3 (uniform 2 of 3) -> maps [0], [2].
  np.testing.assert_allclose(
      metrics["loss/attention_vision"],
      attention_loss(s.vision_attentions[:2], [t.vision_attentions[0], t.vision_attentions[2]]),
      rtol=1e-6)
  np.testing.assert_allclose(
      metrics["loss/attention_text"],
      attention_loss(s.text_attentions[:1], t.text_attentions[1:2], mask), rtol=1e-6)


def test_padding_does_not_change_the_loss():
  loss, mask = full_loss(), jnp.asarray(MASK)
  _, clean = loss(PROJECTORS, STUDENT_OUT, TEACHER_OUT, mask)
  _, padded = loss(PROJECTORS, fake_output(STUDENT, 1, 14.3, pad_value=3.0),
                   fake_output(TEACHER, 2, 100.0, pad_value=-5.0), mask)
  for key in clean:
    np.testing.assert_allclose(clean[key], padded[key], rtol=1e-5, err_msg=key)


def test_gradients_finite_under_jit_and_reach_projectors():
  loss, mask = full_loss(), jnp.asarray(MASK)

  @jax.jit
  def objective(projectors, student_out):
    return loss(projectors, student_out, TEACHER_OUT, mask)[0]

  value, (g_proj, g_out) = jax.value_and_grad(objective, argnums=(0, 1))(PROJECTORS,
                                                                         STUDENT_OUT)
  assert float(value) == pytest.approx(float(loss(PROJECTORS, STUDENT_OUT, TEACHER_OUT,
                                                  mask)[0]), rel=1e-5)
  for g in jax.tree_util.tree_leaves((g_proj, g_out)):
    assert np.isfinite(np.asarray(g)).all()
  for name in ("image_embeds", "text_embeds", "vision_hidden_2_to_3", "text_hidden_1_to_2"):
    assert float(jnp.abs(g_proj[name]["kernel"]).sum()) > 0, name
  assert float(jnp.abs(g_out.vision_attentions[1]).sum()) > 0
  assert float(jnp.abs(g_out.logits_per_image).sum()) > 0


def test_no_teacher_is_contrastive_only():
  loss = DistillLoss(STUDENT, None, ALL_WEIGHTS)
  assert loss.active_components == ("contrastive",)
  assert loss.init_projectors(jax.random.key(0)) == {}
  want = 0.1 * float(contrastive_loss(STUDENT_OUT.logits_per_image))
  total, metrics = loss({}, STUDENT_OUT, None)
  assert float(total) == pytest.approx(want)
  assert float(metrics["loss/feature"]) == 0.0 and float(metrics["loss/hidden"]) == 0.0
  # A teacher-configured loss called without teacher outputs also skips the teacher parts.
  total, _ = full_loss()(PROJECTORS, STUDENT_OUT, None, jnp.asarray(MASK))
  assert float(total) == pytest.approx(want)


def test_cached_teacher_embeddings():
  loss = full_loss({"feature": 1.0, "logit_kl": 1.0})
  projectors = loss.init_projectors(jax.random.key(3))
  total, _ = loss(projectors, STUDENT_OUT, TEACHER_OUT)
  t = TEACHER_OUT
  cached = CLIPOutput(image_embeds=t.image_embeds, text_embeds=t.text_embeds,
                      logit_scale=t.logit_scale)
  assert float(loss(projectors, STUDENT_OUT, cached)[0]) == pytest.approx(float(total),
                                                                          rel=1e-5)
  # Without a stored scale the default (OpenAI's 100) is used.
  bare = CLIPOutput(image_embeds=t.image_embeds, text_embeds=t.text_embeds)
  np.testing.assert_allclose(losses.teacher_logits_per_image(bare, 100.0),
                             t.logits_per_image, atol=1e-4)
  for kind in ("hidden", "attention"):
    hungry = full_loss({kind: 1.0})
    with pytest.raises(ValueError, match="Cached teacher outputs hold only embeddings"):
      hungry(hungry.init_projectors(jax.random.key(3)), STUDENT_OUT, cached)


def test_token_count_mismatch_is_a_clear_error():
  other = student_config(TEACHER, projection_dim=16, text_hidden_size=24,
                         text_intermediate_size=48, text_layers=1, text_heads=3,
                         vision_hidden_size=32, vision_intermediate_size=64, vision_layers=2,
                         vision_heads=2, patch_size=16)  # 5 vision tokens instead of 17
  loss = DistillLoss(other, TEACHER, {"hidden": 1.0}, vision_hidden_layers=((2, 3),))
  with pytest.raises(ValueError, match="image_size/patch_size"):
    loss(loss.init_projectors(jax.random.key(0)), fake_output(other, 1, 10.0), TEACHER_OUT)


def test_config_errors():
  with pytest.raises(ValueError, match="unknown loss weights"):
    DistillLoss(STUDENT, TEACHER, {"kd": 1.0})
  with pytest.raises(ValueError, match="no layers"):
    DistillLoss(STUDENT, TEACHER, {"hidden": 1.0})
  with pytest.raises(ValueError, match="out of range"):
    DistillLoss(STUDENT, TEACHER, {"hidden": 1.0}, vision_hidden_layers=((3, 3),))
  with pytest.raises(ValueError, match="temperature"):
    DistillLoss(STUDENT, TEACHER, {"logit_kl": 1.0}, temperature=0.0)
  loss = full_loss({"contrastive": 1.0, "hidden": 0.0})
  assert loss.projectors is None and not loss.needs_hidden_states


def test_real_models_padding_ids_and_grads():
  """Real tiny CLIPs: padded token ids leave every loss unchanged; grads reach the student."""
  teacher, student = CLIPModel(TEACHER), CLIPModel(STUDENT)
  teacher_params, student_params = random_params(TEACHER, 0), random_params(STUDENT, 1)
  loss, mask = full_loss(), jnp.asarray(MASK)
  pixels = jnp.asarray(RNG.normal(size=(3, 32, 32, 3)), jnp.float32)

  def ids(pad_fill):
    x = np.full((3, 16), pad_fill, np.int32)
    for b, n in enumerate(LENGTHS):
      x[b, 0], x[b, 1:n - 1], x[b, n - 1] = 49406, np.arange(100, 100 + n - 2), 49407
    return jnp.asarray(x)

  @jax.jit
  def objective(student_params, projectors, input_ids):
    t_out = teacher.apply({"params": teacher_params}, pixels, input_ids, mask, True, True)
    s_out = student.apply({"params": student_params}, pixels, input_ids, mask, True, True)
    return loss(projectors, s_out, t_out, mask)

  grad_fn = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)
  (total, metrics), grads = grad_fn(student_params, PROJECTORS, ids(0))
  (_, metrics_other_pad), _ = grad_fn(student_params, PROJECTORS, ids(777))
  for key in metrics:
    np.testing.assert_allclose(metrics[key], metrics_other_pad[key], rtol=1e-5, atol=1e-6,
                               err_msg=key)
  assert all(np.isfinite(float(v)) and float(v) >= 0 for v in metrics.values())
  for g in jax.tree_util.tree_leaves(grads):
    assert np.isfinite(np.asarray(g)).all()
  q_grad = grads[0]["text_model"]["encoder"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert float(jnp.abs(q_grad).sum()) > 0


def random_params(config, seed):
  """Random params with the model's exact tree, filled by numpy (no init compile)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: init_params(CLIPModel(config), jax.random.key(0)))

  def fill(path, leaf):
    if path[-1].key == "scale":
      return jnp.asarray(1 + 0.1 * rng.normal(size=leaf.shape), leaf.dtype)
    return jnp.asarray(0.05 * rng.normal(size=leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


# ---------------------------------------------------------------------------- FD, ICL, affinity


def np_unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_fd_loss_matches_clip_kd_mse_times_width():
  s, t = RNG.normal(size=(5, 12)), RNG.normal(size=(5, 12))
  # CLIP-KD: F.mse_loss(normalize(s), normalize(t)), a mean over batch AND dims.
  clip_kd = np.mean((np_unit(s) - np_unit(t)) ** 2)
  np.testing.assert_allclose(losses.fd_loss(jnp.asarray(s), jnp.asarray(t)), 12 * clip_kd,
                             rtol=1e-5)
  # On unit vectors it is 2 - 2 cos, i.e. twice the cosine feature loss.
  np.testing.assert_allclose(losses.fd_loss(jnp.asarray(s), jnp.asarray(t)),
                             2 * embedding_feature_loss(jnp.asarray(s), jnp.asarray(t)),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="differ in shape"):
    losses.fd_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4)))


def test_icl_loss_matches_numpy_cross_entropy():
  si, st, ti, tt = (RNG.normal(size=(4, 6)) for _ in range(4))
  scale = 14.3

  def ce_diag(q, k):
    logits = scale * np_unit(q) @ np_unit(k).T
    return -np.mean(np.diag(np_log_softmax(logits, axis=1)))

  image, text = losses.icl_loss(*(jnp.asarray(x) for x in (si, st, ti, tt)), scale)
  np.testing.assert_allclose(image, ce_diag(si, tt), rtol=1e-5)
  np.testing.assert_allclose(text, ce_diag(st, ti), rtol=1e-5)


def test_teacher_logit_scale_override_rescales_affinities():
  t = TEACHER_OUT
  np.testing.assert_allclose(losses.teacher_logits_per_image(t, 100.0, 50.0),
                             0.5 * t.logits_per_image, rtol=1e-5, atol=1e-5)
  loss = full_loss({"logit_kl": 1.0})
  loss70 = DistillLoss(STUDENT, TEACHER, {"logit_kl": 1.0}, temperature=2.0,
                       kd_teacher_logit_scale=70.0)
  _, metrics = loss70({}, STUDENT_OUT, t)
  np.testing.assert_allclose(metrics["loss/logit_kl"], logit_kl_loss(
      STUDENT_OUT.logits_per_image, 0.7 * t.logits_per_image, 2.0), rtol=1e-5)
  assert float(loss({}, STUDENT_OUT, t)[1]["loss/logit_kl"]) != pytest.approx(
      float(metrics["loss/logit_kl"]))


SAME_SPACE = student_config(TEACHER, projection_dim=TEACHER.projection_dim, text_hidden_size=24,
                            text_intermediate_size=48, text_layers=1, text_heads=3,
                            vision_hidden_size=32, vision_intermediate_size=64,
                            vision_layers=2, vision_heads=2)


def test_embedding_losses_in_the_students_own_space_when_widths_match():
  student_out = fake_output(SAME_SPACE, seed=5, scale=14.3)
  weights = {"feature": 1.0, "fd": 2.0, "icl": 0.5}
  loss = DistillLoss(SAME_SPACE, TEACHER, weights)
  assert not loss.uses_embed_projector
  params = loss.init_projectors(jax.random.key(0))
  assert set(params) == {"icl_logit_scale"}  # no projector: only ICL's own scale
  np.testing.assert_allclose(np.exp(params["icl_logit_scale"]), 1 / 0.07, rtol=1e-5)
  total, metrics = loss(params, student_out, TEACHER_OUT)
  s, t = student_out, TEACHER_OUT
  np.testing.assert_allclose(metrics["loss/feature"], 0.5 * (
      embedding_feature_loss(s.image_embeds, t.image_embeds)
      + embedding_feature_loss(s.text_embeds, t.text_embeds)), rtol=1e-5)
  np.testing.assert_allclose(metrics["loss/fd"], losses.fd_loss(s.image_embeds, t.image_embeds)
                             + losses.fd_loss(s.text_embeds, t.text_embeds), rtol=1e-5)
  image, text = losses.icl_loss(s.image_embeds, s.text_embeds, t.image_embeds, t.text_embeds,
                                1 / 0.07)
  np.testing.assert_allclose(metrics["loss/icl"], 0.5 * (image + text), rtol=1e-5)
  np.testing.assert_allclose(metrics["icl_logit_scale"], 1 / 0.07, rtol=1e-5)
  want = sum(w * float(metrics[f"loss/{c}"]) for c, w in weights.items())
  assert float(total) == pytest.approx(want, rel=1e-5)
  # 'linear' forces a projector even at equal widths (it starts as the identity).
  linear = DistillLoss(SAME_SPACE, TEACHER, weights, embed_projector="linear")
  assert linear.uses_embed_projector
  projected = linear.init_projectors(jax.random.key(0))
  assert {"image_embeds", "text_embeds", "icl_logit_scale"} <= set(projected)
  np.testing.assert_allclose(linear(projected, student_out, TEACHER_OUT)[0], total, rtol=1e-5)


def test_icl_and_fd_through_projector_when_widths_differ():
  loss = DistillLoss(STUDENT, TEACHER, {"fd": 1.0, "icl": 1.0})
  assert loss.uses_embed_projector
  params = loss.init_projectors(jax.random.key(0))
  _, metrics = loss(params, STUDENT_OUT, TEACHER_OUT)
  kernel = lambda name: params[name]["kernel"]
  s_image = STUDENT_OUT.image_embeds @ kernel("image_embeds")
  s_text = STUDENT_OUT.text_embeds @ kernel("text_embeds")
  np.testing.assert_allclose(metrics["loss/fd_image"],
                             losses.fd_loss(s_image, TEACHER_OUT.image_embeds), rtol=1e-5)
  np.testing.assert_allclose(metrics["loss/icl_text"], losses.icl_loss(
      s_image, s_text, TEACHER_OUT.image_embeds, TEACHER_OUT.text_embeds, 1 / 0.07)[1],
      rtol=1e-5)
  # Gradients reach ICL's logit scale and the projectors.
  grads = jax.grad(lambda p: loss(p, STUDENT_OUT, TEACHER_OUT)[0])(params)
  assert float(jnp.abs(grads["icl_logit_scale"])) > 0
  assert float(jnp.abs(grads["image_embeds"]["kernel"]).sum()) > 0


def test_new_options_are_validated():
  with pytest.raises(ValueError, match="embed_projector"):
    DistillLoss(STUDENT, TEACHER, {"fd": 1.0}, embed_projector="mlp")
  with pytest.raises(ValueError, match="kd_teacher_logit_scale"):
    DistillLoss(STUDENT, TEACHER, {"logit_kl": 1.0}, kd_teacher_logit_scale=0.0)
