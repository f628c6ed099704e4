"""data.num_views: K fixed augmented views per example, one shown per epoch, seeded by
(data.seed, example id, view); the cache writer's view v is the training pipeline's."""

import numpy as np
import pytest
from test_data import SIZE, row_ids, write_local_set

from clipdistill_jax.data import augment as augment_lib
from clipdistill_jax.data import pipeline, tf_pipeline
from clipdistill_jax.data.tokenizer import load_tokenizer

CONTEXT, ROWS, VIEWS = 16, 10, 3
AUGMENT = {"crop_min_scale": 0.5, "flip": True}


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """ROWS 40 px images (the pipeline resizes them to SIZE), a manifest and 2 TFRecord files."""
  return write_local_set(tmp_path_factory.mktemp("views"), ROWS, render_size=40, seed=5)


def train_batches(config, tokenizer, n, *, batch, start=0, index=0, count=1):
  it = pipeline.make_train_iterator(
      config, global_batch_size=batch, image_size=SIZE, context_length=CONTEXT,
      tokenizer=tokenizer, process_index=index, process_count=count, start_step=start)
  return [next(it) for _ in range(n)]


def augmentation(seed, example_id, view, **augment):
  return augment_lib.view_augmentation(seed, example_id, view, image_size=SIZE,
                                       **(augment or AUGMENT)).numpy()


def test_view_augmentation_is_a_pure_function_of_seed_example_and_view():
  params = np.stack([[augmentation(0, i, v) for v in range(8)] for i in range(6)])
  np.testing.assert_array_equal(params, np.stack([[augmentation(0, i, v) for v in range(8)]
                                                  for i in range(6)]))
  top, left, side, flip = np.moveaxis(params, -1, 0)
  assert (side >= round(SIZE * 0.5 ** 0.5)).all() and (side <= SIZE).all()
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + side <= SIZE).all() and (left + side <= SIZE).all()
  assert set(flip.ravel().tolist()) == {0, 1}
  for per_example in params:  # the views of one example differ
    assert len({tuple(p) for p in per_example}) == 8
  assert not np.array_equal(params[0], params[1])  # and differ between examples
  assert not np.array_equal(params[0], [augmentation(1, 0, v) for v in range(8)])  # and seeds
  # Without augmentation every view is the whole image, unflipped.
  np.testing.assert_array_equal(
      augmentation(0, 3, 2, crop_min_scale=1.0, flip=False), [0, 0, SIZE, 0])


def test_each_epoch_shows_one_view_of_each_example_and_resumes_exactly(files, tokenizer):
  root, pixels, _ = files
  plain = {"source": "manifest", "path": str(root / "m.jsonl"), "seed": 4}
  config = {**plain, **AUGMENT, "num_views": VIEWS}
  # 2 steps of 5 rows = one epoch of the 10 rows; 2 * VIEWS epochs.
  run = train_batches(config, tokenizer, 4 * VIEWS, batch=5)
  # The same rows in the same order as without views: only the pixels differ.
  unaugmented = train_batches(plain, tokenizer, 4 * VIEWS, batch=5)
  seen: dict[int, list[int]] = {i: [] for i in range(ROWS)}
  for step, (batch, reference) in enumerate(zip(run, unaugmented, strict=True)):
    assert batch["example_id"].dtype == np.int64 and batch["view"].dtype == np.int32
    assert batch["augmentation"].shape == (5, 4)
    np.testing.assert_array_equal(batch["example_id"], row_ids(reference, pixels))
    np.testing.assert_array_equal(batch["input_ids"], reference["input_ids"])
    epoch = step // 2
    for row, (i, view) in enumerate(zip(batch["example_id"], batch["view"], strict=True)):
      assert view == int(augment_lib.pick_view(4, epoch, i, VIEWS))
      seen[int(i)].append(int(view))
      params = batch["augmentation"][row]
      np.testing.assert_array_equal(params, augmentation(4, i, view))
      # The image is exactly the unaugmented one with that crop and flip.
      want = augment_lib.apply_augmentation(pixels[i], params, crop=True, flip=True).numpy()
      np.testing.assert_allclose(batch["image"][row], want, atol=1e-6)
  for views in seen.values():  # every view once per VIEWS epochs, in a fresh order per round
    assert sorted(views[:VIEWS]) == sorted(views[VIEWS:]) == list(range(VIEWS))
  assert any(v[:VIEWS] != v[VIEWS:] for v in seen.values())

  # A resume at step s (mid-epoch, or a later round of views) gives the same batches.
  for start in (3, 7):
    for a, b in zip(run[start:], train_batches(config, tokenizer, 3, batch=5, start=start),
                    strict=False):
      assert a.keys() == b.keys()
      for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  # pipeline.without_example_fields leaves the model inputs.
  assert sorted(pipeline.without_example_fields(run[0])) == [
      "attention_mask", "image", "input_ids"]


def test_tfrecord_views_use_the_record_index(files, tokenizer):
  _, pixels, pattern = files
  # Sorted files, records in file order: shard 00000 holds rows 0, 2, 4, 6, 8.
  config = {"source": "tfrecord", "path": pattern, "num_train_examples": 4, "shuffle_buffer": 1,
            "num_views": 2, "seed": 1}
  run = train_batches(config, tokenizer, 4, batch=4)  # unshuffled: one epoch per step
  for epoch, batch in enumerate(run):
    np.testing.assert_array_equal(np.asarray(row_ids(batch, pixels)), 2 * batch["example_id"])
    np.testing.assert_array_equal(batch["example_id"], [0, 1, 2, 3])
    np.testing.assert_array_equal(
        batch["view"], [int(augment_lib.pick_view(1, epoch, i, 2)) for i in range(4)])
  shuffled = {**config, "shuffle_buffer": 4}
  for batch in train_batches(shuffled, tokenizer, 3, batch=4):
    np.testing.assert_array_equal(np.asarray(row_ids(batch, pixels)), 2 * batch["example_id"])


@pytest.mark.parametrize("source", ["manifest", "tfrecord"])
def test_the_writer_sees_the_training_views(files, tokenizer, source):
  """make_views_iterator's view v of example i is the image training shows for (i, v)."""
  root, _, pattern = files
  path = str(root / "m.jsonl") if source == "manifest" else pattern
  config = {"source": source, "path": path, **AUGMENT, "num_views": VIEWS,
            "num_train_examples": 7, "shuffle_buffer": 1}
  trained = {}
  for batch in train_batches(config, tokenizer, 6 * VIEWS, batch=7):
    for row, (i, view) in enumerate(zip(batch["example_id"], batch["view"], strict=True)):
      trained[int(i), int(view)] = (batch["image"][row], batch["augmentation"][row],
                                    batch["input_ids"][row])
  assert len(trained) == 7 * VIEWS
  # 2 hosts, global batches of 4 examples: host p holds rows [2p, 2p + 2) of each.
  for host in range(2):
    it = pipeline.make_views_iterator(config, global_batch_size=4, image_size=SIZE,
                                      context_length=CONTEXT, tokenizer=tokenizer,
                                      process_index=host, process_count=2)
    assert it.num_examples == 7
    batches = list(it)
    ids = np.concatenate([b["example_id"] for b in batches]).tolist()
    assert ids == ([2, 3, 6, -1] if host else [0, 1, 4, 5])
    for batch in batches:
      assert batch["image"].shape == (2, VIEWS, SIZE, SIZE, 3) and batch["ok"].all()
      for row, i in enumerate(batch["example_id"]):
        for view in range(VIEWS if i >= 0 else 0):
          image, params, input_ids = trained[int(i), view]
          np.testing.assert_array_equal(batch["image"][row, view], image)
          np.testing.assert_array_equal(batch["augmentation"][row, view], params)
          np.testing.assert_array_equal(batch["input_ids"][row], input_ids)
  resumed = pipeline.make_views_iterator(config, global_batch_size=4, image_size=SIZE,
                                         context_length=CONTEXT, tokenizer=tokenizer,
                                         process_index=0, process_count=1, start_example=4)
  assert [b["example_id"].tolist() for b in resumed] == [[4, 5, 6, -1]]
  done = pipeline.make_views_iterator(config, global_batch_size=4, image_size=SIZE,
                                      context_length=CONTEXT, tokenizer=tokenizer,
                                      process_index=0, process_count=1, start_example=8)
  assert done.num_examples == 7 and not list(done)


@pytest.mark.parametrize("config, fix", [
    ({"source": "synthetic"}, "unset data.num_views"),
    ({"source": "tfds", "name": "cifar10"}, "write the split to TFRecords"),
    ({"source": "tfrecord", "path": "/nonexistent/*.tfrecord"}, "set data.num_train_examples"),
])
def test_num_views_needs_a_finite_set_with_example_ids(config, fix, tokenizer):
  with pytest.raises(ValueError, match=f"data.num_views=2 needs a finite training set.*{fix}"):
    train_batches({**config, "num_views": 2}, tokenizer, 1, batch=2)
  with pytest.raises(ValueError, match="num_views=0 must be >= 1"):
    train_batches({"source": "synthetic", "num_views": 0}, tokenizer, 1, batch=2)


def test_num_views_needs_one_caption_per_example():
  tf = tf_pipeline.import_tf()
  record = {"position": tf.constant(0, tf.int64), "example_id": tf.constant(0, tf.int64),
            "epoch": tf.constant(0, tf.int64), "image": tf.zeros([40, 40, 3], tf.uint8),
            "caption": tf.constant(["a dog", "a brown dog"])}
  settings = tf_pipeline.DecodeSettings(image_size=SIZE, seed=0, process_index=0,
                                        process_count=1, train=True, num_views=2)
  # Several captions (a TFRecord with two 'txt' values): the record is dropped and counted,
  # one caption (the usual record) is served; a class label has no caption to cache.
  def decode(record):
    return tf_pipeline.decode_batches(tf.data.Dataset.from_tensors(record), settings,
                                      batch_size=1, num_parallel_calls=1)

  assert not bool(next(iter(decode(record)))["ok"][0])
  single = dict(record, caption=tf.constant(["a dog"]))
  example = next(iter(decode(single)))
  assert bool(example["ok"][0]) and example["caption"].numpy()[0] == b"a dog"
  labelled = {k: v for k, v in record.items() if k != "caption"}
  labelled["label"] = tf.constant(3, tf.int64)
  with pytest.raises(ValueError, match="exactly one caption"):
    decode(labelled)
  del record["example_id"]
  with pytest.raises(ValueError, match="fixed example ids"):
    decode(record)
