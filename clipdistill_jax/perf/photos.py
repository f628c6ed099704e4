"""Benchmark data from real photos: JPEG files, a manifest and TFRecord shards of them.

The photos are the ones scikit-image ships (skimage.data: astronaut, coffee, chelsea, ...;
in the dev extra, nothing downloaded). Each file is a seeded random crop of one of them (at
least half its side, the file's aspect), resized to the file's size with PIL bicubic and
mirrored at random, so files differ and decode like real camera JPEGs (quality 90, 4:2:0):
a 500 x 375 one is about 60 KB, as COCO's are.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import PIL.Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
          "hubble_deep_field", "retina", "colorwheel")
CAPTIONS = ("a photo of {} on a sunny day", "a close-up picture of {}",
            "{} seen from the side, in a well lit room", "an old photograph showing {}",
            "a blurry snapshot of {} taken with a phone")


def load_photos() -> dict[str, np.ndarray]:
  """{name: uint8 [H, W, 3]} of the packaged photos (ImportError naming the fix)."""
  try:
    import skimage.data
  except ImportError as e:
    raise ImportError("The input benchmark draws its JPEGs from scikit-image's photos: "
                      "pip install -e '.[dev]' (or pip install scikit-image).") from e
  return {name: np.asarray(getattr(skimage.data, name)()) for name in PHOTOS}


def jpeg_bytes(photo: np.ndarray, size: tuple[int, int], rng: np.random.Generator,
               quality: int = 90) -> bytes:
  """One seeded crop of `photo` at `size` = (width, height), JPEG-encoded."""
  height, width = photo.shape[:2]
  aspect = size[0] / size[1]
  max_w = min(width, int(height * aspect))
  crop_w = int(rng.uniform(0.5, 1.0) * max_w)
  crop_h = max(1, int(crop_w / aspect))
  top = int(rng.integers(0, height - crop_h + 1))
  left = int(rng.integers(0, width - crop_w + 1))
  image = PIL.Image.fromarray(photo[top:top + crop_h, left:left + crop_w]).resize(
      size, PIL.Image.Resampling.BICUBIC)
  if rng.random() < 0.5:
    image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
  out = io.BytesIO()
  image.save(out, format="JPEG", quality=quality)
  return out.getvalue()


def write_photo_set(root: str | Path, num_images: int, size: tuple[int, int] = (500, 375),
                    seed: int = 0, num_shards: int = 2) -> dict[str, str]:
  """num_images JPEGs of `size` (width, height) in root/images, a manifest root/m.jsonl of
  them with captions, and the same examples as img2dataset-style TFRecord shards
  (features jpg, txt). Returns {'manifest': path, 'tfrecord': glob, 'mean_jpeg_bytes': ...}."""
  from clipdistill_jax.data.tf_pipeline import import_tf

  tf = import_tf()
  root = Path(root)
  (root / "images").mkdir(parents=True, exist_ok=True)
  photos = load_photos()
  names = list(photos)
  rng = np.random.default_rng(seed)
  rows, encoded = [], []
  for i in range(num_images):
    name = names[i % len(names)]
    data = jpeg_bytes(photos[name], size, rng)
    path = root / "images" / f"{i:05d}.jpg"
    path.write_bytes(data)
    caption = CAPTIONS[i % len(CAPTIONS)].format(name.replace("_", " "))
    rows.append({"image": str(path), "caption": caption})
    encoded.append((data, caption))
  manifest = root / "m.jsonl"
  manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
  (root / "shards").mkdir(exist_ok=True)
  for shard in range(num_shards):
    with tf.io.TFRecordWriter(str(root / "shards" / f"{shard:05d}.tfrecord")) as writer:
      for data, caption in encoded[shard::num_shards]:
        feature = {"jpg": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
                   "txt": tf.train.Feature(bytes_list=tf.train.BytesList(
                       value=[caption.encode()]))}
        writer.write(tf.train.Example(features=tf.train.Features(feature=feature))
                     .SerializeToString())
  return {"manifest": str(manifest), "tfrecord": str(root / "shards" / "*.tfrecord"),
          "mean_jpeg_bytes": float(np.mean([len(d) for d, _ in encoded]))}
