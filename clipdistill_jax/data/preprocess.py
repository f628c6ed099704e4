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

Bit depths. 8-bit modes convert to RGB exactly as transformers does. PIL's own conversion of
high-bit-depth modes clips at 255 (a 16-bit scan comes out almost white), so those are first
scaled to 8 bits by their range (to_rgb): 16-bit modes (I;16, I;16L, I;16B, I;16N; uint16
arrays) divide by 257; 32-bit integers (I) are read as 8-bit when every value is <= 255, as
16-bit when <= 65535, else by the bit depth their largest value needs; floats (F) in [0, 1]
multiply by 255, larger ones follow the integer rule. Negative values and NaN become 0.

Size. Decoding refuses images over `max_image_pixels` (default PIL's decompression-bomb limit,
DEFAULT_MAX_IMAGE_PIXELS; None or 0: no limit) with ImageTooLargeError, before any pixel is decoded.
"""

from __future__ import annotations

import io
import json
import logging
import numbers
import os
import threading
import warnings
from collections.abc import Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps

from clipdistill_jax.data.caches import DecodedImageCache

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_IMAGE_SIZE = 224
RESCALE_FACTOR = 1 / 255
# PIL.Image.MAX_IMAGE_PIXELS as PIL ships it: 1024 * 1024 * 1024 // 4 // 3.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# data.image_decoder: 'pil' (this module's exact path) or 'tf' (tf_fast_preprocess).
IMAGE_DECODERS = ("pil", "tf")
DEFAULT_IMAGE_DECODER = "pil"

ImageLike = PIL.Image.Image | np.ndarray

logger = logging.getLogger(__name__)


class CorruptImageError(ValueError):
  """Bytes that PIL cannot decode into an image."""


class ImageTooLargeError(CorruptImageError):
  """An image with more pixels than the decoder is allowed (max_image_pixels)."""


# Modes whose samples do not fit in 8 bits; PIL's convert("RGB") clips them at 255.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
HIGH_BIT_DEPTH_MODES = (*SIXTEEN_BIT_MODES, "I", "F")


def _scale_to_8bit(values: np.ndarray, float_data: bool) -> np.ndarray:
  """uint8 of integer-valued or float samples, scaled by their range (module docstring)."""
  values = np.nan_to_num(np.asarray(values, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
  values = np.maximum(values, 0.0)
  peak = float(values.max()) if values.size else 0.0
  if float_data and peak <= 1.0:
    full_scale = 1.0
  elif peak <= 255:
    full_scale = 255.0
  elif peak <= 65535:
    full_scale = 65535.0
  else:
    full_scale = float(2 ** int(np.ceil(peak)).bit_length() - 1)
  return np.clip(np.round(values * (255.0 / full_scale)), 0, 255).astype(np.uint8)


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
  """Any PIL image as an 8-bit 'RGB' image: the one conversion every decode path uses.

  8-bit modes follow transformers.image_transforms.convert_to_rgb exactly (alpha, or a
  palette's transparency, composited onto white). High-bit-depth modes (I;16*, I, F) are
  scaled to 8 bits by their range first (module docstring) instead of being clipped.
  """
  if image.mode in HIGH_BIT_DEPTH_MODES:
    if image.mode in SIXTEEN_BIT_MODES:
      pixels = (np.asarray(image).astype(np.float64) / 257).round().astype(np.uint8)
    else:
      pixels = _scale_to_8bit(np.asarray(image), float_data=image.mode == "F")
    return PIL.Image.fromarray(pixels, "L").convert("RGB")
  if image.mode in ("La", "RGBa"):  # premultiplied alpha: un-premultiply first
    image = image.convert("LA" if image.mode == "La" else "RGBA")
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(white, rgba).convert("RGB")
  return image.convert("RGB")


def _rgb_pixels(image: ImageLike) -> np.ndarray:
  """uint8 [H, W, 3], following transformers.image_transforms.convert_to_rgb exactly for
  8-bit data (to_rgb; uint16 arrays are scaled like 16-bit images)."""
  if isinstance(image, PIL.Image.Image):
    return np.asarray(to_rgb(image))

  if not isinstance(image, np.ndarray):
    raise TypeError(f"Expected a PIL image or a numpy array, got {type(image).__name__}.")
  pixels = image[..., None] if image.ndim == 2 else image
  if pixels.ndim != 3 or pixels.shape[-1] not in (1, 3, 4):
    raise ValueError(
      f"Image array of shape {image.shape}: expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] "
      "(channels last). Transpose channels-first arrays with np.moveaxis(x, 0, -1)."
    )
  if pixels.dtype == np.uint16:
    pixels = (pixels.astype(np.float64) / 257).round().astype(np.uint8)
  if pixels.dtype != np.uint8:
    is_byte_range = np.issubdtype(pixels.dtype, np.integer) and (
      pixels.size == 0 or (pixels.min() >= 0 and pixels.max() <= 255)
    )
    if not is_byte_range:
      raise ValueError(
        f"Image array of dtype {pixels.dtype}: pass uint8 pixels in [0, 255] "
        "or uint16 (for floats in [0, 1]: (x * 255).round().astype(np.uint8))."
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


def clip_pixels(image: ImageLike, image_size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
  """One image (PIL, or uint8 [H, W(, C)] array) -> uint8 [S, S, 3]: RGB, the short side
  resized to S with PIL bicubic, center-cropped (CLIPImageProcessor's steps before rescaling).
  Raises ValueError for an image without pixels."""
  # PIL images are resized as they are (RGB); arrays go through PIL (the same pixels).
  rgb = to_rgb(image) if isinstance(image, PIL.Image.Image) else PIL.Image.fromarray(
    _rgb_pixels(image))
  width, height = rgb.size
  if height == 0 or width == 0:
    raise ValueError(f"Image has no pixels (shape {(height, width, 3)}).")
  new_height, new_width = resized_shape(height, width, image_size)
  resized = rgb.resize((new_width, new_height), resample=PIL.Image.Resampling.BICUBIC)
  resized = np.asarray(resized)
  top, left = (new_height - image_size) // 2, (new_width - image_size) // 2
  return resized[top : top + image_size, left : left + image_size]


def _normalize(pixels: np.ndarray) -> np.ndarray:
  scaled = (pixels.astype(np.float64) * RESCALE_FACTOR).astype(np.float32)
  return (scaled - np.asarray(OPENAI_MEAN, np.float32)) / np.asarray(OPENAI_STD, np.float32)


# normalize_pixels' value of every uint8 level, one float32 [256] table per channel.
_NORMALIZED_LEVELS = tuple(np.ascontiguousarray(column) for column in _normalize(
    np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)).T)


def normalize_pixels(pixels: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32: x * (1/255) in float64, cast to float32, then (x - mean) / std
  in float32 (CLIPImageProcessor's rescale and normalize), element by element. The result
  depends only on the level and the channel, so uint8 input is looked up in a table of
  those 768 values, a channel at a time (the same numbers; 28 ms against 67 ms computed per
  64 images at 224 px). Other dtypes, or a last axis other than 3, are computed."""
  if pixels.dtype != np.uint8 or pixels.shape[-1:] != (3,):
    return _normalize(pixels)
  out = np.empty(pixels.shape, np.float32)
  for channel, table in enumerate(_NORMALIZED_LEVELS):
    out[..., channel] = table[pixels[..., channel]]
  return out


def preprocess_image(image: ImageLike, image_size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
  """One image (PIL, or uint8 [H, W(, C)] array) -> normalized float32 [S, S, 3]."""
  return normalize_pixels(clip_pixels(image, image_size))


def preprocess_images(
  images: Sequence[ImageLike], image_size: int = DEFAULT_IMAGE_SIZE
) -> np.ndarray:
  """A batch of images -> float32 [N, S, S, 3].

  A uint8 array [N, S, S, 3] already at the model's size (the synthetic set renders at it) is
  normalized in one vectorized pass: PIL's resize to the same size is the identity and the
  crop takes every pixel, so the values are those of `preprocess_image`, bit for bit.
  """
  if len(images) == 0:
    return np.zeros((0, image_size, image_size, 3), np.float32)
  if (isinstance(images, np.ndarray) and images.dtype == np.uint8
      and images.shape[1:] == (image_size, image_size, 3)):
    return normalize_pixels(images)
  return np.stack([preprocess_image(image, image_size) for image in images])


_PIL_LIMIT_LOCK = threading.Lock()


def _allow_in_pil(max_pixels: int | None) -> None:
  """Lifts PIL's process-wide bomb guard when a caller allows more than it does.

  PIL checks PIL.Image.MAX_IMAGE_PIXELS in Image.open, for every caller in the process; our
  limit is per call. So a larger limit (or None) switches PIL's off once, and decode_image
  applies the caller's own limit before decoding any pixel.
  """
  with _PIL_LIMIT_LOCK:
    current = PIL.Image.MAX_IMAGE_PIXELS
    if current is not None and (max_pixels is None or max_pixels > current):
      PIL.Image.MAX_IMAGE_PIXELS = None


def check_max_image_pixels(max_pixels: int | None, what: str = "max_image_pixels") -> None:
  """ValueError unless max_pixels is a number of pixels, or None or 0 (no limit: 0 is how a
  command line, which cannot set None on an int knob, says it)."""
  if max_pixels is not None and (isinstance(max_pixels, bool)
                                 or not isinstance(max_pixels, numbers.Integral)
                                 or max_pixels < 0):
    raise ValueError(f"{what}={max_pixels!r}: give a positive number of pixels, or None (or 0) "
                     f"for no limit (default {DEFAULT_MAX_IMAGE_PIXELS}, PIL's).")


def decode_image(encoded: bytes, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
                 ) -> PIL.Image.Image:
  """Fully decodes image bytes (EXIF orientation applied).

  Raises CorruptImageError if PIL cannot decode them, ImageTooLargeError (a subclass) if the
  image has more than `max_image_pixels` pixels (None or 0: no limit), checked from the header
  before any pixel is decoded.
  """
  if not isinstance(encoded, bytes | bytearray | memoryview):
    raise TypeError(
      f"Expected encoded image bytes, got {type(encoded).__name__}; for a file, pass "
      "open(path, 'rb').read()."
    )
  check_max_image_pixels(max_image_pixels)
  max_image_pixels = max_image_pixels or None
  _allow_in_pil(max_image_pixels)
  head = bytes(encoded[:8])
  try:
    with warnings.catch_warnings():
      # Our own limit below decides; PIL's warning between its limit and twice it is noise.
      warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
      image = PIL.Image.open(io.BytesIO(encoded))
    width, height = image.size
    if max_image_pixels is not None and width * height > max_image_pixels:
      raise ImageTooLargeError(
        f"Image of {width} x {height} = {width * height:,} pixels is over the limit of "
        f"{max_image_pixels:,} pixels (max_image_pixels; PIL's decompression-bomb guard). "
        "For files you trust, raise the limit or set it to None."
      )
    image.load()
  except ImageTooLargeError:
    raise
  except PIL.Image.DecompressionBombError as e:  # PIL's guard, still on: over twice its limit
    raise ImageTooLargeError(
      f"{e} (max_image_pixels={max_image_pixels}; for files you trust, raise it or set it to "
      "None)."
    ) from e
  except Exception as e:  # PIL raises OSError, SyntaxError, struct.error, ... on bad data
    raise CorruptImageError(
      f"Cannot decode image ({len(encoded)} bytes, starting {head!r}): "
      f"{type(e).__name__}: {e}. Re-encode or drop this file."
    ) from e
  try:
    return PIL.ImageOps.exif_transpose(image)
  except Exception:  # malformed EXIF: the pixels are fine, keep them as stored
    return image


def decode_and_preprocess(encoded: bytes, image_size: int = DEFAULT_IMAGE_SIZE,
                          max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
                          ) -> np.ndarray:
  """Encoded image bytes (JPEG, PNG, ...) -> normalized float32 [S, S, 3].

  Raises CorruptImageError / ImageTooLargeError as decode_image does.
  """
  return preprocess_image(decode_image(encoded, max_image_pixels), image_size)


class _NumpyDecoder:
  """tf_preprocess's Python side, run by tf.numpy_function on a batch (or one) of encoded
  images or paths, with their example ids when there is a cache. A module-level class, not a
  closure inside tf_preprocess: autograph converts the tf.data functions that call
  tf_preprocess and every function defined in them, and converted Python pays autograph's
  converted_call on each call it makes (about 60 us per cached image)."""

  def __init__(self, image_size: int, max_image_pixels: int | None, from_path: bool,
               cache: DecodedImageCache | None):
    self.image_size, self.max_image_pixels = image_size, max_image_pixels
    self.from_path, self.cache = from_path, cache

  def one(self, encoded) -> tuple[np.ndarray, bool]:
    import tensorflow as tf

    try:
      if self.from_path:
        with tf.io.gfile.GFile(encoded.decode(), "rb") as f:
          encoded = f.read()
      return clip_pixels(decode_image(encoded, self.max_image_pixels), self.image_size), True
    except (CorruptImageError, OSError, tf.errors.OpError) as e:
      if isinstance(e, ImageTooLargeError):
        _warn_too_large(e)
      return np.zeros((self.image_size, self.image_size, 3), np.uint8), False

  def cached(self, encoded, example_id) -> tuple[np.ndarray, bool]:
    pixels = self.cache.get(int(example_id))
    if pixels is not None:
      return pixels, True
    pixels, ok = self.one(encoded)
    if ok:
      self.cache.put(int(example_id), pixels)
    return pixels, ok

  def __call__(self, encoded, *example_ids) -> tuple[np.ndarray, np.ndarray]:
    # Graph mode hands a scalar over as `bytes`, eager mode as a 0-d object array; a batch
    # comes as a 1-d object array of `bytes`.
    scalar = not isinstance(encoded, np.ndarray) or encoded.ndim == 0
    encoded = np.reshape(np.asarray(encoded, dtype=object), [-1])
    size = self.image_size
    pixels = np.zeros((len(encoded), size, size, 3), np.uint8)
    ok = np.zeros(len(encoded), bool)
    ids = np.reshape(example_ids[0], [-1]) if example_ids else [None] * len(encoded)
    for row, (item, example_id) in enumerate(zip(encoded, ids, strict=True)):
      pixels[row], ok[row] = (self.one(item) if example_id is None
                              else self.cached(item, example_id))
    images = normalize_pixels(pixels)
    images[~ok] = 0  # undecodable images come out as zeros, not as the normalized black
    return (images[0], ok[0]) if scalar else (images, ok)


def tf_preprocess(encoded_bytes, image_size: int = DEFAULT_IMAGE_SIZE,
                  max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, *,
                  from_path: bool = False, example_ids=None,
                  cache: DecodedImageCache | None = None):
  """tf.data version: tf.string -> (float32 [S, S, 3], bool ok) for a scalar, or a batch of
  them, rank-1 [n] -> (float32 [n, S, S, 3], bool [n]), decoded in one Python call.

  A corrupt image gives ok=False and zeros, so a pipeline can count and filter it rather than
  die mid-epoch; an image over max_image_pixels too, with a logged warning saying so (the
  first few times), since raising the limit fixes it. Runs the numpy path through
  tf.numpy_function: same numbers as decode_and_preprocess (PIL releases the GIL while
  decoding and resizing). from_path: `encoded_bytes` holds file paths (local or any
  tf.io.gfile filesystem), read in the same call; a file that cannot be read is ok=False too.
  Never raises for the data, so a pipeline needs no per-element error guard. A batch costs
  one tf.numpy_function call (the GIL taken once, not n times): for small images that call's
  overhead is most of the work (tf_pipeline decodes a batch of records per call).
  With `cache` and `example_ids` (int64, the shape of encoded_bytes), images are looked up
  by example id first, and decoded ones kept there (DecodedImageCache).
  """
  import tensorflow as tf

  encoded_bytes = tf.convert_to_tensor(encoded_bytes)
  inputs = [encoded_bytes]
  if cache is not None and example_ids is not None:
    inputs.append(tf.convert_to_tensor(example_ids, tf.int64))
  image, ok = tf.numpy_function(
    _NumpyDecoder(image_size, max_image_pixels, from_path, cache),
    inputs,
    [tf.float32, tf.bool],
    stateful=False,
    name="clip_preprocess",
  )
  batch_shape = encoded_bytes.shape
  image.set_shape(batch_shape.concatenate([image_size, image_size, 3]))
  ok.set_shape(batch_shape)
  return image, ok


def tf_fast_preprocess(encoded_bytes, image_size: int = DEFAULT_IMAGE_SIZE,
                       max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
  """data.image_decoder='tf': scalar tf.string -> (float32 [S, S, 3], bool ok) in TF ops only.

  The same steps as tf_preprocess, in TensorFlow's C++ kernels instead of PIL under the GIL
  (so it scales with tf.data threads): tf.io.decode_jpeg (libjpeg-turbo, accurate integer
  DCT, as PIL) or decode_image for other formats, the short side resized to image_size with
  an antialiased bicubic (Keys a = -0.5, PIL's kernel) and rounded to 8 bits as PIL does,
  the same center crop, rescale and normalization. Not bit-exact: resampling arithmetic
  differs (PIL is fixed-point), so pixels move by a level or two out of 255; the largest
  difference from CLIPImageProcessor measured on the benchmark's JPEG photos is in README's
  Performance section. Also unlike the PIL path: EXIF orientation is not applied, an alpha
  channel is dropped (not composited onto white), and max_image_pixels is checked from the
  JPEG header, but only after decoding for other formats. Undecodable bytes raise inside
  the op; the pipeline (tf_pipeline.decode_batches) turns that into ok=False.
  """
  import tensorflow as tf

  limit = max_image_pixels or None
  is_jpeg = tf.io.is_jpeg(encoded_bytes)

  def decode():
    return tf.cond(
        is_jpeg,
        lambda: tf.io.decode_jpeg(encoded_bytes, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.ensure_shape(tf.io.decode_image(encoded_bytes, channels=3,
                                                   expand_animations=False), [None, None, 3]))

  def header_ok():
    if limit is None:
      return tf.constant(True)
    shape = tf.cond(is_jpeg, lambda: tf.image.extract_jpeg_shape(encoded_bytes),
                    lambda: tf.constant([0, 0, 3], tf.int32))
    return tf.cast(shape[0], tf.int64) * tf.cast(shape[1], tf.int64) <= limit

  def process():
    pixels = decode()
    shape = tf.shape(pixels, out_type=tf.int64)
    height, width = shape[0], shape[1]
    within = tf.constant(True) if limit is None else height * width <= limit
    short, long = tf.minimum(height, width), tf.maximum(height, width)
    size = tf.constant(image_size, tf.int64)
    new_long = (size * long) // short  # int(S * long / short), as resized_shape
    new_height = tf.where(width <= height, new_long, size)
    new_width = tf.where(width <= height, size, new_long)
    resized = tf.image.resize(tf.cast(pixels, tf.float32),
                              tf.cast(tf.stack([new_height, new_width]), tf.int32),
                              method="bicubic", antialias=True)
    resized = tf.clip_by_value(tf.round(resized), 0.0, 255.0)  # PIL returns 8-bit pixels
    top, left = (new_height - image_size) // 2, (new_width - image_size) // 2
    cropped = tf.slice(resized, tf.stack([top, left, tf.constant(0, tf.int64)]),
                       [image_size, image_size, 3])
    mean = tf.constant(OPENAI_MEAN, tf.float32)
    std = tf.constant(OPENAI_STD, tf.float32)
    image = (cropped * tf.constant(RESCALE_FACTOR, tf.float32) - mean) / std
    return tf.where(within, image, tf.zeros_like(image)), within

  image, ok = tf.cond(header_ok(), process,
                      lambda: (tf.zeros([image_size, image_size, 3]), tf.constant(False)))
  image = tf.ensure_shape(image, [image_size, image_size, 3])
  return image, ok


_TOO_LARGE_WARNINGS = [10]  # how many more "too large" warnings to log


def _warn_too_large(error: ImageTooLargeError) -> None:
  if _TOO_LARGE_WARNINGS[0] > 0:
    _TOO_LARGE_WARNINGS[0] -= 1
    logger.warning("Skipping an image: %s (data.max_image_pixels)", error)


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
