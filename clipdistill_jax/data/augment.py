"""Training augmentation: a random square crop resized back to S x S, then a random horizontal
flip, both described by four int32 numbers (AUGMENTATION_COLUMNS: crop top, left and side in
pixels of the preprocessed S x S image, flip 0/1) that augmentation_params draws from
stateless seeds and apply_augmentation applies. With fixed views (data.num_views = K) view v
of an example is view_augmentation(seed, example id, v), and pick_view says which view an
epoch shows. The training pipeline (tf_pipeline.py) and the teacher cache writer both draw
here.
"""

from __future__ import annotations

AUGMENTATION_COLUMNS = ("top", "left", "side", "flip")


def _tf():
  # Called while tf_pipeline builds its datasets (TensorFlow configured by its import_tf).
  import tensorflow as tf

  return tf


def augmentation_params(crop_seed, flip_seed, *, image_size: int, crop_min_scale: float,
                        flip: bool):
  """One augmentation drawn from two stateless seeds: int32 [4] (AUGMENTATION_COLUMNS).

  Crop: a square of area fraction uniform in [crop_min_scale, 1] of the S x S image (S =
  image_size), side rounded to whole pixels, top/left uniform over the positions that keep
  it inside; crop_min_scale = 1 gives (0, 0, S). Flip: 1 with probability 1/2 when `flip`,
  else 0. crop_seed, flip_seed: int [2] seeds of tf.random's stateless ops.
  """
  tf = _tf()
  size = image_size
  if crop_min_scale < 1.0:
    u = tf.random.stateless_uniform([3], crop_seed)
    area = crop_min_scale + (1.0 - crop_min_scale) * u[0]
    side = tf.clip_by_value(tf.cast(tf.round(size * tf.sqrt(area)), tf.int32), 1, size)
    span = tf.cast(size - side + 1, tf.float32)
    top = tf.minimum(tf.cast(u[1] * span, tf.int32), size - side)
    left = tf.minimum(tf.cast(u[2] * span, tf.int32), size - side)
  else:
    top, left, side = tf.constant(0), tf.constant(0), tf.constant(size)
  flipped = (tf.cast(tf.random.stateless_uniform([], flip_seed) < 0.5, tf.int32) if flip
             else tf.constant(0))
  return tf.stack([top, left, side, flipped])


def _view_key(seed, example_id, purpose: int, index):
  """A stateless seed [2] for (data seed, example, purpose, index); purposes keep the view
  draws and the crops of one example independent."""
  tf = _tf()
  key = tf.stack([tf.cast(seed, tf.int64), tf.cast(example_id, tf.int64)])
  key = tf.random.experimental.stateless_fold_in(key, tf.constant(purpose, tf.int64))
  return tf.random.experimental.stateless_fold_in(key, tf.cast(index, tf.int64))


def view_augmentation(seed, example_id, view, *, image_size: int, crop_min_scale: float,
                      flip: bool):
  """The augmentation of view `view` of example `example_id`: int32 [4] (AUGMENTATION_COLUMNS),
  a pure function of (data seed, example id, view). The training pipeline and the teacher
  cache writer both draw views here."""
  tf = _tf()
  crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(_view_key(seed, example_id, 0, view), 2))
  return augmentation_params(crop_seed, flip_seed, image_size=image_size,
                             crop_min_scale=crop_min_scale, flip=flip)


def pick_view(seed, epoch, example_id, num_views: int):
  """The view (int32 in [0, num_views)) example `example_id` shows in epoch `epoch`.

  Epochs go in rounds of K = num_views: round r = epoch // K shows the K views in an order
  seeded by (data seed, example id, r), so every view is used once per K epochs and the
  choice is a pure function of (data seed, epoch, example id).
  """
  tf = _tf()
  epoch = tf.cast(epoch, tf.int64)
  order = tf.random.experimental.stateless_shuffle(
      tf.range(num_views, dtype=tf.int32), seed=_view_key(seed, example_id, 1, epoch // num_views))
  return order[epoch % num_views]


def apply_augmentation(image, params, *, crop: bool, flip: bool):
  """image float32 [S, S, 3] cropped to params' box and resized back (bilinear), then
  mirrored left-right where params' flip is 1. crop / flip False skip those ops (their
  params are then the identity anyway).

  Applied after normalization: crop, bilinear resize and flip are linear, so they commute
  with it.
  """
  tf = _tf()
  size = image.shape[0]
  if crop:
    top, left, side = params[0], params[1], params[2]
    cropped = tf.slice(image, tf.stack([top, left, 0]), tf.stack([side, side, 3]))
    image = tf.image.resize(cropped[None], [size, size], method="bilinear")[0]
    image.set_shape([size, size, 3])
  if flip:
    image = tf.cond(params[3] > 0, lambda: tf.reverse(image, axis=[1]), lambda: image)
  return image
