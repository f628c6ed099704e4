"""The teacher cache's format, shared by its writer (teacher_cache.py, whose docstring
describes the cache) and its reader (teacher_cache_reader.py): the manifest's name and
versions, the shard names, the fingerprints that tie a cache to a config, and the checks a
config must pass for any cache to serve it.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from clipdistill_jax.errors import UserError

# 2: manifests say their kind ('steps' | 'views'); 1: step caches written before, still read.
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
EMBED_FIELDS = ("image_embeds", "text_embeds")
POOLED_FIELDS = ("image_pooled", "text_pooled")
CACHED_LOSSES = ("feature", "fd", "icl", "logit_kl", "contrastive")
# Multi-view cache fields indexed [example, view, ...]; the others are [example, ...].
PER_VIEW_FIELDS = ("image_embeds", "image_pooled", "augmentation")
# The data settings a multi-view cache's content depends on (not the order, batch or hosts).
VIEW_DATA_KEYS = ("source", "path", "image_key", "caption_key", "num_train_examples", "seed",
                  "crop_min_scale", "flip", "num_views")


class TeacherCacheError(UserError, ValueError):
  """A cache that cannot serve this config (wrong data, batch, teacher, losses or length)."""


# --- config checks --------------------------------------------------------------------------

def check_cacheable(config: ml_collections.ConfigDict) -> None:
  """Refuses configs that cached teacher outputs cannot serve, saying what to change."""
  weights = config.loss.weights
  hungry = [k for k in ("hidden", "attention") if float(weights.get(k, 0.0) or 0.0) > 0]
  if hungry:
    raise TeacherCacheError(
        f"cached teacher mode stores only the teacher's embeddings, but loss weights "
        f"{', '.join(f'{k}={weights[k]}' for k in hungry)} need its hidden states / attention "
        "maps every step. Set --config.loss.weights.hidden=0 --config.loss.weights."
        f"attention=0 (cached mode supports {', '.join(CACHED_LOSSES)}), or "
        "unset teacher.cache_dir to run the teacher live.")
  data = config.data
  augmented = float(data.crop_min_scale) < 1.0 or bool(data.flip)
  if augmented and data.num_views is None:
    raise TeacherCacheError(
        "a step teacher cache holds one teacher output per example read, but random "
        f"augmentation is on (data.crop_min_scale={data.crop_min_scale}, data.flip="
        f"{data.flip}): each step would see another crop/flip than the cached one. "
        "Write a multi-view cache instead (python -m clipdistill_jax.teacher_cache ... --views "
        "K, then train with --config.data.num_views=K), or set --config.data.crop_min_scale=1.0 "
        "--config.data.flip=False, or run the teacher live.")
  if not config.teacher.source:
    raise TeacherCacheError("cached teacher mode needs teacher.source (the teacher the cache "
                            "was written with).")


def data_fingerprint(config: ml_collections.ConfigDict, process_count: int) -> dict[str, Any]:
  """Everything the training order depends on; a step cache is valid iff these match."""
  data = json.loads(json.dumps(config.data.to_dict(), sort_keys=True, default=str))
  if data.get("seed") is None:  # unresolved: the data order follows config.seed
    data["seed"] = int(config.seed)
  if data.get("num_views", 0) is None:
    del data["num_views"]  # caches written before the knob existed stay valid
  key = {"data": data, "tokenizer": config.tokenizer,
         "global_batch_size": int(config.train.batch_size), "process_count": process_count,
         "teacher_source": str(config.teacher.source),
         "teacher_dtype": config.teacher.dtype}
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  return {**key, "hash": digest}


def views_fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a multi-view cache's content depends on (VIEW_DATA_KEYS, tokenizer, teacher); the
  cache serves a config iff these match (image size and context length are checked apart)."""
  data = config.data
  views_data = json.loads(json.dumps({k: data.get(k) for k in VIEW_DATA_KEYS}, default=str))
  if "seed" in views_data and views_data["seed"] is None:  # follows config.seed
    views_data["seed"] = int(config.seed)
  key = {"data": views_data, "tokenizer": config.tokenizer,
         "teacher_source": str(config.teacher.source),
         "teacher_dtype": config.teacher.dtype}
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  return {**key, "hash": digest}


def input_fingerprints(input_ids: np.ndarray) -> np.ndarray:
  """crc32 of each row of input_ids (as little-endian int32): uint32 [rows]."""
  ids = np.ascontiguousarray(np.asarray(input_ids).astype("<i4"))
  return np.asarray([zlib.crc32(row.tobytes()) for row in ids], np.uint32)


def teacher_logit_scale(teacher_params: Mapping) -> float:
  """exp(logit_scale) of host teacher params: what the cached logits are rebuilt with."""
  return float(np.exp(np.asarray(teacher_params["logit_scale"], np.float32)))


def shard_name(first_step: int, host: int) -> str:
  return f"teacher-{first_step:08d}-host{host:03d}.safetensors"


def views_shard_name(first_example: int) -> str:
  return f"teacher-views-{first_example:09d}.safetensors"
