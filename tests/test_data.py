"""Input pipelines: synthetic set, manifests, img2dataset TFRecords, tfds; sharding, resume,
corrupt images, teacher/student input compatibility."""

import csv
import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from clipdistill_jax.data import compat, defaults, pipeline, preprocess, synthetic
from clipdistill_jax.data.batches import NO_LABEL, CorruptLimits, TooManyCorruptImagesError
from clipdistill_jax.data.synthetic import SyntheticCaptions
from clipdistill_jax.data.tokenizer import load_tokenizer
from clipdistill_jax.models.config import tiny_config

SIZE = 32
CONTEXT = 16
NUM_GOOD = 12


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer()


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def train_iter(config, tokenizer, *, batch=4, index=0, count=1, start=0):
  return pipeline.make_train_iterator(
      config, global_batch_size=batch, image_size=SIZE, context_length=CONTEXT,
      tokenizer=tokenizer, process_index=index, process_count=count, start_step=start)


def eval_data(config, tokenizer, *, batch=5, index=0, count=1, **kw):
  return pipeline.make_eval_dataset(
      config, batch_size=batch, image_size=SIZE, context_length=CONTEXT, tokenizer=tokenizer,
      process_index=index, process_count=count, **kw)


# --- local files -----------------------------------------------------------------------------


def png_bytes(pixels):
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")  # lossless: exact expected pixels
  return buffer.getvalue()


@pytest.fixture(scope="module")
def local_data(tmp_path_factory):
  """NUM_GOOD images rendered by the synthetic set, a corrupt file, manifests, TFRecords."""
  root = tmp_path_factory.mktemp("local")
  source = SyntheticCaptions(40, seed=7)  # 40 px: the pipeline really resizes to 32
  images, captions = [], []
  for i in range(NUM_GOOD):
    pixels, caption, _ = source.example(i)
    (root / f"img{i}.png").write_bytes(png_bytes(pixels))
    images.append(pixels)
    captions.append(caption)
  (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
  rows = [{"image": f"img{i}.png", "caption": captions[i], "label": i % 3}
          for i in range(NUM_GOOD)]
  write_jsonl(root / "good.jsonl", rows)
  bad_rows = [*rows[:5], {"image": "corrupt.jpg", "caption": "corrupt"}, *rows[5:],
              {"image": "missing.png", "caption": "missing"}]
  write_jsonl(root / "with_corrupt.jsonl", bad_rows)
  write_jsonl(root / "all_corrupt.jsonl", [{"image": "corrupt.jpg", "caption": "x"}] * 4)
  # open_clip's CSV column names, found without configuration.
  with open(root / "good.csv", "w") as f:
    f.write("filepath,title\n")
    for row in rows:
      f.write(f"{root / row['image']},\"{row['caption']}\"\n")
  expected = {"pixels": np.stack([preprocess.preprocess_image(p, SIZE) for p in images]),
              "captions": captions}
  return root, expected


def write_jsonl(path, rows):
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def write_img2dataset_shards(directory, encoded_images, captions, num_shards):
  """tf.train.Example records with img2dataset's tfrecord features."""
  import tensorflow as tf

  def feature(value):
    if isinstance(value, bytes):
      return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

  directory.mkdir()
  for shard in range(num_shards):
    with tf.io.TFRecordWriter(str(directory / f"{shard:05d}.tfrecord")) as writer:
      for i in range(shard, len(encoded_images), num_shards):
        example = tf.train.Example(features=tf.train.Features(feature={
            "key": feature(f"{shard:05d}{i:04d}".encode()), "jpg": feature(encoded_images[i]),
            "txt": feature(captions[i].encode()), "width": feature(40), "height": feature(40),
            "error_message": feature(b"")}))
        writer.write(example.SerializeToString())
  return str(directory / "*.tfrecord")


def write_local_set(root, rows, *, render_size, seed):
  """`rows` synthetic images as PNGs in `root`, a manifest m.jsonl and 2 img2dataset TFRecord
  shards of them. Returns (root, expected pixels at SIZE [rows, SIZE, SIZE, 3], shard glob)."""
  source = SyntheticCaptions(render_size, seed=seed)
  pixels, captions = [], []
  for i in range(rows):
    image, caption, _ = source.example(i)
    (root / f"img{i}.png").write_bytes(png_bytes(image))
    pixels.append(preprocess.preprocess_image(image, SIZE))
    captions.append(caption)
  write_jsonl(root / "m.jsonl", [{"image": f"img{i}.png", "caption": captions[i]}
                                 for i in range(rows)])
  encoded = [(root / f"img{i}.png").read_bytes() for i in range(rows)]
  pattern = write_img2dataset_shards(root / "shards", encoded, captions, num_shards=2)
  return root, np.stack(pixels), pattern


def row_ids(batch, expected_pixels):
  """Which expected example each batch row is (asserting that it is one of them)."""
  distances = np.abs(batch["image"][:, None] - expected_pixels[None]).max(axis=(2, 3, 4))
  ids = distances.argmin(axis=1)
  np.testing.assert_allclose(distances.min(axis=1), 0, atol=1e-5)
  return ids.tolist()


# --- synthetic ---------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_test_split_is_held_out():
  a, b = SyntheticCaptions(SIZE, seed=3), SyntheticCaptions(SIZE, seed=3)
  images_a, captions_a, labels_a = a.examples(range(50))
  images_b, captions_b, labels_b = b.examples(range(50))
  np.testing.assert_array_equal(images_a, images_b)
  assert captions_a == captions_b and labels_a.tolist() == labels_b.tolist()
  np.testing.assert_array_equal(a.example(17)[0], images_a[17])  # random access = sequential

  train = {img.tobytes() for img in SyntheticCaptions(SIZE, 3, "train").examples(range(300))[0]}
  test = {img.tobytes() for img in SyntheticCaptions(SIZE, 3, "test").examples(range(300))[0]}
  other_seed = {img.tobytes() for img in SyntheticCaptions(SIZE, 4).examples(range(300))[0]}
  assert len(train) == 300 and not train & test and not train & other_seed
  # The held-out split covers the same classes.
  test_labels = SyntheticCaptions(SIZE, 3, "test").examples(range(1000))[2]
  assert set(test_labels.tolist()) == set(range(a.num_classes))


def test_synthetic_captions_say_what_is_rendered():
  data = SyntheticCaptions(64, seed=0)
  assert data.num_classes == len(data.class_names) == 48
  areas = {"small": [], "large": []}
  for params in data.params_batch(range(120)):
    caption = data.caption(params)
    for word in (params.colour, params.shape, params.size, synthetic.POSITIONS[params.position][1],
                 synthetic.BACKGROUNDS[params.background][1]):
      assert word in caption, (word, caption)
    assert data.class_names[params.label] == f"{params.colour} {params.shape}"
    image = data.render(params)
    shape_pixels = np.all(image == np.asarray(params.rgb, np.uint8), axis=-1)
    ys, xs = np.nonzero(shape_pixels)
    x, y = (xs.mean() + 0.5) / 64, (ys.mean() + 0.5) / 64
    expected = {"left": x < 0.4, "right": x > 0.6, "top": y < 0.4, "bottom": y > 0.6,
                "center": abs(x - 0.5) < 0.1 and abs(y - 0.5) < 0.1}
    assert expected[params.position], (params, x, y)
    areas[params.size].append(shape_pixels.mean())
  assert max(areas["small"]) < min(areas["large"])


def test_synthetic_renders_fast():
  data = SyntheticCaptions(64, seed=0)
  start = time.perf_counter()
  data.examples(range(500))
  assert 500 / (time.perf_counter() - start) > 300  # ~3000/s measured; loose for shared CPUs


def test_synthetic_train_batches(tokenizer):
  batch = next(train_iter(defaults.default_data_config(), tokenizer, batch=6))
  assert batch["image"].shape == (6, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
  assert batch["input_ids"].shape == batch["attention_mask"].shape == (6, CONTEXT)
  assert batch["input_ids"].dtype == batch["attention_mask"].dtype == np.int32
  images, captions, _ = SyntheticCaptions(SIZE, seed=0).examples(range(6))
  np.testing.assert_array_equal(batch["image"], preprocess.preprocess_images(images, SIZE))
  np.testing.assert_array_equal(batch["input_ids"], tokenizer(captions, CONTEXT)[0])


def test_synthetic_host_slices_partition_the_global_batch(tokenizer):
  whole = take(train_iter({}, tokenizer, batch=8), 3)
  hosts = [take(train_iter({}, tokenizer, batch=8, index=i, count=2), 3) for i in range(2)]
  for step in range(3):
    for key in whole[step]:
      np.testing.assert_array_equal(
          whole[step][key], np.concatenate([hosts[0][step][key], hosts[1][step][key]]))


def test_synthetic_resume_sees_the_same_batches(tokenizer):
  uninterrupted = take(train_iter({"seed": 5}, tokenizer), 5)
  resumed = take(train_iter({"seed": 5}, tokenizer, start=3), 2)
  assert_batches_equal(uninterrupted[3:], resumed)


def test_synthetic_eval_has_labels_and_class_names(tokenizer):
  config = {"num_eval_examples": 13}
  data = eval_data(config, tokenizer, batch=5)
  batches = list(data)
  assert [len(b["label"]) for b in batches] == [5, 5, 3]
  assert data.class_names == SyntheticCaptions(SIZE).class_names
  _, _, labels = SyntheticCaptions(SIZE, 0, "test").examples(range(13))
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), labels)
  padded = list(eval_data(config, tokenizer, batch=5, pad_remainder=True))
  assert padded[-1]["image"].shape[0] == 5
  assert padded[-1]["mask"].tolist() == [True] * 3 + [False] * 2
  shards = [list(eval_data(config, tokenizer, batch=4, index=i, count=2)) for i in range(2)]
  host_labels = np.concatenate([b["label"] for shard in shards for b in shard])
  np.testing.assert_array_equal(host_labels, labels)


def test_synthetic_rejects_augmentation(tokenizer):
  with pytest.raises(ValueError, match="flip"):
    train_iter({"flip": True}, tokenizer)


def test_synthetic_path_does_not_import_tensorflow():
  code = (
      "import sys\n"
      "from clipdistill_jax.data import pipeline\n"
      "import numpy as np\n"
      "tok = lambda texts, n: (np.zeros((len(texts), n), np.int32),) * 2\n"
      "it = pipeline.make_train_iterator({}, global_batch_size=2, image_size=32, "
      "context_length=8, tokenizer=tok, process_index=0, process_count=1)\n"
      "next(it)\n"
      "assert 'tensorflow' not in sys.modules, 'synthetic path imported TF'\n")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_unknown_config_key_is_an_error(tokenizer):
  with pytest.raises(KeyError, match="shuffle_buffer_size"):
    train_iter({"shuffle_buffer_size": 3}, tokenizer)


# --- manifests -------------------------------------------------------------------------------


@pytest.mark.parametrize("manifest", ["good.jsonl", "good.csv"])
def test_manifest_eval_reads_every_row_in_order(local_data, tokenizer, manifest):
  root, expected = local_data
  config = {"source": "manifest", "path": str(root / manifest), "eval_path": str(root / manifest)}
  data = eval_data(config, tokenizer, batch=5)
  batches = list(data)
  assert [len(b["image"]) for b in batches] == [5, 5, 2]
  images = np.concatenate([b["image"] for b in batches])
  np.testing.assert_allclose(images, expected["pixels"], atol=1e-6)
  np.testing.assert_array_equal(np.concatenate([b["input_ids"] for b in batches]),
                                tokenizer(expected["captions"], CONTEXT)[0])
  assert (np.concatenate([b["label"] for b in batches]) == NO_LABEL).all()
  assert data.num_skipped == 0 and data.num_read == NUM_GOOD


def test_manifest_eval_label_column_and_host_shards(local_data, tokenizer):
  root, _ = local_data
  config = {"source": "manifest", "path": str(root / "good.jsonl"),
            "eval_path": str(root / "good.jsonl"), "label_key": "label"}
  shards = [list(eval_data(config, tokenizer, batch=4, index=i, count=2)) for i in range(2)]
  labels = np.concatenate([b["label"] for shard in shards for b in shard])
  np.testing.assert_array_equal(labels, np.arange(NUM_GOOD) % 3)


def test_manifest_train_order_sharding_and_resume(local_data, tokenizer):
  root, expected = local_data
  config = {"source": "manifest", "path": str(root / "good.jsonl"), "seed": 1}
  # One epoch (12 rows, 2 hosts, 2 per host per step = 3 steps): each host sees its own
  # rows exactly once, and the hosts together see every row.
  seen = []
  for index in range(2):
    batches = take(train_iter(config, tokenizer, batch=4, index=index, count=2), 6)
    epochs = [sum((row_ids(b, expected["pixels"]) for b in batches[:3]), []),
              sum((row_ids(b, expected["pixels"]) for b in batches[3:]), [])]
    assert sorted(epochs[0]) == sorted(epochs[1]) and len(set(epochs[0])) == 6
    assert epochs[0] != epochs[1]  # a new permutation each epoch
    seen.append(set(epochs[0]))
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(NUM_GOOD))
  # Resume mid-epoch and across an epoch boundary.
  uninterrupted = take(train_iter(config, tokenizer), 7)
  assert_batches_equal(uninterrupted[2:], take(train_iter(config, tokenizer, start=2), 5))
  assert_batches_equal(uninterrupted[4:], take(train_iter(config, tokenizer, start=4), 3))


def test_manifest_augmentation_is_seeded_and_resumable(local_data, tokenizer):
  root, expected = local_data
  config = {"source": "manifest", "path": str(root / "good.jsonl"), "crop_min_scale": 0.5,
            "flip": True}
  uninterrupted = take(train_iter(config, tokenizer), 4)
  assert_batches_equal(uninterrupted[1:], take(train_iter(config, tokenizer, start=1), 3))
  plain = take(train_iter({k: v for k, v in config.items() if k == "source" or k == "path"},
                          tokenizer), 4)
  assert not np.allclose(np.stack([b["image"] for b in plain]),
                         np.stack([b["image"] for b in uninterrupted]))
  # Same examples (captions) as without augmentation: augmentation only changes pixels.
  assert_batches_equal([{"ids": b["input_ids"]} for b in plain],
                       [{"ids": b["input_ids"]} for b in uninterrupted])


def test_corrupt_and_missing_images_are_skipped_and_counted(local_data, tokenizer):
  root, expected = local_data
  config = {"source": "manifest", "path": str(root / "with_corrupt.jsonl"),
            "eval_path": str(root / "with_corrupt.jsonl")}
  iterator = train_iter(config, tokenizer)
  for step in range(1, 10):  # over 2 epochs of 14 rows
    batch = next(iterator)
    row_ids(batch, expected["pixels"])  # every row is a real image, none is a placeholder
    assert iterator.num_read - iterator.num_skipped == 4 * step
  assert iterator.num_skipped >= 2
  assert iterator.metrics()["data/num_skipped"] == iterator.num_skipped

  data = eval_data(config, tokenizer, batch=5)
  batches = list(data)
  assert data.num_read == NUM_GOOD + 2 and data.num_skipped == 2
  images = np.concatenate([b["image"] for b in batches])
  np.testing.assert_allclose(images, expected["pixels"], atol=1e-6)
  np.testing.assert_array_equal(np.concatenate([b["input_ids"] for b in batches]),
                                tokenizer(expected["captions"], CONTEXT)[0])


def test_process_exits_with_a_tf_iterator_still_open(tmp_path):
  # The decoders run Python on tf.data threads; without the atexit close, a process that
  # ends with its iterator mid-prefetch hangs in interpreter finalization (TF 2.21).
  code = (
      "import json, sys\n"
      "import numpy as np\n"
      "from PIL import Image\n"
      "from clipdistill_jax.data import pipeline\n"
      f"root = {str(tmp_path)!r}\n"
      "with open(root + '/m.jsonl', 'w') as f:\n"
      "  for i in range(8):\n"
      "    noise = np.random.default_rng(i).integers(0, 255, (300, 400, 3), np.uint8)\n"
      "    Image.fromarray(noise).save(f'{root}/{i}.png')\n"
      "    f.write(json.dumps({'image': f'{i}.png', 'caption': 'noise'}) + '\\n')\n"
      "tok = lambda texts, n: (np.zeros((len(texts), n), np.int32),) * 2\n"
      "it = pipeline.make_train_iterator({'source': 'manifest', 'path': root + '/m.jsonl'}, "
      "global_batch_size=2, image_size=224, context_length=8, tokenizer=tok, "
      "process_index=0, process_count=1)\n"
      "next(it)\n")
  try:
    subprocess.run([sys.executable, "-c", code], check=True, timeout=150,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
  except subprocess.TimeoutExpired:
    pytest.fail("The process hung at exit with a tf.data iterator open.")


def test_all_corrupt_data_raises_instead_of_spinning(local_data, tokenizer):
  root, _ = local_data
  config = {"source": "manifest", "path": str(root / "all_corrupt.jsonl"),
            "eval_path": str(root / "all_corrupt.jsonl"), "corrupt_check_after": 20}
  with pytest.raises(TooManyCorruptImagesError, match="image_key"):
    next(train_iter(config, tokenizer))
  with pytest.raises(TooManyCorruptImagesError):
    list(eval_data(config, tokenizer))


@pytest.mark.parametrize("batch", [1, 8])
def test_corrupt_counts_are_those_of_reading_one_image_at_a_time(batch):
  """The pipeline counts a batch of decoded rows at a time: every kept row carries the
  run's num_read / num_skipped up to it, and abort where the limits say so, exactly as
  counting row by row (CorruptLimits.exceeded), bad runs crossing batch boundaries and
  counts carried over from before a resume included."""
  from clipdistill_jax.data import tf_pipeline

  tf = tf_pipeline.import_tf()
  ok = np.random.default_rng(0).random(90) > 0.3
  ok[10:21] = False  # 11 bad in a row: across batches of 8
  ok[60:65] = False
  limits = CorruptLimits(max_fraction=0.45, check_after=30, max_consecutive=9)
  counts = (7, 2)
  rows = tf.data.Dataset.from_tensor_slices({"ok": ok, "position": np.arange(ok.size)})
  kept = tf_pipeline.count_and_filter(rows.batch(batch), limits, counts).rebatch(
      4, drop_remainder=False)
  got = {k: np.concatenate([b[k] for b in kept.as_numpy_iterator()])
         for k in ("position", "num_read", "num_skipped", "abort")}
  want = []
  num_read, num_skipped, consecutive = *counts, 0
  for position, good in enumerate(ok.tolist()):
    num_read, num_skipped = num_read + 1, num_skipped + (not good)
    consecutive = 0 if good else consecutive + 1
    abort = limits.exceeded(num_read, num_skipped, consecutive)
    if good or abort:
      want.append((position, num_read, num_skipped, abort))
  assert np.asarray(want)[:, 3].any() and not np.asarray(want)[:, 3].all()
  for i, key in enumerate(("position", "num_read", "num_skipped", "abort")):
    np.testing.assert_array_equal(got[key], np.asarray(want)[:, i].astype(got[key].dtype), key)


# --- manifest rows: quoting, bad rows, caption lists, empty captions ---------------------------

CC3M_CAPTIONS = [
    "a red car parked on a street",
    '"Untitled" oil painting by an unknown artist',
    '"sunset over the lake, with a boat',
    "a dog catching a frisbee",
    'the 12" vinyl record on a table',
]


def read(path, **kw):
  from clipdistill_jax.data import manifest

  return manifest.read_manifest(str(path), image_key=kw.pop("image_key", None),
                                caption_key=kw.pop("caption_key", None), **kw)


def test_tsv_manifests_are_unquoted_and_rows_never_swallow_each_other(tmp_path):
  tsv = tmp_path / "cc3m.tsv"  # CC3M style: header, no quoting
  tsv.write_text("caption\timage\n" + "".join(
      f"{caption}\timg{i}.jpg\n" for i, caption in enumerate(CC3M_CAPTIONS)))
  rows = read(tsv)
  assert rows["caption"] == [[c] for c in CC3M_CAPTIONS]  # 5 rows, verbatim
  assert rows["image_path"] == [str(tmp_path / f"img{i}.jpg") for i in range(5)]

  # Read as quoted CSV, the stray quotes are errors naming the line, never merged rows.
  with pytest.raises(ValueError, match=r"cc3m.tsv:3: a stray or unclosed quote.*'none'") as e:
    read(tsv, quoting="csv")
  assert "\n" not in str(e.value)
  rows = read(tsv, quoting="csv", skip_bad_rows=True)
  assert rows["caption"] == [[CC3M_CAPTIONS[0]]]  # lines 3 and 4-6 skipped, not merged

  # A pandas-written TSV doubles quotes: data.manifest_quoting='csv' reads it back.
  quoted = tmp_path / "pandas.tsv"
  with open(quoted, "w", newline="") as f:
    writer = csv.writer(f, delimiter="\t")
    writer.writerows([("caption", "image"), *((c, f"img{i}.jpg")
                                             for i, c in enumerate(CC3M_CAPTIONS))])
  assert read(quoted, quoting="csv")["caption"] == [[c] for c in CC3M_CAPTIONS]
  assert read(quoted)["caption"][2] == ['"""sunset over the lake, with a boat"']
  # .csv files are quoted by default (commas inside captions).
  quoted_csv = tmp_path / "m.csv"
  with open(quoted_csv, "w", newline="") as f:
    csv.writer(f).writerows([("image", "caption"), *((f"img{i}.jpg", c)
                                                   for i, c in enumerate(CC3M_CAPTIONS))])
  assert read(quoted_csv)["caption"] == [[c] for c in CC3M_CAPTIONS]

  # A row with the wrong number of fields, or one field spanning lines.
  extra = tmp_path / "extra.tsv"
  extra.write_text("caption\timage\na\timg0.jpg\nb\twith a tab\timg1.jpg\n\nc\timg2.jpg\n")
  with pytest.raises(ValueError, match=r"extra.tsv:3: 3 fields where the header has 2"):
    read(extra)
  assert read(extra, skip_bad_rows=True)["caption"] == [["a"], ["c"]]
  multiline = tmp_path / "multi.csv"
  multiline.write_text('caption,image\n"unclosed,img0.jpg\nb,img1.jpg\nc,img2.jpg\n"x",img3.jpg\n')
  with pytest.raises(ValueError, match=r"multi.csv:2-5: "):
    read(multiline)
  with pytest.raises(ValueError, match="manifest_quoting"):
    read(tsv, quoting="pandas")


def test_jsonl_bad_lines_are_named_or_skipped_and_counted(tmp_path, caplog):
  lines = [json.dumps({"image": f"img{i}.png", "caption": f"photo {i}", "label": i})
           for i in range(20)]
  lines[17] = '{"image": "img17.png", "caption": "photo 17"'  # line 18: cut short
  path = tmp_path / "m.jsonl"
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=r"m.jsonl:18: not valid JSON .*skip_bad_rows") as e:
    read(path)
  assert "\n" not in str(e.value)
  with caplog.at_level("WARNING"):
    rows = read(path, skip_bad_rows=True)
  assert len(rows["image_path"]) == 19 and ["photo 17"] not in rows["caption"]
  assert "m.jsonl:18" in caplog.text and "skipped 1 bad row(s) of 20" in caplog.text

  lines[17] = json.dumps(["img17.png", "photo 17"])  # a list, not an object
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=r"m.jsonl:18: a list in JSON, not an object"):
    read(path)
  for bad, message in [({"image": "a.png", "caption": 3}, "is a number"),
                       ({"image": "a.png", "caption": ["x", None]}, "is a list"),
                       ({"image": ["a.png"], "caption": "x"}, "image path 'image' is a list"),
                       ({"image": "a.png", "caption": "x", "label": "cat"}, "label 'label'")]:
    lines[17] = json.dumps(bad)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"m.jsonl:18: .*{message}"):
      read(path, label_key="label" if "label" in bad else None)


def test_jsonl_columns_are_the_union_and_empty_captions_are_dropped(tmp_path, caplog):
  rows = [{"image": "img0.png"},  # no caption in the first row only
          {"image": "img1.png", "caption": "a cat", "extra": 1},
          {"image": "img2.png", "caption": "line one\u2028same line"},  # not a line break
          {"image": "img3.png", "caption": "   "}, {"image": "img4.png", "caption": ""},
          {"image": "img5.png", "caption": ["", " \t"]}, {"image": "img6.png", "caption": []},
          {"image": None, "caption": "no image"},
          {"image": "img8.png", "caption": ["", "a dog", "a small dog"]}]
  path = tmp_path / "m.jsonl"
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
  with caplog.at_level("WARNING"):
    out = read(path)
  assert out["caption"] == [["a cat"], ["line one\u2028same line"], ["a dog", "a small dog"]]
  assert out["image_path"] == [str(tmp_path / f"img{i}.png") for i in (1, 2, 8)]
  assert ("dropped 6 of 9 rows: 1 without an image path, 1 without a caption, 4 whose "
          "captions are all empty or whitespace") in caplog.text
  csv_path = tmp_path / "m.csv"
  csv_path.write_text("image,caption\nimg0.png,\nimg1.png,a cat\nimg2.png,  \n")
  assert read(csv_path)["caption"] == [["a cat"]]


@pytest.fixture(scope="module")
def caption_lists(local_data):
  """good.jsonl's images, even rows with two captions, odd rows with one (a string)."""
  root, expected = local_data
  words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
           "juliet", "kilo", "lima"]  # the tokenizer's decode splits digit runs
  captions = [[f"photo {words[i]} first", f"photo {words[i]} second"] if i % 2 == 0
              else f"photo {words[i]} only" for i in range(NUM_GOOD)]
  path = root / "caption_lists.jsonl"
  write_jsonl(path, [{"image": f"img{i}.png", "caption": c} for i, c in enumerate(captions)])
  return str(path), [c if isinstance(c, list) else [c] for c in captions], expected


def test_caption_lists_train_on_one_caption_per_epoch(caption_lists, tokenizer):
  path, captions, expected = caption_lists
  config = {"source": "manifest", "path": path, "seed": 3}
  batches = take(train_iter(config, tokenizer), 12)  # 4 epochs of 12 rows, 4 per step
  drawn = {i: [] for i in range(NUM_GOOD)}
  for batch in batches:
    for i, ids in zip(row_ids(batch, expected["pixels"]), batch["input_ids"], strict=True):
      drawn[i].append(tokenizer.decode(ids))
  for i, texts in drawn.items():
    assert len(texts) == 4 and set(texts) <= set(captions[i]), (i, texts)  # never a repr
  assert any(len(set(drawn[i])) == 2 for i in range(0, NUM_GOOD, 2))
  # The draw is a function of (seed, row, epoch): a resume sees the same captions.
  assert_batches_equal(batches[5:], take(train_iter(config, tokenizer, start=5), 7))


def test_a_caption_list_is_not_trained_as_its_repr(local_data, tokenizer, tmp_path):
  root, _ = local_data
  (tmp_path / "a.png").write_bytes((root / "img0.png").read_bytes())
  (tmp_path / "train.jsonl").write_text(
      '{"image": "a.png", "caption": ["a red square", "a small red image"]}\n')
  config = {"source": "manifest", "path": str(tmp_path / "train.jsonl")}
  assert read(tmp_path / "train.jsonl")["caption"] == [["a red square", "a small red image"]]
  # One row, 4 per batch: each batch is 4 epochs, each drawing one of the two captions.
  texts = [tokenizer.decode(ids) for b in take(train_iter(config, tokenizer), 4)
           for ids in b["input_ids"]]
  assert set(texts) == {"a red square", "a small red image"}


def test_caption_lists_evaluate_every_caption(caption_lists, tokenizer):
  path, captions, expected = caption_lists
  config = {"source": "manifest", "path": path, "eval_path": path}
  batches = list(eval_data(config, tokenizer, batch=5, pad_remainder=True))
  first = [tokenizer.decode(ids) for b in batches for ids in b["input_ids"][b["mask"]]]
  assert first == [c[0] for c in captions]
  texts, owners, offset = [], [], 0
  for batch in batches:
    n = int(batch["mask"].sum())
    assert len(batch["text_input_ids"]) == len(batch["text_image"])
    assert batch["text_image"].max() < n  # padding rows have no captions
    texts += [tokenizer.decode(ids) for ids in batch["text_input_ids"]]
    owners += (offset + batch["text_image"]).tolist()
    offset += n
  assert texts == [c for row in captions for c in row]
  assert owners == [i for i, row in enumerate(captions) for _ in row]


def test_manifest_knobs_in_the_data_config(local_data, tokenizer):
  with pytest.raises(ValueError, match="manifest_quoting"):
    train_iter({"source": "manifest", "path": "x.tsv", "manifest_quoting": "excel"}, tokenizer)
  with pytest.raises(ValueError, match="max_image_pixels"):
    train_iter({"max_image_pixels": -1}, tokenizer)
  config = defaults.default_data_config()
  assert config.manifest_quoting is None and config.skip_bad_rows is False
  assert config.max_image_pixels == preprocess.DEFAULT_MAX_IMAGE_PIXELS == 89_478_485
  config.manifest_quoting = "csv"  # placeholders take a value from the command line
  config.max_image_pixels = None


def test_the_demo_config_reads_a_manifest(local_data, tokenizer):
  import importlib.util

  from clipdistill_jax import config_lib

  root, _ = local_data
  assert config_lib.base_config().data.caption_key is None  # COCO's key only where named
  spec = importlib.util.spec_from_file_location(
      "demo_config", os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.source = "manifest"
  config.data.path = str(root / "good.jsonl")
  config_lib.resolve(config)  # data.seed None -> config.seed, as every entry point does
  batch = next(train_iter(config.data, tokenizer))
  assert batch["image"].shape == (4, SIZE, SIZE, 3)


# --- images: bit depths, size limit ---------------------------------------------------------


def grey_levels(normalized):
  return (normalized * np.asarray(preprocess.OPENAI_STD) + np.asarray(preprocess.OPENAI_MEAN)) * 255


def test_16bit_images_decode_like_8bit_in_every_path(tmp_path, tokenizer):
  from clipdistill_jax.export import onnx_runtime

  pixels, _, _ = SyntheticCaptions(40, seed=9).example(3)
  photo8 = np.asarray(Image.fromarray(pixels).convert("L"))
  photo16 = np.minimum(photo8.astype(np.uint32) * 257 + 100, 65535).astype(np.uint16)
  encoded = {8: png_bytes(photo8), 16: png_bytes(photo16)}
  assert Image.open(io.BytesIO(encoded[16])).mode == "I;16"
  for bits, data in encoded.items():
    (tmp_path / f"{bits}.png").write_bytes(data)
  write_jsonl(tmp_path / "m.jsonl", [{"image": f"{b}.png", "caption": "x"} for b in (8, 16)])
  manifest = str(tmp_path / "m.jsonl")
  pattern = write_img2dataset_shards(tmp_path / "shards", [encoded[8], encoded[16]],
                                     ["x", "x"], 1)
  paths = {
      "manifest": {"source": "manifest", "path": manifest, "eval_path": manifest},
      "tfrecord": {"source": "tfrecord", "path": pattern, "eval_path": pattern},
  }
  for name, config in paths.items():
    images = np.concatenate([b["image"] for b in eval_data(config, tokenizer)])
    means = grey_levels(images).mean(axis=(1, 2, 3))
    assert len(means) == 2 and abs(means[0] - means[1]) < 1, (name, means)
    assert means[0] > 20  # the photo, not black or white
  cli = [grey_levels(onnx_runtime.load_image_file(tmp_path / f"{b}.png", SIZE)).mean()
         for b in (8, 16)]
  assert abs(cli[0] - cli[1]) < 1


def test_max_image_pixels_applies_to_the_pipelines(tmp_path, tokenizer, caplog):
  big = SyntheticCaptions(40, seed=1).example(0)[0]  # 1600 pixels
  small = SyntheticCaptions(20, seed=1).example(0)[0]  # 400 pixels
  (tmp_path / "big.png").write_bytes(png_bytes(big))
  (tmp_path / "small.png").write_bytes(png_bytes(small))
  write_jsonl(tmp_path / "m.jsonl", [{"image": "big.png", "caption": "big"},
                                     {"image": "small.png", "caption": "small"}])
  manifest = str(tmp_path / "m.jsonl")
  config = {"source": "manifest", "path": manifest, "eval_path": manifest,
            "max_image_pixels": 1000}
  preprocess._TOO_LARGE_WARNINGS[0] = 10
  with caplog.at_level("WARNING"):
    data = eval_data(config, tokenizer)
    assert sum(len(b["image"]) for b in data) == 1
  assert data.num_skipped == 1 and "1,600 pixels is over the limit of 1,000" in caplog.text
  for no_limit in (None, 0):
    data = eval_data({**config, "max_image_pixels": no_limit}, tokenizer)
    assert sum(len(b["image"]) for b in data) == 2 and data.num_skipped == 0


# --- img2dataset TFRecords ---------------------------------------------------------------------


def test_tfrecord_img2dataset_shards(local_data, tokenizer, tmp_path):
  root, expected = local_data
  encoded = [(root / f"img{i}.png").read_bytes() for i in range(NUM_GOOD)]
  pattern = write_img2dataset_shards(tmp_path / "good", encoded, expected["captions"], 3)
  config = {"source": "tfrecord", "path": pattern, "eval_path": pattern, "shuffle_buffer": 8}

  batches = list(eval_data(config, tokenizer, batch=5))
  ids = sum((row_ids(b, expected["pixels"]) for b in batches), [])
  assert sorted(ids) == list(range(NUM_GOOD))
  np.testing.assert_array_equal(np.concatenate([b["input_ids"] for b in batches]),
                                tokenizer([expected["captions"][i] for i in ids], CONTEXT)[0])

  uninterrupted = take(train_iter(config, tokenizer), 6)
  for batch in uninterrupted:  # images and captions stay paired
    np.testing.assert_array_equal(
        batch["input_ids"],
        tokenizer([expected["captions"][i] for i in row_ids(batch, expected["pixels"])],
                  CONTEXT)[0])
  assert_batches_equal(uninterrupted[3:], take(train_iter(config, tokenizer, start=3), 3))
  # 3 files, 2 hosts: file-level shards, disjoint.
  host_ids = [set(sum((row_ids(b, expected["pixels"])
                       for b in eval_data(config, tokenizer, index=i, count=2)), []))
              for i in range(2)]
  assert not host_ids[0] & host_ids[1] and host_ids[0] | host_ids[1] == set(range(NUM_GOOD))

  with_corrupt = write_img2dataset_shards(
      tmp_path / "corrupt", [*encoded, b"garbage"], [*expected["captions"], "bad"], 2)
  config = {"source": "tfrecord", "path": with_corrupt, "eval_path": with_corrupt}
  iterator = train_iter(config, tokenizer)
  for step in range(1, 9):
    row_ids(next(iterator), expected["pixels"])
    assert iterator.num_read - iterator.num_skipped == 4 * step
  assert iterator.num_skipped >= 2  # 2.5 epochs of 13 records, one of them corrupt
  data = eval_data(config, tokenizer)
  assert sum(len(b["image"]) for b in data) == NUM_GOOD and data.num_skipped == 1


def test_tfrecord_caption_lists_and_empty_captions(local_data, tokenizer, tmp_path):
  import tensorflow as tf

  root, expected = local_data
  captions = [["photo alpha first", "photo alpha second"], ["photo bravo"], ["   "], [],
              ["", "photo delta"]]
  (tmp_path / "shards").mkdir()
  with tf.io.TFRecordWriter(str(tmp_path / "shards" / "0.tfrecord")) as writer:
    for i, texts in enumerate(captions):
      feature = {"jpg": tf.train.Feature(bytes_list=tf.train.BytesList(
          value=[(root / f"img{i}.png").read_bytes()]))}
      if texts:
        feature["txt"] = tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[t.encode() for t in texts]))
      writer.write(tf.train.Example(
          features=tf.train.Features(feature=feature)).SerializeToString())
  pattern = str(tmp_path / "shards" / "*.tfrecord")
  config = {"source": "tfrecord", "path": pattern, "eval_path": pattern, "shuffle_buffer": 1}
  data = eval_data(config, tokenizer)
  batches = list(data)
  assert data.num_read == 5 and data.num_skipped == 2  # "   " and no caption at all
  assert [tokenizer.decode(ids) for ids in batches[0]["text_input_ids"]] == [
      "photo alpha first", "photo alpha second", "photo bravo", "photo delta"]
  assert batches[0]["text_image"].tolist() == [0, 0, 1, 2]
  iterator = train_iter(config, tokenizer, batch=3)
  texts = {tokenizer.decode(ids) for b in take(iterator, 6) for ids in b["input_ids"]}
  assert texts <= {"photo alpha first", "photo alpha second", "photo bravo", "photo delta"}
  assert iterator.num_skipped >= 2


# --- tfds ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """A tiny tfds dataset (image, caption, label) prepared offline, read back by name only."""
  import tensorflow_datasets as tfds

  colours = ["red", "green", "blue"]

  class ClipdistillTinyShapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "caption": tfds.features.Text(),
          "captions": tfds.features.Sequence({"text": tfds.features.Text()}),  # coco-like
          "label": tfds.features.ClassLabel(names=colours)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(0, 10), "test": self._generate_examples(100, 7)}

    def _generate_examples(self, offset, n):
      for i in range(n):
        label = i % 3
        pixels = np.zeros((36, 30, 3), np.uint8)
        pixels[..., label] = 60 + 15 * i
        caption = f"a {colours[label]} image number {i}"
        # The last train image has no captions at all: skipped and counted.
        texts = [] if offset == 0 and i == n - 1 else [caption, f"{caption}, again"]
        yield offset + i, {"image": pixels, "caption": caption, "label": label,
                           "captions": {"text": texts}}

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  ClipdistillTinyShapes(data_dir=data_dir).download_and_prepare()
  return data_dir


def test_tfds_caption_dataset(tfds_dir, tokenizer):
  config = {"source": "tfds", "name": "clipdistill_tiny_shapes", "data_dir": tfds_dir,
            "caption_key": "caption", "label_key": "label", "shuffle_buffer": 4}
  captions = [f"a {['red', 'green', 'blue'][i % 3]} image number {i}" for i in range(10)]
  known = {tuple(ids) for ids in tokenizer(captions, CONTEXT)[0].tolist()}
  uninterrupted = take(train_iter(config, tokenizer), 5)
  for batch in uninterrupted:
    assert {tuple(ids) for ids in batch["input_ids"].tolist()} <= known
    # Colour of the image == colour named in the caption.
    texts = [tokenizer.decode(ids) for ids in batch["input_ids"]]
    channels = batch["image"].mean(axis=(1, 2)).argmax(axis=-1)
    assert all(["red", "green", "blue"][c] in t for c, t in zip(channels, texts, strict=True))
  assert_batches_equal(uninterrupted[2:], take(train_iter(config, tokenizer, start=2), 3))

  shards = [list(eval_data(config, tokenizer, batch=3, index=i, count=2)) for i in range(2)]
  ids = [tuple(x) for shard in shards for b in shard for x in b["input_ids"].tolist()]
  test_captions = [f"a {['red', 'green', 'blue'][i % 3]} image number {i}" for i in range(7)]
  assert sorted(ids) == sorted(tuple(x) for x in tokenizer(test_captions, CONTEXT)[0].tolist())
  labels = [label for shard in shards for b in shard for label in b["label"].tolist()]
  assert sorted(labels) == sorted(i % 3 for i in range(7))

  # Several captions per image (coco_captions' "captions/text"): training draws among them,
  # evaluation takes the first.
  config = {**config, "caption_key": "captions/text"}
  iterator = train_iter(config, tokenizer)
  texts = {tokenizer.decode(ids) for b in take(iterator, 5) for ids in b["input_ids"]}
  assert any(t.endswith("again") for t in texts) and not all(t.endswith("again") for t in texts)
  assert not any("number 9" in t for t in texts) and iterator.num_skipped >= 1
  eval_texts = [tokenizer.decode(ids) for b in eval_data(config, tokenizer)
                for ids in b["input_ids"]]
  assert sorted(eval_texts) == sorted(test_captions)


def test_tfds_label_dataset(tfds_dir, tokenizer):
  templates = ("a photo of a {}.", "a {} thing.")
  config = {"source": "tfds", "name": "clipdistill_tiny_shapes", "data_dir": tfds_dir,
            "label_key": "label", "templates": templates, "class_names": ["rot", "grün", "blau"]}
  prompts = [t.format(c) for t in templates for c in ("rot", "grün", "blau")]
  by_ids = dict(zip((tuple(x) for x in tokenizer(prompts, CONTEXT)[0].tolist()), prompts,
                    strict=True))
  used = set()
  for batch in take(train_iter(config, tokenizer), 5):
    channels = batch["image"].mean(axis=(1, 2)).argmax(axis=-1)
    for channel, ids in zip(channels, batch["input_ids"].tolist(), strict=True):
      prompt = by_ids[tuple(ids)]
      assert ("rot", "grün", "blau")[channel] in prompt
      used.add(prompt)
  assert any(p.startswith("a photo") for p in used) and any(p.endswith("thing.") for p in used)

  data = eval_data(config, tokenizer, batch=4)
  assert data.class_names == ["rot", "grün", "blau"] and data.templates == templates
  batches = list(data)
  assert data.num_examples == 7 and sum(len(b["label"]) for b in batches) == 7
  for batch in batches:
    channels = batch["image"].mean(axis=(1, 2)).argmax(axis=-1)
    np.testing.assert_array_equal(channels, batch["label"])


def test_tfds_missing_dataset_says_what_to_do(tmp_path, tokenizer):
  config = {"source": "tfds", "name": "clipdistill_no_such_data", "data_dir": str(tmp_path)}
  with pytest.raises(FileNotFoundError, match="data_dir"):
    train_iter(config, tokenizer)


def test_tfds_finds_the_caption_feature_and_keeps_every_caption(tfds_dir, tokenizer):
  config = {"source": "tfds", "name": "clipdistill_tiny_shapes", "data_dir": tfds_dir}
  test_captions = [f"a {['red', 'green', 'blue'][i % 3]} image number {i}" for i in range(7)]
  batches = list(eval_data(config, tokenizer))  # no caption_key: 'caption' found by name
  texts = [tokenizer.decode(ids) for b in batches for ids in b["input_ids"]]
  assert sorted(texts) == sorted(test_captions)
  lists = list(eval_data({**config, "caption_key": "captions/text"}, tokenizer, batch=4))
  ids = [tuple(x) for b in lists for x in b["text_input_ids"].tolist()]
  every = test_captions + [f"{c}, again" for c in test_captions]
  assert sorted(ids) == sorted(tuple(x) for x in tokenizer(every, CONTEXT)[0].tolist())
  assert all((np.bincount(b["text_image"]) == 2).all() for b in lists)


# --- teacher / student ---------------------------------------------------------------------------


def test_check_compatible():
  teacher = tiny_config(image_size=32, context_length=16, eos_token_id=2)  # legacy argmax pooling
  student = tiny_config(image_size=32, context_length=12)
  shared = compat.check_compatible(teacher, student)
  assert (shared.image_size, shared.context_length) == (32, 12)
  assert compat.check_compatible(teacher.to_dict(), student.to_dict()) == shared
  with pytest.raises(compat.IncompatibleInputsError, match="image_size: teacher 32, student 64"):
    compat.check_compatible(teacher, tiny_config(image_size=64))
  with pytest.raises(compat.IncompatibleInputsError, match="vocab_size"):
    compat.check_compatible(teacher, tiny_config(vocab_size=1000))
  openai = preprocess.preprocessor_config(32)
  compat.check_compatible(teacher, student, teacher_preprocessor=openai)
  imagenet = {**openai, "image_mean": [0.485, 0.456, 0.406]}
  with pytest.raises(compat.IncompatibleInputsError, match="share one tokenizer and one image"):
    compat.check_compatible(teacher, student, teacher_preprocessor=imagenet)


if __name__ == "__main__":
  sys.exit(pytest.main([os.path.abspath(__file__), "-v"]))
