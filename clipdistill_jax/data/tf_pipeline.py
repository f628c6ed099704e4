"""The tf.data half of the input pipeline: decode, augment, count corrupt images, batch.

Every tf.data source (tfds, manifest, TFRecord) yields *records*: dicts with
  position  int64  the record's place in this host's stream (0, 1, 2, ... from the stream's
                   first record, whatever start offset was skipped), seeds its augmentation;
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
host in Python (the tokenizer is transformers' Rust one) after batching.

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


# --- per-record decoding ----------------------------------------------------------------------


def decode_records(records, settings: DecodeSettings, num_parallel_calls: int):
  """records -> examples {image float32 [S,S,3], ok, position, caption | label, template_index}
  (evaluation: also `captions`, rank-1, every non-empty caption of the record).

  Never raises for a bad image: `ok` is False instead (and the image zeros); also False for a
  record whose captions are all empty or whitespace.
  """
  tf = import_tf()
  size = settings.image_size

  def load(image_or_path, from_path: bool):
    encoded = tf.io.read_file(image_or_path) if from_path else image_or_path
    if encoded.dtype == tf.string:
      return preprocess.tf_preprocess(encoded, size, settings.max_image_pixels)
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

  def decode(record: dict[str, Any]) -> dict[str, Any]:
    from_path = "image_path" in record
    image, ok = guarded_load(record["image_path"] if from_path else record["image"], from_path)
    seed = tf.stack([tf.constant(settings.seed, tf.int64),
                     record["position"] * settings.process_count + settings.process_index])
    crop_seed, flip_seed, text_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    example = {"image": image, "ok": ok, "position": record["position"]}
    if settings.train:
      example["image"] = _augment(image, crop_seed, flip_seed, settings)
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
              if settings.train else 0)
      example["ok"] = example["ok"] & (count > 0)
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


def _augment(image, crop_seed, flip_seed, settings: DecodeSettings):
  """Random square crop (area fraction >= crop_min_scale) resized back, then random flip.

  Applied after normalization: crop, bilinear resize and flip are linear, so they commute
  with it. Seeds come from the record's position, so a resumed run augments identically.
  """
  tf = import_tf()
  size = settings.image_size
  if settings.crop_min_scale < 1.0:
    u = tf.random.stateless_uniform([3], crop_seed)
    area = settings.crop_min_scale + (1.0 - settings.crop_min_scale) * u[0]
    side = tf.clip_by_value(tf.cast(tf.round(size * tf.sqrt(area)), tf.int32), 1, size)
    span = tf.cast(size - side + 1, tf.float32)
    top = tf.minimum(tf.cast(u[1] * span, tf.int32), size - side)
    left = tf.minimum(tf.cast(u[2] * span, tf.int32), size - side)
    crop = tf.slice(image, tf.stack([top, left, 0]), tf.stack([side, side, 3]))
    image = tf.image.resize(crop[None], [size, size], method="bilinear")[0]
    image.set_shape([size, size, 3])
  if settings.flip:
    flipped = tf.random.stateless_uniform([], flip_seed) < 0.5
    image = tf.cond(flipped, lambda: tf.reverse(image, axis=[1]), lambda: image)
  return image


# --- training batches -----------------------------------------------------------------------


def count_and_filter(examples, limits: CorruptLimits):
  """Drops ok=False examples; each kept one carries cumulative num_read / num_skipped.

  Once the limits are exceeded every element passes with abort=True, so the host side sees
  it at once instead of a pipeline spinning over undecodable data forever.
  """
  tf = import_tf()
  zero = tf.constant(0, tf.int64)

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

  counted = examples.scan((zero, zero, zero), count)
  kept = counted.filter(lambda example: example["ok"] | example["abort"])
  return kept.map(lambda example: {k: v for k, v in example.items() if k != "ok"})


class TFTrainIterator:
  """Endless per-host training batches from a tf.data pipeline.

  Yields {image float32 [b,S,S,3], input_ids int32 [b,L], attention_mask int32 [b,L]}.
  `num_read` / `num_skipped` count the images this host has decoded / dropped as unreadable
  since the iterator was made (`metrics()` returns them for logging).
  """

  def __init__(self, batches, *, tokenizer, context_length: int, captions: CaptionFn,
               limits: CorruptLimits, where: str, local_batch_size: int,
               class_names: list[str] | None):
    self._batches = NumpyIterator(batches)
    self._tokenizer = tokenizer
    self._context_length = context_length
    self._captions = captions
    self._limits = limits
    self._where = where
    self.local_batch_size = local_batch_size
    self.class_names = class_names
    self.num_read = 0
    self.num_skipped = 0

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._batches)
    self.num_read = int(batch["num_read"][-1])
    self.num_skipped = int(batch["num_skipped"][-1])
    if batch["abort"].any():
      raise TooManyCorruptImagesError(
          self._limits.message(self.num_read, self.num_skipped, self._where))
    input_ids, attention_mask = self._tokenizer(self._captions(batch), self._context_length)
    return {"image": batch["image"], "input_ids": input_ids, "attention_mask": attention_mask}

  def close(self) -> None:
    """Stops the tf.data pipeline now (it is also stopped at interpreter exit)."""
    self._batches.close()

  def metrics(self) -> dict[str, float]:
    return {"data/num_read": float(self.num_read), "data/num_skipped": float(self.num_skipped),
            "data/skipped_fraction": self.num_skipped / max(self.num_read, 1)}


def train_batches(records, settings: DecodeSettings, *, batch_size: int, limits: CorruptLimits,
                  num_parallel_calls: int, prefetch: int, num_threads: int | None):
  """Endless tf.data batches (numpy on iteration) from an endless record stream."""
  tf = import_tf()
  examples = decode_records(records, settings, num_parallel_calls)
  batches = count_and_filter(examples, limits).batch(batch_size, drop_remainder=True)
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
