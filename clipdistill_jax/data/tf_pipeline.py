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
This module turns records into batches, a batch of records at a time (decode_batches): one
tf.data call per batch decodes, augments and checks its examples, so the per-example cost of
tf.data's own machinery is paid once per batch. Images are decoded with the same CLIP
preprocessing as everything else (preprocess.tf_preprocess); a record whose file is missing
or whose bytes do not decode is dropped and counted, never passed on and never fatal, unless
so many fail that the data is evidently wrong (TooManyCorruptImagesError); dropped rows are
refilled from the next batch (Dataset.rebatch), so batches stay full. Captions are tokenized
on the host after batching (transformers' Rust tokenizer), each distinct one once
(caches.TokenCache).

Augmentation (training only; augment.py): a random square crop resized back to S x S, then a
random horizontal flip. Its seed is either
  * the record's position (data.num_views None): a new crop every time an example is read;
  * (data.seed, example_id, view) with view = augment.pick_view(data.seed, epoch, example_id,
    K) (data.num_views = K): each example has K fixed augmented views, and each epoch shows
    one of them, so a teacher cache can hold the teacher's output for every view in advance
    (teacher_cache.py). Batches then also carry example_id, view and augmentation.

TensorFlow is imported only here and in the tf sources, so the synthetic path never pays
for it; it is kept off the GPUs, which belong to JAX.
"""

from __future__ import annotations

import atexit
import dataclasses
import weakref
from collections.abc import Iterator

import numpy as np

from clipdistill_jax.data import augment as augment_lib
from clipdistill_jax.data import preprocess
from clipdistill_jax.data.batches import CaptionFn, CorruptLimits, TooManyCorruptImagesError
from clipdistill_jax.data.caches import DecodedImageCache, TokenCache

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


# Per-example fields of training batches besides the model inputs (data.num_views only).
EXAMPLE_FIELDS = ("example_id", "view", "augmentation")


# --- decoding, a batch of records at a time ----------------------------------------------


_BLANK = r"[\s\p{Z}]*"  # a caption of only whitespace is no caption
_DECODED = "_decoded"  # the decoded (image, ok) of a batch of records, until examples() takes it


def _decoded_images(records, settings: DecodeSettings, batch_size: int, drop_remainder: bool,
                    num_parallel_calls: int):
  """Batches of records, each with _DECODED = (float32 [b, S, S, 3], bool ok [b]): its images.

  Encoded bytes and file paths with the 'pil' decoder are batched first and decoded in one
  Python call per batch (preprocess.tf_preprocess, which never raises; decoded images kept
  by example id with settings.decoded_cache_bytes). Otherwise (the 'tf' decoder; decoded
  uint8 pixels, which differ in size) each record is decoded on its own first, its errors
  turned into ok=False, and then batched. Rank-1 string fields of unequal length (several
  captions) are padded with "", which counts as no caption.
  """
  tf = import_tf()
  size = settings.image_size
  from_path = "image_path" in records.element_spec
  key = "image_path" if from_path else "image"
  encoded = from_path or records.element_spec[key].dtype == tf.string
  if settings.image_decoder == "pil" and encoded:
    by_id = settings.decoded_cache_bytes > 0 and "example_id" in records.element_spec
    cache = DecodedImageCache(settings.decoded_cache_bytes) if by_id else None

    def decode(batch):
      decoded = preprocess.tf_preprocess(
          batch.pop(key), size, settings.max_image_pixels, from_path=from_path,
          example_ids=batch["example_id"] if by_id else None, cache=cache)
      return {**batch, _DECODED: decoded}

    return records.padded_batch(batch_size, drop_remainder=drop_remainder).map(
        decode, num_parallel_calls=num_parallel_calls, deterministic=True)

  def load(image_or_path):
    encoded = tf.io.read_file(image_or_path) if from_path else image_or_path
    if encoded.dtype == tf.string:  # the 'tf' decoder
      return preprocess.tf_fast_preprocess(encoded, size, settings.max_image_pixels)
    preprocess_image = tf.autograph.experimental.do_not_convert(
        lambda pixels: preprocess.preprocess_image(pixels, size))
    image = tf.numpy_function(preprocess_image, [encoded], tf.float32, stateful=False)
    image.set_shape([size, size, 3])
    return image, tf.constant(True)

  def guarded_load(record):
    # Errors raised by ops (missing file, odd formats, numpy exceptions) end the inner
    # dataset; the fallback element then says ok=False.
    attempt = tf.data.Dataset.from_tensors(record.pop(key)).map(load).ignore_errors()
    fallback = tf.data.Dataset.from_tensors((tf.zeros([size, size, 3]), tf.constant(False)))
    return {**record, _DECODED: attempt.concatenate(fallback).take(1).get_single_element()}

  return records.map(guarded_load, num_parallel_calls=num_parallel_calls,
                     deterministic=True).padded_batch(batch_size, drop_remainder=drop_remainder)


def decode_batches(records, settings: DecodeSettings, *, batch_size: int, num_parallel_calls: int,
                   drop_remainder: bool = False):
  """records -> batches of `batch_size` examples, in record order:
  {image float32 [b,S,S,3], ok bool [b], position int64 [b], caption string [b] | label int32
  [b] and template_index int32 [b]} (evaluation: also `captions`, ragged [b, (n)], every
  non-empty caption of the record).

  With settings.num_views (train only) examples also carry example_id, view and augmentation
  int32 [b, 4]; with settings.all_views instead image [b,K,S,S,3] and augmentation [b,K,4],
  every view of the example. Never raises for a bad image: `ok` is False instead (and the
  image zeros); also False for a record whose captions are all empty or whitespace. Each
  batch costs a handful of tf.data calls, not a handful per example; per-example random
  draws (crops, flips, views, caption and template picks: functions of the record's
  position, or of (seed, example id, view)) run in one tf.map_fn, only when some are drawn.
  Raises ValueError for records that data.num_views cannot use.
  """
  tf = import_tf()
  views = settings.num_views if settings.train else None
  augment = dict(image_size=settings.image_size, crop_min_scale=settings.crop_min_scale,
                 flip=settings.flip)
  apply = dict(crop=settings.crop_min_scale < 1.0, flip=settings.flip)
  spec = records.element_spec
  if views is not None:
    ids = {"example_id", "epoch"} <= set(spec) or (settings.all_views and "example_id" in spec)
    if not ids:
      raise ValueError("data.num_views needs records with fixed example ids (a manifest, or "
                       "TFRecords with data.num_train_examples set).")
    if spec.get("caption") is None:
      raise ValueError("data.num_views caches one teacher text embedding per example, so each "
                       "example needs exactly one caption (not a class label); unset "
                       "data.num_views for this data.")
  several = "caption" in spec and spec["caption"].shape.rank == 1
  pick_caption = settings.train and views is None and several
  pick_template = settings.train and "label" in spec and settings.num_templates > 1
  augmented = settings.train and views is None and (apply["crop"] or apply["flip"])
  # What `draws` draws per example: int32 of these shapes.
  drawn_shapes = {}
  if views is not None or augmented:
    drawn_shapes["augmentation"] = [views, 4] if settings.all_views else [4]
  if views is not None and not settings.all_views:
    drawn_shapes["view"] = []
  if pick_caption:
    drawn_shapes["pick"] = []
  if pick_template:
    drawn_shapes["template_index"] = []

  def draws(row):
    """The random draws of one example (row: its position, example_id, epoch, count)."""
    seed = tf.stack([tf.constant(settings.seed, tf.int64),
                     row["position"] * settings.process_count + settings.process_index])
    crop_seed, flip_seed, text_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    out = {}
    if views is not None and settings.all_views:
      out["augmentation"] = tf.stack([
          augment_lib.view_augmentation(settings.seed, row["example_id"], v, **augment)
          for v in range(views)])
    elif views is not None:
      out["view"] = augment_lib.pick_view(settings.seed, row["epoch"], row["example_id"], views)
      out["augmentation"] = augment_lib.view_augmentation(settings.seed, row["example_id"],
                                                          out["view"], **augment)
    elif augmented:
      out["augmentation"] = augment_lib.augmentation_params(crop_seed, flip_seed, **augment)
    if pick_caption:  # several captions: one drawn per use, i.e. per epoch (resumes draw the same)
      out["pick"] = tf.random.stateless_uniform([], text_seed, 0, tf.maximum(row["count"], 1),
                                                tf.int32)
    if pick_template:
      out["template_index"] = tf.random.stateless_uniform([], text_seed, 0,
                                                          settings.num_templates, tf.int32)
    return out

  def examples(batch):
    image, ok = batch.pop(_DECODED)
    example = {"image": image, "ok": ok, "position": batch["position"]}
    n = tf.shape(ok)[0]
    row = {k: batch[k] for k in ("position", "example_id", "epoch") if k in batch}
    if "caption" in batch:
      captions = batch["caption"] if several else batch["caption"][:, None]
      valid = tf.logical_not(tf.strings.regex_full_match(captions, _BLANK))
      row["count"] = tf.reduce_sum(tf.cast(valid, tf.int32), axis=1)
    drawn = {}
    if drawn_shapes:
      drawn = tf.map_fn(draws, row, fn_output_signature={
          k: tf.TensorSpec(shape, tf.int32) for k, shape in drawn_shapes.items()})
    if "augmentation" in drawn:
      params = drawn["augmentation"]

      def one(args):
        pixels, box = args
        if settings.all_views:
          return tf.stack([augment_lib.apply_augmentation(pixels, box[v], **apply)
                           for v in range(views)])
        return augment_lib.apply_augmentation(pixels, box, **apply)

      example["image"] = tf.map_fn(one, (image, params), fn_output_signature=tf.float32)
    if views is not None:
      example["example_id"] = batch["example_id"]
      example["augmentation"] = params
      if not settings.all_views:
        example["view"] = drawn["view"]
    if "caption" in batch:
      count = row["count"]
      # With fixed views one teacher text embedding serves each example: a record with
      # several captions cannot be served, so it is dropped and counted like an unreadable
      # one. An image without a caption is not an example either.
      example["ok"] = ok & ((count == 1) if views is not None else (count > 0))
      # The pick-th non-empty caption (training draws one; evaluation takes the first, and
      # keeps them all as `captions`: retrieval counts every one); "" when there is none.
      pick = drawn["pick"] if pick_caption else tf.zeros([n], tf.int32)
      rank = tf.cumsum(tf.cast(valid, tf.int32), axis=1) - 1
      chosen = tf.argmax(tf.cast(valid & (rank == pick[:, None]), tf.int32), axis=1,
                         output_type=tf.int32)
      example["caption"] = tf.where(count > 0, tf.gather(captions, chosen, batch_dims=1), "")
      if not settings.train:
        example["captions"] = tf.ragged.boolean_mask(captions, valid)
    if "label" in batch:
      example["label"] = tf.cast(batch["label"], tf.int32)
      example["template_index"] = (drawn["template_index"] if pick_template
                                   else tf.zeros([n], tf.int32))
    return example

  batches = _decoded_images(records, settings, batch_size, drop_remainder, num_parallel_calls)
  return batches.map(examples, num_parallel_calls=num_parallel_calls, deterministic=True)


# --- training batches -----------------------------------------------------------------------


def count_and_filter(batches, limits: CorruptLimits, counts: tuple[int, int] = (0, 0)):
  """Drops ok=False rows of decode_batches' batches; each kept row carries the cumulative
  num_read / num_skipped of the stream up to it. Rows come out in batches of varying size
  (rebatch them).

  `counts`: (num_read, num_skipped) of the run before this stream started (a resumed run
  continues its totals, and the limits apply to the whole run). Once the limits are exceeded
  rows pass with abort=True, so the host side sees it at once instead of a pipeline
  spinning over undecodable data forever.
  """
  tf = import_tf()
  start = (tf.constant(int(counts[0]), tf.int64), tf.constant(int(counts[1]), tf.int64),
           tf.constant(0, tf.int64))

  def count(state, batch):
    num_read, num_skipped, consecutive = state
    bad = tf.logical_not(batch["ok"])
    index = tf.range(1, tf.size(bad, out_type=tf.int64) + 1)  # 1-based, within the batch
    read = num_read + index
    skipped = num_skipped + tf.cumsum(tf.cast(bad, tf.int64))
    # Bad rows in a row up to each row: since the batch's last good row at or before it,
    # or, with none, the previous batches' run plus this batch's rows so far.
    goods = tf.cumsum(tf.cast(~bad, tf.int64))
    last_good = tf.gather(tf.concat([[0], tf.boolean_mask(index, ~bad)], 0), goods)
    run = tf.where(goods > 0, index - last_good, consecutive + index)
    over_fraction = (read >= limits.check_after) & (
        tf.cast(skipped, tf.float64) > limits.max_fraction * tf.cast(read, tf.float64))
    abort = over_fraction | (run >= limits.max_consecutive)
    keep = batch["ok"] | abort
    counted = {**batch, "num_read": read, "num_skipped": skipped, "abort": abort}
    kept = {k: tf.boolean_mask(v, keep) for k, v in counted.items() if k != "ok"}
    return (read[-1], skipped[-1], run[-1]), kept

  return batches.scan(start, count)


class TFTrainIterator:
  """Endless per-host training batches from a tf.data pipeline.

  Yields {image float32 [b,S,S,3], input_ids int32 [b,L], attention_mask int32 [b,L]}, plus
  with data.num_views example_id int64 [b], view int32 [b] and augmentation int32 [b, 4]
  (augment.AUGMENTATION_COLUMNS). `num_read` / `num_skipped` count the images this host has
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
  examples = decode_batches(records, settings, batch_size=batch_size,
                            num_parallel_calls=num_parallel_calls, drop_remainder=True)
  batches = count_and_filter(examples, limits, counts).rebatch(batch_size, drop_remainder=True)
  batches = batches.prefetch(prefetch if prefetch >= 0 else tf.data.AUTOTUNE)
  return batches.with_options(dataset_options(num_threads))


# --- evaluation batches ----------------------------------------------------------------------


def eval_chunks(records, settings: DecodeSettings, *, chunk_size: int,
                num_parallel_calls: int, num_threads: int | None):
  """Finite chunks of decoded examples, corrupt ones still in (ok=False) so the host side
  counts them exactly and drops them (eval_dataset.EvalDataset)."""
  # `captions` differ in number from record to record: ragged (numpy: object arrays).
  chunks = decode_batches(records, settings, batch_size=chunk_size,
                          num_parallel_calls=num_parallel_calls).prefetch(2)
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
    empty = decode_batches(records.take(0), settings, batch_size=b,
                           num_parallel_calls=num_parallel_calls)
    return empty.with_options(dataset_options(num_threads))
  last = -(-remaining // global_batch_size) - 1  # index of the last global batch
  real_in_last = min(max(remaining - last * global_batch_size - p * b, 0), b)
  mine = records.filter(
      lambda r: (r["example_id"] - start) % global_batch_size // b == p)
  padding = records.take(1).map(lambda r: {**r, "example_id": tf.constant(-1, tf.int64)})
  mine = mine.concatenate(padding.repeat(b - real_in_last))
  batches = decode_batches(mine, settings, batch_size=b, num_parallel_calls=num_parallel_calls,
                           drop_remainder=True).prefetch(1)
  return batches.with_options(dataset_options(num_threads))
