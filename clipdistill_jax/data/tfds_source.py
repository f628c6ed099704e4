"""TensorFlow Datasets by name and split, as tf.data record streams (see tf_pipeline).

Two kinds of dataset:
  * caption datasets: an image feature plus a caption feature (a string, or a sequence of
    strings such as coco_captions' "captions/text", of which one is drawn per use); without
    data.caption_key or data.label_key, the first Text feature in CAPTION_FEATURES;
  * label datasets: an image plus a ClassLabel, turned into captions by filling
    data.templates ("a photo of a {}.") with the class names.

Images are read as encoded bytes (tfds.decode.SkipDecoding) and decoded by the shared CLIP
preprocessing, so a corrupt image is counted and dropped like anywhere else.

Each host reads its own even share of the split (tfds.split_for_jax_process). Training
order: tfds' file shuffle with read_config.shuffle_seed, then a seeded shuffle buffer,
repeated; a resume skips the records already consumed (they are read, not decoded). Nothing
is ever downloaded: the dataset must already be prepared under data.data_dir.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from clipdistill_jax.data.tf_pipeline import dataset_options, import_tf

_WORDNET_ID = re.compile(r"^n\d{8}$")
# Caption features found without data.caption_key, first match wins (coco_captions':
# "captions/text", a sequence of strings).
CAPTION_FEATURES = ("caption", "captions/text", "text", "captions", "title")


def import_tfds():
  import_tf()  # configures TF (no GPUs) before tfds touches it
  import tensorflow_datasets as tfds

  return tfds


@dataclasses.dataclass(frozen=True)
class TfdsSource:
  """A prepared tfds dataset and how its features map onto records."""

  builder: Any
  image_key: str
  caption_key: str | None
  label_key: str | None
  class_names: list[str] | None

  @property
  def kind(self) -> str:
    return "caption" if self.caption_key else "label"


def open_tfds(name: str, *, data_dir: str | None, image_key: str | None,
              caption_key: str | None, label_key: str | None,
              class_names: Sequence[str] | None) -> TfdsSource:
  """Finds the builder and resolves the feature keys; raises with the fix if anything is off."""
  tfds = import_tfds()
  if not name:
    raise ValueError("data.source='tfds' needs data.name (e.g. 'cifar10', 'coco_captions').")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError as e:
    raise FileNotFoundError(
        f"tfds has no dataset {name!r} (data_dir={data_dir!r}). Check data.name, or point "
        "data.data_dir at the folder holding the prepared dataset.") from e
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"tfds dataset {name!r} is not prepared under {builder.data_dir!r}, and this pipeline "
        f"never downloads. Prepare it where there is network (`tfds build {name} "
        "--data_dir=...`), copy it over, and set data.data_dir.")
  features = builder.info.features
  image_key = image_key or "image"
  _feature(features, image_key, "image", name)
  if caption_key is None and label_key is None:
    caption_key = next((key for key in CAPTION_FEATURES if _has_text_feature(features, key)),
                       None)
  if caption_key is not None:
    _feature(features, caption_key, "caption", name)
  elif label_key is None:
    if "label" not in features:
      raise KeyError(f"tfds {name!r} has features {list(features)}: set data.caption_key (a "
                     "caption dataset) or data.label_key (a label dataset).")
    label_key = "label"
  names = None
  if label_key is not None:
    label_feature = _feature(features, label_key, "label", name)
    names = list(class_names) if class_names else list(getattr(label_feature, "names", []))
    if caption_key is None:
      _check_class_names(names, name, label_key)
  return TfdsSource(builder, image_key, caption_key, label_key, names)


def _feature(features, key: str, what: str, name: str):
  tfds = import_tfds()
  node = features
  for part in key.split("/"):
    if isinstance(node, tfds.features.Sequence):
      node = node.feature
    if part not in node:
      raise KeyError(f"tfds {name!r}: no {what} feature {key!r} (top-level features: "
                     f"{list(features)}). Set data.{what}_key.")
    node = node[part]
  return node


def _has_text_feature(features, key: str) -> bool:
  """Whether `key` names a Text feature (or a sequence of them)."""
  tfds = import_tfds()
  try:
    node = _feature(features, key, "caption", "")
  except KeyError:
    return False
  while isinstance(node, tfds.features.Sequence):
    node = node.feature
  return isinstance(node, tfds.features.Text)


def _check_class_names(names: Sequence[str], name: str, label_key: str) -> None:
  if not names:
    raise ValueError(f"tfds {name!r}: feature {label_key!r} has no class names; set "
                     "data.class_names to build captions from labels.")
  if all(_WORDNET_ID.match(n) for n in names):
    raise ValueError(f"tfds {name!r} names its classes by WordNet id ({names[0]}, ...), which "
                     "make meaningless captions; set data.class_names to readable names (for "
                     "ImageNet, the CLIP paper's 1000 class names).")


def _decoders(source: TfdsSource) -> dict:
  """SkipDecoding for the image feature, nested like the key: bytes reach our decoder."""
  tfds = import_tfds()
  decoders: Any = tfds.decode.SkipDecoding()
  for part in reversed(source.image_key.split("/")):
    decoders = {part: decoders}
  return decoders


def _get(example: dict, key: str):
  for part in key.split("/"):
    example = example[part]
  return example


def _to_record(source: TfdsSource, include_label: bool):
  def to_record(position, example):
    record = {"position": position, "image": _get(example, source.image_key)}
    if source.caption_key:
      record["caption"] = _get(example, source.caption_key)
    if source.label_key and (include_label or not source.caption_key):
      record["label"] = _get(example, source.label_key)
    return record

  return to_record


def host_split(source: TfdsSource, split: str, process_index: int, process_count: int):
  """This host's even share of `split`, and its size (None if tfds cannot tell)."""
  tfds = import_tfds()
  share = tfds.split_for_jax_process(split, process_index=process_index,
                                     process_count=process_count)
  try:
    size = int(source.builder.info.splits[share].num_examples)
  except (KeyError, ValueError, AssertionError):
    size = None
  return share, size


def tfds_train_records(source: TfdsSource, *, split: str, seed: int, shuffle_buffer: int,
                       process_index: int, process_count: int, start_position: int,
                       num_parallel_calls: int, num_threads: int | None,
                       num_examples: int | None = None):
  """Endless records of this host's share of `split` (of its first `num_examples` if set)."""
  tfds = import_tfds()
  if num_examples is not None:
    split = f"{split}[:{int(num_examples)}]"  # tfds' slicing API; hosts split the slice
  share, _ = host_split(source, split, process_index, process_count)
  read_config = tfds.ReadConfig(shuffle_seed=seed, skip_prefetch=True,
                                options=dataset_options(num_threads))
  ds = source.builder.as_dataset(split=share, shuffle_files=True, decoders=_decoders(source),
                                 read_config=read_config)
  if shuffle_buffer > 1:
    ds = ds.shuffle(shuffle_buffer, seed=(seed * 1_000_003 + process_index) % (2**31 - 1))
  ds = ds.repeat().enumerate().skip(start_position)
  return ds.map(_to_record(source, include_label=False), num_parallel_calls=num_parallel_calls,
                deterministic=True)


def tfds_eval_records(source: TfdsSource, *, split: str, process_index: int, process_count: int,
                      num_threads: int | None):
  """This host's share of `split` in stored order. Returns (dataset, size or None)."""
  tfds = import_tfds()
  share, size = host_split(source, split, process_index, process_count)
  read_config = tfds.ReadConfig(skip_prefetch=True, options=dataset_options(num_threads))
  ds = source.builder.as_dataset(split=share, shuffle_files=False, decoders=_decoders(source),
                                 read_config=read_config)
  return ds.enumerate().map(_to_record(source, include_label=True)), size
