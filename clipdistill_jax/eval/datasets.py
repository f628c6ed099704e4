"""Labelled image sets for zero-shot evaluation: tfds datasets, local class folders, synthetic.

    load_zero_shot_dataset("cifar10", "test", image_size=224)
    load_zero_shot_dataset("imagenet2012", "validation", 224, data_dir="gs://bucket/tfds")
    load_zero_shot_dataset("folder:/data/pets", "test", 224)   # one subfolder per class
    load_zero_shot_dataset("synthetic", "test", 64, max_examples=512)   # offline demo set

Images come out preprocessed exactly as for training (clipdistill_jax.data.preprocess):
float32 NHWC, CLIP-normalized. Unreadable images are skipped and counted, not fatal.
This is a small evaluation-only reader; training input pipelines live in clipdistill_jax.data.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from clipdistill_jax.data.folder_source import list_class_folder
from clipdistill_jax.data.preprocess import (
    DEFAULT_MAX_IMAGE_PIXELS,
    CorruptImageError,
    decode_image,
    preprocess_image,
)
from clipdistill_jax.eval.prompts import get_templates, readable_class_names

logger = logging.getLogger(__name__)

FOLDER_PREFIX = "folder:"
SYNTHETIC_NAME = "synthetic"
# The synthetic set is endless; evaluate this many examples unless told otherwise.
DEFAULT_SYNTHETIC_EXAMPLES = 1024

Batch = tuple[np.ndarray, np.ndarray]  # (images float32 [b, S, S, 3], labels int32 [b])


@dataclasses.dataclass
class ZeroShotDataset:
  """A labelled image set. Iterate `batches(batch_size)`; each pass re-reads the source.

  num_skipped counts the unreadable images skipped by the latest completed pass.
  """
  name: str
  class_names: tuple[str, ...]
  templates: tuple[str, ...]   # the prompts CLIP's paper used for this dataset
  num_examples: int | None     # None when unknown before reading
  _read: Callable[[int, list[int]], Iterator[Batch]] = dataclasses.field(repr=False)
  num_skipped: int = 0
  # Set when eval.max_examples leaves out part of the set: which part, in words (the log and
  # the report's caption say it); None when every example is evaluated.
  subset: str | None = None

  def batches(self, batch_size: int) -> Iterator[Batch]:
    skipped = [0]
    yield from self._read(batch_size, skipped)
    self.num_skipped = skipped[0]


def load_zero_shot_dataset(name: str, split: str, image_size: int, data_dir: str | None = None,
                           max_examples: int | None = None,
                           max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
                           ) -> ZeroShotDataset:
  """A tfds dataset by name ('cifar10', 'cifar100', 'imagenet2012', 'imagenet_v2', ...),
  'folder:/path' (one subfolder per class; `split` is ignored: point at the split's folder)
  or 'synthetic' (clipdistill_jax.data.synthetic, split 'train'/'test').

  max_examples: evaluate only the first N examples (a fixed random subset for folders).
  max_image_pixels: larger images are skipped as unreadable (None: no limit).
  """
  if max_examples is not None and max_examples < 1:
    raise ValueError(f"max_examples={max_examples} must be >= 1 (or None for all).")
  if name.startswith(FOLDER_PREFIX):
    return _folder_dataset(name[len(FOLDER_PREFIX):], image_size, max_examples,
                           max_image_pixels)
  if name == SYNTHETIC_NAME:
    return _synthetic_dataset(split, image_size, max_examples)
  return _tfds_dataset(name, split, image_size, data_dir, max_examples,
                       max_image_pixels=max_image_pixels)


# --- local folders ------------------------------------------------------------------------


def _folder_dataset(root: str, image_size: int, max_examples: int | None,
                    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> ZeroShotDataset:
  root = os.path.expanduser(root)
  classes, files = list_class_folder(root)
  subset = None
  if max_examples is not None and max_examples < len(files):
    # A fixed random subset, so that every class is represented (not just the first ones).
    subset = (f"a fixed random subset of {max_examples:,} of the {len(files):,} images under "
              f"{root} (eval.max_examples={max_examples})")
    logger.warning("Zero-shot folder:%s: evaluating %s.", root, subset)
    keep = np.sort(np.random.default_rng(0).permutation(len(files))[:max_examples])
    files = [files[i] for i in keep]

  def read(batch_size: int, skipped: list[int]) -> Iterator[Batch]:
    first_error = None
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
      for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        decoded = list(pool.map(
            lambda item: _read_image(item[0], image_size, max_image_pixels), chunk))
        images, labels = [], []
        for (path, label), (image, error) in zip(chunk, decoded, strict=True):
          if image is None:
            skipped[0] += 1
            first_error = first_error or f"{path}: {error}"
            logger.debug("Skipping unreadable image %s: %s", path, error)
            continue
          images.append(image)
          labels.append(label)
        if images:
          yield np.stack(images), np.asarray(labels, np.int32)
    if skipped[0]:
      warnings.warn(f"Skipped {skipped[0]} unreadable image(s) of {len(files)} under {root} "
                    f"(first: {first_error}). Re-encode or delete them.", stacklevel=2)

  return ZeroShotDataset(
      name=f"{FOLDER_PREFIX}{root}", class_names=readable_class_names("folder", classes),
      templates=get_templates("folder"), num_examples=len(files), _read=read, subset=subset)


def _read_image(path: str, image_size: int, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
                ) -> tuple[np.ndarray | None, str | None]:
  try:
    with open(path, "rb") as f:
      return preprocess_image(decode_image(f.read(), max_image_pixels), image_size), None
  except (CorruptImageError, OSError, ValueError) as e:
    return None, f"{type(e).__name__}: {e}"


# --- synthetic --------------------------------------------------------------------------------


def _synthetic_dataset(split: str, image_size: int, max_examples: int | None
                       ) -> ZeroShotDataset:
  from clipdistill_jax.data.synthetic import SyntheticCaptions, zero_shot_templates

  source = SyntheticCaptions(image_size=image_size, split=split)
  total = max_examples or DEFAULT_SYNTHETIC_EXAMPLES

  def read(batch_size: int, skipped: list[int]) -> Iterator[Batch]:
    del skipped  # rendered, never unreadable
    for start in range(0, total, batch_size):
      images, _, labels = source.examples(range(start, min(total, start + batch_size)))
      yield (np.stack([preprocess_image(image, image_size) for image in images]),
             labels.astype(np.int32))

  return ZeroShotDataset(name=SYNTHETIC_NAME, class_names=tuple(source.class_names),
                         templates=zero_shot_templates(), num_examples=total, _read=read)


# --- tensorflow-datasets ------------------------------------------------------------------


def _tfds_dataset(name: str, split: str, image_size: int, data_dir: str | None,
                  max_examples: int | None, image_key: str = "image",
                  label_key: str = "label",
                  max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> ZeroShotDataset:
  import tensorflow as tf
  import tensorflow_datasets as tfds

  from clipdistill_jax.data.preprocess import tf_preprocess

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError and friends
    raise ValueError(f"{name!r} is neither a tfds dataset nor 'folder:PATH' / 'synthetic' "
                     f"({type(e).__name__}: {e}).") from e
  features = builder.info.features
  if image_key not in features or label_key not in features:
    raise ValueError(f"tfds {name} has features {sorted(features.keys())}; zero-shot needs "
                     f"'{image_key}' and '{label_key}'.")
  label_names = features[label_key].names
  num_examples = builder.info.splits[split].num_examples if split in builder.info.splits else None
  subset = None
  if max_examples is not None and num_examples and max_examples < num_examples:
    subset = (f"the first {max_examples:,} of the {num_examples:,} images of tfds "
              f"{name}/{split} (eval.max_examples={max_examples})")
    logger.warning("Zero-shot %s: evaluating %s.", name, subset)
    num_examples = max_examples

  def read(batch_size: int, skipped: list[int]) -> Iterator[Batch]:
    try:
      # Undecoded bytes -> the same PIL preprocessing as training (tf_preprocess).
      ds = builder.as_dataset(split=split, shuffle_files=False,
                              decoders={image_key: tfds.decode.SkipDecoding()})
    except AssertionError as e:  # tfds' "Dataset ... not found / not prepared"
      raise FileNotFoundError(
          f"tfds dataset {name} is not prepared under {builder.data_dir}: run "
          f"`tfds build {name} --data_dir=DIR` on a machine with network (ImageNet needs its "
          "tars in DIR/downloads/manual first) and pass data_dir=DIR.") from e
    if max_examples is not None:
      ds = ds.take(max_examples)
    ds = ds.map(lambda ex: (*tf_preprocess(ex[image_key], image_size, max_image_pixels),
                            ex[label_key]),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    for images, ok, labels in ds.batch(batch_size).prefetch(2).as_numpy_iterator():
      skipped[0] += int(np.sum(~ok))
      if ok.any():
        yield images[ok], labels[ok].astype(np.int32)
    if skipped[0]:
      warnings.warn(f"Skipped {skipped[0]} undecodable image(s) in tfds {name}/{split}.",
                    stacklevel=2)

  return ZeroShotDataset(name=name, class_names=readable_class_names(name, label_names),
                         templates=get_templates(name), num_examples=num_examples, _read=read,
                         subset=subset)
