"""CLIP image preprocessing, numerically identical to transformers' PIL `CLIPImageProcessor`.

transformers 5 ships two CLIP image processors: `CLIPImageProcessorPil` (PIL resize, what
`CLIPImageProcessor` falls back to without torchvision) and a torchvision one (antialiased
tensor resize, a few 1e-2 off). We reproduce the PIL one step for step, in channels-last
float32 because the Flax model takes NHWC:

  RGB (alpha composited onto white) -> resize the short side to `image_size` with PIL bicubic,
  long side int(image_size * long / short) -> center crop at ((h - s) // 2, (w - s) // 2) ->
  x * (1/255) in float64, cast to float32 -> (x - mean) / std in float32.

Encoded bytes (files, TFRecords) are also EXIF-transposed first, as `transformers.image_utils.
load_image` does, so phone photos come out upright.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_IMAGE_SIZE = 224
RESCALE_FACTOR = 1 / 255

ImageLike = PIL.Image.Image | np.ndarray


class CorruptImageError(ValueError):
  """Bytes that PIL cannot decode into an image."""


def _rgb_pixels(image: ImageLike) -> np.ndarray:
  """uint8 [H, W, 3], following transformers.image_transforms.convert_to_rgb exactly."""
  if isinstance(image, PIL.Image.Image):
    if "A" in image.getbands() or image.info.get("transparency") is not None:
      rgba = image.convert("RGBA")
      white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
      return np.asarray(PIL.Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))

  if not isinstance(image, np.ndarray):
    raise TypeError(f"Expected a PIL image or a numpy array, got {type(image).__name__}.")
  pixels = image[..., None] if image.ndim == 2 else image
  if pixels.ndim != 3 or pixels.shape[-1] not in (1, 3, 4):
    raise ValueError(
      f"Image array of shape {image.shape}: expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] "
      "(channels last). Transpose channels-first arrays with np.moveaxis(x, 0, -1)."
    )
  if pixels.dtype != np.uint8:
    is_byte_range = np.issubdtype(pixels.dtype, np.integer) and (
      pixels.size == 0 or (pixels.min() >= 0 and pixels.max() <= 255)
    )
    if not is_byte_range:
      raise ValueError(
        f"Image array of dtype {pixels.dtype}: pass uint8 pixels in [0, 255] "
        "(for floats in [0, 1]: (x * 255).round().astype(np.uint8))."
      )
    pixels = pixels.astype(np.uint8)
  if pixels.shape[-1] == 1:
    return np.repeat(pixels, 3, axis=-1)
  if pixels.shape[-1] == 4:
    # transformers blends arrays in float and rounds (PIL's alpha_composite is integer math).
    alpha = pixels[..., 3:4] / 255
    return np.round(alpha * pixels[..., :3] + (1 - alpha) * 255).astype(np.uint8)
  return pixels


def resized_shape(height: int, width: int, image_size: int) -> tuple[int, int]:
  """(height, width) after matching the short side to image_size, as transformers computes it."""
  short, long = (width, height) if width <= height else (height, width)
  new_long = int(image_size * long / short)
  return (new_long, image_size) if width <= height else (image_size, new_long)


def preprocess_image(image: ImageLike, image_size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
  """One image (PIL, or uint8 [H, W(, C)] array) -> normalized float32 [S, S, 3]."""
  pixels = _rgb_pixels(image)
  height, width = pixels.shape[:2]
  if height == 0 or width == 0:
    raise ValueError(f"Image has no pixels (shape {pixels.shape}).")
  new_height, new_width = resized_shape(height, width, image_size)
  resized = PIL.Image.fromarray(pixels).resize(
    (new_width, new_height), resample=PIL.Image.Resampling.BICUBIC
  )
  resized = np.asarray(resized)
  top, left = (new_height - image_size) // 2, (new_width - image_size) // 2
  cropped = resized[top : top + image_size, left : left + image_size]
  scaled = (cropped.astype(np.float64) * RESCALE_FACTOR).astype(np.float32)
  mean = np.asarray(OPENAI_MEAN, np.float32)
  std = np.asarray(OPENAI_STD, np.float32)
  return (scaled - mean) / std


def preprocess_images(
  images: Sequence[ImageLike], image_size: int = DEFAULT_IMAGE_SIZE
) -> np.ndarray:
  """A batch of images -> float32 [N, S, S, 3]."""
  if len(images) == 0:
    return np.zeros((0, image_size, image_size, 3), np.float32)
  return np.stack([preprocess_image(image, image_size) for image in images])


def decode_image(encoded: bytes) -> PIL.Image.Image:
  """Fully decodes image bytes (EXIF orientation applied); CorruptImageError if it cannot."""
  if not isinstance(encoded, bytes | bytearray | memoryview):
    raise TypeError(
      f"Expected encoded image bytes, got {type(encoded).__name__}; for a file, pass "
      "open(path, 'rb').read()."
    )
  head = bytes(encoded[:8])
  try:
    with warnings.catch_warnings():
      # Treat huge "decompression bomb" images as errors, not warnings, in data pipelines.
      warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
      image = PIL.Image.open(io.BytesIO(encoded))
      image.load()
  except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, ... on bad data
    raise CorruptImageError(
      f"Cannot decode image ({len(encoded)} bytes, starting {head!r}): "
      f"{type(e).__name__}: {e}. Re-encode or drop this file."
    ) from e
  try:
    return PIL.ImageOps.exif_transpose(image)
  except Exception:  # malformed EXIF: the pixels are fine, keep them as stored
    return image


def decode_and_preprocess(encoded: bytes, image_size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
  """Encoded image bytes (JPEG, PNG, ...) -> normalized float32 [S, S, 3]."""
  return preprocess_image(decode_image(encoded), image_size)


def tf_preprocess(encoded_bytes, image_size: int = DEFAULT_IMAGE_SIZE):
  """tf.data version: scalar tf.string -> (float32 [S, S, 3], bool ok).

  A corrupt image gives ok=False and zeros, so a pipeline can count and filter it rather than
  die mid-epoch. Runs the numpy path through tf.numpy_function: same numbers as
  decode_and_preprocess (PIL releases the GIL while decoding and resizing).
  """
  import tensorflow as tf

  def _numpy_preprocess(encoded) -> tuple[np.ndarray, np.bool_]:
    # Graph mode hands us `bytes`; eager mode a 0-d object array, whose bytes() is its buffer.
    if isinstance(encoded, np.ndarray):
      encoded = encoded.item()
    try:
      return decode_and_preprocess(encoded, image_size), np.bool_(True)
    except CorruptImageError:
      return np.zeros((image_size, image_size, 3), np.float32), np.bool_(False)

  image, ok = tf.numpy_function(
    _numpy_preprocess,
    [encoded_bytes],
    [tf.float32, tf.bool],
    stateful=False,
    name="clip_preprocess",
  )
  image.set_shape([image_size, image_size, 3])
  ok.set_shape([])
  return image, ok


def preprocessor_config(image_size: int = DEFAULT_IMAGE_SIZE) -> dict:
  """The HF preprocessor_config.json contents describing this preprocessing."""
  return {
    "crop_size": {"height": image_size, "width": image_size},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": list(OPENAI_MEAN),
    "image_processor_type": "CLIPImageProcessor",
    "image_std": list(OPENAI_STD),
    "processor_class": "CLIPProcessor",
    "resample": int(PIL.Image.Resampling.BICUBIC),
    "rescale_factor": RESCALE_FACTOR,
    "size": {"shortest_edge": image_size},
  }


def save_preprocessor_config(out_dir: str, image_size: int = DEFAULT_IMAGE_SIZE) -> str:
  """Writes preprocessor_config.json (CLIPImageProcessor) into out_dir; returns its path."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "preprocessor_config.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(preprocessor_config(image_size), f, indent=2, sort_keys=True)
    f.write("\n")
  return path
