"""Images with captions for checking an export: real photos when available, else generated.

scikit-image ships a handful of real photographs (an astronaut, a cat, a cup of coffee, ...)
inside its wheel, so they exist offline; it is a dev extra, though, so without it we fall
back to generated pictures (coloured shapes) with matching captions and say so in `source`.
The numbers an export prints (parity diffs, int8 agreement) name the source they came from.

Only numpy and PIL here: the ONNX side and the CLI tests use the same samples.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import numpy as np
import PIL.Image

from clipdistill_jax.data.preprocess import preprocess_image

# (skimage.data loader, caption). Captions double as zero-shot class prompts.
_SKIMAGE_PHOTOS: list[tuple[str, str]] = [
    ("astronaut", "a photo of an astronaut"),
    ("chelsea", "a photo of a cat"),
    ("coffee", "a photo of a cup of coffee"),
    ("rocket", "a photo of a rocket on a launch pad"),
    ("camera", "a black and white photo of a man with a camera"),
    ("coins", "a photo of old coins"),
    ("hubble_deep_field", "a photo of galaxies in deep space"),
    ("immunohistochemistry", "a microscope image of stained tissue"),
    ("moon", "a photo of the surface of the moon"),
    ("page", "a scanned page of printed text"),
    ("clock", "a photo of a clock"),
    ("brick", "a photo of a brick wall"),
    ("grass", "a photo of grass"),
    ("gravel", "a photo of gravel"),
    ("retina", "a photo of a human retina"),
    ("colorwheel", "a colour wheel"),
    ("logo", "a logo"),
    ("stereo_motorcycle", "a photo of a motorcycle"),
    ("cell", "a microscope image of a cell"),
]

_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
            "yellow": (235, 215, 40)}
_SHAPES = ("circle", "square", "stripes")


@dataclasses.dataclass(frozen=True)
class CaptionedImages:
  """uint8 RGB(A) images of any size, one caption each, and where they came from."""
  images: list[np.ndarray]
  captions: list[str]
  source: str  # "scikit-image photos" or "generated shapes"

  def preprocessed(self, image_size: int) -> np.ndarray:
    """float32 [N, S, S, 3], CLIP-normalized (the Flax model's input)."""
    return np.stack([preprocess_image(image, image_size) for image in self.images])


@dataclasses.dataclass(frozen=True)
class ZeroShotSet:
  """Images labelled with one of `class_prompts`: what int8 top-1 agreement is measured on."""
  pixel_values: np.ndarray  # float32 [N, S, S, 3], CLIP-normalized
  labels: np.ndarray        # int [N], index into class_prompts
  class_prompts: list[str]  # prompts_per_class consecutive prompts per class
  source: str
  prompts_per_class: int = 1

  def class_embeddings(self, prompt_embeds: np.ndarray) -> np.ndarray:
    """[classes, D] from the embeddings [classes * prompts_per_class, D] of class_prompts:
    the normalized mean over each class's templates (CLIP's prompt ensembling)."""
    if self.prompts_per_class == 1:
      return prompt_embeds
    per_class = np.asarray(prompt_embeds, np.float32).reshape(
        -1, self.prompts_per_class, prompt_embeds.shape[-1])
    per_class = per_class / np.linalg.norm(per_class, axis=-1, keepdims=True)
    mean = per_class.mean(axis=1)
    return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def reference_photos() -> CaptionedImages:
  """The scikit-image photos with captions, or generated shapes if skimage is missing."""
  try:
    import skimage.data
  except ImportError:
    return generated_shapes()
  images, captions = [], []
  for name, caption in _SKIMAGE_PHOTOS:
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = getattr(skimage.data, name)()
    except Exception:  # a loader that needs a download (pooch) in this skimage version
      continue
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
      image = image[0]
    images.append(_as_uint8(image))
    captions.append(caption)
  if len(images) < 4:
    return generated_shapes()
  return CaptionedImages(images, captions, "scikit-image photos")


def generated_shapes(size: int = 128) -> CaptionedImages:
  """Coloured circles, squares and stripes on grey, with noise; deterministic."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:size, :size]
  centre = (size - 1) / 2
  masks: dict[str, Callable[[], np.ndarray]] = {
      "circle": lambda: (yy - centre) ** 2 + (xx - centre) ** 2 < (0.35 * size) ** 2,
      "square": lambda: (np.abs(yy - centre) < 0.3 * size) & (np.abs(xx - centre) < 0.3 * size),
      "stripes": lambda: (xx // max(size // 8, 1)) % 2 == 0,
  }
  images, captions = [], []
  for colour, rgb in _COLOURS.items():
    for shape in _SHAPES:
      image = np.full((size, size, 3), 128, np.float32)
      image[masks[shape]()] = rgb
      image += rng.normal(0, 8, image.shape)
      images.append(np.clip(image, 0, 255).astype(np.uint8))
      captions.append(f"a photo of a {colour} {shape}")
  return CaptionedImages(images, captions, "generated shapes")


def zero_shot_set(image_size: int, photos: CaptionedImages | None = None) -> ZeroShotSet:
  """Six views of each photo (whole, mirrored, four corner crops), labelled by its caption.

  Views multiply a small photo set into enough images (~100) for a top-1 agreement
  percentage to mean something, without any download.
  """
  photos = photos or reference_photos()
  views, labels = [], []
  for label, image in enumerate(photos.images):
    for view in _views(image):
      views.append(preprocess_image(view, image_size))
      labels.append(label)
  return ZeroShotSet(np.stack(views), np.asarray(labels), list(photos.captions),
                     f"{photos.source}, 6 views each")


def _views(image: np.ndarray) -> list[np.ndarray]:
  h, w = image.shape[:2]
  ch, cw = max(int(h * 0.7), 1), max(int(w * 0.7), 1)
  corners = [image[:ch, :cw], image[:ch, w - cw:], image[h - ch:, :cw], image[h - ch:, w - cw:]]
  return [image, image[:, ::-1].copy()] + [np.ascontiguousarray(c) for c in corners]


def _as_uint8(image: np.ndarray) -> np.ndarray:
  if image.dtype == bool:
    return image.astype(np.uint8) * 255
  if image.dtype != np.uint8:
    lo, hi = float(image.min()), float(image.max())
    image = (image - lo) / max(hi - lo, 1e-8) * 255
    return image.round().astype(np.uint8)
  return image


def to_pil(image: np.ndarray) -> PIL.Image.Image:
  """A uint8 [H, W(, C)] array as a PIL image (what transformers' processor takes)."""
  return PIL.Image.fromarray(image)


def run_eval_set(run_config: dict, image_size: int, max_examples: int | None = 1000,
                 split: str | None = None, max_templates: int | None = 8) -> ZeroShotSet:
  """The training run's own zero-shot set: eval.zero_shot[0] of its config.json ('synthetic',
  'folder:PATH' or a prepared tfds name), built by evaluate.load_zero_shot_dataset.

  max_examples: at most this many images (and at most the run's eval.max_examples);
  split: default the run's eval.zero_shot_split, else 'test'; max_templates: the first N of
  the run's prompt templates per class (eval.templates, else the dataset's), so an 80-template
  ImageNet set stays cheap. Raises ValueError when the config names no zero-shot set and
  whatever load_zero_shot_dataset raises when the data is not there.
  """
  from clipdistill_jax.eval.datasets import load_zero_shot_dataset
  from clipdistill_jax.eval.prompts import get_templates
  eval_config = run_config.get("eval") or {}
  names = eval_config.get("zero_shot") or ()
  if not names:
    raise ValueError("the run's config.json has no eval.zero_shot set")
  limits = [n for n in (max_examples, eval_config.get("max_examples")) if n]
  dataset = load_zero_shot_dataset(
      names[0], split or eval_config.get("zero_shot_split") or "test", image_size,
      data_dir=(run_config.get("data") or {}).get("data_dir"),
      max_examples=min(limits) if limits else None)
  images, labels = [], []
  for batch_images, batch_labels in dataset.batches(256):
    images.append(np.asarray(batch_images, np.float32))
    labels.append(np.asarray(batch_labels))
  if not images:
    raise ValueError(f"zero-shot set {names[0]!r} yielded no images")
  templates = list(get_templates(eval_config.get("templates") or dataset.templates))
  templates = templates[:max_templates] if max_templates else templates
  prompts = [t.format(name) for name in dataset.class_names for t in templates]
  pixels = np.concatenate(images)
  return ZeroShotSet(pixels, np.concatenate(labels), prompts,
                     f"the run's zero-shot set {names[0]!r} ({len(pixels)} images, "
                     f"{len(templates)} template{'s' if len(templates) > 1 else ''} per class)",
                     len(templates))
