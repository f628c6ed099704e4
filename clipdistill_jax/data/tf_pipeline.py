"""The tf.data half of the input pipeline: decode, augment, count corrupt images, batch.

Every tf.data source (tfds, manifest, TFRecord) yields *records*: dicts with
  position  int64  the record's place in this host's stream (0, 1, 2, ... from the stream's
                   first record, whatever start offset was skipped), seeds its augmentation;
  example_id int64 the example's fixed index in a finite training set (manifest row, TFRecord
                   record), and epoch int64 how many times it was read before: records of
                   finite sets carry both, and data.num_views needs them (below);
  image     string encoded bytes, or uint8 [H, W, 3] already decoded pixels;
  image_path string instead of `image`, a file to read (manifests);
  caption   string, or rank-1 strings (several captions: one is drawn per use); empty or
                   whitespace-only captions do not count, and a record without any other
                   is dropped and counted like an unreadable image;
  label     int64 class id (label datasets; optional for caption datasets).
This module turns records into batches. Images are decoded with the same CLIP preprocessing
as everything else (preprocess.tf_preprocess); a record whose file is missing or whose bytes
do not decode is dropped and counted, never passed on and never fatal, unless so many fail
that the data is evidently wrong (TooManyCorruptImagesError). Captions are tokenized on the
host after batching (transformers' Rust tokenizer), each distinct one once (caches.TokenCache).

Augmentation (training only): a random square crop resized back to S x S, then a random
horizontal flip, both described by four int32 numbers (AUGMENTATION_COLUMNS: crop top, left
and side in pixels of the preprocessed S x S image, flip 0/1) that augmentation_params draws
and apply_augmentation applies. Their seed is either
  * the record's position (data.num_views None): a new crop every time an example is read;
  * (data.seed, example_id, view) with view = pick_view(data.seed, epoch, example_id, K)
    (data.num_views = K): each example has K fixed augmented views, and each epoch shows one
    of them, so a teacher cache can hold the teacher's output for every view in advance
    (teacher_cache.py). Batches then also carry example_id, view and augmentation.

TensorFlow is imported only here and in the tf sources, so the synthetic path never pays
for it; it is kept off the GPUs, which belong to JAX.
"""

from __future__ import annotations

import atexit
import dataclasses
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np

from clipdistill_jax.data import preprocess
from clipdistill_jax.data.batches import CaptionFn, CorruptLimits, TooManyCorruptImagesError
from clipdistill_jax.data.caches import TokenCache

_TF_CONFIGURED = False
_OPEN_ITERATORS: weakref.WeakSet = weakref.WeakSet()


def import_tf():
  """Imports TensorFlow for tf.data only: no GPUs (JAX owns them)."""
  global _TF_CONFIGURED
  import tensorflow as tf

  if not _TF_CONFIGURED:
    try:
      tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialized its devices; nothing to hide any more
      pass
    # Registered after TF's own exit handlers, so it runs before them (LIFO).
    atexit.register(close_open_iterators)
    _TF_CONFIGURED = True
  return tf


class NumpyIterator:
  """A tf.data dataset's numpy iterator that can be closed, and is closed at exit.

  The decoders run Python (tf.numpy_function) on tf.data threads. An iterator still alive
  when the interpreter finalizes waits for those threads, which can no longer take the GIL:
  the process hangs on exit (seen with TF 2.21). Closing every open iterator from an atexit
  handler, while threads still run, avoids that; close() frees the pipeline earlier.
  """

  def __init__(self, dataset):
    self._iterator = dataset.as_numpy_iterator()
    _OPEN_ITERATORS.add(self)

  def __iter__(self) -> NumpyIterator:
    return self

  def __next__(self):
    if self._iterator is None:
      raise StopIteration
    return next(self._iterator)

  def close(self) -> None:
    self._iterator = None
    _OPEN_ITERATORS.discard(self)


def close_open_iterators() -> None:
  for iterator in list(_OPEN_ITERATORS):
    iterator.close()


def dataset_options(num_threads: int | None):
  """Deterministic order; at most `num_threads` tf.data threads (None: TF's default)."""
  tf = import_tf()
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  if num_threads:
    options.threading.private_threadpool_size = int(num_threads)
  return options


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """How records become examples; one instance per pipeline."""

  image_size: int
  seed: int
  process_index: int
  process_count: int
  train: bool
  num_templates: int = 1
  crop_min_scale: float = 1.0
  flip: bool = False
  max_image_pixels: int | None = preprocess.DEFAULT_MAX_IMAGE_PIXELS
  num_views: int | None = None  # K fixed augmented views per example (module docstring)
  all_views: bool = False  # every view of each example at once (the teacher cache writer)
  image_decoder: str = preprocess.DEFAULT_IMAGE_DECODER  # 'pil' | 'tf' (data.image_decoder)
  decoded_cache_bytes: int = 0  # training: data.decoded_cache_mb in bytes ('pil'; caches.py)


AUGMENTATION_COLUMNS = ("top", "left", "side", "flip")
# Per-example fields of training batches besides the model inputs (data.num_views only).
EXAMPLE_FIELDS = ("example_id", "view", "augmentation")


# --- augmentation ---------------------------------------------------------------------------


def augmentation_params(crop_seed, flip_seed, *, image_size: int, crop_min_scale: float,
                        flip: bool):
  """One augmentation drawn from two stateless seeds: int32 [4] (AUGMENTATION_COLUMNS).

  Crop: a square of area fraction uniform in [crop_min_scale, 1] of the S x S image (S =
  image_size), side rounded to whole pixels, top/left uniform over the positions that keep
  it inside; crop_min_scale = 1 gives (0, 0, S). Flip: 1 with probability 1/2 when `flip`,
  else 0. crop_seed, flip_seed: int [2] seeds of tf.random's stateless ops.
  """
  tf = import_tf()
  size = image_size
  if crop_min_scale < 1.0:
    u = tf.random.stateless_uniform([3], crop_seed)
    area = crop_min_scale + (1.0 - crop_min_scale) * u[0]
    side = tf.clip_by_value(tf.cast(tf.round(size * tf.sqrt(area)), tf.int32), 1, size)
    span = tf.cast(size - side + 1, tf.float32)
    top = tf.minimum(tf.cast(u[1] * span, tf.int32), size - side)
    left = tf.minimum(tf.cast(u[2] * span, tf.int32), size - side)
  else:
    top, left, side = tf.constant(0), tf.constant(0), tf.constant(size)
  flipped = (tf.cast(tf.random.stateless_uniform([], flip_seed) < 0.5, tf.int32) if flip
             else tf.constant(0))
  return tf.stack([top, left, side, flipped])


def _view_key(seed, example_id, purpose: int, index):
  """A stateless seed [2] for (data seed, example, purpose, index); purposes keep the view
  draws and the crops of one example independent."""
  tf = import_tf()
  key = tf.stack([tf.cast(seed, tf.int64), tf.cast(example_id, tf.int64)])
  key = tf.random.experimental.stateless_fold_in(key, tf.constant(purpose, tf.int64))
  return tf.random.experimental.stateless_fold_in(key, tf.cast(index, tf.int64))


def view_augmentation(seed, example_id, view, *, image_size: int, crop_min_scale: float,
                      flip: bool):
  """The augmentation of view `view` of example `example_id`: int32 [4] (AUGMENTATION_COLUMNS),
  a pure function of (data seed, example id, view). The training pipeline and the teacher
  cache writer both draw views here."""
  tf = import_tf()
  crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(_view_key(seed, example_id, 0, view), 2))
  return augmentation_params(crop_seed, flip_seed, image_size=image_size,
                             crop_min_scale=crop_min_scale, flip=flip)


def pick_view(seed, epoch, example_id, num_views: int):
  """The view (int32 in [0, num_views)) example `example_id` shows in epoch `epoch`.

  Epochs go in rounds of K = num_views: round r = epoch // K shows the K views in an order
  seeded by (data seed, example id, r), so every view is used once per K epochs and the
  choice is a pure function of (data seed, epoch, example id).
  """
  tf = import_tf()
  epoch = tf.cast(epoch, tf.int64)
  order = tf.random.experimental.stateless_shuffle(
      tf.range(num_views, dtype=tf.int32), seed=_view_key(seed, example_id, 1, epoch // num_views))
  return order[epoch % num_views]


def apply_augmentation(image, params, *, crop: bool, flip: bool):
  """image float32 [S, S, 3] cropped to params' box and resized back (bilinear), then
  mirrored left-right where params' flip is 1. crop / flip False skip those ops (their
  params are then the identity anyway).

  Applied after normalization: crop, bilinear resize and flip are linear, so they commute
  with it.
  """
  tf = import_tf()
  size = image.shape[0]
  if crop:
    top, left, side = params[0], params[1], params[2]
    cropped = tf.slice(image, tf.stack([top, left, 0]), tf.stack([side, side, 3]))
    image = tf.image.resize(cropped[None], [size, size], method="bilinear")[0]
    image.set_shape([size, size, 3])
  if flip:
    image = tf.cond(params[3] > 0, lambda: tf.reverse(image, axis=[1]), lambda: image)
  return image


# --- per-record decoding ----------------------------------------------------------------------


def decode_records(records, settings: DecodeSettings, num_parallel_calls: int):
  """records -> examples {image float32 [S,S,3], ok, position, caption | label, template_index}
  (evaluation: also `captions`, rank-1, every non-empty caption of the record).

  With settings.num_views (train only) examples also carry example_id, view and augmentation
  int32 [4]; with settings.all_views instead image [K,S,S,3] and augmentation [K,4], every
  view of the example. Never raises for a bad image: `ok` is False instead (and the image
  zeros); also False for a record whose captions are all empty or whitespace.
  """
  tf = import_tf()
  size = settings.image_size
  views = settings.num_views if settings.train else None
  augment = dict(image_size=size, crop_min_scale=settings.crop_min_scale, flip=settings.flip)
  apply = dict(crop=settings.crop_min_scale < 1.0, flip=settings.flip)
  if views is not None:
    keys = set(records.element_spec)
    if not {"example_id", "epoch"} <= keys and not (settings.all_views and "example_id" in keys):
      raise ValueError("data.num_views needs records with fixed example ids (a manifest, or "
                       "TFRecords with data.num_train_examples set).")
    if records.element_spec.get("caption") is None:
      raise ValueError("data.num_views caches one teacher text embedding per example, so each "
                       "example needs exactly one caption (not a class label); unset "
                       "data.num_views for this data.")

  def load(image_or_path, from_path: bool):
    encoded = tf.io.read_file(image_or_path) if from_path else image_or_path
    if encoded.dtype == tf.string:  # the 'tf' decoder ('pil' needs no guard: decode below)
      return preprocess.tf_fast_preprocess(encoded, size, settings.max_image_pixels)
    image = tf.numpy_function(lambda pixels: preprocess.preprocess_image(pixels, size),
                              [encoded], tf.float32, stateful=False)
    image.set_shape([size, size, 3])
    return image, tf.constant(True)

  def guarded_load(image_or_path, from_path: bool):
    # Errors raised by ops (missing file, odd formats, numpy exceptions) end the inner
    # dataset; the fallback element then says ok=False.
    attempt = tf.data.Dataset.from_tensors(image_or_path).map(
        lambda x: load(x, from_path)).ignore_errors()
    fallback = tf.data.Dataset.from_tensors((tf.zeros([size, size, 3]), tf.constant(False)))
    return attempt.concatenate(fallback).take(1).get_single_element()

  def augment_views(record, image, example):
    example_id = record["example_id"]
    example["example_id"] = example_id
    if settings.all_views:
      params = tf.stack([view_augmentation(settings.seed, example_id, v, **augment)
                         for v in range(views)])
      example["image"] = tf.stack([apply_augmentation(image, params[v], **apply)
                                   for v in range(views)])
    else:
      view = pick_view(settings.seed, record["epoch"], example_id, views)
      params = view_augmentation(settings.seed, example_id, view, **augment)
      example["image"] = apply_augmentation(image, params, **apply)
      example["view"] = view
    example["augmentation"] = params

  from_path = "image_path" in records.element_spec
  image_key = "image_path" if from_path else "image"
  if settings.image_decoder == "pil" and (
      from_path or records.element_spec[image_key].dtype == tf.string):
    # PIL_DECODE_BATCH records per Python call, which never raises: no per-element guard.
    records = preprocess.tf_preprocess_records(
        records, image_key, size, settings.max_image_pixels, from_path=from_path,
        num_parallel_calls=num_parallel_calls, cache_bytes=settings.decoded_cache_bytes)

  def decode(record: dict[str, Any]) -> dict[str, Any]:
    if preprocess.DECODED_IMAGE in record:
      image, ok = record.pop(preprocess.DECODED_IMAGE), record.pop(preprocess.DECODED_OK)
    else:
      image, ok = guarded_load(record[image_key], from_path)
    seed = tf.stack([tf.constant(settings.seed, tf.int64),
                     record["position"] * settings.process_count + settings.process_index])
    crop_seed, flip_seed, text_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    example = {"image": image, "ok": ok, "position": record["position"]}
    if views is not None:
      augment_views(record, image, example)
    elif settings.train:
      params = augmentation_params(crop_seed, flip_seed, **augment)
      example["image"] = apply_augmentation(image, params, **apply)
    if "caption" in record:
      captions = record["caption"]
      if captions.shape.rank == 0:
        captions = captions[None]
      # Empty or whitespace-only captions are no captions, and an image without a caption is
      # not an example: it is dropped and counted like an unreadable image.
      captions = tf.boolean_mask(
          captions, tf.logical_not(tf.strings.regex_full_match(captions, r"[\s\p{Z}]*")))
      count = tf.shape(captions)[0]
      # Several captions per image: training draws one per use (a function of the seed and
      # the record's position, so of the epoch: resumes draw the same); evaluation takes the
      # first as `caption` and keeps them all as `captions` (retrieval counts every one).
      pick = (tf.random.stateless_uniform([], text_seed, 0, tf.maximum(count, 1), tf.int32)
              if settings.train and views is None else 0)
      # With fixed views one teacher text embedding serves each example: a record with
      # several captions cannot be served, so it is dropped and counted like an unreadable one.
      example["ok"] = example["ok"] & ((count == 1) if views is not None else (count > 0))
      example["caption"] = tf.gather(tf.concat([captions, [""]], axis=0), pick)
      if not settings.train:
        example["captions"] = captions
    if "label" in record:
      example["label"] = tf.cast(record["label"], tf.int32)
      example["template_index"] = (
          tf.random.stateless_uniform([], text_seed, 0, settings.num_templates, tf.int32)
          if settings.train else tf.constant(0, tf.int32))
    return example

  return records.map(decode, num_parallel_calls=num_parallel_calls, deterministic=True)


# --- training batches -----------------------------------------------------------------------


def count_and_filter(examples, limits: CorruptLimits, counts: tuple[int, int] = (0, 0)):
  """Drops ok=False examples; each kept one carries cumulative num_read / num_skipped.

  `counts`: (num_read, num_skipped) of the run before this stream started (a resumed run
  continues its totals, and the limits apply to the whole run). Once the limits are exceeded
  every element passes with abort=True, so the host side sees it at once instead of a
  pipeline spinning over undecodable data forever.
  """
  tf = import_tf()
  zero = tf.constant(0, tf.int64)
  start = (tf.constant(int(counts[0]), tf.int64), tf.constant(int(counts[1]), tf.int64), zero)

  def count(state, example):
    num_read, num_skipped, consecutive = state
    bad = tf.logical_not(example["ok"])
    num_read += 1
    num_skipped += tf.cast(bad, tf.int64)
    consecutive = tf.where(bad, consecutive + 1, zero)
    over_fraction = (num_read >= limits.check_after) & (
        tf.cast(num_skipped, tf.float64) > limits.max_fraction * tf.cast(num_read, tf.float64))
    abort = over_fraction | (consecutive >= limits.max_consecutive)
    example = {**example, "num_read": num_read, "num_skipped": num_skipped, "abort": abort}
    return (num_read, num_skipped, consecutive), example

  counted = examples.scan(start, count)
  kept = counted.filter(lambda example: example["ok"] | example["abort"])
  return kept.map(lambda example: {k: v for k, v in example.items() if k != "ok"})


class TFTrainIterator:
  """Endless per-host training batches from a tf.data pipeline.

  Yields {image float32 [b,S,S,3], input_ids int32 [b,L], attention_mask int32 [b,L]}, plus
  with data.num_views example_id int64 [b], view int32 [b] and augmentation int32 [b, 4]
  (AUGMENTATION_COLUMNS). `num_read` / `num_skipped` count the images this host has
  decoded / dropped as unreadable in the whole run (`counts` carries those of the run before
  a resume); `position` is the place in this host's record stream after the last batch
  handed out: records consumed, skipped ones included. `state()` returns all three, what a
  checkpoint stores to resume the stream exactly (pipeline.make_train_iterator).
  """

  def __init__(self, batches, *, tokenizer, context_length: int, captions: CaptionFn,
               limits: CorruptLimits, where: str, local_batch_size: int,
               class_names: list[str] | None, position: int = 0,
               counts: tuple[int, int] = (0, 0)):
    self._batches = NumpyIterator(batches)
    self._tokens = TokenCache(tokenizer, context_length)  # epochs repeat captions
    self._captions = captions
    self._limits = limits
    self._where = where
    self.local_batch_size = local_batch_size
    self.class_names = class_names
    self.position = int(position)
    self.num_read, self.num_skipped = (int(c) for c in counts)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._batches)
    self.num_read = int(batch["num_read"][-1])
    self.num_skipped = int(batch["num_skipped"][-1])
    # Records are numbered in stream order, so the next unread one follows the batch's last;
    # unreadable records before it were consumed (and counted) with this batch.
    self.position = int(batch["position"][-1]) + 1
    if batch["abort"].any():
      raise TooManyCorruptImagesError(
          self._limits.message(self.num_read, self.num_skipped, self._where))
    input_ids, attention_mask = self._tokens(self._captions(batch))
    return {"image": batch["image"], "input_ids": input_ids, "attention_mask": attention_mask,
            **{k: batch[k] for k in EXAMPLE_FIELDS if k in batch}}

  def close(self) -> None:
    """Stops the tf.data pipeline now (it is also stopped at interpreter exit)."""
    self._batches.close()

  def state(self) -> dict[str, int]:
    """{position, num_read, num_skipped} after the last batch: resumes the stream exactly."""
    return {"position": self.position, "num_read": self.num_read,
            "num_skipped": self.num_skipped}

  def metrics(self) -> dict[str, float]:
    return {"data/num_read": float(self.num_read), "data/num_skipped": float(self.num_skipped),
            "data/skipped_fraction": self.num_skipped / max(self.num_read, 1)}


def train_batches(records, settings: DecodeSettings, *, batch_size: int, limits: CorruptLimits,
                  num_parallel_calls: int, prefetch: int, num_threads: int | None,
                  counts: tuple[int, int] = (0, 0)):
  """Endless tf.data batches (numpy on iteration) of endless records; counts: count_and_filter."""
  tf = import_tf()
  examples = decode_records(records, settings, num_parallel_calls)
  batches = count_and_filter(examples, limits, counts).batch(batch_size, drop_remainder=True)
  batches = batches.prefetch(prefetch if prefetch >= 0 else tf.data.AUTOTUNE)
  return batches.with_options(dataset_options(num_threads))


# --- evaluation batches ----------------------------------------------------------------------


def eval_chunks(records, settings: DecodeSettings, *, chunk_size: int,
                num_parallel_calls: int, num_threads: int | None):
  """Finite chunks of decoded examples, corrupt ones still in (ok=False) so the host side
  counts them exactly and drops them (eval_dataset.EvalDataset)."""
  examples = decode_records(records, settings, num_parallel_calls)
  # ragged: `captions` differ in number from record to record (numpy: object arrays).
  chunks = examples.ragged_batch(chunk_size, drop_remainder=False).prefetch(2)
  return chunks.with_options(dataset_options(num_threads))


# --- every view of every example (the teacher cache writer) ---------------------------------


class TFViewsIterator:
  """Finite per-host batches of consecutive examples with all their views, unfiltered.

  Yields {image float32 [b,K,S,S,3], augmentation int32 [b,K,4], example_id int64 [b] (-1:
  padding that completes the last global batch), ok bool [b] (False: the image could not be
  read; its row is zeros), input_ids int32 [b,L], attention_mask int32 [b,L]}.
  """

  def __init__(self, batches, *, tokenizer, context_length: int, captions: CaptionFn,
               num_examples: int):
    self._batches = NumpyIterator(batches)
    self._tokenizer = tokenizer
    self._context_length = context_length
    self._captions = captions
    self.num_examples = num_examples

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._batches)
    input_ids, attention_mask = self._tokenizer(self._captions(batch), self._context_length)
    return {"image": batch["image"], "augmentation": batch["augmentation"],
            "example_id": batch["example_id"], "ok": batch["ok"], "input_ids": input_ids,
            "attention_mask": attention_mask}

  def close(self) -> None:
    self._batches.close()


def views_batches(records, settings: DecodeSettings, *, num_examples: int, start: int,
                  global_batch_size: int, num_parallel_calls: int, num_threads: int | None):
  """This host's rows of global batches of consecutive examples [start, num_examples).

  `records`: the examples from id `start` on, in id order, each with example_id. Global
  batch g holds examples start + g*B + [0, B), host p its rows [p*b, (p+1)*b); the last
  batch is completed with padding rows (example_id -1) so every host yields as many batches.
  Nothing when start >= num_examples.
  """
  tf = import_tf()
  b = global_batch_size // settings.process_count
  p = settings.process_index
  remaining = num_examples - start
  if remaining <= 0:
    empty = decode_records(records.take(0), settings, num_parallel_calls).batch(b)
    return empty.with_options(dataset_options(num_threads))
  last = -(-remaining // global_batch_size) - 1  # index of the last global batch
  real_in_last = min(max(remaining - last * global_batch_size - p * b, 0), b)
  mine = records.filter(
      lambda r: (r["example_id"] - start) % global_batch_size // b == p)
  padding = records.take(1).map(lambda r: {**r, "example_id": tf.constant(-1, tf.int64)})
  mine = mine.concatenate(padding.repeat(b - real_in_last))
  examples = decode_records(mine, settings, num_parallel_calls)
  batches = examples.batch(b, drop_remainder=True).prefetch(1)
  return batches.with_options(dataset_options(num_threads))
