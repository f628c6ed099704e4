r"""Cached teacher: run the frozen teacher once over the training data, train without it.

    python -m clipdistill_jax.teacher_cache --config configs/X.py --workdir DIR \
        [--num_steps N | --num_examples N] [--store_pooled]

writes the teacher's outputs for the first N training steps to config.teacher.cache_dir (or
DIR/teacher_cache when that is unset); training with `--config.teacher.cache_dir=...` then
reads them instead of running the teacher, which roughly halves the FLOPs of a step.

What is stored, per training example, in the trainer's exact order (pipeline.
make_train_iterator with the same data config, seed, global batch size and host count:
step s of the cache is step s of training):
  image_embeds, text_embeds    L2-normalized teacher embeddings, bfloat16 [rows, proj_dim]
  image_pooled, text_pooled    pre-projection pooled states, bfloat16 (--store_pooled only)
  input_fingerprint            crc32 of each row's input_ids, uint32: training checks that
                               the batch it reads is the one the cache was written for
Files: `manifest.json` (teacher source/dtype/logit scale, data config and its hash, batch
size, host count, steps, shard list) and safetensors shards `teacher-{first step:08d}-host
{p:03d}.safetensors` holding `steps_per_shard` steps of host p's rows (safetensors: plain,
documented, bf16-native, memory-mapped; torch/numpy read it). A writer that stops part-way
resumes from its last complete shard when rerun with the same command.

Only the embeddings are cached, so cached training supports the 'feature', 'logit_kl' and
'contrastive' losses; a config with 'hidden' or 'attention' weights > 0 is refused. The
teacher's logits are recomputed as logit_scale * image_embeds @ text_embeds.T with the
teacher's own logit scale from the manifest.

Augmentation: the cache holds one teacher output per training example, so every step must
see exactly the images the teacher saw: cached mode refuses random augmentation
(data.crop_min_scale < 1 or data.flip). To distill with augmentation, run the teacher live
(or write one cache per augmented epoch with its own data.seed).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EMBED_FIELDS = ("image_embeds", "text_embeds")
POOLED_FIELDS = ("image_pooled", "text_pooled")
CACHED_LOSSES = ("feature", "fd", "icl", "logit_kl", "contrastive")
DEFAULT_STEPS_PER_SHARD = 64


class TeacherCacheError(ValueError):
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
  if float(data.get("crop_min_scale", 1.0)) < 1.0 or bool(data.get("flip", False)):
    raise TeacherCacheError(
        "cached teacher mode needs the images the teacher saw, but random augmentation is on "
        f"(data.crop_min_scale={data.get('crop_min_scale')}, data.flip={data.get('flip')}): "
        "each step would see a different crop/flip than the cached one. Set "
        "--config.data.crop_min_scale=1.0 --config.data.flip=False, or run the teacher live.")
  if not config.teacher.get("source"):
    raise TeacherCacheError("cached teacher mode needs teacher.source (the teacher the cache "
                            "was written with).")


def data_fingerprint(config: ml_collections.ConfigDict, process_count: int) -> dict[str, Any]:
  """Everything the training order depends on; the cache is valid iff these match."""
  data = json.loads(json.dumps(config.data.to_dict(), sort_keys=True, default=str))
  key = {"data": data, "tokenizer": config.get("tokenizer"),
         "global_batch_size": int(config.train.batch_size), "process_count": process_count,
         "teacher_source": str(config.teacher.source),
         "teacher_dtype": config.teacher.get("dtype", "float32")}
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  return {**key, "hash": digest}


def input_fingerprints(input_ids: np.ndarray) -> np.ndarray:
  """crc32 of each row of input_ids (as little-endian int32): uint32 [rows]."""
  ids = np.ascontiguousarray(np.asarray(input_ids).astype("<i4"))
  return np.asarray([zlib.crc32(row.tobytes()) for row in ids], np.uint32)


def teacher_logit_scale(teacher_params: Mapping) -> float:
  """exp(logit_scale) of host teacher params: what the cached logits are rebuilt with."""
  return float(np.exp(np.asarray(teacher_params["logit_scale"], np.float32)))


def _shard_name(first_step: int, host: int) -> str:
  return f"teacher-{first_step:08d}-host{host:03d}.safetensors"


# --- writing --------------------------------------------------------------------------------

def write_teacher_cache(config: ml_collections.ConfigDict, out_dir: str | os.PathLike, *,
                        num_steps: int | None = None, num_examples: int | None = None,
                        store_pooled: bool = False,
                        steps_per_shard: int = DEFAULT_STEPS_PER_SHARD, log=print) -> Path:
  """Runs the teacher over the first training steps and writes the cache; returns its dir.

  num_steps (or num_examples, rounded up to whole steps; default train.total_steps) steps of
  train.batch_size examples, in the trainer's order. The teacher runs jitted on the config's
  mesh with the batch sharded as in training. Every host writes its own rows.
  """
  import jax
  from jax.experimental import multihost_utils
  from jax.sharding import PartitionSpec

  from clipdistill_jax import sharding, train
  from clipdistill_jax.data import pipeline
  from clipdistill_jax.data.tokenizer import load_tokenizer

  check_cacheable(config)
  batch_size = int(config.train.batch_size)
  if num_steps is None:
    num_steps = (math.ceil(num_examples / batch_size) if num_examples is not None
                 else int(config.train.total_steps))
  if num_steps <= 0:
    raise ValueError(f"num_steps={num_steps}: cache at least one step.")
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  host, hosts = jax.process_index(), jax.process_count()

  models = train.build_models(config)
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  logit_scale = teacher_logit_scale(models.teacher_params)
  teacher_params, teacher_shardings = train.place_teacher(models, mesh, config.mesh.rules)
  fields = EMBED_FIELDS + (POOLED_FIELDS if store_pooled else ())

  def teacher_fn(params, batch):
    out_ = models.teacher.apply({"params": params}, batch["image"], batch["input_ids"],
                                batch["attention_mask"])
    return {k: getattr(out_, k).astype(jax.numpy.bfloat16) for k in fields}
  batch_spec = sharding.batch_sharding(mesh)
  run_teacher = jax.jit(teacher_fn, in_shardings=(teacher_shardings, batch_spec),
                        out_shardings=batch_spec)

  fingerprint = data_fingerprint(config, hosts)
  manifest = {
      "format_version": FORMAT_VERSION, "complete": False,
      "teacher_source": str(config.teacher.source),
      "teacher_dtype": config.teacher.get("dtype", "float32"),
      "teacher_config": models.teacher_config.to_dict(),
      "teacher_logit_scale": logit_scale, "projection_dim": models.teacher_config.projection_dim,
      "data_fingerprint": fingerprint, "global_batch_size": batch_size, "process_count": hosts,
      "local_batch_size": batch_size // hosts, "num_steps": num_steps,
      "steps_per_shard": steps_per_shard, "fields": list(fields), "dtype": "bfloat16",
      "image_size": models.student_config.vision_config.image_size,
      "context_length": models.context_length,
  }
  _check_resumable(out, manifest)
  if host == 0:
    _write_json(out / MANIFEST, manifest)

  first_missing = next((s for s in range(0, num_steps, steps_per_shard)
                        if not (out / _shard_name(s, host)).exists()), num_steps)
  if first_missing:
    log(f"resuming the teacher cache at step {first_missing} of {num_steps}")
  batches = pipeline.make_train_iterator(
      config.data, global_batch_size=batch_size,
      image_size=models.student_config.vision_config.image_size,
      context_length=models.context_length, tokenizer=load_tokenizer(config.get("tokenizer")),
      process_index=host, process_count=hosts, start_step=first_missing)
  started = time.perf_counter()
  with jax.set_mesh(mesh):
    for first in range(first_missing, num_steps, steps_per_shard):
      rows: dict[str, list[np.ndarray]] = {k: [] for k in (*fields, "input_fingerprint")}
      for _ in range(first, min(first + steps_per_shard, num_steps)):
        host_batch = next(batches)
        host_batch.pop("num_skipped", None)
        outputs = run_teacher(teacher_params, sharding.shard_host_batch(host_batch, mesh))
        local = multihost_utils.global_array_to_host_local_array(
            outputs, mesh, PartitionSpec(batch_spec.spec[0]))
        for k in fields:
          rows[k].append(np.asarray(local[k]))
        rows["input_fingerprint"].append(input_fingerprints(host_batch["input_ids"]))
      _write_shard(out / _shard_name(first, host), {k: np.concatenate(v) for k, v in
                                                    rows.items()}, first)
      done = min(first + steps_per_shard, num_steps)
      log(f"teacher cache: {done}/{num_steps} steps "
          f"({(done - first_missing) * batch_size / (time.perf_counter() - started):.1f} "
          "examples/s)")
  if hasattr(batches, "close"):
    batches.close()
  if hosts > 1:
    multihost_utils.sync_global_devices("teacher_cache_written")
  if host == 0:
    manifest["complete"] = True
    manifest["shards"] = [_shard_name(s, p) for s in range(0, num_steps, steps_per_shard)
                          for p in range(hosts)]
    _write_json(out / MANIFEST, manifest)
  return out


def _check_resumable(out: Path, manifest: dict[str, Any]) -> None:
  path = out / MANIFEST
  if not path.exists():
    return
  old = json.loads(path.read_text())
  keys = ("data_fingerprint", "global_batch_size", "process_count", "steps_per_shard",
          "fields", "teacher_source", "teacher_dtype")
  changed = [k for k in keys if old.get(k) != manifest.get(k)]
  if changed:
    raise TeacherCacheError(
        f"{out} already holds a teacher cache written with other settings ({', '.join(changed)} "
        "differ). Write the new cache to another directory, or delete this one.")


def _write_json(path: Path, value: dict[str, Any]) -> None:
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)


def _write_shard(path: Path, tensors: dict[str, np.ndarray], first_step: int) -> None:
  from safetensors.numpy import save_file

  tmp = path.with_name(path.name + ".tmp")
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
            metadata={"first_step": str(first_step)})
  os.replace(tmp, path)  # a shard on disk is always complete


# --- reading --------------------------------------------------------------------------------

class TeacherCache:
  """A written cache: its manifest, checks against a training config, per-step batches."""

  def __init__(self, cache_dir: str | os.PathLike):
    self.directory = Path(cache_dir)
    path = self.directory / MANIFEST
    if not path.exists():
      raise FileNotFoundError(
          f"no teacher cache in {self.directory} ({MANIFEST} missing). Write one with: python "
          "-m clipdistill_jax.teacher_cache --config <your config> --workdir <dir>")
    self.manifest = json.loads(path.read_text())
    if self.manifest.get("format_version") != FORMAT_VERSION:
      raise TeacherCacheError(f"{path}: format version {self.manifest.get('format_version')}, "
                              f"this code reads {FORMAT_VERSION}; rewrite the cache.")
    if not self.manifest.get("complete"):
      raise TeacherCacheError(f"the teacher cache in {self.directory} is incomplete (its writer "
                              "stopped); rerun the same teacher_cache command to finish it.")

  @property
  def num_steps(self) -> int:
    return int(self.manifest["num_steps"])

  @property
  def teacher_logit_scale(self) -> float:
    return float(self.manifest["teacher_logit_scale"])

  def check_config(self, config: ml_collections.ConfigDict, process_count: int) -> None:
    """Raises TeacherCacheError unless this cache serves `config`'s training run exactly."""
    check_cacheable(config)
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

  def batches(self, start_step: int = 0, process_index: int = 0) -> Iterator[dict]:
    """Per training step from start_step: {'teacher_image_embeds', 'teacher_text_embeds'
    (bf16 [local batch, D]), 'input_fingerprint' (uint32 [local batch])}."""
    from safetensors.numpy import load_file

    per_shard, local = int(self.manifest["steps_per_shard"]), int(
        self.manifest["local_batch_size"])
    shard_first, shard = None, None
    for step in range(start_step, self.num_steps):
      first = step - step % per_shard
      if first != shard_first:
        shard_first, shard = first, load_file(str(self.directory / _shard_name(
            first, process_index)))
      rows = slice((step - first) * local, (step - first + 1) * local)
      yield {"teacher_image_embeds": shard["image_embeds"][rows],
             "teacher_text_embeds": shard["text_embeds"][rows],
             "input_fingerprint": shard["input_fingerprint"][rows]}
    raise TeacherCacheError(
        f"the teacher cache in {self.directory} ends at step {self.num_steps}; rerun the "
        "writer with a larger --num_steps.")


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


# --- command line ---------------------------------------------------------------------------

def main(argv: list[str]) -> None:
  from absl import flags

  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments {argv[1:]}")
  from clipdistill_jax import recipes

  f = flags.FLAGS
  out = f.config.teacher.get("cache_dir") or os.path.join(f.workdir, "teacher_cache")
  try:
    config = recipes.apply_recipe(f.config)  # the losses a recipe names decide what is cached
  except ValueError as e:  # an unknown recipe name
    raise SystemExit(f"error: {e}") from None
  try:
    write_teacher_cache(config, out, num_steps=f.num_steps, num_examples=f.num_examples,
                        store_pooled=f.store_pooled, steps_per_shard=f.steps_per_shard)
  except (FileNotFoundError, TeacherCacheError) as e:  # fixable by the user: no traceback
    raise SystemExit(f"error: {e}") from None
  print(f"teacher cache written to {out}; train with --config.teacher.cache_dir={out} "
        "(and the same config otherwise).")


def _define_flags() -> None:
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory of the run (cache goes to "
                      "WORKDIR/teacher_cache unless config.teacher.cache_dir is set).")
  flags.DEFINE_integer("num_steps", None, "Training steps to cache (default: "
                       "train.total_steps).")
  flags.DEFINE_integer("num_examples", None, "Alternatively, examples to cache (rounded up "
                       "to whole steps).")
  flags.DEFINE_bool("store_pooled", False, "Also store the pre-projection pooled states.")
  flags.DEFINE_integer("steps_per_shard", DEFAULT_STEPS_PER_SHARD, "Steps per shard file.")
  flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from absl import app

  _define_flags()
  app.run(main)
