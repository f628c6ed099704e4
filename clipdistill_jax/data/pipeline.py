"""Input pipelines: one config picks the source, every source yields the same batches.

    data.source = 'synthetic' | 'tfds' | 'manifest' | 'tfrecord' | 'webdataset' | 'folder'
                  (defaults.py; webdataset_source.py, folder_source.py)

Training batches (make_train_iterator) are this host's slice of the global batch:
    image           float32 [b, S, S, 3]  NHWC, CLIP-normalized (OpenAI mean/std)
    input_ids       int32   [b, L]        CLIP BPE, padded/truncated to L = context_length
    attention_mask  int32   [b, L]
with b = global_batch_size // process_count; the trainer builds the global array with
jax.make_array_from_process_local_data. Teacher and student consume the SAME batch: one
tokenizer, one image transform (resize, crop, normalization, augmentation) for both. A
teacher that needs other inputs than the student cannot be distilled from this batch:
compat.check_compatible(teacher_config, student_config) says so before training starts.

Order and resume. The order is a pure function of data.seed, the host and the step:
  * synthetic: step s is global examples [s*B, (s+1)*B) of an endless stream, and host p
    takes its contiguous b of them, so hosts partition the global batch exactly and a
    resume at start_step computes its batches directly.
  * manifest, folder: rows (folder: images) are dealt round-robin to hosts; each host reads
    a seeded permutation of its rows per epoch, and a resume jumps to (epoch, offset)
    without reading anything.
  * tfrecord, webdataset, tfds: files (tfds: even splits) per host, seeded file order and
    shuffle buffer; a resume skips the records this host consumed. They are read but not
    decoded: fast next to training, yet on a large dataset deep into a run it takes a
    noticeable while at startup.
Every source numbers the records of a host's stream 0, 1, 2, ...; an iterator's `state()`
({position, num_read, num_skipped}: the next record's number and the run's counts) is what
a checkpoint stores per host, and `reader_state=` resumes there: the same batches as the
uninterrupted stream even when unreadable records were dropped before the resume (each
dropped record moves the position one further than step x batch), and counts that go on
from the run's totals. Without a reader state, start_step resumes at record start_step * b,
which is exact only when nothing was dropped before it.
With data.num_train_examples = N only the first N examples are trained on, epoch after
epoch (synthetic: a seeded permutation of stream examples 0..N-1 per epoch, computed
directly, so resume is still exact; manifest: its first N rows; tfrecord: the first N
records in sorted file order; tfds: split[:N]). The experiment's teacher stage ignores it:
the teacher reads everything, the students the subset.
Images that cannot be read or decoded are dropped and counted (`it.num_skipped`,
`it.metrics()`); batches stay full. Augmentation is seeded by each record's position, so it
resumes identically too.

Fixed augmented views (data.num_views = K; manifests, and TFRecords with
data.num_train_examples): example i has K augmentations, view v's crop box and flip a pure
function of (data.seed, i, v) (augment.view_augmentation), and in its e-th epoch it shows
view pick_view(data.seed, e, i, K), every view once per K epochs. Batches then also carry
    example_id      int64   [b]           manifest row / TFRecord index
    view            int32   [b]           in [0, K)
    augmentation    int32   [b, 4]        crop top, left, side (pixels of the S x S image), flip
which the teacher cache reads (teacher_cache.py) and without_example_fields drops before
the model. The same examples in the same order as without views; only the crops differ.
tf.data iterators are closed at interpreter exit (or by `it.close()`).

Evaluation (make_eval_dataset) reads a finite split once per iteration, unshuffled, keeps
the remainder, and carries the label where the data has one (plus class names for zero-shot).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from clipdistill_jax.data import preprocess
from clipdistill_jax.data.batches import CorruptLimits, EvalDataset, caption_fn
from clipdistill_jax.data.defaults import _DEFAULTS, PATH_SOURCES, check_views, resolve_data_config
from clipdistill_jax.data.synthetic import SyntheticCaptions


def _check_seed(cfg) -> None:
  if cfg.seed is None:  # a full config's data.seed None means config.seed: resolve it first
    raise ValueError("data.seed is None: clipdistill_jax.config_lib.resolve(config) sets it "
                     "to config.seed before the data is read.")


def _limits(cfg) -> CorruptLimits:
  return CorruptLimits(cfg.max_corrupt_fraction, cfg.corrupt_check_after,
                       cfg.max_consecutive_corrupt)


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")
  return int(process_index), int(process_count)


def without_example_fields(batch: Mapping[str, Any]) -> dict[str, Any]:
  """The batch without example_id / view / augmentation: what the model step takes."""
  from clipdistill_jax.data.tf_pipeline import EXAMPLE_FIELDS

  return {k: v for k, v in batch.items() if k not in EXAMPLE_FIELDS}


# --- synthetic ------------------------------------------------------------------------------


_SYNTHETIC_CACHE_BYTES = 2**30  # a fixed set of at most this many image bytes stays in memory


class SyntheticTrainIterator:
  """Endless synthetic batches; step s, host p: global examples s*B + p*b + [0, b)."""

  def __init__(self, synthetic: SyntheticCaptions, *, global_batch_size: int,
               process_index: int, process_count: int, start_step: int, tokenizer,
               context_length: int, num_examples: int | None = None, num_read: int = 0):
    self._synthetic = synthetic
    self._num_examples = num_examples
    self._epoch_order: tuple[int, np.ndarray] | None = None
    self._global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self._process_index = process_index
    self._tokenizer = tokenizer
    self._context_length = context_length
    self.step = start_step
    self.class_names = synthetic.class_names
    self.num_read = int(num_read)
    self.num_skipped = 0  # rendered images never fail
    # A fixed set is rendered and tokenized once, on first read, and then read from memory.
    self._cache = None
    size = synthetic.image_size
    if num_examples is not None and num_examples * size * size * 3 <= _SYNTHETIC_CACHE_BYTES:
      self._cache = dict(image=np.zeros((num_examples, size, size, 3), np.uint8),
                         input_ids=np.zeros((num_examples, context_length), np.int32),
                         attention_mask=np.zeros((num_examples, context_length), np.int32),
                         done=np.zeros(num_examples, bool))

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.batch_at(self.step)
    self.step += 1
    self.num_read += self.local_batch_size
    return batch

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    first = step * self._global_batch_size + self._process_index * self.local_batch_size
    indices = self.example_indices(range(first, first + self.local_batch_size))
    if self._cache is None:
      images, captions, _ = self._synthetic.examples(indices)
      input_ids, attention_mask = self._tokenizer(captions, self._context_length)
    else:
      cache, indices = self._cache, np.asarray(indices)
      todo = np.unique(indices[~cache["done"][indices]])
      if todo.size:
        images, captions, _ = self._synthetic.examples(todo)
        cache["input_ids"][todo], cache["attention_mask"][todo] = self._tokenizer(
            captions, self._context_length)
        cache["image"][todo], cache["done"][todo] = images, True
      images, input_ids, attention_mask = (
          cache[k][indices] for k in ("image", "input_ids", "attention_mask"))
    return {"image": preprocess.preprocess_images(images, self._synthetic.image_size),
            "input_ids": input_ids, "attention_mask": attention_mask}

  def example_indices(self, positions: range) -> list[int]:
    """Stream positions -> example indices. With num_examples = N, position p is example
    order_e[p % N] of epoch e = p // N, order_e a permutation of range(N) seeded by
    (data seed, e): every epoch reads the same N examples in a fresh order."""
    n = self._num_examples
    if n is None:
      return list(positions)
    out = []
    for p in positions:
      epoch, offset = divmod(p, n)
      if self._epoch_order is None or self._epoch_order[0] != epoch:
        rng = np.random.default_rng([self._synthetic.seed, epoch])
        self._epoch_order = (epoch, rng.permutation(n))
      out.append(int(self._epoch_order[1][offset]))
    return out

  def close(self) -> None:
    """Nothing to release (same interface as the tf.data iterators)."""

  def state(self) -> dict[str, int]:
    """{position, num_read, num_skipped}: as the tf.data iterators' (module docstring)."""
    return {"position": self.step * self.local_batch_size, "num_read": self.num_read,
            "num_skipped": 0}

  def metrics(self) -> dict[str, float]:
    return {"data/num_read": float(self.num_read), "data/num_skipped": 0.0,
            "data/skipped_fraction": 0.0}


def _synthetic_eval_chunks(synthetic: SyntheticCaptions, first: int, stop: int, chunk: int):
  def chunks():
    for start in range(first, stop, chunk):
      images, captions, labels = synthetic.examples(range(start, min(start + chunk, stop)))
      yield {"image": preprocess.preprocess_images(images, synthetic.image_size),
             "ok": np.ones(len(labels), bool), "caption": np.asarray(captions, dtype=object),
             "label": labels}

  return chunks


# --- entry points ---------------------------------------------------------------------------


def make_train_iterator(data_config, *, global_batch_size: int, image_size: int,
                        context_length: int, tokenizer, process_index: int | None = None,
                        process_count: int | None = None, start_step: int = 0,
                        reader_state: Mapping[str, int] | None = None):
  """An endless iterator of this host's training batches, starting at `start_step`, or
  exactly where `reader_state` (this host's `state()` when the run was saved) says.

  Returns an iterator of dicts {image, input_ids, attention_mask} (+ example_id, view,
  augmentation with data.num_views; module docstring) with `num_read`, `num_skipped`
  (unreadable images dropped on this host in the run), `state()` and `metrics()`.
  process_index / process_count default to jax's. Raises ValueError for a reader state
  that is not one of this host's (a negative position, or one the batch size cannot reach).
  """
  cfg = resolve_data_config(data_config)
  _check_seed(cfg)
  check_views(cfg)
  process_index, process_count = _processes(process_index, process_count)
  if global_batch_size < process_count or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"process_count={process_count}.")
  if start_step < 0:
    raise ValueError(f"start_step={start_step} must be >= 0.")
  local_batch_size = global_batch_size // process_count
  start_position, counts = start_step * local_batch_size, (0, 0)
  if reader_state is not None:
    start_position = int(reader_state["position"])
    counts = (int(reader_state.get("num_read", 0)), int(reader_state.get("num_skipped", 0)))
    if start_position < 0:
      raise ValueError(f"reader_state {dict(reader_state)}: the position must be >= 0.")

  if cfg.source == "synthetic":
    if cfg.crop_min_scale < 1.0 or cfg.flip:
      raise ValueError("Synthetic captions say where the shape is and how big it is; a crop or "
                       "flip would make them wrong. Set data.crop_min_scale=1.0, data.flip=False.")
    if start_position % local_batch_size:
      raise ValueError(f"reader_state {dict(reader_state or {})} is not at a step boundary "
                       f"of {local_batch_size} examples per host: it is not this run's.")
    return SyntheticTrainIterator(
        SyntheticCaptions(image_size, cfg.seed, "train"), global_batch_size=global_batch_size,
        process_index=process_index, process_count=process_count,
        start_step=start_position // local_batch_size, tokenizer=tokenizer,
        context_length=context_length, num_examples=cfg.num_train_examples,
        num_read=counts[0])

  from clipdistill_jax.data import tf_pipeline

  hosts = dict(process_index=process_index, process_count=process_count)
  class_names = cfg.class_names
  if cfg.source == "manifest":
    from clipdistill_jax.data import local, manifest

    rows = manifest.read_manifest(cfg.path, image_key=cfg.image_key, caption_key=cfg.caption_key,
                                  quoting=cfg.manifest_quoting,
                                  skip_bad_rows=cfg.skip_bad_rows)
    records = local.manifest_train_records(rows, seed=cfg.seed, start_position=start_position,
                                           num_examples=cfg.num_train_examples, **hosts)
    where = cfg.path
  elif cfg.source == "folder":
    from clipdistill_jax.data import folder_source, local

    rows, class_names = folder_source.class_folder_rows(cfg.path, cfg.class_names)
    records = local.manifest_train_records(rows, seed=cfg.seed, start_position=start_position,
                                           num_examples=cfg.num_train_examples, **hosts)
    where = cfg.path
  elif cfg.source == "tfrecord":
    from clipdistill_jax.data import local

    files = local.list_tfrecords(cfg.path)
    keys = local.tfrecord_features(files, image_key=cfg.image_key, caption_key=cfg.caption_key,
                                   label_key=None)
    records = local.tfrecord_train_records(
        files, keys, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
        start_position=start_position, num_parallel_calls=cfg.num_parallel_calls,
        num_examples=cfg.num_train_examples, **hosts)
    where = cfg.path
  elif cfg.source == "webdataset":
    from clipdistill_jax.data import webdataset_source

    records = webdataset_source.webdataset_train_records(
        webdataset_source.list_shards(cfg.path), image_key=cfg.image_key,
        caption_key=cfg.caption_key, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
        start_position=start_position, num_parallel_calls=cfg.num_parallel_calls,
        num_examples=cfg.num_train_examples, **hosts)
    where = cfg.path
  else:
    from clipdistill_jax.data import tfds_source

    source = _open_tfds(cfg)
    records = tfds_source.tfds_train_records(
        source, split=cfg.split, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
        start_position=start_position, num_parallel_calls=cfg.num_parallel_calls,
        num_threads=cfg.num_threads, num_examples=cfg.num_train_examples, **hosts)
    class_names = source.class_names
    where = f"tfds {cfg.name} {cfg.split}"

  settings = tf_pipeline.DecodeSettings(
      image_size=image_size, seed=cfg.seed, train=True, num_templates=len(cfg.templates),
      crop_min_scale=cfg.crop_min_scale, flip=cfg.flip, max_image_pixels=cfg.max_image_pixels,
      num_views=cfg.num_views, image_decoder=cfg.image_decoder,
      decoded_cache_bytes=cfg.decoded_cache_mb * 2**20, **hosts)
  batches = tf_pipeline.train_batches(
      records, settings, batch_size=local_batch_size, limits=_limits(cfg),
      num_parallel_calls=cfg.num_parallel_calls, prefetch=cfg.prefetch,
      num_threads=cfg.num_threads, counts=counts)
  return tf_pipeline.TFTrainIterator(
      batches, tokenizer=tokenizer, context_length=context_length,
      captions=caption_fn(class_names, cfg.templates), limits=_limits(cfg), where=where,
      local_batch_size=local_batch_size, class_names=class_names, position=start_position,
      counts=counts)


def make_views_iterator(data_config, *, global_batch_size: int, image_size: int,
                        context_length: int, tokenizer, process_index: int | None = None,
                        process_count: int | None = None, start_example: int = 0):
  """Every view of every training example once, for the teacher cache writer.

  Global batch g holds examples start_example + g*B + [0, B) in id order, each with all
  data.num_views views; this host gets its rows [p*b, (p+1)*b) (tf_pipeline.TFViewsIterator:
  image [b,K,S,S,3], augmentation [b,K,4], example_id (-1: padding), ok, input_ids,
  attention_mask); nothing from start_example >= the training set's size (`num_examples`
  on the iterator). The images and
  crops are the training pipeline's (same decode, augment.view_augmentation); unreadable
  images come with ok=False instead of being dropped. TFRecords have no random access: they
  are counted once, and every host reads (not decodes) all records from start_example.
  """
  cfg = resolve_data_config(data_config)
  _check_seed(cfg)
  process_index, process_count = _processes(process_index, process_count)
  if cfg.num_views is None:
    raise ValueError("make_views_iterator needs data.num_views.")
  check_views(cfg)
  if global_batch_size < process_count or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"process_count={process_count}.")
  from clipdistill_jax.data import local, manifest, tf_pipeline

  if cfg.source == "manifest":
    rows = manifest.read_manifest(cfg.path, image_key=cfg.image_key, caption_key=cfg.caption_key)
    records, total = local.manifest_example_records(rows, num_examples=cfg.num_train_examples,
                                                    start=start_example)
  else:
    files = local.list_tfrecords(cfg.path)
    keys = local.tfrecord_features(files, image_key=cfg.image_key, caption_key=cfg.caption_key,
                                   label_key=None)
    records, total = local.tfrecord_example_records(
        files, keys, num_examples=cfg.num_train_examples, start=start_example)
  if start_example < 0:
    raise ValueError(f"start_example={start_example} must be >= 0.")
  settings = tf_pipeline.DecodeSettings(
      image_size=image_size, seed=cfg.seed, train=True, num_templates=len(cfg.templates),
      crop_min_scale=cfg.crop_min_scale, flip=cfg.flip, num_views=cfg.num_views,
      all_views=True, image_decoder=cfg.image_decoder, process_index=process_index,
      process_count=process_count)
  batches = tf_pipeline.views_batches(
      records, settings, num_examples=total, start=start_example,
      global_batch_size=global_batch_size, num_parallel_calls=cfg.num_parallel_calls,
      num_threads=cfg.num_threads)
  return tf_pipeline.TFViewsIterator(
      batches, tokenizer=tokenizer, context_length=context_length,
      captions=caption_fn(cfg.class_names, cfg.templates), num_examples=total)


def make_eval_dataset(data_config, *, batch_size: int, image_size: int, context_length: int,
                      tokenizer, process_index: int | None = None,
                      process_count: int | None = None, split: str | None = None,
                      pad_remainder: bool = False) -> EvalDataset:
  """This host's share of a finite evaluation split (batches.EvalDataset).

  `split` overrides data.eval_split (tfds) or data.eval_path (manifest, tfrecord); the
  synthetic source uses its held-out test split of data.num_eval_examples examples.
  """
  cfg = resolve_data_config(data_config)
  process_index, process_count = _processes(process_index, process_count)
  hosts = dict(process_index=process_index, process_count=process_count)
  common = dict(batch_size=batch_size, tokenizer=tokenizer, context_length=context_length,
                templates=cfg.templates, pad_remainder=pad_remainder, limits=_limits(cfg))

  if cfg.source == "synthetic":
    # Evaluation neither shuffles nor augments; the synthetic test split only needs a fixed
    # seed (data.seed None = config.seed, unknown here: its own default).
    synthetic = SyntheticCaptions(image_size, _DEFAULTS["seed"] if cfg.seed is None
                                  else cfg.seed, "test")
    total = int(cfg.num_eval_examples)
    first = total * process_index // process_count
    stop = total * (process_index + 1) // process_count
    return EvalDataset(
        _synthetic_eval_chunks(synthetic, first, stop, batch_size),
        captions=caption_fn(synthetic.class_names, cfg.templates),
        class_names=synthetic.class_names, num_examples=stop - first,
        where="the synthetic test split", **common)

  from clipdistill_jax.data import tf_pipeline

  class_names = cfg.class_names
  if cfg.source in PATH_SOURCES:
    from clipdistill_jax.data import folder_source, local, manifest, webdataset_source

    path = split or cfg.eval_path
    if not path:
      raise ValueError(f"Evaluating data.source={cfg.source!r} needs data.eval_path (or split=).")
    if cfg.source == "folder":
      rows, class_names = folder_source.class_folder_rows(path, cfg.class_names)
      records, size = local.manifest_eval_records(rows, **hosts)
    elif cfg.source == "webdataset":
      records, size = webdataset_source.webdataset_eval_records(
          webdataset_source.list_shards(path), image_key=cfg.image_key,
          caption_key=cfg.caption_key, **hosts), None
    elif cfg.source == "manifest":
      rows = manifest.read_manifest(path, image_key=cfg.image_key, caption_key=cfg.caption_key,
                                    label_key=cfg.label_key, quoting=cfg.manifest_quoting,
                                    skip_bad_rows=cfg.skip_bad_rows)
      records, size = local.manifest_eval_records(rows, **hosts)
    else:
      files = local.list_tfrecords(path)
      keys = local.tfrecord_features(files, image_key=cfg.image_key,
                                     caption_key=cfg.caption_key, label_key=cfg.label_key)
      records, size = local.tfrecord_eval_records(files, keys, **hosts), None
    where = path
  else:
    from clipdistill_jax.data import tfds_source

    source = _open_tfds(cfg)
    split = split or cfg.eval_split
    records, size = tfds_source.tfds_eval_records(source, split=split,
                                                  num_threads=cfg.num_threads, **hosts)
    class_names = source.class_names
    where = f"tfds {cfg.name} {split}"

  settings = tf_pipeline.DecodeSettings(image_size=image_size, seed=cfg.seed or 0, train=False,
                                        max_image_pixels=cfg.max_image_pixels,
                                        image_decoder=cfg.image_decoder, **hosts)
  chunks = tf_pipeline.eval_chunks(records, settings, chunk_size=batch_size,
                                   num_parallel_calls=cfg.num_parallel_calls,
                                   num_threads=cfg.num_threads)
  return EvalDataset(lambda: tf_pipeline.NumpyIterator(chunks),
                     captions=caption_fn(class_names, cfg.templates), class_names=class_names,
                     num_examples=size, where=where, **common)


def _open_tfds(cfg):
  from clipdistill_jax.data import tfds_source

  return tfds_source.open_tfds(cfg.name, data_dir=cfg.data_dir, image_key=cfg.image_key,
                               caption_key=cfg.caption_key, label_key=cfg.label_key,
                               class_names=cfg.class_names)
