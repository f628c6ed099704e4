r"""Cached teacher: run the frozen teacher once over the training data, train without it.

    python -m clipdistill_jax.teacher_cache --config configs/X.py --workdir DIR \
        [--num_steps N | --num_examples N | --views K] [--store_pooled]

writes the teacher's outputs to config.teacher.cache_dir (or DIR/teacher_cache when that is
unset); training with `--config.teacher.cache_dir=...` then reads them instead of running
the teacher, which roughly halves the FLOPs of a step. Two kinds of cache:

Step cache (default): the first N training steps, in the trainer's exact order (pipeline.
make_train_iterator with the same data config, seed, global batch size and host count:
step s of the cache is step s of training). Per row:
  image_embeds, text_embeds    L2-normalized teacher embeddings, bfloat16 [rows, proj_dim]
  image_pooled, text_pooled    pre-projection pooled states, bfloat16 (--store_pooled only)
  input_fingerprint            crc32 of each row's input_ids, uint32: training checks that
                               the batch it reads is the one the cache was written for
in shards `teacher-{first step:08d}-host{p:03d}.safetensors` of `steps_per_shard` steps of
host p's rows. It holds one teacher output per example read, so it cannot serve random
augmentation (data.crop_min_scale < 1 or data.flip): each step would see another crop than
the cached one; such configs are refused.

Multi-view cache (--views K, or data.num_views = K; MobileCLIP's "reinforced" dataset,
Vasu et al. 2024, apple/ml-mobileclip): every example of the (finite) training set with K
fixed augmented views, view v's crop and flip a pure function of (data.seed, example id, v),
of which training shows view pick_view(data.seed, epoch, example id, K) in each epoch
(pipeline.py, augment.view_augmentation / pick_view): augmentation and cached targets
stay consistent for any number of epochs, batch size or host count. Per example i (rows in
example-id order, shards `teacher-views-{first example:09d}.safetensors` of
`steps_per_shard * train.batch_size` examples):
  image_embeds       bfloat16 [n, K, proj_dim]  L2-normalized, view v of example i at [i, v]
  image_pooled       bfloat16 [n, K, width]     (--store_pooled only)
  text_embeds        bfloat16 [n, proj_dim]     the caption's (captions are not augmented;
  text_pooled        bfloat16 [n, width]         one caption per example is required)
  augmentation       int32 [n, K, 4]            view v's crop top, left, side (pixels of the
                                                image_size x image_size input) and flip 0/1
  input_fingerprint  uint32 [n]                 crc32 of the caption's input_ids
  valid              uint8 [n]                  0: the image could not be read (training
                                                drops it too)
Training with it needs --config.data.num_views=K and reads, per batch row, the row of its
(example_id, view), checking the caption fingerprint and the crop/flip against the batch's.
The writer runs the teacher's image tower once per view and its text tower once per example.
The examples must have fixed ids: a manifest (its rows, the first data.num_train_examples),
or TFRecords with data.num_train_examples (records in sorted file order); synthetic, tfds
and unbounded TFRecord streams are refused.

Both: `manifest.json` (format version, kind, teacher source/dtype/logit scale, the data
settings the cache depends on and their hash, shard list) beside safetensors shards
(safetensors: plain, documented, bf16-native, memory-mapped; torch/numpy read it; the
reader, teacher_cache_reader.py, maps the multi-view shards and reads only the rows a batch
needs). A writer that stops part-way resumes from its last complete shard when rerun with
the same command. A cache written for other data, seed, views, teacher, image size (or, for
step caches, batch size or host count) is refused before step 1.

Only the embeddings are cached, so cached training supports the 'feature', 'fd', 'icl',
'logit_kl' and 'contrastive' losses; a config with 'hidden' or 'attention' weights > 0 is
refused. The teacher's logits are recomputed as logit_scale * image_embeds @ text_embeds.T
with the teacher's own logit scale from the manifest.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from clipdistill_jax.teacher_cache_format import (
  EMBED_FIELDS,
  FORMAT_VERSION,
  MANIFEST,
  POOLED_FIELDS,
  TeacherCacheError,
  check_cacheable,
  data_fingerprint,
  input_fingerprints,
  shard_name,
  teacher_logit_scale,
  views_fingerprint,
  views_shard_name,
)

DEFAULT_STEPS_PER_SHARD = 64


# --- writing --------------------------------------------------------------------------------

def write_teacher_cache(config: ml_collections.ConfigDict, out_dir: str | os.PathLike, *,
                        num_steps: int | None = None, num_examples: int | None = None,
                        views: int | None = None, store_pooled: bool = False,
                        steps_per_shard: int = DEFAULT_STEPS_PER_SHARD, log=print) -> Path:
  """Runs the teacher over the training data and writes the cache; returns its dir.

  Step cache (data.num_views None and views None): num_steps (or num_examples, rounded up to
  whole steps; default train.total_steps) steps of train.batch_size examples, in the
  trainer's order. Multi-view cache (views = K, or data.num_views = K): every training
  example with K augmented views (module docstring); num_steps / num_examples do not apply.
  The teacher runs jitted on the config's mesh with the batch sharded as in training.
  Raises TeacherCacheError for a config the cache cannot serve, or a directory holding a
  cache written with other settings.
  """
  from clipdistill_jax import config_lib
  config_lib.resolve(config)  # the data order the trainer will read (data.seed)
  if views is not None:
    given = config.data.num_views
    if given is not None and int(given) != int(views):
      raise TeacherCacheError(f"--views={views} but the config sets data.num_views={given}; "
                              "give one of them.")
    config = copy.deepcopy(config)
    with config.unlocked():
      config.data.num_views = int(views)
  check_cacheable(config)
  if config.data.num_views is not None:
    from clipdistill_jax.data import defaults

    if num_steps is not None or num_examples is not None:
      raise TeacherCacheError(
          "a multi-view cache holds every training example (data.num_train_examples sets how "
          "many), not a number of steps: drop --num_steps / --num_examples.")
    try:
      defaults.check_views(defaults.resolve_data_config(config.data))
    except ValueError as e:
      raise TeacherCacheError(str(e)) from None
    return _write_views_cache(config, Path(out_dir), store_pooled=store_pooled,
                              steps_per_shard=steps_per_shard, log=log)

  import jax
  from jax.experimental import multihost_utils
  from jax.sharding import PartitionSpec

  from clipdistill_jax import sharding
  from clipdistill_jax.data import pipeline
  from clipdistill_jax.data.tokenizer import load_tokenizer

  batch_size = int(config.train.batch_size)
  if num_steps is None:
    num_steps = (math.ceil(num_examples / batch_size) if num_examples is not None
                 else int(config.train.total_steps))
  if num_steps <= 0:
    raise ValueError(f"num_steps={num_steps}: cache at least one step.")
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  host, hosts = jax.process_index(), jax.process_count()

  teacher = _Teacher(config)
  models, mesh = teacher.models, teacher.mesh
  fields = EMBED_FIELDS + (POOLED_FIELDS if store_pooled else ())

  def teacher_fn(params, batch):
    out_ = models.teacher.apply({"params": params}, batch["image"], batch["input_ids"],
                                batch["attention_mask"])
    return {k: getattr(out_, k).astype(jax.numpy.bfloat16) for k in fields}
  batch_spec = sharding.batch_sharding(mesh)
  run_teacher = jax.jit(teacher_fn, in_shardings=(teacher.shardings, batch_spec),
                        out_shardings=batch_spec)

  fingerprint = data_fingerprint(config, hosts)
  manifest = {
      **teacher.manifest_entries(), "kind": "steps",
      "data_fingerprint": fingerprint, "global_batch_size": batch_size, "process_count": hosts,
      "local_batch_size": batch_size // hosts, "num_steps": num_steps,
      "steps_per_shard": steps_per_shard, "fields": list(fields),
  }
  _check_resumable(out, manifest)
  if host == 0:
    _write_json(out / MANIFEST, manifest)

  first_missing = next((s for s in range(0, num_steps, steps_per_shard)
                        if not (out / shard_name(s, host)).exists()), num_steps)
  reader_state = None
  if first_missing:
    log(f"resuming the teacher cache at step {first_missing} of {num_steps}")
    # Where the reader stood after the last shard written: exact after skipped images.
    reader_state = _shard_reader_state(out / shard_name(first_missing - steps_per_shard, host))
  batches = pipeline.make_train_iterator(
      config.data, global_batch_size=batch_size, image_size=teacher.image_size,
      context_length=models.context_length, tokenizer=load_tokenizer(config.tokenizer),
      process_index=host, process_count=hosts, start_step=first_missing,
      reader_state=reader_state)
  started = time.perf_counter()
  with jax.set_mesh(mesh):
    for first in range(first_missing, num_steps, steps_per_shard):
      rows: dict[str, list[np.ndarray]] = {k: [] for k in (*fields, "input_fingerprint")}
      for _ in range(first, min(first + steps_per_shard, num_steps)):
        host_batch = next(batches)
        host_batch.pop("num_skipped", None)
        outputs = run_teacher(teacher.params, sharding.shard_host_batch(host_batch, mesh))
        local = multihost_utils.global_array_to_host_local_array(
            outputs, mesh, PartitionSpec(batch_spec.spec[0]))
        for k in fields:
          rows[k].append(np.asarray(local[k]))
        rows["input_fingerprint"].append(input_fingerprints(host_batch["input_ids"]))
      _write_shard(out / shard_name(first, host), {k: np.concatenate(v) for k, v in
                                                    rows.items()},
                   {"first_step": first, **batches.state()})
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
    manifest["shards"] = [shard_name(s, p) for s in range(0, num_steps, steps_per_shard)
                          for p in range(hosts)]
    _write_json(out / MANIFEST, manifest)
  return out


class _Teacher:
  """The teacher of a config placed on its mesh, as both writers run it."""

  def __init__(self, config: ml_collections.ConfigDict):
    from clipdistill_jax import run_builder, sharding

    self.config = config
    self.models = run_builder.build_models(config)
    self.mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
    self.logit_scale = teacher_logit_scale(self.models.teacher_params)
    self.params, self.shardings = run_builder.place_teacher(self.models, self.mesh,
                                                      config.mesh.rules)
    self.image_size = self.models.student_config.vision_config.image_size

  def manifest_entries(self) -> dict[str, Any]:
    teacher_config = self.models.teacher_config
    return {"format_version": FORMAT_VERSION, "complete": False,
            "teacher_source": str(self.config.teacher.source),
            "teacher_dtype": self.config.teacher.dtype,
            "teacher_config": teacher_config.to_dict(), "teacher_logit_scale": self.logit_scale,
            "projection_dim": teacher_config.projection_dim, "dtype": "bfloat16",
            "image_size": self.image_size, "context_length": self.models.context_length}


def _write_views_cache(config: ml_collections.ConfigDict, out: Path, *, store_pooled: bool,
                       steps_per_shard: int, log) -> Path:
  """The multi-view cache (module docstring): shards of steps_per_shard * train.batch_size
  consecutive examples, each with all data.num_views views; host 0 writes every shard.

  Each teacher call takes train.batch_size examples, so a host holds train.batch_size /
  hosts x K decoded images at a time: lower train.batch_size for the writer if that is too
  much (the cache's rows do not depend on it; its shard size does).
  """
  import jax
  from jax.experimental import multihost_utils

  from clipdistill_jax import sharding
  from clipdistill_jax.data import pipeline
  from clipdistill_jax.data.tokenizer import load_tokenizer

  batch_size, num_views = int(config.train.batch_size), int(config.data.num_views)
  per_shard = steps_per_shard * batch_size
  out.mkdir(parents=True, exist_ok=True)
  host, hosts = jax.process_index(), jax.process_count()
  teacher = _Teacher(config)
  models, mesh = teacher.models, teacher.mesh
  image_fields = ("image_embeds",) + (("image_pooled",) if store_pooled else ())
  text_fields = ("text_embeds",) + (("text_pooled",) if store_pooled else ())

  def tower(method: str, fields: tuple[str, ...]):
    def run(params, *inputs):
      out_ = models.teacher.apply({"params": params}, *inputs, method=method)
      return {k: getattr(out_, k).astype(jax.numpy.bfloat16) for k in fields}
    return run
  batch_spec = sharding.batch_sharding(mesh)
  run_image = jax.jit(tower("encode_image", image_fields),
                      in_shardings=(teacher.shardings, batch_spec), out_shardings=batch_spec)
  run_text = jax.jit(tower("encode_text", text_fields),
                     in_shardings=(teacher.shardings, batch_spec, batch_spec),
                     out_shardings=batch_spec)

  def on_device(array):
    return sharding.shard_host_batch({"x": array}, mesh)["x"]

  def gathered(tree):  # this host's rows -> every host's rows, in global batch order
    if hosts == 1:
      return jax.tree_util.tree_map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)

  # Host 0's files decide where to resume; every host must feed the same batches.
  first_missing = 0
  while (out / views_shard_name(first_missing)).exists():
    first_missing += per_shard
  if hosts > 1:
    first_missing = int(multihost_utils.broadcast_one_to_all(np.int64(first_missing)))
  examples = pipeline.make_views_iterator(
      config.data, global_batch_size=batch_size, image_size=teacher.image_size,
      context_length=models.context_length, tokenizer=load_tokenizer(config.tokenizer),
      process_index=host, process_count=hosts, start_example=first_missing)
  total = examples.num_examples
  manifest = {
      **teacher.manifest_entries(), "kind": "views", "views_fingerprint":
      views_fingerprint(config), "num_views": num_views, "num_examples": total,
      "examples_per_shard": per_shard, "fields": [*image_fields, *text_fields],
      "augmentation_columns": ["top", "left", "side", "flip"],
  }
  _check_resumable(out, manifest)
  if host == 0:
    _write_json(out / MANIFEST, manifest)
  if 0 < first_missing < total:
    log(f"resuming the teacher cache at example {first_missing} of {total}")

  started = time.perf_counter()
  with jax.set_mesh(mesh):
    for first in range(first_missing, total, per_shard):
      stop = min(first + per_shard, total)
      rows: dict[str, list[np.ndarray]] = {}
      for _ in range(math.ceil((stop - first) / batch_size)):
        batch = next(examples)
        outputs = gathered(run_text(teacher.params, on_device(batch["input_ids"]),
                                    on_device(batch["attention_mask"])))
        per_view = [gathered(run_image(teacher.params, on_device(batch["image"][:, v])))
                    for v in range(num_views)]
        outputs.update({k: np.stack([o[k] for o in per_view], axis=1) for k in image_fields})
        outputs.update(gathered({
            "example_id": batch["example_id"], "augmentation": batch["augmentation"],
            "valid": batch["ok"].astype(np.uint8),
            "input_fingerprint": input_fingerprints(batch["input_ids"])}))
        keep = outputs["example_id"] >= 0  # -1: padding of the last batch
        for k, v in outputs.items():
          rows.setdefault(k, []).append(np.asarray(v)[keep])
      tensors = {k: np.concatenate(v) for k, v in rows.items()}
      if not np.array_equal(tensors.pop("example_id"), np.arange(first, stop)):
        raise RuntimeError(f"teacher cache: the examples read for the shard at {first} are "
                           f"not examples {first}..{stop - 1} in order.")  # a bug, not data
      if host == 0:
        _write_shard(out / views_shard_name(first), tensors, {"first_example": first})
      invalid = int((tensors["valid"] == 0).sum())
      log(f"teacher cache: {stop}/{total} examples x {num_views} views"
          + (f", {invalid} unreadable images in this shard" if invalid else "")
          + f" ({(stop - first_missing) / (time.perf_counter() - started):.1f} examples/s)")
  examples.close()
  if hosts > 1:
    multihost_utils.sync_global_devices("teacher_cache_written")
  if host == 0:
    manifest["complete"] = True
    manifest["shards"] = [views_shard_name(s) for s in range(0, total, per_shard)]
    _write_json(out / MANIFEST, manifest)
  return out


def _check_resumable(out: Path, manifest: dict[str, Any]) -> None:
  path = out / MANIFEST
  if not path.exists():
    return
  old = json.loads(path.read_text())
  keys = ("kind", "data_fingerprint", "views_fingerprint", "global_batch_size",
          "process_count", "steps_per_shard", "examples_per_shard", "num_views", "num_examples",
          "fields", "teacher_source", "teacher_dtype", "image_size", "context_length")
  old.setdefault("kind", "steps")
  changed = [k for k in keys if old.get(k) != manifest.get(k)]
  if changed:
    raise TeacherCacheError(
        f"{out} already holds a teacher cache written with other settings ({', '.join(changed)} "
        "differ). Write the new cache to another directory, or delete this one.")


def _write_json(path: Path, value: dict[str, Any]) -> None:
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)


def _shard_reader_state(path: Path) -> dict[str, int] | None:
  """The reader state stored with a step shard (None for shards written without one)."""
  from safetensors import safe_open

  with safe_open(str(path), "np") as f:
    metadata = f.metadata() or {}
  keys = ("position", "num_read", "num_skipped")
  return {k: int(metadata[k]) for k in keys} if all(k in metadata for k in keys) else None


def _write_shard(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, int]) -> None:
  from safetensors.numpy import save_file

  tmp = path.with_name(path.name + ".tmp")
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
            metadata={k: str(v) for k, v in metadata.items()})
  os.replace(tmp, path)  # a shard on disk is always complete


# --- command line ---------------------------------------------------------------------------

def main(argv: list[str]) -> None:
  from absl import flags

  from clipdistill_jax import errors

  if len(argv) > 1:
    raise SystemExit(f"error: unexpected arguments {argv[1:]}")
  with errors.boundary():  # user errors: `error:` lines, exit 1
    _main(flags.FLAGS)


def _main(f) -> None:
  from clipdistill_jax import config_lib, recipes
  from clipdistill_jax.config_validate import validate

  config = config_lib.resolve(f.config)
  out = config.teacher.cache_dir or os.path.join(f.workdir, "teacher_cache")
  try:
    config = recipes.apply_recipe(config)  # the losses a recipe names decide what is cached
  except ValueError:  # an unknown recipe: listed by validate with every other problem
    validate(config)
    raise
  validate(config)
  views = f.views if f.views is not None else config.data.num_views
  write_teacher_cache(config, out, num_steps=f.num_steps, num_examples=f.num_examples,
                      views=f.views, store_pooled=f.store_pooled,
                      steps_per_shard=f.steps_per_shard)
  flags_ = f"--config.teacher.cache_dir={out}" + (
      f" --config.data.num_views={views}" if views is not None else "")
  print(f"teacher cache written to {out}; train with {flags_} (and the same config otherwise).")


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
  flags.DEFINE_integer("views", None, "Write a multi-view cache: every training example with "
                       "this many augmented views (sets data.num_views; train with the same).")
  flags.DEFINE_bool("store_pooled", False, "Also store the pre-projection pooled states.")
  flags.DEFINE_integer("steps_per_shard", DEFAULT_STEPS_PER_SHARD, "Steps per shard file "
                       "(multi-view caches: steps_per_shard * train.batch_size examples).")
  flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from absl import app

  _define_flags()
  app.run(main)
