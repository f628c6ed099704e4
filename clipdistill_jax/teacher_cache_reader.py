"""Reading a teacher cache (written by teacher_cache.py, whose docstring gives the format):
its manifest, the checks against a training config, and the teacher rows of each batch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import ml_collections
import numpy as np

from clipdistill_jax.teacher_cache_format import (
  MANIFEST,
  PER_VIEW_FIELDS,
  READ_VERSIONS,
  TeacherCacheError,
  check_cacheable,
  data_fingerprint,
  input_fingerprints,
  shard_name,
  views_fingerprint,
  views_shard_name,
)


class TeacherCache:
  """A written cache: its manifest, checks against a training config, the rows of a batch.

  The trainer calls check_config, then merger(start_step) once and the merger on every
  batch; batches() (step caches) and lookup() (multi-view caches) are the parts.
  """

  def __init__(self, cache_dir: str | os.PathLike):
    self.directory = Path(cache_dir)
    path = self.directory / MANIFEST
    if not path.exists():
      raise FileNotFoundError(
          f"no teacher cache in {self.directory} ({MANIFEST} missing). Write one with: python "
          "-m clipdistill_jax.teacher_cache --config <your config> --workdir <dir>")
    self.manifest = json.loads(path.read_text())
    if self.manifest.get("format_version") not in READ_VERSIONS:
      raise TeacherCacheError(f"{path}: format version {self.manifest.get('format_version')}, "
                              f"this code reads {READ_VERSIONS}; rewrite the cache.")
    if not self.manifest.get("complete"):
      raise TeacherCacheError(f"the teacher cache in {self.directory} is incomplete (its writer "
                              "stopped); rerun the same teacher_cache command to finish it.")
    self.kind = self.manifest.get("kind", "steps")
    self._shards: dict[int, dict[str, np.ndarray]] = {}

  @property
  def num_views(self) -> int | None:
    """K for a multi-view cache, None for a step cache."""
    return int(self.manifest["num_views"]) if self.kind == "views" else None

  @property
  def num_steps(self) -> int:
    return int(self.manifest["num_steps"])

  @property
  def teacher_logit_scale(self) -> float:
    return float(self.manifest["teacher_logit_scale"])

  def check_config(self, config: ml_collections.ConfigDict, process_count: int, *,
                   image_size: int | None = None, context_length: int | None = None) -> None:
    """Raises TeacherCacheError unless this cache serves `config`'s training run exactly.

    image_size / context_length (the models' inputs) are checked against the cache's where
    given.
    """
    if self.kind == "views":  # first: its advice (data.num_views=K) beats "no augmentation"
      self._check_views_config(config)
    check_cacheable(config)
    for name, want in (("image_size", image_size), ("context_length", context_length)):
      have = self.manifest.get(name)
      if want is not None and have is not None and int(want) != int(have):
        raise TeacherCacheError(
            f"the teacher cache in {self.directory} was written for {name}={have}; this run's "
            f"models take {name}={want}. Write a cache for this config.")
    if self.kind == "views":
      return
    views = config.data.num_views
    if views is not None:
      raise TeacherCacheError(
          f"the teacher cache in {self.directory} holds one teacher output per training step, "
          f"but data.num_views={views} trains on fixed augmented views: write a multi-view "
          "cache (python -m clipdistill_jax.teacher_cache ... --views "
          f"{views}), or unset data.num_views.")
    want = data_fingerprint(config, process_count)
    have = self.manifest["data_fingerprint"]
    if want["hash"] != have["hash"]:
      diff = [k for k in want if k != "hash" and want[k] != have.get(k)]
      raise TeacherCacheError(
          f"the teacher cache in {self.directory} was written for another run: {', '.join(diff)} "
          "differ(s) from this config, so its step s would not be this run's step s. Write a "
          "cache for this config (python -m clipdistill_jax.teacher_cache --config ...).")
    total = int(config.train.total_steps)
    if total > self.num_steps:
      raise TeacherCacheError(
          f"the teacher cache in {self.directory} holds {self.num_steps} steps; training asks "
          f"for {total}. Rerun the writer with --num_steps={total}, or lower train.total_steps.")

  def _check_views_config(self, config: ml_collections.ConfigDict) -> None:
    views, have_views = config.data.num_views, self.num_views
    if views is None or int(views) != have_views:
      raise TeacherCacheError(
          f"the teacher cache in {self.directory} holds {have_views} augmented views per "
          f"example; train with --config.data.num_views={have_views} (this config has "
          f"data.num_views={views}), or write a cache for this config.")
    want, have = views_fingerprint(config), self.manifest["views_fingerprint"]
    if want["hash"] != have["hash"]:
      diff = [f"data.{k}" for k in want["data"] if want["data"][k] != have["data"].get(k)]
      diff += [k for k in want if k not in ("data", "hash") and want[k] != have.get(k)]
      raise TeacherCacheError(
          f"the teacher cache in {self.directory} was written for other data or another "
          f"teacher: {', '.join(diff)} differ(s) from this config, so its views are not this "
          "run's. Write a cache for this config (python -m clipdistill_jax.teacher_cache "
          f"--config ... --views {views}).")

  def merger(self, start_step: int = 0, process_index: int = 0
             ) -> Callable[[dict[str, np.ndarray], int], dict[str, np.ndarray]]:
    """merge(host_batch, step) -> the batch plus teacher_image_embeds / teacher_text_embeds
    (bf16 [local batch, D]) for training steps start_step, start_step + 1, ... in order
    (step counted from 0), after checking that they are this batch's."""
    if self.kind == "views":
      return self.merge_views
    cached = self.batches(start_step, process_index)
    return lambda batch, step: merge_cached(batch, next(cached), step)

  def batches(self, start_step: int = 0, process_index: int = 0) -> Iterator[dict]:
    """Step caches, per training step from start_step: {'teacher_image_embeds',
    'teacher_text_embeds' (bf16 [local batch, D]), 'input_fingerprint' (uint32 [local
    batch])}."""
    from safetensors.numpy import load_file

    if self.kind != "steps":
      raise TeacherCacheError(f"the teacher cache in {self.directory} is a multi-view cache, "
                              "read by example and view (lookup), not by step.")
    per_shard, local = int(self.manifest["steps_per_shard"]), int(
        self.manifest["local_batch_size"])
    shard_first, shard = None, None
    for step in range(start_step, self.num_steps):
      first = step - step % per_shard
      if first != shard_first:
        shard_first, shard = first, load_file(str(self.directory / shard_name(
            first, process_index)))
      rows = slice((step - first) * local, (step - first + 1) * local)
      yield {"teacher_image_embeds": shard["image_embeds"][rows],
             "teacher_text_embeds": shard["text_embeds"][rows],
             "input_fingerprint": shard["input_fingerprint"][rows]}
    raise TeacherCacheError(
        f"the teacher cache in {self.directory} ends at step {self.num_steps}; rerun the "
        "writer with a larger --num_steps.")

  def lookup(self, example_ids: np.ndarray, views: np.ndarray) -> dict[str, np.ndarray]:
    """Multi-view caches: the rows of (example_ids[r], views[r]), int [n] each. Returns
    {image_embeds [n, D], text_embeds [n, D] (+ image_pooled / text_pooled), augmentation
    int32 [n, 4], input_fingerprint uint32 [n], valid uint8 [n]}, read from the memory-mapped
    shards. Raises TeacherCacheError for ids or views outside the cache."""
    ids, views = np.asarray(example_ids, np.int64), np.asarray(views, np.int64)
    total, num_views = int(self.manifest["num_examples"]), self.num_views
    outside = (ids < 0) | (ids >= total) | (views < 0) | (views >= num_views)
    if outside.any():
      r = int(np.argmax(outside))
      raise TeacherCacheError(
          f"example {ids[r]} view {views[r]} is not in the teacher cache in {self.directory} "
          f"({total} examples x {num_views} views): the training set grew since it was "
          "written; rewrite the cache.")
    per_shard = int(self.manifest["examples_per_shard"])
    shard_of = ids // per_shard
    out: dict[str, np.ndarray] = {}
    for shard in np.unique(shard_of):
      rows = np.nonzero(shard_of == shard)[0]
      arrays = self._shard(int(shard) * per_shard)
      local = ids[rows] - int(shard) * per_shard
      for name, array in arrays.items():
        values = array[local, views[rows]] if name in PER_VIEW_FIELDS else array[local]
        if name not in out:
          out[name] = np.empty((len(ids), *values.shape[1:]), values.dtype)
        out[name][rows] = values
    return out

  def _shard(self, first_example: int) -> dict[str, np.ndarray]:
    if first_example not in self._shards:
      self._shards[first_example] = _map_safetensors(
          self.directory / views_shard_name(first_example))
    return self._shards[first_example]

  def merge_views(self, batch: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    """A multi-view cache's teacher embeddings for a batch with example_id and view, after
    checking each row's caption (input_ids fingerprint) and crop/flip against the cache."""
    if "example_id" not in batch or "view" not in batch:
      raise TeacherCacheError("a multi-view teacher cache needs batches with example_id and "
                              "view: set data.num_views.")
    ids = np.asarray(batch["example_id"])
    rows = self.lookup(ids, batch["view"])

    def first_bad(bad: np.ndarray) -> str:
      r = int(np.argmax(bad))
      return f"example {ids[r]}, view {int(batch['view'][r])}"
    bad = rows["valid"] == 0
    if bad.any():
      raise TeacherCacheError(
          f"step {step}: {first_bad(bad)} could not be read when the teacher cache was "
          "written, but is read now: the data changed since; rewrite the cache.")
    bad = input_fingerprints(batch["input_ids"]) != rows["input_fingerprint"]
    if bad.any():
      raise TeacherCacheError(
          f"step {step}: the caption of {first_bad(bad)} is not the one the teacher cache "
          "holds. The data changed since the cache was written (files, tokenizer or order of "
          "rows); rewrite the cache.")
    bad = (np.asarray(batch["augmentation"]) != rows["augmentation"]).any(axis=-1)
    if bad.any():
      raise TeacherCacheError(
          f"step {step}: the crop/flip of {first_bad(bad)} differs from the cached view's: "
          "the cache was written with other augmentation settings or code; rewrite the cache.")
    return {**batch, "teacher_image_embeds": rows["image_embeds"],
            "teacher_text_embeds": rows["text_embeds"]}


_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F32": np.float32, "I32": np.int32,
                       "I64": np.int64, "U32": np.uint32, "U8": np.uint8}


def _map_safetensors(path: Path) -> dict[str, np.ndarray]:
  """A safetensors file's tensors as read-only numpy memory maps (the format: an 8-byte
  little-endian header length, a JSON header of dtype / shape / data_offsets, the data)."""
  import ml_dtypes

  with open(path, "rb") as f:
    length = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(length))
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = _SAFETENSORS_DTYPES[info["dtype"]]
    dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    begin, _ = info["data_offsets"]
    tensors[name] = np.memmap(path, dtype, "r", offset=8 + length + begin,
                              shape=tuple(info["shape"]))
  return tensors


def merge_cached(batch: dict[str, np.ndarray], cached: Mapping[str, np.ndarray], step: int
                 ) -> dict[str, np.ndarray]:
  """The training batch plus the cached teacher embeddings, after checking that the cache
  row order is this batch's (input_ids fingerprints)."""
  got = input_fingerprints(batch["input_ids"])
  if not np.array_equal(got, cached["input_fingerprint"]):
    raise TeacherCacheError(
        f"step {step}: the batch's captions are not the ones the teacher cache holds for this "
        "step. The data changed since the cache was written (files, tokenizer or order); "
        "rewrite the cache.")
  return {**batch, "teacher_image_embeds": cached["teacher_image_embeds"],
          "teacher_text_embeds": cached["teacher_text_embeds"]}
