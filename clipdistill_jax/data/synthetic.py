"""A synthetic image-caption set: coloured shapes whose captions say what is drawn.

Every example is a pure function of (seed, split, index): nothing is stored, nothing is
downloaded, any example of any step can be recomputed directly (cheap resume, per-host
slices). Rendering is numpy only; a 64 px image takes well under a millisecond.

An image shows one shape (circle, square, triangle, diamond, cross, star) in one colour, one
of two sizes, at one of five positions, over one of four backgrounds, with small random
jitter of position, size and colour so that no two examples are pixel-identical. The caption
names all five attributes through one of several templates. The label is the (colour,
shape) pair, so zero-shot prompts such as "a photo of a red circle." have a right answer.

The train and test splits draw from independent random streams (the split is part of the
per-example seed), so the test split is held out: same distribution, different examples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}
COLOUR_NAMES = tuple(COLOURS)
# Radius of the shape's circumscribed circle, as a fraction of the image side.
SIZES = {"small": 0.13, "large": 0.27}
SIZE_NAMES = tuple(SIZES)
# Centre (x, y) as fractions of the image side, and how captions say where it is.
POSITIONS = {
    "left": ((0.3, 0.5), "on the left"),
    "right": ((0.7, 0.5), "on the right"),
    "top": ((0.5, 0.3), "at the top"),
    "bottom": ((0.5, 0.7), "at the bottom"),
    "center": ((0.5, 0.5), "in the center"),
}
POSITION_NAMES = tuple(POSITIONS)
# Grey level of a plain background (None: per-pixel noise), and its caption wording.
BACKGROUNDS = {
    "plain": (128, "plain gray"),
    "dark": (50, "dark"),
    "light": (205, "light"),
    "noise": (None, "noisy"),
}
BACKGROUND_NAMES = tuple(BACKGROUNDS)
CAPTION_TEMPLATES = (
    "a {size} {colour} {shape} {where} on a {background} background",
    "a photo of a {size} {colour} {shape} {where}, {background} background",
    "a {background} background with a {size} {colour} {shape} {where}",
    "{where} there is a {size} {colour} {shape} against a {background} background",
    "a {colour} {shape}, {size}, {where} of the image, on a {background} background",
)
ZERO_SHOT_TEMPLATES = ("a photo of a {}.",)
SPLITS = ("train", "test")


def zero_shot_templates() -> tuple[str, ...]:
  """Zero-shot prompts in the captions' own words, '{}' standing for the class ("red circle").

  One per (size, position, background): CLIP-style prompt ensembling over the attributes a
  class name leaves out, so that "a photo of a red circle" is not the only, off-distribution
  way of asking.
  """
  return tuple(f"a {size} {{}} {where} on a {BACKGROUNDS[background][1]} background"
               for size in SIZE_NAMES for _, where in POSITIONS.values()
               for background in BACKGROUND_NAMES)

_CENTRE_JITTER = 0.04  # fraction of the image side
_RADIUS_JITTER = 0.1  # relative
_COLOUR_JITTER = 12  # grey levels per channel
_NOISE_RANGE = (60, 200)


@dataclasses.dataclass(frozen=True)
class SyntheticExample:
  """The rendering parameters of one example (names index the module tables)."""

  shape: str
  colour: str
  size: str
  position: str
  background: str
  template_index: int
  centre: tuple[float, float]  # (x, y), fractions of the image side, jitter included
  radius: float  # fraction of the image side, jitter included
  rgb: tuple[int, int, int]  # jittered colour
  noise_seed: int

  @property
  def label(self) -> int:
    return COLOUR_NAMES.index(self.colour) * len(SHAPES) + SHAPES.index(self.shape)

  @property
  def class_name(self) -> str:
    return f"{self.colour} {self.shape}"


class SyntheticCaptions:
  """Deterministic synthetic image-caption data: `example(index) -> (image, caption, label)`.

  Images are uint8 [image_size, image_size, 3], rendered at the model's resolution so the
  CLIP preprocessing that follows only normalizes (its resize is the identity).
  """

  def __init__(self, image_size: int = 64, seed: int = 0, split: str = "train"):
    if split not in SPLITS:
      raise ValueError(f"split={split!r}: the synthetic set has splits {SPLITS}.")
    if image_size < 16:
      raise ValueError(f"image_size={image_size}: shapes need at least 16 pixels to be told apart.")
    self.image_size = int(image_size)
    self.seed = int(seed)
    self.split = split
    self._split_code = SPLITS.index(split)

  # --- classes ------------------------------------------------------------------------------

  @property
  def class_names(self) -> list[str]:
    return [f"{colour} {shape}" for colour in COLOUR_NAMES for shape in SHAPES]

  @property
  def num_classes(self) -> int:
    return len(COLOUR_NAMES) * len(SHAPES)

  # --- examples -----------------------------------------------------------------------------

  def params(self, index: int) -> SyntheticExample:
    """The rendering parameters of example `index` (any non-negative integer)."""
    return self.params_batch([index])[0]

  def params_batch(self, indices: Sequence[int]) -> list[SyntheticExample]:
    """Rendering parameters of many examples at once (vectorized hashing, no RNG objects)."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    if indices.size and indices.min() < 0:
      raise ValueError(f"indices must be >= 0, got min {indices.min()}: examples count from 0.")
    u = _uniforms([self.seed, self._split_code], indices, num=13)  # [n, 13] in [0, 1)
    pick = lambda column, names: (u[:, column] * len(names)).astype(np.int64)
    shapes, colours, sizes, positions, backgrounds = (
        pick(c, names) for c, names in enumerate(
            (SHAPES, COLOUR_NAMES, SIZE_NAMES, POSITION_NAMES, BACKGROUND_NAMES)))
    templates = pick(5, CAPTION_TEMPLATES)
    jitter = 2 * u[:, 6:12] - 1  # centre x, centre y, radius, red, green, blue
    noise_seeds = (u[:, 12] * 2**31).astype(np.int64)
    examples = []
    for n in range(indices.size):
      position = POSITION_NAMES[positions[n]]
      size = SIZE_NAMES[sizes[n]]
      colour = COLOUR_NAMES[colours[n]]
      (cx, cy), _ = POSITIONS[position]
      rgb = np.clip(np.asarray(COLOURS[colour]) + np.round(_COLOUR_JITTER * jitter[n, 3:6]), 0, 255)
      examples.append(SyntheticExample(
          shape=SHAPES[shapes[n]], colour=colour, size=size, position=position,
          background=BACKGROUND_NAMES[backgrounds[n]], template_index=int(templates[n]),
          centre=(float(cx + _CENTRE_JITTER * jitter[n, 0]),
                  float(cy + _CENTRE_JITTER * jitter[n, 1])),
          radius=float(SIZES[size] * (1 + _RADIUS_JITTER * jitter[n, 2])),
          rgb=tuple(int(c) for c in rgb), noise_seed=int(noise_seeds[n])))
    return examples

  def caption(self, example: SyntheticExample) -> str:
    """The caption of an example: every attribute it was rendered with, in words."""
    return CAPTION_TEMPLATES[example.template_index].format(
        size=example.size, colour=example.colour, shape=example.shape,
        where=POSITIONS[example.position][1], background=BACKGROUNDS[example.background][1])

  def render(self, example: SyntheticExample) -> np.ndarray:
    """uint8 [image_size, image_size, 3]."""
    size = self.image_size
    level, _ = BACKGROUNDS[example.background]
    if level is None:
      pixel_ids = np.arange(size * size, dtype=np.int64)
      uniform = _uniforms([self.seed, example.noise_seed], pixel_ids, num=1)[:, 0]
      low, high = _NOISE_RANGE
      grey = (low + uniform * (high - low)).astype(np.uint8).reshape(size, size)
      image = np.repeat(grey[..., None], 3, axis=-1)
    else:
      image = np.full((size, size, 3), level, np.uint8)
    # Only the shape's bounding box is tested pixel by pixel.
    cx, cy = example.centre
    extent = example.radius * _MAX_EXTENT
    to_pixel = lambda v: int(np.clip(np.floor(v * size), 0, size))
    x0, x1 = to_pixel(cx - extent), min(size, to_pixel(cx + extent) + 1)
    y0, y1 = to_pixel(cy - extent), min(size, to_pixel(cy + extent) + 1)
    dx = (np.arange(x0, x1, dtype=np.float32) + 0.5) / size - cx
    dy = (np.arange(y0, y1, dtype=np.float32) + 0.5) / size - cy
    mask = _shape_mask(example.shape, example.radius, dx[None, :], dy[:, None])
    image[y0:y1, x0:x1][mask] = example.rgb
    return image

  def example(self, index: int) -> tuple[np.ndarray, str, int]:
    """(uint8 image [S, S, 3], caption, label) of example `index`."""
    params = self.params(index)
    return self.render(params), self.caption(params), params.label

  def examples(self, indices: Sequence[int]) -> tuple[np.ndarray, list[str], np.ndarray]:
    """A batch: (uint8 images [N, S, S, 3], captions, int32 labels [N])."""
    all_params = self.params_batch(indices)
    images = np.zeros((len(all_params), self.image_size, self.image_size, 3), np.uint8)
    for row, params in enumerate(all_params):
      images[row] = self.render(params)
    labels = np.asarray([p.label for p in all_params], np.int32)
    return images, [self.caption(p) for p in all_params], labels


# --- geometry -------------------------------------------------------------------------------

# Shapes are scaled so that their areas are comparable; none reaches past this many radii.
_MAX_EXTENT = 1.2


def _shape_mask(shape: str, r: float, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
  """Boolean mask over the broadcast of dx [1, W] and dy [H, 1] (offsets from the centre)."""
  adx, ady = np.abs(dx), np.abs(dy)
  if shape == "circle":
    return dx * dx + dy * dy <= r * r
  if shape == "square":
    return (adx <= 0.85 * r) & (ady <= 0.85 * r)
  if shape == "diamond":
    return adx + ady <= 1.15 * r
  if shape == "cross":
    arm, half_width = 1.1 * r, 0.38 * r
    return ((adx <= arm) & (ady <= half_width)) | ((ady <= arm) & (adx <= half_width))
  if shape == "triangle":
    return _convex_polygon_mask(dx, dy, _regular_polygon(3, 1.2 * r))
  if shape == "star":
    outer = _regular_polygon(5, 1.2 * r)
    inner = _regular_polygon(5, 0.5 * r, rotation=np.pi / 5)
    mask = _convex_polygon_mask(dx, dy, inner)
    for k in range(5):  # a spike: a tip and the two inner vertices either side of it
      mask = mask | _convex_polygon_mask(dx, dy, [inner[k - 1], outer[k], inner[k]])
    return mask
  raise ValueError(f"Unknown shape {shape!r}; known: {SHAPES}.")


def _regular_polygon(sides: int, radius: float, rotation: float = 0.0) -> list[tuple[float, float]]:
  """Vertices (x, y) of a regular polygon with a vertex pointing up (image y grows down)."""
  angles = rotation - np.pi / 2 + 2 * np.pi * np.arange(sides) / sides
  return [(float(radius * np.cos(a)), float(radius * np.sin(a))) for a in angles]


def _convex_polygon_mask(dx: np.ndarray, dy: np.ndarray,
                         vertices: Sequence[tuple[float, float]]) -> np.ndarray:
  """Points on the inner side of every edge of a convex polygon (vertices in angle order)."""
  mask = None
  for (x0, y0), (x1, y1) in zip(vertices, [*vertices[1:], vertices[0]], strict=True):
    inside = (x1 - x0) * (dy - y0) - (y1 - y0) * (dx - x0) >= 0
    mask = inside if mask is None else mask & inside
  return mask


# --- counter-based randomness ---------------------------------------------------------------


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """The splitmix64 finalizer: a bijective, well-mixing hash of uint64 (wrapping arithmetic)."""
  with np.errstate(over="ignore"):  # wrap-around is the point
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _uniforms(key: Sequence[int], indices: np.ndarray, num: int) -> np.ndarray:
  """float64 [len(indices), num] in [0, 1): a pure function of (key, index, column).

  Counter-based, so any example's numbers are computed directly, without a stateful RNG
  (and ~100x faster than creating a numpy Generator per example).
  """
  state = np.zeros((), np.uint64)
  for part in key:
    state = _splitmix64(np.asarray(state ^ np.uint64(int(part) & 0xFFFFFFFFFFFFFFFF)))
  rows = _splitmix64(state ^ np.asarray(indices, np.int64).astype(np.uint64))
  columns = np.arange(num, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)
  bits = _splitmix64(rows[:, None] ^ columns[None, :])
  return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
