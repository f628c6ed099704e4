"""Local image-caption data as tf.data record streams (see tf_pipeline for the record format).

Two layouts:
  * a manifest: JSONL (one {"image": path, "caption": text} object a line) or CSV/TSV with a
    header row, its rows read by manifest.read_manifest (which has the rules).
  * TFRecord shards of tf.train.Example, as img2dataset's tfrecord output writes them:
    "jpg" (or "png"/"webp") encoded bytes, "txt" caption bytes, "key", metadata.

Per-host sharding is deterministic: a manifest's rows, or a glob's sorted files, are dealt
round-robin to the hosts (records round-robin when there are fewer files than hosts).

Training order: a manifest is read in a fresh permutation every epoch, a pure function of
(seed, host, epoch), so a resume jumps straight to (epoch, offset) without reading anything.
TFRecords are read in a seeded file order through a seeded shuffle buffer; a resume skips
the records already consumed (reading them, not decoding them).

Example ids: a manifest's training records, and TFRecords' when data.num_train_examples fixes
the set, carry example_id (the row's index in the manifest, or the record's index in sorted
file order, among the first num_train_examples) and epoch (how many times this host read it
before). *_example_records give the same examples once each, in id order (the teacher cache
writer).
"""

from __future__ import annotations

from collections.abc import Sequence

from clipdistill_jax.data.tf_pipeline import import_tf

TFRECORD_IMAGE_FEATURES = ("jpg", "jpeg", "png", "webp", "image", "image/encoded")
TFRECORD_CAPTION_FEATURES = ("txt", "caption", "text", "image/text")
_NEVER = 2**62  # "forever" for epoch counters
_CHUNK_ROWS = 4096  # manifest rows gathered at a time


# --- manifests ------------------------------------------------------------------------------


def _tensor_columns(rows: dict[str, list]) -> dict:
  """read_manifest's columns as tensors. Captions: one string a row when every row has one
  (a record's caption is then a scalar), else ragged [rows, (captions of the row)] (rank-1);
  none for label-only rows (class folders, folder_source.class_folder_rows)."""
  tf = import_tf()
  columns = {"image_path": tf.constant(rows["image_path"], tf.string)}
  captions = rows.get("caption")
  if captions is None:
    pass
  elif all(len(c) == 1 for c in captions):
    columns["caption"] = tf.constant([c[0] for c in captions], tf.string)
  else:
    columns["caption"] = tf.RaggedTensor.from_row_lengths(
        tf.constant([c for row in captions for c in row], tf.string),
        tf.constant([len(row) for row in captions], tf.int64))
  if "label" in rows:
    columns["label"] = tf.constant(rows["label"], tf.int64)
  return columns


def _gather_row(columns: dict, i) -> dict:
  """Row i (a scalar): image_path scalar, caption rank-1 (one or more), label scalar; rows i
  (rank-1 [n]): the same with a leading [n], captions ragged [n, (k)] when rows differ."""
  tf = import_tf()
  return {k: tf.gather(v, i) for k, v in columns.items()}


def manifest_train_records(rows: dict[str, list], *, seed: int, process_index: int,
                           process_count: int, start_position: int,
                           num_examples: int | None = None):
  """Endless records of this host's rows (read_manifest's), a new seeded permutation each
  epoch; a record's caption is the row's (a scalar), or rank-1, the row's captions, when some
  row of the manifest has several (_tensor_columns).

  `num_examples`: train on the manifest's first that many rows only (all hosts together).
  Records carry position, example_id (the row's index in the manifest) and epoch.
  """
  tf = import_tf()
  rows = {k: v[:num_examples] for k, v in rows.items()}
  host_rows = {k: v[process_index::process_count] for k, v in rows.items()}
  n = len(host_rows["image_path"])
  if n == 0:
    raise ValueError(f"The manifest has {len(rows['image_path'])} rows: too few for "
                     f"{process_count} hosts to get one each.")
  columns = _tensor_columns(host_rows)
  host_seed = _host_seed(seed, process_index)
  start_epoch, offset = divmod(start_position, n)

  def epoch_records(epoch):
    order = tf.random.experimental.stateless_shuffle(
        tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(host_seed, tf.int64), epoch]))

    def chunk(start):
      # The epoch's rows in slices of _CHUNK_ROWS, each gathered in one op: no per-record
      # function in the stream (that would cost more than decoding a cached image).
      i = order[start:start + _CHUNK_ROWS]
      return tf.data.Dataset.from_tensor_slices({
          "position": epoch * n + start + tf.range(tf.size(i, out_type=tf.int64)),
          # Host row i is manifest row i * process_count + process_index (round-robin deal).
          "example_id": i * process_count + process_index,
          "epoch": tf.fill(tf.shape(i), epoch),
          # Several captions: padded with "" (no caption) to the chunk's longest row.
          **{k: v.to_tensor("") if isinstance(v, tf.RaggedTensor) else v
             for k, v in _gather_row(columns, i).items()}})

    return tf.data.Dataset.range(0, n, _CHUNK_ROWS).flat_map(chunk)

  # Several captions: tf_pipeline.decode_batches draws one from (seed, position), i.e. per
  # epoch.
  return tf.data.Dataset.range(start_epoch, _NEVER).flat_map(epoch_records).skip(offset)


def manifest_example_records(rows: dict[str, list], *, num_examples: int | None, start: int):
  """Training rows (the first num_examples) once each from row `start`, in manifest order:
  records {position, example_id, image_path, caption}. Returns (dataset, number of rows)."""
  tf = import_tf()
  rows = {k: v[:num_examples] for k, v in rows.items() if k != "label"}
  total = len(rows["image_path"])
  columns = _tensor_columns(rows)
  ids = tf.data.Dataset.range(start, total)
  return ids.map(lambda i: {"position": i, "example_id": i, **_gather_row(columns, i)}), total


def manifest_eval_records(rows: dict[str, list], *, process_index: int, process_count: int):
  """This host's contiguous block of rows, in manifest order. Returns (dataset, size)."""
  tf = import_tf()
  n = len(rows["image_path"])
  lo, hi = n * process_index // process_count, n * (process_index + 1) // process_count
  columns = _tensor_columns({k: v[lo:hi] for k, v in rows.items()})
  ds = tf.data.Dataset.range(hi - lo)
  return ds.map(lambda position: {"position": position, **_gather_row(columns, position)}), hi - lo


# --- TFRecords ------------------------------------------------------------------------------


def list_tfrecords(pattern: str) -> list[str]:
  """Sorted files matching a glob (or comma-separated globs)."""
  tf = import_tf()
  files = sorted({f for p in pattern.split(",") if p.strip() for f in tf.io.gfile.glob(p.strip())})
  if not files:
    raise FileNotFoundError(f"No TFRecord files match {pattern!r}; set data.path to a glob such "
                            "as /data/cc3m/*.tfrecord (comma-separate several globs).")
  return files


def tfrecord_features(files: Sequence[str], *, image_key: str | None, caption_key: str | None,
                      label_key: str | None) -> tuple[str, str, str | None]:
  """(image_key, caption_key, label_key), defaults found in the first record's features."""
  tf = import_tf()
  first = next(iter(tf.data.TFRecordDataset(files[0]).take(1)), None)
  if first is None:
    raise ValueError(f"{files[0]} holds no records.")
  names = sorted(tf.train.Example.FromString(first.numpy()).features.feature)

  def pick(requested, candidates, what):
    if requested is not None:
      if requested not in names:
        raise KeyError(f"{files[0]}: no feature {requested!r}; features: {names}. "
                       f"Set data.{what}_key to one of them.")
      return requested
    found = [c for c in candidates if c in names]
    if not found:
      raise KeyError(f"{files[0]}: no {what} feature among {names} (looked for {candidates}); "
                     f"set data.{what}_key.")
    return found[0]

  image_key = pick(image_key, TFRECORD_IMAGE_FEATURES, "image")
  caption_key = pick(caption_key, TFRECORD_CAPTION_FEATURES, "caption")
  if label_key is not None:
    pick(label_key, (), "label")
  return image_key, caption_key, label_key


def _parser(image_key: str, caption_key: str, label_key: str | None):
  tf = import_tf()
  # A record without the image gets b"" and is then counted as corrupt, not fatal. Captions
  # are read as a list: a record may hold several (one is drawn per use) or none (dropped).
  spec = {image_key: tf.io.FixedLenFeature([], tf.string, default_value=b""),
          caption_key: tf.io.VarLenFeature(tf.string)}
  if label_key is not None:
    spec[label_key] = tf.io.FixedLenFeature([], tf.int64, default_value=-1)

  def parse(position, serialized):
    features = tf.io.parse_single_example(serialized, spec)
    record = {"position": position, "image": features[image_key],
              "caption": tf.sparse.to_dense(features[caption_key], default_value=b"")}
    if label_key is not None:
      record["label"] = features[label_key]
    return record

  return parse


def _host_files(files: Sequence[str], process_index: int, process_count: int):
  """(files this host reads, whether it must also take every process_count-th record)."""
  if len(files) >= process_count:
    return list(files[process_index::process_count]), False
  return list(files), True


def tfrecord_train_records(files: Sequence[str], keys: tuple[str, str, str | None], *, seed: int,
                           shuffle_buffer: int, process_index: int, process_count: int,
                           start_position: int, num_parallel_calls: int,
                           num_examples: int | None = None):
  """Endless records: seeded file order per epoch, interleaved, seeded shuffle buffer.

  `num_examples`: train on the first that many records (sorted files, file order) only;
  records then carry example_id (that index) and epoch.
  """
  tf = import_tf()
  host_files, shard_records = _host_files(files, process_index, process_count)
  parse = _parser(*keys)
  if num_examples is not None:
    # A fixed subset: the first records in sorted file order, dealt round-robin to hosts,
    # each tagged with its index and the pass over the subset it belongs to (the shuffle
    # buffer below mixes neighbouring epochs).
    subset = tf.data.TFRecordDataset(list(files)).take(num_examples).enumerate().shard(
        process_count, process_index)
    records = tf.data.Dataset.range(_NEVER).flat_map(
        lambda epoch: subset.map(lambda i, serialized: (i, epoch, serialized)))
    parse = _tagged(parse)
  else:
    # The same file order on every host: record-level sharding needs it.
    file_order = tf.data.Dataset.from_tensor_slices(host_files).shuffle(
        len(host_files), seed=seed, reshuffle_each_iteration=True).repeat()
    records = file_order.interleave(
        tf.data.TFRecordDataset, cycle_length=min(16, len(host_files)), block_length=1,
        num_parallel_calls=num_parallel_calls, deterministic=True)
    if shard_records:
      records = records.shard(process_count, process_index)
  if shuffle_buffer > 1:
    records = records.shuffle(shuffle_buffer, seed=_host_seed(seed, process_index))
  records = records.enumerate().skip(start_position)
  return records.map(parse, num_parallel_calls=num_parallel_calls, deterministic=True)


def _tagged(parse):
  """A parser of (position, (example_id, epoch, serialized)) elements."""
  def parse_tagged(position, tagged):
    example_id, epoch, serialized = tagged
    return {**parse(position, serialized), "example_id": example_id, "epoch": epoch}
  return parse_tagged


def tfrecord_example_records(files: Sequence[str], keys: tuple[str, str, str | None], *,
                             num_examples: int, start: int):
  """The first num_examples records (sorted files, file order) once each from index
  `start`: records {position, example_id, image, caption}. Returns (dataset, number of
  records), counting them (a read of the files) when the files hold fewer."""
  tf = import_tf()
  subset = tf.data.TFRecordDataset(list(files)).take(num_examples)
  total = int(subset.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1))
  parse = _parser(*keys)
  records = subset.enumerate().skip(start).map(
      lambda i, serialized: {**parse(i, serialized), "example_id": i})
  return records, total


def tfrecord_eval_records(files: Sequence[str], keys: tuple[str, str, str | None], *,
                          process_index: int, process_count: int):
  """This host's records, files in sorted order, records in file order."""
  tf = import_tf()
  host_files, shard_records = _host_files(files, process_index, process_count)
  records = tf.data.TFRecordDataset(host_files)
  if shard_records:
    records = records.shard(process_count, process_index)
  return records.enumerate().map(_parser(*keys))


def _host_seed(seed: int, process_index: int) -> int:
  return (int(seed) * 1_000_003 + int(process_index)) % (2**31 - 1)
