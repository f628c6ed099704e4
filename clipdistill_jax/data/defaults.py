"""The data config: every data.* knob with its one default, and the checks a data config
passes before anything is read (unknown keys, bad values, data.num_views without fixed example
ids). pipeline.py's docstring says what the knobs do; its iterators resolve their config here.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any

import ml_collections

from clipdistill_jax.data import preprocess

SOURCES = ("synthetic", "tfds", "manifest", "tfrecord", "webdataset", "folder")
# Sources read from data.path (and data.eval_path for evaluation).
PATH_SOURCES = ("manifest", "tfrecord", "webdataset", "folder")

_DEFAULTS: dict[str, Any] = {
    "source": "synthetic",
    # tfds
    "name": None,  # e.g. 'cifar10', 'coco_captions'
    "split": "train",
    "eval_split": "test",
    "data_dir": None,  # where the prepared tfds data lives (nothing is ever downloaded)
    # local files
    # manifest (.jsonl/.csv/.tsv); TFRecord glob(s), comma-separated; webdataset .tar shards
    # (braces and globs: 'shard-{00000..00099}.tar'); folder: ROOT with one subfolder a class
    "path": None,
    "eval_path": None,
    # features / columns (None: the usual names, e.g. 'image'/'caption', img2dataset 'jpg'/'txt')
    "image_key": None,
    "caption_key": None,
    "label_key": None,
    # manifests (local.read_manifest): CSV/TSV quoting 'csv' | 'none' (None: 'none' for .tsv,
    # as CC3M's are unquoted; 'csv' for .csv); bad rows: an error naming the line, or skipped
    "manifest_quoting": None,
    "skip_bad_rows": False,
    "class_names": None,  # overrides the dataset's (needed for WordNet-id names)
    "templates": ("a photo of a {}.",),  # label -> caption; zero-shot prompts
    # order
    "seed": 0,
    "shuffle_buffer": 10_000,
    # augmentation (training only; off by default: a flip contradicts "on the left" captions)
    "crop_min_scale": 1.0,  # < 1: random square crop of at least this area fraction
    "flip": False,
    # None: a fresh crop/flip every read. K: K fixed augmented views per example, one per
    # epoch (module docstring); what a multi-view teacher cache stores (teacher_cache.py)
    "num_views": None,
    # unreadable images; larger ones are skipped too (PIL's decompression-bomb limit; None or
    # 0: no limit, 0 being what a command line can say)
    "max_image_pixels": preprocess.DEFAULT_MAX_IMAGE_PIXELS,
    # 'pil': decode and resize exactly as transformers' CLIPImageProcessor (PIL, run in
    # Python); 'tf': tf.image decode + antialiased bicubic resize, all in TF's C++ threads
    # (no GIL: faster where Python threads contend; up to 0.10 off in normalized units,
    # 0.002 on average; preprocess.tf_fast_preprocess, README's Performance section)
    "image_decoder": preprocess.DEFAULT_IMAGE_DECODER,
    # training on a finite set (manifest, class folder, TFRecords with num_train_examples) with
    # the 'pil' decoder: keep up to this many MiB of decoded images (uint8 S x S x 3, 147 KiB
    # each at 224 px) in memory, so that later epochs skip decoding them; same pixels, bit
    # for bit. 0: decode every read.
    "decoded_cache_mb": 1024,
    "max_corrupt_fraction": 0.5,
    "corrupt_check_after": 200,
    "max_consecutive_corrupt": 1000,
    # how much training data: None = all of it (synthetic: an endless stream); N = only the
    # first N examples (synthetic: of the stream; manifest: rows; tfrecord: records in sorted
    # file order; tfds: split[:N]), read epoch after epoch in a fresh seeded order
    "num_train_examples": None,
    # synthetic
    "num_eval_examples": 1024,
    # tf.data performance
    "num_parallel_calls": -1,  # tf.data.AUTOTUNE
    "prefetch": 2,
    "num_threads": None,  # tf.data threads per host (None: TF's default)
}


# Types of the knobs that default to None, so that the command line can set them
# (`--config.data.path=...`): ml_collections refuses to override a plain None.
_OPTIONAL_TYPES = {"name": str, "data_dir": str, "path": str, "eval_path": str,
                   "image_key": str, "caption_key": str, "label_key": str,
                   "manifest_quoting": str,
                   "class_names": tuple, "num_threads": int, "num_train_examples": int,
                   "num_views": int}


def default_data_config() -> ml_collections.ConfigDict:
  """Every data knob with its default; configs override what they need."""
  placeholder = ml_collections.config_dict.placeholder
  return ml_collections.ConfigDict({
      k: placeholder(_OPTIONAL_TYPES[k]) if v is None and k in _OPTIONAL_TYPES else v
      for k, v in _DEFAULTS.items()})


def resolve_data_config(data_config: Mapping[str, Any] | ml_collections.ConfigDict | None,
                        ) -> types.SimpleNamespace:
  """Defaults filled in and checked; unknown keys (typos) are an error."""
  given = {} if data_config is None else (
      data_config.to_dict() if isinstance(data_config, ml_collections.ConfigDict)
      else dict(data_config))
  unknown = sorted(set(given) - set(_DEFAULTS))
  if unknown:
    raise KeyError(f"Unknown data config keys {unknown}; known: {sorted(_DEFAULTS)}.")
  cfg = types.SimpleNamespace(**{**_DEFAULTS, **given})
  if cfg.source not in SOURCES:
    raise ValueError(f"data.source={cfg.source!r}; choose one of {SOURCES}.")
  if isinstance(cfg.templates, str):
    cfg.templates = (cfg.templates,)
  cfg.templates = tuple(cfg.templates)
  for template in cfg.templates:
    if "{}" not in template:
      raise ValueError(f"data.templates entry {template!r} has no '{{}}' for the class name.")
  if not cfg.templates:
    raise ValueError("data.templates is empty; give at least one, e.g. 'a photo of a {}.'.")
  if not 0.0 < cfg.crop_min_scale <= 1.0:
    raise ValueError(f"data.crop_min_scale={cfg.crop_min_scale} must be in (0, 1].")
  if cfg.num_train_examples is not None and cfg.num_train_examples < 1:
    raise ValueError(f"data.num_train_examples={cfg.num_train_examples} must be >= 1 (or None "
                     "for all of the data).")
  if cfg.manifest_quoting not in (None, "none", "csv"):
    raise ValueError(f"data.manifest_quoting={cfg.manifest_quoting!r}; choose 'none' "
                     "(unquoted, as CC3M's TSVs), 'csv' (pandas / Python csv quoting) or None "
                     "('none' for .tsv, 'csv' for .csv).")
  preprocess.check_max_image_pixels(cfg.max_image_pixels, "data.max_image_pixels")
  if cfg.image_decoder not in preprocess.IMAGE_DECODERS:
    raise ValueError(f"data.image_decoder={cfg.image_decoder!r}; choose 'pil' (exact "
                     "CLIPImageProcessor numbers) or 'tf' (faster, tf.image).")
  if (isinstance(cfg.decoded_cache_mb, bool) or not isinstance(cfg.decoded_cache_mb, int)
      or cfg.decoded_cache_mb < 0):
    raise ValueError(f"data.decoded_cache_mb={cfg.decoded_cache_mb!r} must be a whole number of "
                     "MiB >= 0 (0: decode every image at every read).")
  if cfg.num_views is not None and cfg.num_views < 1:
    raise ValueError(f"data.num_views={cfg.num_views} must be >= 1 (or None for a fresh "
                     "augmentation every read).")
  if cfg.source in PATH_SOURCES and not cfg.path:
    raise ValueError(f"data.source={cfg.source!r} needs data.path.")
  return cfg


def check_views(cfg) -> None:
  """data.num_views needs a finite training set whose examples have fixed ids: a manifest, or
  TFRecords with data.num_train_examples. Raises ValueError naming the fix otherwise."""
  if cfg.num_views is None:
    return
  fix = None
  if cfg.source == "synthetic":
    fix = ("the synthetic source has no augmentation to fix; unset data.num_views")
  elif cfg.source == "tfds":
    fix = ("tfds streams carry no fixed example ids; write the split to TFRecords (with "
           "data.num_train_examples) or a manifest, or unset data.num_views")
  elif cfg.source == "webdataset":
    fix = ("webdataset shards are not supported by the views writer yet; convert them to "
           "TFRecords or a manifest, or unset data.num_views")
  elif cfg.source == "folder":
    fix = ("class folders are captioned by templates, not one fixed caption per example; "
           "unset data.num_views")
  elif cfg.source == "tfrecord" and cfg.num_train_examples is None:
    fix = ("an unbounded TFRecord stream has no fixed example ids; set "
           "data.num_train_examples (e.g. to the number of records)")
  if fix:
    raise ValueError(f"data.num_views={cfg.num_views} needs a finite training set with fixed "
                     f"example ids (source={cfg.source!r}): {fix}.")
