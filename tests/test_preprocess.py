"""Image preprocessing vs transformers' PIL CLIPImageProcessor, the tf.data path, bad bytes."""

import io

import numpy as np
import PIL.Image
import pytest
from skimage import data as skdata

from clipdistill_jax.data import preprocess
from clipdistill_jax.data.preprocess import (
  OPENAI_MEAN,
  OPENAI_STD,
  CorruptImageError,
  decode_and_preprocess,
  decode_image,
  normalize_pixels,
  preprocess_image,
  preprocess_images,
  save_preprocessor_config,
  tf_preprocess,
)

TOLERANCE = 1e-5


def _photos() -> dict[str, PIL.Image.Image]:
  return {
    "astronaut": PIL.Image.fromarray(skdata.astronaut()),  # 512x512 RGB
    "chelsea": PIL.Image.fromarray(skdata.chelsea()),  # 300x451, landscape
    "coffee": PIL.Image.fromarray(skdata.coffee()),  # 400x600
    "camera": PIL.Image.fromarray(skdata.camera()),  # 512x512 grayscale ("L")
    "camera_portrait": PIL.Image.fromarray(skdata.camera()[:300, :137]),  # tall, grayscale
  }


def _hf_processor(image_size: int = 224):
  from transformers import CLIPImageProcessorPil

  return CLIPImageProcessorPil(
    size={"shortest_edge": image_size},
    crop_size={"height": image_size, "width": image_size},
    image_mean=list(OPENAI_MEAN),
    image_std=list(OPENAI_STD),
  )


def _hf_nhwc(processor, images) -> np.ndarray:
  pixel_values = processor(images=images, return_tensors="np")["pixel_values"]
  return np.moveaxis(pixel_values, 1, -1)


def _encode(image: PIL.Image.Image, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  image.save(buf, fmt, **kwargs)
  return buf.getvalue()


@pytest.fixture(scope="module")
def photos():
  return _photos()


# ---------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("name", list(_photos()))
def test_single_image_matches_transformers(photos, name):
  image = photos[name]
  ours = preprocess_image(image)
  ref = _hf_nhwc(_hf_processor(), [image])[0]
  assert ours.shape == (224, 224, 3) and ours.dtype == np.float32
  assert np.abs(ours - ref).max() <= TOLERANCE


@pytest.mark.parametrize("image_size", [224, 64, 16])
def test_batch_matches_transformers(photos, image_size):
  images = list(photos.values())
  ours = preprocess_images(images, image_size=image_size)
  ref = _hf_nhwc(_hf_processor(image_size), images)
  assert ours.shape == (len(images), image_size, image_size, 3)
  assert np.abs(ours - ref).max() <= TOLERANCE


def test_numpy_inputs_match_transformers(photos):
  chelsea = np.asarray(photos["chelsea"])
  ref = _hf_nhwc(_hf_processor(), [chelsea])[0]
  assert np.abs(preprocess_image(chelsea) - ref).max() <= TOLERANCE
  # Alpha is composited onto white, for arrays and for PIL images.
  alpha = np.tile(np.linspace(0, 255, chelsea.shape[1]).astype(np.uint8), (chelsea.shape[0], 1))
  rgba = np.dstack([chelsea, alpha])
  for image in (rgba, PIL.Image.fromarray(rgba, "RGBA")):
    ref = _hf_nhwc(_hf_processor(), [image])[0]
    assert np.abs(preprocess_image(image) - ref).max() <= TOLERANCE
  # transformers rejects bare 2-D arrays; we read them as grayscale, like a PIL "L" image.
  gray = np.asarray(photos["camera_portrait"])
  np.testing.assert_array_equal(preprocess_image(gray), preprocess_image(photos["camera_portrait"]))
  np.testing.assert_array_equal(preprocess_image(gray[..., None]), preprocess_image(gray))


def test_every_pixel_level_is_normalized_as_transformers_does():
  # normalize_pixels looks uint8 levels up in a table: every level of every channel, through
  # transformers' rescale and normalize (an image at the model's size: no resize, no crop).
  levels = np.arange(256, dtype=np.uint8)
  image = np.stack([np.roll(levels, 85 * c) for c in range(3)], axis=-1).reshape(16, 16, 3)
  ref = _hf_nhwc(_hf_processor(16), [image])[0]
  ours = normalize_pixels(image)
  assert ours.dtype == np.float32
  np.testing.assert_array_equal(ours, ref)  # bit for bit
  # Other dtypes are computed, with the same numbers.
  np.testing.assert_array_equal(normalize_pixels(image.astype(np.int64)), ours)
  # One channel broadcasts to three (each with its own mean and std), as computed; an empty
  # batch stays empty.
  gray = image[..., :1]
  np.testing.assert_array_equal(normalize_pixels(gray), normalize_pixels(np.repeat(gray, 3, -1)))
  assert normalize_pixels(np.zeros((0, 16, 16, 3), np.uint8)).shape == (0, 16, 16, 3)


def test_resized_shape_and_crop_offsets_follow_transformers():
  # int(224 * 451 / 300) = 336: truncated, not rounded.
  assert preprocess.resized_shape(300, 451, 224) == (224, 336)
  assert preprocess.resized_shape(451, 300, 224) == (336, 224)
  assert preprocess.resized_shape(7, 7, 224) == (224, 224)
  # An image a pixel off square crops at offset 0, as (h - s) // 2 says.
  image = PIL.Image.fromarray(skdata.astronaut()[:, :449])
  ref = _hf_nhwc(_hf_processor(), [image])[0]
  assert np.abs(preprocess_image(image) - ref).max() <= TOLERANCE


def test_rejects_arrays_it_cannot_read():
  with pytest.raises(ValueError, match="uint8"):
    preprocess_image(np.random.rand(32, 32, 3))
  with pytest.raises(ValueError, match="channels last"):
    preprocess_image(np.zeros((3, 32, 32), np.uint8))
  with pytest.raises(TypeError, match="PIL image"):
    preprocess_image("photo.jpg")
  for empty in (np.zeros((0, 5, 3), np.uint8), PIL.Image.new("RGB", (0, 4))):
    with pytest.raises(ValueError, match="no pixels"):
      preprocess_image(empty)
  assert preprocess_images([], image_size=16).shape == (0, 16, 16, 3)


def test_a_batch_at_the_model_size_is_normalized_exactly_like_one_image_at_a_time():
  batch = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
  one_by_one = np.stack([preprocess_image(image, 16) for image in batch])
  np.testing.assert_array_equal(preprocess_images(batch, 16), one_by_one)
  # Other sizes still go through the resize and crop.
  np.testing.assert_array_equal(preprocess_images(batch, 8),
                                np.stack([preprocess_image(image, 8) for image in batch]))


# ---------------------------------------------------------------- encoded bytes


def test_decode_and_preprocess_equals_in_memory_path(photos):
  png = _encode(photos["coffee"], "PNG")
  np.testing.assert_array_equal(decode_and_preprocess(png), preprocess_image(photos["coffee"]))
  jpeg = _encode(photos["chelsea"], "JPEG", quality=90)
  decoded = PIL.Image.open(io.BytesIO(jpeg))
  np.testing.assert_array_equal(decode_and_preprocess(jpeg, 32), preprocess_image(decoded, 32))


def test_decode_applies_exif_orientation(photos):
  exif = PIL.Image.Exif()
  exif[0x0112] = 6  # "rotate 90 CW to display"
  jpeg = _encode(photos["chelsea"], "JPEG", exif=exif)
  assert decode_image(jpeg).size == (300, 451)  # (width, height): portrait once upright


@pytest.mark.parametrize(
  "bad_bytes",
  [b"", b"definitely not an image", b"\xff\xd8\xff\xe0" + b"\x00" * 64],
  ids=["empty", "text", "jpeg_header_only"],
)
def test_corrupt_bytes_raise_a_clear_error(bad_bytes):
  with pytest.raises(CorruptImageError, match="Cannot decode image"):
    decode_and_preprocess(bad_bytes)


def test_decode_wants_bytes():
  with pytest.raises(TypeError, match="rb"):
    decode_and_preprocess("photo.jpg")


def test_truncated_jpeg_raises(photos):
  jpeg = _encode(photos["astronaut"], "JPEG")
  with pytest.raises(ValueError, match="truncated"):  # CorruptImageError is a ValueError
    decode_and_preprocess(jpeg[: len(jpeg) // 2])


# ---------------------------------------------------------------- tf.data


def test_tf_path_equals_numpy_path_and_flags_corrupt_images(photos):
  tf = pytest.importorskip("tensorflow")
  good = [_encode(photos["chelsea"], "JPEG"), _encode(photos["camera_portrait"], "PNG")]
  records = [good[0], b"garbage", good[1], good[0][:500]]
  dataset = tf.data.Dataset.from_tensor_slices(records).map(
    lambda encoded: tf_preprocess(encoded, 32), num_parallel_calls=2, deterministic=True
  )
  assert dataset.element_spec[0].shape == (32, 32, 3)
  results = list(dataset.as_numpy_iterator())
  np.testing.assert_array_equal([ok for _, ok in results], [True, False, True, False])
  np.testing.assert_array_equal(results[0][0], decode_and_preprocess(good[0], 32))
  np.testing.assert_array_equal(results[2][0], decode_and_preprocess(good[1], 32))
  assert not results[1][0].any() and not results[3][0].any()
  # What a pipeline does with the flag: keep the good ones, count the rest.
  num_corrupt = dataset.reduce(0, lambda n, x: n + tf.cast(tf.logical_not(x[1]), tf.int32))
  assert int(num_corrupt) == 2
  assert len(list(dataset.filter(lambda image, ok: ok))) == 2
  # Eager calls (a 0-d object array reaches numpy_function, not bytes) agree too.
  image, ok = tf_preprocess(tf.constant(good[0]), 32)
  assert bool(ok)
  np.testing.assert_array_equal(image.numpy(), results[0][0])


def test_tf_path_reads_files_itself_and_flags_the_unreadable(photos, tmp_path):
  tf = pytest.importorskip("tensorflow")
  good = tmp_path / "good.jpg"
  good.write_bytes(_encode(photos["chelsea"], "JPEG"))
  (tmp_path / "bad.jpg").write_bytes(b"garbage")
  paths = [str(good), str(tmp_path / "bad.jpg"), str(tmp_path / "missing.jpg"), str(tmp_path)]
  dataset = tf.data.Dataset.from_tensor_slices(paths).map(
    lambda path: tf_preprocess(path, 32, from_path=True))
  results = list(dataset.as_numpy_iterator())
  np.testing.assert_array_equal([ok for _, ok in results], [True, False, False, False])
  np.testing.assert_array_equal(results[0][0], decode_and_preprocess(good.read_bytes(), 32))


def test_a_batch_of_files_decodes_in_one_call_like_each_file_alone(photos, tmp_path):
  tf = pytest.importorskip("tensorflow")
  good = tmp_path / "good.jpg"
  good.write_bytes(_encode(photos["chelsea"], "JPEG"))
  png = tmp_path / "good.png"
  png.write_bytes(_encode(photos["camera_portrait"], "PNG"))
  (tmp_path / "bad.jpg").write_bytes(b"garbage")
  paths = [str(good), str(tmp_path / "bad.jpg"), str(png), str(tmp_path / "missing.jpg")]
  singles = [tf_preprocess(tf.constant(p), 32, from_path=True) for p in paths]
  images, ok = tf_preprocess(tf.constant(paths), 32, from_path=True)
  assert images.shape == (4, 32, 32, 3) and ok.shape == (4,)
  np.testing.assert_array_equal(ok.numpy(), [True, False, True, False])
  for row, (image, single_ok) in enumerate(singles):
    assert bool(single_ok) == bool(ok[row])
    np.testing.assert_array_equal(images[row].numpy(), image.numpy())
  # In a graph (tf.data), a batch of unknown size keeps its static image shape.
  batched = tf.data.Dataset.from_tensor_slices(paths).batch(3).map(
    lambda p: tf_preprocess(p, 32, from_path=True))
  assert batched.element_spec[0].shape.as_list() == [None, 32, 32, 3]
  rows = np.concatenate([image for image, _ in batched.as_numpy_iterator()])
  np.testing.assert_array_equal(rows, images.numpy())


# ---------------------------------------------------------------- HF preprocessor_config.json


def test_saved_config_loads_into_transformers(tmp_path, photos):
  from transformers import CLIPImageProcessorPil, CLIPProcessor

  from clipdistill_jax.data.tokenizer import load_tokenizer

  save_preprocessor_config(str(tmp_path), image_size=64)
  loaded = CLIPImageProcessorPil.from_pretrained(str(tmp_path))
  assert loaded.size == {"shortest_edge": 64} and loaded.crop_size == {"height": 64, "width": 64}
  assert tuple(loaded.image_mean) == OPENAI_MEAN and tuple(loaded.image_std) == OPENAI_STD
  images = [photos["coffee"], photos["camera"]]
  ours = preprocess_images(images, image_size=64)
  assert np.abs(_hf_nhwc(loaded, images) - ours).max() <= TOLERANCE

  tokenizer = load_tokenizer()
  tokenizer.save(str(tmp_path))
  processor = CLIPProcessor.from_pretrained(str(tmp_path))
  out = processor(
    text=["a photo of a cat"],
    images=images,
    padding="max_length",
    max_length=16,
    truncation=True,
    return_tensors="np",
  )
  np.testing.assert_array_equal(out["input_ids"], tokenizer(["a photo of a cat"], 16)[0])
  # With torchvision installed, CLIPProcessor picks the torchvision resize: not bit-comparable.
  if getattr(processor.image_processor, "backend", "pil") == "pil":
    assert np.abs(np.moveaxis(out["pixel_values"], 1, -1) - ours).max() <= TOLERANCE


# ---------------------------------------------------------------- bit depths


def _grey_levels(normalized: np.ndarray) -> np.ndarray:
  """Preprocessed pixels back to 0..255 grey levels (per channel)."""
  return (normalized * np.asarray(OPENAI_STD) + np.asarray(OPENAI_MEAN)) * 255


def _high_bit_depth_versions(photo8: np.ndarray) -> dict[str, bytes]:
  """One 8-bit grayscale photo stored at other bit depths, as scanners and tools write it."""
  rng = np.random.default_rng(0)
  # A real 16-bit capture of the same scene: each 8-bit level v spans [257 v, 257 v + 256].
  noise = rng.integers(0, 129, photo8.shape)
  photo16 = np.minimum(photo8.astype(np.uint32) * 257 + noise, 65535).astype(np.uint16)
  big_endian = PIL.Image.frombytes("I;16B", photo16.shape[::-1], photo16.astype(">u2").tobytes())
  as_float = PIL.Image.fromarray((photo16 / 65535).astype(np.float32), "F")
  return {
    "png_I;16": _encode(PIL.Image.fromarray(photo16), "PNG"),
    "tiff_I;16": _encode(PIL.Image.fromarray(photo16), "TIFF"),
    "tiff_I;16B": _encode(big_endian, "TIFF"),
    "tiff_I_16bit_values": _encode(PIL.Image.fromarray(photo16.astype(np.int32)), "TIFF"),
    "tiff_I_24bit_values": _encode(
      PIL.Image.fromarray((photo16.astype(np.int32) * 256 + 255).astype(np.int32)), "TIFF"),
    "tiff_F_0_to_1": _encode(as_float, "TIFF"),
    "tiff_F_0_to_65535": _encode(PIL.Image.fromarray(photo16.astype(np.float32), "F"), "TIFF"),
  }


@pytest.fixture(scope="module")
def camera_bit_depths():
  photo8 = skdata.camera()[::4, ::4]  # 128 x 128, 8-bit grayscale
  return photo8, _high_bit_depth_versions(photo8)


def test_high_bit_depth_images_keep_their_content(camera_bit_depths):
  photo8, versions = camera_bit_depths
  reference = _grey_levels(decode_and_preprocess(_encode(PIL.Image.fromarray(photo8), "PNG"), 64))
  assert 100 < reference.mean() < 150  # a real photo, not a blank
  for name, encoded in versions.items():
    image = decode_image(encoded)
    assert image.mode in preprocess.HIGH_BIT_DEPTH_MODES, (name, image.mode)
    got = _grey_levels(decode_and_preprocess(encoded, 64))
    # Same photo: mean within 1 grey level, and pixel for pixel close (not just the mean).
    assert abs(got.mean() - reference.mean()) < 1, (name, got.mean(), reference.mean())
    assert np.abs(got - reference).max() < 3, name
  # PIL's own conversion clips 16-bit data: what the scaling avoids.
  clipped = np.asarray(decode_image(versions["png_I;16"]).convert("RGB"))
  assert clipped.mean() > 250
  # uint16 arrays are 16-bit images too.
  photo16 = np.asarray(decode_image(versions["png_I;16"]))
  np.testing.assert_array_equal(preprocess_image(photo16, 64),
                                preprocess_image(decode_image(versions["png_I;16"]), 64))


def test_rgb_conversion_of_every_mode():
  rgb = np.random.default_rng(1).integers(0, 256, (8, 8, 3), np.uint8)
  image = PIL.Image.fromarray(rgb)
  for mode in ("1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "LA", "PA", "RGBX",
               "RGBa", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"):
    converted = image.convert("LA").convert(mode) if mode == "La" else image.convert(mode)
    out = preprocess.to_rgb(converted)
    assert out.mode == "RGB" and out.size == (8, 8), mode
  # 8-bit modes convert as PIL (and transformers) do; "I" and "F" holding 8-bit values too.
  gray = image.convert("L")
  for mode in ("L", "I", "F", "I;16"):
    expected = np.asarray(gray.convert("RGB"), np.int32)
    got = np.asarray(preprocess.to_rgb(gray.convert(mode)), np.int32)
    # I;16 holding 0..255 is a very dark 16-bit image: v / 257 rounds to 0 or 1.
    bound = 1 if mode == "I;16" else 0
    if mode == "I;16":
      expected = np.round(expected / 257)
    assert np.abs(got - expected).max() <= bound, mode


def _png_header_only(width: int, height: int) -> bytes:
  """A PNG whose header claims width x height (its pixel data is not really there)."""
  import struct
  import zlib

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
      ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

  ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
          + chunk(b"IEND", b""))


def test_max_image_pixels_says_why_and_is_configurable(photos):
  huge = _png_header_only(10_000, 10_000)  # 100 MP: over PIL's default 89.5 MP
  with pytest.raises(preprocess.ImageTooLargeError, match="10000 x 10000 = 100,000,000 pixels"):
    decode_image(huge)
  with pytest.raises(preprocess.ImageTooLargeError, match="max_image_pixels"):
    decode_and_preprocess(_png_header_only(20_000, 20_000))  # over twice PIL's limit
  # A limit of our own, lower or None (no limit: the fake pixel data is what fails then).
  png = _encode(photos["coffee"], "PNG")  # 600 x 400
  with pytest.raises(preprocess.ImageTooLargeError, match="240,000 pixels"):
    decode_and_preprocess(png, 32, max_image_pixels=100_000)
  assert decode_and_preprocess(png, 32, max_image_pixels=240_000).shape == (32, 32, 3)
  for size in (10_000, 20_000):
    with pytest.raises(CorruptImageError, match="Cannot decode") as error:
      decode_image(_png_header_only(size, size), max_image_pixels=None)
    assert not isinstance(error.value, preprocess.ImageTooLargeError)
  with pytest.raises(ValueError, match="positive number of pixels"):
    decode_image(png, max_image_pixels=-1)
  assert decode_image(png, max_image_pixels=0).size == (600, 400)  # 0: no limit
