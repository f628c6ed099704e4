"""WebDataset tar shards as tf.data record streams (see tf_pipeline for the record format).

    data.source = 'webdataset'
    data.path   = '/data/cc3m/{00000..00331}.tar'     (or a glob, or comma-separated patterns)

The layout img2dataset writes by default, and DataComp, LAION and CC3M/CC12M releases use:
each shard a tar whose members come in samples, `KEY.EXT`, the members of one sample next
to each other. KEY is the member's path up to the first '.' of its file name, EXT the rest
(lower case), as in the webdataset library. A sample's
  * image: the member with extension data.image_key, default the first of IMAGE_EXTENSIONS
    ('jpg', 'jpeg', 'png', 'webp') present;
  * captions: data.caption_key None: KEY.txt, else the 'caption' field of KEY.json;
    data.caption_key = FIELD: that field of KEY.json. A field may hold a string or a list
    of strings (several captions: one is drawn per use, all count in retrieval).
A sample without an image member, or whose captions are missing or empty, is kept as a
record with no image or no caption, so the decoder drops and counts it like an unreadable
image; a member that cannot be read (a truncated or corrupt tar) ends its shard with a
warning and one such record, so every broken shard shows in data/num_skipped (a tar cut
exactly between two members reads as a shorter shard: tarfile cannot tell it from the end).

Shards: data.path is brace-expanded (the `braceexpand` package: the same `{a..b}` / `{x,y}`
syntax as the webdataset library and img2dataset's output names), then globbed, through
tf.io.gfile (local paths, gs://, anything TF reads). Shards are dealt to hosts like
TFRecord files (local._host_files): round-robin, or every host reading all of them and
keeping every process_count-th sample when there are fewer shards than hosts. Training
order: a seeded shard order per epoch, shards interleaved, a seeded shuffle buffer; a resume
at position p skips the first p samples this host consumed (reads, does not decode them),
exactly as the TFRecord source does, so the resumed stream equals the uninterrupted one.
With data.num_train_examples = N: the first N samples in sorted shard order, every epoch.
Tar members are read in Python (tarfile, streaming) inside tf.data.Dataset.from_generator:
TensorFlow has no tar reader, and a generator per shard keeps the rest of the pipeline the
one every other source uses.
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
from collections.abc import Iterator, Sequence

import numpy as np

from clipdistill_jax.data.local import _NEVER, _host_files, _host_seed
from clipdistill_jax.data.tf_pipeline import import_tf

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
DEFAULT_JSON_CAPTION = "caption"
_MEMBER = re.compile(r"^((?:.*/)?[^./]+)\.([^/]*)$")  # webdataset's KEY.EXT split

logger = logging.getLogger(__name__)


def list_shards(pattern: str) -> list[str]:
  """Sorted, distinct shard paths of comma-separated patterns, each brace-expanded and
  globbed (`/d/shard-{00000..00099}.tar`, `gs://b/*.tar`).

  Raises FileNotFoundError naming the first path or glob that matches nothing.
  """
  from braceexpand import braceexpand

  tf = import_tf()
  files, missing = set(), []
  for part in _split_top_level_commas(pattern):
    for path in braceexpand(part):
      found = tf.io.gfile.glob(path)
      if not found:
        missing.append(path)
      files.update(found)
  if missing:
    raise FileNotFoundError(
        f"{len(missing)} webdataset shard path(s) of {pattern!r} match no file (first: "
        f"{missing[0]!r}); set data.path to existing .tar shards, e.g. "
        "/data/cc3m/{00000..00331}.tar (braces) or /data/cc3m/*.tar.")
  return sorted(files)


def _split_top_level_commas(pattern: str) -> list[str]:
  """'a/{0..3}.tar,b/{x,y}.tar' -> ['a/{0..3}.tar', 'b/{x,y}.tar']: commas inside braces
  belong to the brace expression."""
  parts, depth, current = [], 0, ""
  for char in pattern:
    depth += (char == "{") - (char == "}")
    if char == "," and depth == 0:
      parts.append(current)
      current = ""
    else:
      current += char
  parts.append(current)
  return [p.strip() for p in parts if p.strip()]


def _captions(members: dict[str, bytes], caption_key: str | None) -> list[bytes]:
  if caption_key is None and "txt" in members:
    return [members["txt"]]
  if "json" not in members:
    return []
  try:
    value = json.loads(members["json"].decode("utf-8")).get(caption_key or DEFAULT_JSON_CAPTION)
  except (UnicodeDecodeError, ValueError, AttributeError):  # not JSON, or not an object
    return []
  if isinstance(value, str):
    value = [value]
  if not isinstance(value, list):
    return []
  return [c.encode("utf-8") for c in value if isinstance(c, str)]


def _sample(members: dict[str, bytes], image_key: str | None, caption_key: str | None
            ) -> dict[str, np.ndarray]:
  image_ext = image_key or next((e for e in IMAGE_EXTENSIONS if e in members), None)
  return {"image": np.asarray(members.get(image_ext, b""), dtype=object),
          "caption": np.asarray(_captions(members, caption_key), dtype=object).reshape(-1)}


def read_shard(path: str, image_key: str | None, caption_key: str | None
               ) -> Iterator[dict[str, np.ndarray]]:
  """The samples of one shard in member order: {image: bytes (b'' if none), caption: [bytes]}.

  A shard that cannot be opened or breaks off yields one empty sample (counted downstream as
  unreadable) and a warning, and ends.
  """
  tf = import_tf()
  path = path.decode() if isinstance(path, bytes) else str(path)
  key, members, count = None, {}, 0
  try:
    with tf.io.gfile.GFile(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
      for member in tar:
        match = _MEMBER.match(member.name)
        if not member.isfile() or match is None:
          continue
        if match.group(1) != key:
          if key is not None:
            count += 1
            yield _sample(members, image_key, caption_key)
          key, members = match.group(1), {}
        members[match.group(2).lower()] = tar.extractfile(member).read()
  except (tarfile.TarError, OSError, EOFError, tf.errors.OpError) as e:
    logger.warning("webdataset shard %s: unreadable after %d sample(s) (%s: %s); the rest of "
                   "the shard is skipped.", path, count, type(e).__name__, e)
    yield _sample({}, image_key, caption_key)
    return
  if key is not None:
    yield _sample(members, image_key, caption_key)


def _shard_dataset(image_key: str | None, caption_key: str | None):
  """path tensor -> dataset of one shard's samples {image: string, caption: string [n]}."""
  tf = import_tf()
  signature = {"image": tf.TensorSpec([], tf.string), "caption": tf.TensorSpec([None], tf.string)}

  def samples(path):
    return tf.data.Dataset.from_generator(
        lambda p: read_shard(p, image_key, caption_key), output_signature=signature,
        args=(path,))

  return samples


def _samples(files: Sequence[str], image_key: str | None, caption_key: str | None):
  """Every sample of `files`, in file order."""
  tf = import_tf()
  return tf.data.Dataset.from_tensor_slices(list(files)).flat_map(
      _shard_dataset(image_key, caption_key))


def webdataset_train_records(files: Sequence[str], *, image_key: str | None,
                             caption_key: str | None, seed: int, shuffle_buffer: int,
                             process_index: int, process_count: int, start_position: int,
                             num_parallel_calls: int, num_examples: int | None = None):
  """Endless records {position, image, caption [n]}: the TFRecord source's order and resume
  (local.tfrecord_train_records) over tar shards.

  num_examples: the first that many samples (sorted shards, member order) only, dealt
  round-robin to hosts, every epoch.
  """
  tf = import_tf()
  if num_examples is not None:
    subset = _samples(files, image_key, caption_key).take(num_examples).shard(
        process_count, process_index)
    records = tf.data.Dataset.range(_NEVER).flat_map(lambda epoch: subset)
  else:
    host_files, shard_records = _host_files(files, process_index, process_count)
    # The same shard order on every host: sample-level sharding needs it.
    file_order = tf.data.Dataset.from_tensor_slices(host_files).shuffle(
        len(host_files), seed=seed, reshuffle_each_iteration=True).repeat()
    records = file_order.interleave(
        _shard_dataset(image_key, caption_key), cycle_length=min(16, len(host_files)),
        block_length=1, num_parallel_calls=num_parallel_calls, deterministic=True)
    if shard_records:
      records = records.shard(process_count, process_index)
  if shuffle_buffer > 1:
    records = records.shuffle(shuffle_buffer, seed=_host_seed(seed, process_index))
  return records.enumerate().skip(start_position).map(
      lambda position, sample: {"position": position, **sample})


def webdataset_eval_records(files: Sequence[str], *, image_key: str | None,
                            caption_key: str | None, process_index: int, process_count: int):
  """This host's samples once, shards in sorted order, samples in member order."""
  host_files, shard_records = _host_files(files, process_index, process_count)
  records = _samples(host_files, image_key, caption_key)
  if shard_records:
    records = records.shard(process_count, process_index)
  return records.enumerate().map(lambda position, sample: {"position": position, **sample})
