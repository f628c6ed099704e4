"""CLIP configuration with Hugging Face's field names.

The dataclasses mirror `transformers.CLIPConfig` / `CLIPTextConfig` / `CLIPVisionConfig`
field for field, so a `config.json` written by transformers reads in unchanged and one we
write loads back into `transformers.CLIPModel`. They are frozen (hashable) because a Flax
module keeps its config as a static attribute.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# Published openai/clip-vit-* configs still say eos_token_id=2; transformers then pools the
# text at argmax(input_ids) (the end-of-text id 49407 is the largest id in the vocabulary).
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_dropout: float = 0.0
  initializer_range: float = 0.02
  initializer_factor: float = 1.0
  pad_token_id: int = 1
  bos_token_id: int = 49406
  eos_token_id: int = 49407

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def pools_at_argmax(self) -> bool:
    """True for legacy configs, where the text is pooled at argmax(input_ids)."""
    return self.eos_token_id == LEGACY_EOS_TOKEN_ID


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_dropout: float = 0.0
  initializer_range: float = 0.02
  initializer_factor: float = 1.0

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_positions(self) -> int:
    return self.num_patches + 1


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  text_config: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
  vision_config: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592
  initializer_factor: float = 1.0

  def __post_init__(self):
    for tower in (self.text_config, self.vision_config):
      if tower.hidden_size % tower.num_attention_heads:
        raise ValueError(
            f"hidden_size={tower.hidden_size} is not divisible by num_attention_heads="
            f"{tower.num_attention_heads}; pick a head count that divides the width.")
    if self.vision_config.image_size % self.vision_config.patch_size:
      raise ValueError(
          f"image_size={self.vision_config.image_size} is not a multiple of patch_size="
          f"{self.vision_config.patch_size}.")

  def replace(self, **changes: Any) -> CLIPConfig:
    return dataclasses.replace(self, **changes)

  # --- Hugging Face config.json ----------------------------------------------------------

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
    """Builds a config from a transformers CLIPConfig dict; unknown HF fields are ignored.

    Older configs carry `text_config_dict` / `vision_config_dict` next to (or instead of)
    `text_config` / `vision_config`. transformers' CLIPConfig then rebuilds the tower from the
    `*_dict` alone: every field it names wins, and every field it omits takes the class
    default, overriding `*_config` (see CLIPConfig.__post_init__). We do the same.
    """
    text = _subset(CLIPTextConfig, _tower_fields(d, "text_config"))
    vision = _subset(CLIPVisionConfig, _tower_fields(d, "vision_config"))
    towers = ("text_config", "vision_config", "text_config_dict", "vision_config_dict")
    top = _subset(cls, {k: v for k, v in d.items() if k not in towers})
    return cls(text_config=CLIPTextConfig(**text), vision_config=CLIPVisionConfig(**vision), **top)

  def to_dict(self) -> dict[str, Any]:
    """A dict that `transformers.CLIPConfig(**d)` / `from_pretrained` accepts."""
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": self.projection_dim,
        "logit_scale_init_value": self.logit_scale_init_value,
        "initializer_factor": self.initializer_factor,
        "text_config": {**dataclasses.asdict(self.text_config), "model_type": "clip_text_model"},
        "vision_config": {**dataclasses.asdict(self.vision_config),
                          "model_type": "clip_vision_model"},
        "torch_dtype": "float32",
    }

  @classmethod
  def from_json_file(cls, path: str | os.PathLike) -> CLIPConfig:
    with open(path) as f:
      return cls.from_dict(json.load(f))

  def to_json_file(self, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
      json.dump(self.to_dict(), f, indent=2, sort_keys=True)
      f.write("\n")


def _tower_fields(d: dict[str, Any], key: str) -> dict[str, Any]:
  """The fields of one tower: `key + '_dict'` when present (not None), else `key`."""
  legacy = d.get(f"{key}_dict")
  return dict(legacy) if legacy is not None else dict(d.get(key) or {})


def _subset(cls, d: dict[str, Any]) -> dict[str, Any]:
  names = {f.name for f in dataclasses.fields(cls)} - {"text_config", "vision_config"}
  return {k: v for k, v in d.items() if k in names}


def tiny_config(*, eos_token_id: int = 49407, hidden_act: str = "quick_gelu",
                image_size: int = 32, patch_size: int = 8, context_length: int = 16,
                vocab_size: int = 49408) -> CLIPConfig:
  """A few-thousand-parameter CLIP for tests and the offline demo."""
  text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                        projection_dim=24, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=context_length, hidden_act=hidden_act,
                        eos_token_id=eos_token_id)
  vision = CLIPVisionConfig(hidden_size=48, intermediate_size=96, projection_dim=24,
                            num_hidden_layers=3, num_attention_heads=4, image_size=image_size,
                            patch_size=patch_size, hidden_act=hidden_act)
  return CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
