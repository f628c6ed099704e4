"""Distillation losses: pure functions of the student's and the teacher's `CLIPOutput`.

Layers are numbered 1..L, as hidden states are: `hidden_states[j]` is layer j's output and
`attentions[j-1]` its attention probabilities; a layer map is a tuple of (student_layer,
teacher_layer) pairs (models/layer_map.py).

Global batch. `contrastive_loss` and `logit_kl_loss` compare every image with every text of
the batch. The trainer calls them inside `jax.jit` on the global (sharded) arrays, where GSPMD
inserts the all-gathers, so the negatives are the whole global batch; never call them inside
`shard_map` on a per-device shard (that silently shrinks the batch of negatives).

Everything here is jit-friendly: layer maps, weights and temperature are static Python values
and all shape checks happen at trace time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clipdistill_jax.models.clip import CLIPOutput, l2_normalize
from clipdistill_jax.models.config import CLIPConfig
from clipdistill_jax.models.layer_map import LayerMap, validate_layer_map
from clipdistill_jax.models.projectors import (
    FeatureProjectors,
    ProjectedFeatures,
    require_output,
)

Array = jax.Array

COMPONENTS = ("feature", "fd", "icl", "hidden", "logit_kl", "attention", "contrastive")
TEACHER_COMPONENTS = ("feature", "fd", "icl", "hidden", "logit_kl", "attention")
# Components that compare the final embeddings (through the embedding projector, if any).
EMBEDDING_COMPONENTS = ("feature", "fd", "icl")
ICL_LOGIT_SCALE_INIT = 1 / 0.07  # CLIP-KD's cross_logit_scale init (CLIP's own init)
MAX_ICL_LOGIT_SCALE = 100.0  # CLIP's clamp on its logit scale, applied to ICL's too
_LOG_EPS = 1e-8  # floor for probabilities inside a log (attention KL); see attention_loss.

# ----------------------------------------------------------------------------------------
# The losses
# ----------------------------------------------------------------------------------------


def embedding_feature_loss(student_embeds: Array, teacher_embeds: Array) -> Array:
  """Mean cosine distance 1 - cos(s, t) over the batch.

  `student_embeds` must already be projected to the teacher's width. Cosine rather than MSE:
  on unit vectors MSE is (2 - 2 cos) / d, the same loss rescaled by the width.
  """
  if student_embeds.shape != teacher_embeds.shape:
    raise ValueError(f"embeddings differ in shape: student {student_embeds.shape} vs teacher "
                     f"{teacher_embeds.shape}; project the student's with FeatureProjectors.")
  cos = jnp.sum(l2_normalize(student_embeds) * l2_normalize(teacher_embeds), axis=-1)
  return jnp.mean(1.0 - cos)


def fd_loss(student_embeds: Array, teacher_embeds: Array) -> Array:
  """FD (CLIP-KD's feature distillation): squared L2 distance of the unit embeddings.

  Mean over the batch of ||s/|s| - t/|t|||^2 = 2 - 2 cos(s, t), summed over the embedding
  dim. CLIP-KD (Yang et al., CVPR 2024; winycg/CLIP-KD, src/open_clip/loss.py) takes
  F.mse_loss, the mean over the dims as well, and weights it 2000 at width 512: that is
  weight 2000 / 512 = 3.9 here, whatever the width. Shapes [B, D] (student already in the
  teacher's width); returns a scalar.
  """
  if student_embeds.shape != teacher_embeds.shape:
    raise ValueError(f"embeddings differ in shape: student {student_embeds.shape} vs teacher "
                     f"{teacher_embeds.shape}; project the student's with FeatureProjectors.")
  diff = l2_normalize(student_embeds) - l2_normalize(teacher_embeds)
  return jnp.mean(jnp.sum(diff * diff, axis=-1))


def icl_loss(student_image_embeds: Array, student_text_embeds: Array,
             teacher_image_embeds: Array, teacher_text_embeds: Array,
             logit_scale: Array | float) -> tuple[Array, Array]:
  """ICL (CLIP-KD's interactive contrastive learning): the student's embeddings as queries
  against the teacher's as keys, InfoNCE over the (global) batch.

  Returns (image_to_teacher_text, text_to_teacher_image): CE of logit_scale * cos(s_image_i,
  t_text_j) with label j = i, and of logit_scale * cos(s_text_i, t_image_j) likewise.
  CLIP-KD averages the two; its logit scale is learnable (init 1/0.07), separate from the
  student's. The student learns to place its embeddings where the teacher's other tower
  finds them, i.e. into the teacher's image-text space itself. All inputs [B, D].
  """
  for name, s, t in (("image", student_image_embeds, teacher_image_embeds),
                     ("text", student_text_embeds, teacher_text_embeds)):
    if s.shape != t.shape:
      raise ValueError(f"ICL: student {name} embeddings {s.shape} vs teacher {t.shape}; project "
                       "the student's into the teacher's width first.")
  s_image, s_text = l2_normalize(student_image_embeds), l2_normalize(student_text_embeds)
  t_image, t_text = l2_normalize(teacher_image_embeds), l2_normalize(teacher_text_embeds)
  image_to_text = logit_scale * jnp.matmul(s_image, t_text.T)
  text_to_image = logit_scale * jnp.matmul(s_text, t_image.T)
  diagonal_ce = lambda logits: -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
  return diagonal_ce(image_to_text), diagonal_ce(text_to_image)


def _token_mask(attention_mask: Array | None, shape: tuple[int, int]) -> Array:
  if attention_mask is None:
    return jnp.ones(shape, jnp.float32)
  if tuple(attention_mask.shape) != tuple(shape):
    raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, the states "
                     f"have [batch, tokens] = {tuple(shape)}.")
  return attention_mask.astype(jnp.float32)


def _check_same_tokens(student: Array, teacher: Array, what: str) -> None:
  if student.shape != teacher.shape:
    raise ValueError(
        f"{what}: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}. Token counts "
        "must match: give both models the same image_size/patch_size (vision) and the same "
        "input_ids (text), or turn this loss off (weight 0).")


def hidden_state_loss(student_states: Sequence[Array], teacher_states: Sequence[Array],
                      attention_mask: Array | None = None) -> Array:
  """MSE between aligned lists of [B, T, H] states, averaged over the pairs.

  `student_states[k]` (already projected to the teacher's width) is compared with
  `teacher_states[k]`; tokens where `attention_mask` is 0 (text padding) do not count.
  """
  if len(student_states) != len(teacher_states) or not student_states:
    raise ValueError(f"need equally many (>0) student and teacher states, got "
                     f"{len(student_states)} and {len(teacher_states)}.")
  losses = []
  for s, t in zip(student_states, teacher_states, strict=True):
    _check_same_tokens(s, t, "hidden states differ in shape")
    mask = _token_mask(attention_mask, s.shape[:2])
    sq = jnp.mean(jnp.square(s.astype(jnp.float32) - t.astype(jnp.float32)), axis=-1)
    losses.append(jnp.sum(sq * mask) / jnp.maximum(jnp.sum(mask), 1.0))
  return jnp.mean(jnp.stack(losses))


def attention_loss(student_attentions: Sequence[Array], teacher_attentions: Sequence[Array],
                   attention_mask: Array | None = None) -> Array:
  """KL(teacher_row || student_row) of head-averaged attention maps, averaged over pairs.

  Each entry is [B, heads, T, T] probabilities; head counts may differ (8 vs 12), so both
  sides are averaged over heads first, which keeps every query row a distribution over keys.
  KL rather than MSE: rows are distributions, and MSE on them is tiny and dominated by the few
  peaked rows. Padded queries (attention_mask 0) are left out of the average, padded keys
  contribute nothing; probabilities are floored at 1e-8 inside the log so a student row that
  underflowed where the teacher's has mass gives a large finite loss, not inf.
  """
  if len(student_attentions) != len(teacher_attentions) or not student_attentions:
    raise ValueError(f"need equally many (>0) student and teacher attention maps, got "
                     f"{len(student_attentions)} and {len(teacher_attentions)}.")
  losses = []
  for s, t in zip(student_attentions, teacher_attentions, strict=True):
    p = jnp.mean(t.astype(jnp.float32), axis=1)  # [B, Tq, Tk]
    q = jnp.mean(s.astype(jnp.float32), axis=1)
    _check_same_tokens(q, p, "head-averaged attention maps differ in shape")
    mask = _token_mask(attention_mask, p.shape[:2])
    terms = p * (jnp.log(jnp.maximum(p, _LOG_EPS)) - jnp.log(jnp.maximum(q, _LOG_EPS)))
    kl_rows = jnp.sum(terms * mask[:, None, :], axis=-1)  # [B, Tq]
    losses.append(jnp.sum(kl_rows * mask) / jnp.maximum(jnp.sum(mask), 1.0))
  return jnp.mean(jnp.stack(losses))


def _row_kl(teacher_logits: Array, student_logits: Array, axis: int) -> Array:
  log_p = jax.nn.log_softmax(teacher_logits, axis=axis)
  log_q = jax.nn.log_softmax(student_logits, axis=axis)
  return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=axis))


def logit_kl_loss(student_logits_per_image: Array, teacher_logits_per_image: Array,
                  temperature: float) -> Array:
  """T^2 * KL(teacher || student) of softmax(logits / T), image->text and text->image averaged.

  Each side's logits carry that model's OWN logit scale (teacher ~100, the student's learned
  one), so the student is asked to match the teacher's sharpness through its logit scale plus
  its cosines; dividing the scales out would hide a mis-calibrated student.
  """
  if student_logits_per_image.shape != teacher_logits_per_image.shape:
    raise ValueError(f"logits differ in shape: student {student_logits_per_image.shape} vs "
                     f"teacher {teacher_logits_per_image.shape}; both must see the same batch.")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  s = student_logits_per_image.astype(jnp.float32) / temperature
  t = teacher_logits_per_image.astype(jnp.float32) / temperature
  return 0.5 * (_row_kl(t, s, axis=1) + _row_kl(t, s, axis=0)) * temperature ** 2


def contrastive_loss(logits_per_image: Array) -> Array:
  """CLIP's symmetric InfoNCE: (CE(image->text) + CE(text->image)) / 2, labels arange(B).

  Under jax.jit with batch-sharded inputs this spans the GLOBAL batch (see module docstring).
  """
  if logits_per_image.ndim != 2 or logits_per_image.shape[0] != logits_per_image.shape[1]:
    raise ValueError(f"logits_per_image must be square [B, B], got {logits_per_image.shape}.")
  logits = logits_per_image.astype(jnp.float32)
  image_to_text = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
  text_to_image = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
  return 0.5 * (image_to_text + text_to_image)


def teacher_logits_per_image(teacher_out: CLIPOutput, default_logit_scale: float,
                             override_logit_scale: float | None = None) -> Array:
  """The teacher's logits [B, B]: its own when stored; else recomputed from its normalized
  embeds with its stored logit_scale or `default_logit_scale` (cached-teacher mode).

  `override_logit_scale` recomputes them at that scale instead of the teacher's own: the
  teacher's sharpness as a tuned hyperparameter, as MobileCLIP does (scale 100; 70 and 60 in
  MobileCLIP2; apple/ml-mobileclip).
  """
  if override_logit_scale is not None:
    image = require_output(teacher_out.image_embeds, "teacher image_embeds")
    text = require_output(teacher_out.text_embeds, "teacher text_embeds")
    return override_logit_scale * jnp.matmul(l2_normalize(image), l2_normalize(text).T)
  if teacher_out.logits_per_image is not None:
    return teacher_out.logits_per_image
  image = require_output(teacher_out.image_embeds, "teacher image_embeds")
  text = require_output(teacher_out.text_embeds, "teacher text_embeds")
  scale = default_logit_scale if teacher_out.logit_scale is None else teacher_out.logit_scale
  return scale * jnp.matmul(image.astype(jnp.float32), text.astype(jnp.float32).T)


# ----------------------------------------------------------------------------------------
# The weighted sum the trainer calls
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class DistillLoss:
  """Weighted sum of the enabled losses; call it inside the jitted train step.

  `weights` names components from COMPONENTS; missing or 0 -> off. With `teacher_config=None`
  (the no-teacher baseline) or a call with `teacher_out=None`, only 'contrastive' runs. Layer
  maps are (student, teacher) pairs (see `resolve_layer_map`); an empty map leaves that tower
  out of the hidden/attention loss. `teacher_logit_scale` is used only when the teacher output
  carries neither logits nor a logit_scale (cached embeddings); OpenAI's CLIP uses 100.
  `kd_teacher_logit_scale` (None: the teacher's own) recomputes the teacher's logits for
  'logit_kl' at that scale (MobileCLIP's tuned teacher temperature).

  Embedding space. 'feature', 'fd' and 'icl' compare final embeddings. `embed_projector`
  'auto' compares them directly when the student's projection_dim equals the teacher's, so
  the student's OWN image-text space (the one zero-shot uses) is pulled onto the teacher's;
  where the widths differ, and always with 'linear', a learnable linear map (dropped at
  export) carries the student's embeddings into the teacher's width first. Through a
  projector the student only has to be a linear map away from the teacher, with separate
  maps for image and text, so less of the teacher's image-text geometry reaches the
  student's own space: on the demo (README, "Ablation") the same recipe loses 1.8 points of
  zero-shot top-1 and 2.9 of teacher agreement through a projector.
  Hash/eq are by identity, so an instance can be a static jit argument.
  """
  student_config: CLIPConfig
  teacher_config: CLIPConfig | None = None
  weights: Mapping[str, float] = dataclasses.field(
      default_factory=lambda: {"contrastive": 1.0})
  temperature: float = 1.0
  vision_hidden_layers: LayerMap = ()
  text_hidden_layers: LayerMap = ()
  vision_attention_layers: LayerMap = ()
  text_attention_layers: LayerMap = ()
  teacher_logit_scale: float = 100.0
  kd_teacher_logit_scale: float | None = None
  embed_projector: str = "auto"
  icl_logit_scale_init: float = ICL_LOGIT_SCALE_INIT

  def __post_init__(self):
    unknown = set(self.weights) - set(COMPONENTS)
    if unknown:
      raise ValueError(f"unknown loss weights {sorted(unknown)}; valid names: {COMPONENTS}.")
    if any(w < 0 for w in self.weights.values()):
      raise ValueError(f"loss weights must be >= 0, got {dict(self.weights)}.")
    if self.temperature <= 0:
      raise ValueError(f"temperature must be > 0, got {self.temperature}.")
    if self.embed_projector not in ("auto", "linear"):
      raise ValueError(f"embed_projector={self.embed_projector!r}: use 'auto' or 'linear'.")
    for name in ("kd_teacher_logit_scale", "icl_logit_scale_init"):
      value = getattr(self, name)
      if value is not None and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}.")
    if self.teacher_config is None:
      return
    s, t = self.student_config, self.teacher_config
    for name, tower in (("vision", "vision_config"), ("text", "text_config")):
      n_s = getattr(s, tower).num_hidden_layers
      n_t = getattr(t, tower).num_hidden_layers
      for kind in ("hidden", "attention"):
        field = f"{name}_{kind}_layers"
        object.__setattr__(self, field, validate_layer_map(getattr(self, field), n_s, n_t))
    for kind in ("hidden", "attention"):
      if (kind in self.active_components and not getattr(self, f"vision_{kind}_layers")
          and not getattr(self, f"text_{kind}_layers")):
        raise ValueError(f"the '{kind}' loss has weight {self.weights[kind]} but no layers: set "
                         f"vision_{kind}_layers and/or text_{kind}_layers, e.g. "
                         "layer_map.resolve_layer_map('uniform', n_student, n_teacher).")

  @property
  def active_components(self) -> tuple[str, ...]:
    return tuple(c for c in COMPONENTS if self.weights.get(c, 0.0) > 0 and (
        c == "contrastive" or self.teacher_config is not None))

  @property
  def needs_hidden_states(self) -> bool:
    """Run student and teacher with return_hidden=True."""
    return "hidden" in self.active_components

  @property
  def needs_attentions(self) -> bool:
    """Run student and teacher with return_attention=True."""
    return "attention" in self.active_components

  @property
  def uses_embed_projector(self) -> bool:
    """Whether the embedding losses see the student's embeddings through a linear map."""
    if self.teacher_config is None or not any(
        c in self.active_components for c in EMBEDDING_COMPONENTS):
      return False
    return (self.embed_projector == "linear"
            or self.student_config.projection_dim != self.teacher_config.projection_dim)

  @property
  def projectors(self) -> FeatureProjectors | None:
    """The learnable distillation heads (projectors, ICL's logit scale); None if none."""
    active = self.active_components
    hidden, icl = "hidden" in active, "icl" in active
    if not (self.uses_embed_projector or hidden or icl):
      return None
    t = self.teacher_config
    return FeatureProjectors(
        teacher_projection_dim=t.projection_dim if self.uses_embed_projector else None,
        icl_logit_scale_init=self.icl_logit_scale_init if icl else None,
        teacher_vision_hidden_size=t.vision_config.hidden_size,
        teacher_text_hidden_size=t.text_config.hidden_size,
        vision_layer_map=self.vision_hidden_layers if hidden else (),
        text_layer_map=self.text_hidden_layers if hidden else ())

  def projector_dummy_input(self) -> CLIPOutput:
    """A student-shaped CLIPOutput (batch 1, one token) to init the projectors with."""
    s = self.student_config

    def states(tower):
      return tuple(jnp.zeros((1, 1, tower.hidden_size)) for _ in range(tower.num_hidden_layers + 1))

    embeds = jnp.zeros((1, s.projection_dim))
    return CLIPOutput(image_embeds=embeds, text_embeds=embeds,
                      vision_hidden_states=states(s.vision_config),
                      text_hidden_states=states(s.text_config))

  def init_projectors(self, rng: Array) -> dict:
    """Projector params (unboxed); {} when no active loss needs projectors."""
    module = self.projectors
    if module is None:
      return {}
    variables = jax.jit(module.init)(rng, self.projector_dummy_input())
    return nn.unbox(variables["params"])

  def __call__(self, projector_params: Mapping, student_out: CLIPOutput,
               teacher_out: CLIPOutput | None, attention_mask: Array | None = None
               ) -> tuple[Array, dict[str, Array]]:
    """Returns (total, metrics); metrics has 'loss/<component>' for every component (0 when
    off), per-tower parts of the active ones, 'loss/total', and 'icl_logit_scale' with ICL."""
    active = self.active_components
    if teacher_out is None:
      active = tuple(c for c in active if c not in TEACHER_COMPONENTS)
    else:
      teacher_out = jax.lax.stop_gradient(teacher_out)
    parts: dict[str, Array] = {}
    extra: dict[str, Array] = {}  # metrics that are not losses

    projected = None
    if any(c in active for c in (*EMBEDDING_COMPONENTS, "hidden")) and self.projectors:
      projected = self.projectors.apply({"params": projector_params}, student_out)

    if any(c in active for c in EMBEDDING_COMPONENTS):
      embeds = projected if self.uses_embed_projector else student_out
      s_image = require_output(embeds.image_embeds, "student image_embeds")
      s_text = require_output(embeds.text_embeds, "student text_embeds")
      t_image = require_output(teacher_out.image_embeds, "teacher image_embeds")
      t_text = require_output(teacher_out.text_embeds, "teacher text_embeds")
      if "feature" in active:
        parts["feature_image"] = embedding_feature_loss(s_image, t_image)
        parts["feature_text"] = embedding_feature_loss(s_text, t_text)
        parts["feature"] = 0.5 * (parts["feature_image"] + parts["feature_text"])
      if "fd" in active:  # CLIP-KD sums the towers' FD
        parts["fd_image"], parts["fd_text"] = fd_loss(s_image, t_image), fd_loss(s_text, t_text)
        parts["fd"] = parts["fd_image"] + parts["fd_text"]
      if "icl" in active:
        scale = jnp.minimum(jnp.exp(projected.icl_logit_scale), MAX_ICL_LOGIT_SCALE)
        parts["icl_image"], parts["icl_text"] = icl_loss(s_image, s_text, t_image, t_text, scale)
        parts["icl"] = 0.5 * (parts["icl_image"] + parts["icl_text"])
        extra["icl_logit_scale"] = scale

    for kind, loss_fn in (("hidden", hidden_state_loss), ("attention", attention_loss)):
      if kind in active:
        towers = [self._tower_loss(kind, tower, loss_fn, student_out, teacher_out, projected,
                                   attention_mask if tower == "text" else None)
                  for tower in ("vision", "text") if getattr(self, f"{tower}_{kind}_layers")]
        parts.update(towers)
        parts[kind] = jnp.mean(jnp.stack([v for _, v in towers]))

    if "logit_kl" in active:
      parts["logit_kl"] = logit_kl_loss(
          require_output(student_out.logits_per_image, "student logits_per_image"),
          teacher_logits_per_image(teacher_out, self.teacher_logit_scale,
                                   self.kd_teacher_logit_scale), self.temperature)

    if "contrastive" in active:
      parts["contrastive"] = contrastive_loss(
          require_output(student_out.logits_per_image, "student logits_per_image"))

    total = sum((self.weights[c] * parts[c] for c in active), jnp.zeros((), jnp.float32))
    metrics = {f"loss/{c}": parts.get(c, jnp.zeros((), jnp.float32)) for c in COMPONENTS}
    metrics.update({f"loss/{k}": v for k, v in parts.items() if k not in COMPONENTS})
    metrics["loss/total"] = total
    metrics.update(extra)
    return total, metrics

  def _tower_loss(self, kind: str, tower: str, loss_fn, student_out: CLIPOutput,
                  teacher_out: CLIPOutput, projected: ProjectedFeatures | None,
                  mask: Array | None) -> tuple[str, Array]:
    """One tower's hidden-state or attention loss at its mapped layers."""
    layer_map = getattr(self, f"{tower}_{kind}_layers")
    if kind == "hidden":  # hidden_states[j] is layer j's output; attentions[j - 1] its maps
      field, offset, student = "hidden_states", 0, getattr(projected, f"{tower}_hidden_states")
    else:
      field, offset = "attentions", 1
      student = getattr(student_out, f"{tower}_attentions")
      if not student:
        raise ValueError(f"student_out has no {tower}_attentions: run the student with "
                         "return_attention=True (DistillLoss.needs_attentions).")
      student = tuple(student[i - 1] for i, _ in layer_map)
    teacher = getattr(teacher_out, f"{tower}_{field}")
    if not teacher:
      raise ValueError(
          f"teacher_out has no {tower}_{field}: the '{kind}' loss needs a live teacher run with "
          "return_hidden/return_attention=True. Cached teacher outputs hold only embeddings, "
          "which support only the 'feature' and 'logit_kl' losses: set the 'hidden' and "
          "'attention' weights to 0, or run the teacher live.")
    teacher = tuple(teacher[j - offset] for _, j in layer_map)
    return f"{kind}_{tower}", loss_fn(student, teacher, mask)

