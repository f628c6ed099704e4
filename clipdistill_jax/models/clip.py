"""One Flax CLIP for teacher and student: they differ only in `CLIPConfig`.

Linen rather than NNX: a linen model's parameters are a plain nested dict whose paths are
exactly transformers' module names (`vision_model/encoder/layers_3/self_attn/q_proj/kernel`
<-> `vision_model.encoder.layers.3.self_attn.q_proj.weight`), which keeps the HF mapping a
table (see hf.py), makes orbax checkpoints ordinary pytrees, and lets the trainer derive
shardings from the logical axis names attached with `nn.with_logical_partitioning`.

Images are NHWC (`pixel_values[B, H, W, C]`, the TPU-friendly layout); transformers' NCHW
tensors are transposed by the callers that talk to PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clipdistill_jax.models.config import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

Array = jax.Array
Dtype = Any


def quick_gelu(x: Array) -> Array:
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def _activation(name: str) -> Callable[[Array], Array]:
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"hidden_act={name!r} is not supported; use one of "
                     f"{sorted(ACTIVATIONS)}.") from None


@flax.struct.dataclass
class CLIPOutput:
  """What the towers return. Tuples are empty unless requested (they cost memory)."""
  image_embeds: Array | None = None           # [B, projection_dim], L2-normalized
  text_embeds: Array | None = None            # [B, projection_dim], L2-normalized
  logits_per_image: Array | None = None       # [B_image, B_text] = logit_scale * cos
  logits_per_text: Array | None = None        # [B_text, B_image]
  logit_scale: Array | None = None            # exp(logit_scale param), a scalar
  image_pooled: Array | None = None           # [B, vision hidden] post-layernorm CLS token
  text_pooled: Array | None = None            # [B, text hidden] final-LN state at EOT
  vision_hidden_states: tuple[Array, ...] = ()  # L+1 x [B, T, H]; [0] is after pre-LN
  text_hidden_states: tuple[Array, ...] = ()    # L+1 x [B, T, H]; [0] is the embeddings
  vision_attentions: tuple[Array, ...] = ()     # L x [B, heads, T, T] probabilities
  text_attentions: tuple[Array, ...] = ()       # L x [B, heads, T, T] probabilities


def _dense(features: int, axes: tuple[str, str], cfg_dtype: Dtype, param_dtype: Dtype,
           name: str, use_bias: bool = True, std: float = 0.02) -> nn.Dense:
  return nn.Dense(
      features, use_bias=use_bias, dtype=cfg_dtype, param_dtype=param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(std), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))


def _layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)))


class Attention(nn.Module):
  """Multi-head self-attention with HF's q/k/v/out projections."""
  config: CLIPTextConfig | CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array | None, return_attention: bool
               ) -> tuple[Array, Array | None]:
    cfg = self.config
    heads, head_dim = cfg.num_attention_heads, cfg.head_dim
    factor = cfg.initializer_factor
    in_std = (cfg.hidden_size ** -0.5) * ((2 * cfg.num_hidden_layers) ** -0.5) * factor
    out_std = (cfg.hidden_size ** -0.5) * factor

    def project(name, std):
      y = _dense(cfg.hidden_size, ("embed", "heads"), self.dtype, self.param_dtype, name,
                 std=std)(x)
      return y.reshape(*y.shape[:-1], heads, head_dim)

    q, k, v = (project(n, in_std) for n in ("q_proj", "k_proj", "v_proj"))
    q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", "kv"))
    scale = head_dim ** -0.5
    if return_attention:
      # Materialize the probabilities: the attention-distillation losses read them.
      scores = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k).astype(jnp.float32)
      if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(scores, axis=-1)
      y = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    else:
      probs = None
      y = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)
    y = y.reshape(*y.shape[:-2], cfg.hidden_size)
    y = _dense(cfg.hidden_size, ("heads", "embed"), self.dtype, self.param_dtype,
               "out_proj", std=out_std)(y)
    return y, probs


class MLP(nn.Module):
  config: CLIPTextConfig | CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    factor = cfg.initializer_factor
    in_std = (cfg.hidden_size ** -0.5) * ((2 * cfg.num_hidden_layers) ** -0.5) * factor
    fc_std = ((2 * cfg.hidden_size) ** -0.5) * factor
    x = _dense(cfg.intermediate_size, ("embed", "mlp"), self.dtype, self.param_dtype, "fc1",
               std=fc_std)(x)
    x = nn.with_logical_constraint(_activation(cfg.hidden_act)(x),
                                   ("batch", "length", "act_mlp"))
    return _dense(cfg.hidden_size, ("mlp", "embed"), self.dtype, self.param_dtype, "fc2",
                  std=in_std)(x)


class EncoderLayer(nn.Module):
  config: CLIPTextConfig | CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array | None, return_attention: bool
               ) -> tuple[Array, Array | None]:
    eps = self.config.layer_norm_eps
    h = _layer_norm(eps, self.dtype, self.param_dtype, "layer_norm1")(x)
    h, probs = Attention(self.config, self.dtype, self.param_dtype, name="self_attn")(
        h, mask, return_attention)
    x = x + h
    h = _layer_norm(eps, self.dtype, self.param_dtype, "layer_norm2")(x)
    x = x + MLP(self.config, self.dtype, self.param_dtype, name="mlp")(h)
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), probs


class Encoder(nn.Module):
  """N pre-LN layers named `layers_i` (HF: `layers.i`); optional rematerialization."""
  config: CLIPTextConfig | CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, x: Array, mask: Array | None, return_hidden: bool,
               return_attention: bool) -> tuple[Array, tuple[Array, ...], tuple[Array, ...]]:
    layer_cls = EncoderLayer
    if self.remat_policy != "none":
      policy = getattr(jax.checkpoint_policies, self.remat_policy, None)
      if self.remat_policy != "full" and policy is None:
        raise ValueError(f"remat_policy={self.remat_policy!r}: use 'none', 'full' or a name "
                         "in jax.checkpoint_policies (e.g. 'dots_saveable').")
      layer_cls = nn.remat(EncoderLayer, static_argnums=(3,), policy=policy)
    hidden, attentions = [x], []
    for i in range(self.config.num_hidden_layers):
      x, probs = layer_cls(self.config, self.dtype, self.param_dtype, name=f"layers_{i}")(
          x, mask, return_attention)
      hidden.append(x)
      attentions.append(probs)
    return (x, tuple(hidden) if return_hidden else (),
            tuple(attentions) if return_attention else ())


def _embed_init(std: float, axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


class VisionTransformer(nn.Module):
  """HF `CLIPVisionTransformer`: returns (pooled, hidden_states, attentions)."""
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, pixel_values: Array, return_hidden: bool = False,
               return_attention: bool = False):
    cfg = self.config
    x = _VisionEmbeddings(cfg, self.dtype, self.param_dtype, name="embeddings")(pixel_values)
    x = _layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype, "pre_layrnorm")(x)
    x, hidden, attentions = Encoder(cfg, self.dtype, self.param_dtype, self.remat_policy,
                                    name="encoder")(x, None, return_hidden, return_attention)
    pooled = _layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype,
                         "post_layernorm")(x[:, 0])
    return pooled, hidden, attentions


class _PatchEmbedding(nn.Module):
  """HF's stride-P conv (no bias) as one matmul over flattened P x P patches.

  Same parameter as `nn.Conv` (`kernel` [P, P, C, hidden], HWIO) and the same result; XLA's
  CPU backend runs the matmul form about 3x faster than the strided convolution, forward and
  backward (scripts/benchmark.py).
  """
  hidden_size: int
  patch_size: int
  dtype: Dtype
  param_dtype: Dtype
  kernel_init: Callable

  @nn.compact
  def __call__(self, pixel_values: Array) -> Array:
    p, channels = self.patch_size, pixel_values.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (p, p, channels, self.hidden_size),
                        self.param_dtype)
    batch, height, width, _ = pixel_values.shape
    patches = pixel_values.astype(self.dtype).reshape(
        batch, height // p, p, width // p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(batch, (height // p) * (width // p), p * p * channels)
    return jnp.dot(patches, kernel.astype(self.dtype).reshape(p * p * channels, -1))


class _VisionEmbeddings(nn.Module):
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: Array) -> Array:
    cfg = self.config
    factor = cfg.initializer_factor
    expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
    if tuple(pixel_values.shape[1:]) != expected:
      raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; this model wants "
                       f"[batch, {expected[0]}, {expected[1]}, {expected[2]}] (NHWC, "
                       "preprocessed with clipdistill_jax.data.preprocess).")
    class_embedding = self.param(
        "class_embedding", _embed_init(cfg.hidden_size ** -0.5 * factor, ("embed",)),
        (cfg.hidden_size,), self.param_dtype)
    patches = _PatchEmbedding(
        cfg.hidden_size, cfg.patch_size, self.dtype, self.param_dtype,
        _embed_init(cfg.initializer_range * factor, ("conv_h", "conv_w", "conv_in", "embed")),
        name="patch_embedding")(pixel_values)
    batch = patches.shape[0]
    cls = jnp.broadcast_to(class_embedding.astype(self.dtype), (batch, 1, cfg.hidden_size))
    x = jnp.concatenate([cls, patches], axis=1)
    position = nn.Embed(
        cfg.num_positions, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=_embed_init(cfg.initializer_range * factor, ("positions", "embed")),
        name="position_embedding")
    x = x + position(jnp.arange(cfg.num_positions))[None]
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))


class TextTransformer(nn.Module):
  """HF `CLIPTextTransformer`: returns (pooled, hidden_states, attentions)."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               return_hidden: bool = False, return_attention: bool = False):
    cfg = self.config
    batch, length = input_ids.shape
    if length > cfg.max_position_embeddings:
      raise ValueError(f"input_ids has {length} tokens; this text tower takes at most "
                       f"{cfg.max_position_embeddings} (tokenize with that context_length).")
    x = _TextEmbeddings(cfg, self.dtype, self.param_dtype, name="embeddings")(input_ids)
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is not None:
      mask = mask & attention_mask.astype(bool)[:, None, None, :]
    x, hidden, attentions = Encoder(cfg, self.dtype, self.param_dtype, self.remat_policy,
                                    name="encoder")(x, mask, return_hidden, return_attention)
    x = _layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype, "final_layer_norm")(x)
    if cfg.pools_at_argmax:
      eot = jnp.argmax(input_ids, axis=-1)
    else:
      eot = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
    pooled = x[jnp.arange(batch), eot]
    return pooled, hidden, attentions


class _TextEmbeddings(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array) -> Array:
    cfg = self.config
    std = 0.02 * cfg.initializer_factor
    token = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                     param_dtype=self.param_dtype,
                     embedding_init=_embed_init(std, ("vocab", "embed")),
                     name="token_embedding")
    position = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype,
                        param_dtype=self.param_dtype,
                        embedding_init=_embed_init(std, ("positions", "embed")),
                        name="position_embedding")
    return token(input_ids) + position(jnp.arange(input_ids.shape[1]))[None]


class CLIPModel(nn.Module):
  """Both towers, projections and logit scale, as `transformers.CLIPModel`."""
  config: CLIPConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"

  def setup(self):
    cfg = self.config
    self.vision_model = VisionTransformer(cfg.vision_config, self.dtype, self.param_dtype,
                                          self.remat_policy)
    self.text_model = TextTransformer(cfg.text_config, self.dtype, self.param_dtype,
                                      self.remat_policy)
    self.visual_projection = _dense(
        cfg.projection_dim, ("embed", "proj"), self.dtype, self.param_dtype,
        "visual_projection", use_bias=False,
        std=cfg.vision_config.hidden_size ** -0.5 * cfg.initializer_factor)
    self.text_projection = _dense(
        cfg.projection_dim, ("embed", "proj"), self.dtype, self.param_dtype,
        "text_projection", use_bias=False,
        std=cfg.text_config.hidden_size ** -0.5 * cfg.initializer_factor)
    self.logit_scale = self.param(
        "logit_scale", nn.with_logical_partitioning(
            nn.initializers.constant(cfg.logit_scale_init_value), ()), (), self.param_dtype)

  def encode_image(self, pixel_values: Array, return_hidden: bool = False,
                   return_attention: bool = False) -> CLIPOutput:
    pooled, hidden, attentions = self.vision_model(pixel_values, return_hidden,
                                                   return_attention)
    embeds = l2_normalize(self.visual_projection(pooled))
    return CLIPOutput(image_embeds=embeds, image_pooled=pooled, vision_hidden_states=hidden,
                      vision_attentions=attentions)

  def encode_text(self, input_ids: Array, attention_mask: Array | None = None,
                  return_hidden: bool = False, return_attention: bool = False) -> CLIPOutput:
    pooled, hidden, attentions = self.text_model(input_ids, attention_mask, return_hidden,
                                                 return_attention)
    embeds = l2_normalize(self.text_projection(pooled))
    return CLIPOutput(text_embeds=embeds, text_pooled=pooled, text_hidden_states=hidden,
                      text_attentions=attentions)

  def __call__(self, pixel_values: Array, input_ids: Array,
               attention_mask: Array | None = None, return_hidden: bool = False,
               return_attention: bool = False) -> CLIPOutput:
    image = self.encode_image(pixel_values, return_hidden, return_attention)
    text = self.encode_text(input_ids, attention_mask, return_hidden, return_attention)
    logit_scale = jnp.exp(self.logit_scale.astype(jnp.float32))
    logits_per_text = logit_scale * jnp.matmul(
        text.text_embeds.astype(jnp.float32), image.image_embeds.astype(jnp.float32).T)
    return CLIPOutput(
        image_embeds=image.image_embeds, text_embeds=text.text_embeds,
        logits_per_image=logits_per_text.T, logits_per_text=logits_per_text,
        logit_scale=logit_scale, image_pooled=image.image_pooled,
        text_pooled=text.text_pooled, vision_hidden_states=image.vision_hidden_states,
        text_hidden_states=text.text_hidden_states,
        vision_attentions=image.vision_attentions, text_attentions=text.text_attentions)


def l2_normalize(x: Array | np.ndarray, eps: float = 1e-12) -> Array | np.ndarray:
  """x / ||x||_2 along the last axis, the norm floored at eps (a zero vector stays zero).

  The one normalization of the project: the model's embeddings, the losses and the host-side
  metrics use it. A numpy array comes back numpy in its own dtype; anything else (a jax array,
  a tracer) comes back a float32 jax array.
  """
  if isinstance(x, np.ndarray):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
  x = jnp.asarray(x).astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def init_params(model: CLIPModel, rng: Array) -> dict:
  """Random parameters (HF's init scheme), unboxed from their logical-axis metadata."""
  return nn.unbox(jax.jit(model.init)(rng, *dummy_inputs(model.config))["params"])


def dummy_inputs(config: CLIPConfig, batch: int = 1) -> Sequence[Array]:
  v, t = config.vision_config, config.text_config
  return (jnp.zeros((batch, v.image_size, v.image_size, v.num_channels), jnp.float32),
          jnp.zeros((batch, t.max_position_embeddings), jnp.int32))


def count_params(params: Any) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
