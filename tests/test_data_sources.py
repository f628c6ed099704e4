"""Training sources for users' own files: WebDataset tar shards (img2dataset's default output)
and class folders of labelled photos. Shards and folders are written here, with Python's
tarfile and PIL."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from clipdistill_jax.data import pipeline, preprocess, webdataset_source
from clipdistill_jax.data.synthetic import SyntheticCaptions
from clipdistill_jax.data.tokenizer import load_tokenizer

SIZE, CONTEXT, NUM = 32, 16, 12


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer()


def png_bytes(pixels) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")  # lossless: exact expected pixels
  return buffer.getvalue()


@pytest.fixture(scope="module")
def photos():
  """NUM rendered images (40 px, so the pipeline really resizes), their captions, and the
  pixels the pipeline must produce."""
  source = SyntheticCaptions(40, seed=5)
  images, captions = zip(*[source.example(i)[:2] for i in range(NUM)], strict=True)
  expected = np.stack([preprocess.preprocess_image(image, SIZE) for image in images])
  return [png_bytes(image) for image in images], list(captions), expected


def add_member(tar, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_shards(directory, samples, num_shards: int) -> list:
  """img2dataset's webdataset layout: shard SSSSS.tar, sample i's members KEY.jpg, KEY.txt,
  KEY.json ({"caption", "url", ...}); `samples` are dicts extension -> bytes."""
  directory.mkdir(exist_ok=True)
  paths = []
  for shard in range(num_shards):
    paths.append(directory / f"{shard:05d}.tar")
    with tarfile.open(paths[-1], "w") as tar:
      for i in range(shard, len(samples), num_shards):
        for extension, data in samples[i].items():
          add_member(tar, f"{shard:05d}{i:04d}.{extension}", data)
  return paths


def img2dataset_samples(photos):
  encoded, captions, _ = photos
  return [{"jpg": encoded[i], "txt": captions[i].encode(),
           "json": json.dumps({"caption": captions[i], "alt": [f"alt {i}", f"other {i}"],
                               "url": f"http://x/{i}.jpg"}).encode()}
          for i in range(NUM)]


def row_ids(batch, expected):
  distances = np.abs(batch["image"][:, None] - expected[None]).max(axis=(2, 3, 4))
  np.testing.assert_allclose(distances.min(axis=1), 0, atol=1e-5)
  return distances.argmin(axis=1).tolist()


def train_iter(config, tokenizer, *, start=0, index=0, count=1, batch=4):
  return pipeline.make_train_iterator(
      config, global_batch_size=batch, image_size=SIZE, context_length=CONTEXT,
      tokenizer=tokenizer, process_index=index, process_count=count, start_step=start)


def eval_data(config, tokenizer, *, index=0, count=1):
  return pipeline.make_eval_dataset(
      config, batch_size=5, image_size=SIZE, context_length=CONTEXT, tokenizer=tokenizer,
      process_index=index, process_count=count)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def tokens(tokenizer, captions):
  return tokenizer(list(captions), CONTEXT)[0]


# --- webdataset -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory, photos):
  root = tmp_path_factory.mktemp("wds")
  write_shards(root / "good", img2dataset_samples(photos), num_shards=3)
  return root


def test_webdataset_brace_patterns_globs_and_missing_shards(shards):
  good = shards / "good"
  expected = [str(good / f"{s:05d}.tar") for s in range(3)]
  assert webdataset_source.list_shards(str(good / "{00000..00002}.tar")) == expected
  assert webdataset_source.list_shards(str(good / "*.tar")) == expected
  # Comma-separated patterns; the comma inside braces belongs to the brace list.
  assert webdataset_source.list_shards(
      f"{good}/{{00000,00002}}.tar,{good}/00001.tar") == expected
  with pytest.raises(FileNotFoundError, match=r"1 webdataset shard path.*00003\.tar"):
    webdataset_source.list_shards(str(good / "{00000..00003}.tar"))


def test_webdataset_shards_train_evaluate_and_resume_exactly(shards, photos, tokenizer):
  _, captions, expected = photos
  pattern = str(shards / "good" / "{00000..00002}.tar")
  config = {"source": "webdataset", "path": pattern, "eval_path": pattern,
            "shuffle_buffer": 8, "seed": 3}
  # Evaluation: every sample once, shards in order, KEY.txt as the caption.
  data = eval_data(config, tokenizer)
  batches = list(data)
  ids = sum((row_ids(b, expected) for b in batches), [])
  assert ids == [0, 3, 6, 9, 1, 4, 7, 10, 2, 5, 8, 11] and data.num_skipped == 0
  np.testing.assert_array_equal(np.concatenate([b["input_ids"] for b in batches]),
                                tokens(tokenizer, [captions[i] for i in ids]))
  # Training: images and captions stay paired; a resume at step 3 repeats steps 3.. exactly.
  uninterrupted = take(train_iter(config, tokenizer), 7)
  for batch in uninterrupted:
    np.testing.assert_array_equal(
        batch["input_ids"], tokens(tokenizer, [captions[i] for i in row_ids(batch, expected)]))
  # Shuffled (the buffer mixes neighbouring epochs, as for TFRecords), every sample read.
  first_epoch = sum((row_ids(b, expected) for b in uninterrupted[:3]), [])
  assert first_epoch != ids
  assert set(sum((row_ids(b, expected) for b in uninterrupted), [])) == set(range(NUM))
  for a, b in zip(uninterrupted[3:], take(train_iter(config, tokenizer, start=3), 4),
                  strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
  # Another seed, another order.
  other = take(train_iter({**config, "seed": 4}, tokenizer), 3)
  assert sum((row_ids(b, expected) for b in other), []) != first_epoch
  # 3 shards, 2 hosts: shards dealt round-robin, disjoint, together everything.
  hosts = [set(sum((row_ids(b, expected) for b in eval_data(config, tokenizer, index=i,
                                                            count=2)), []))
           for i in range(2)]
  assert hosts == [{0, 3, 6, 9, 2, 5, 8, 11}, {1, 4, 7, 10}]
  # 3 shards, 4 hosts: every host reads all shards and keeps every 4th sample.
  hosts = [sum((row_ids(b, expected) for b in eval_data(config, tokenizer, index=i,
                                                        count=4)), []) for i in range(4)]
  assert sorted(sum(hosts, [])) == list(range(NUM)) and all(len(h) == 3 for h in hosts)
  # The first N samples only, every epoch.
  subset = take(train_iter({**config, "num_train_examples": 4}, tokenizer), 3)
  assert set(sum((row_ids(b, expected) for b in subset), [])) == {0, 3, 6, 9}


def test_webdataset_json_captions_and_caption_lists(shards, photos, tokenizer):
  _, captions, expected = photos
  pattern = str(shards / "good" / "*.tar")
  # The 'caption' field of KEY.json when there is no KEY.txt.
  no_txt = [{k: v for k, v in s.items() if k != "txt"} for s in img2dataset_samples(photos)]
  json_only = str(shards / "json_only" / "*.tar")
  write_shards(shards / "json_only", no_txt, num_shards=2)
  batches = list(eval_data({"source": "webdataset", "path": json_only, "eval_path": json_only},
                           tokenizer))
  ids = sum((row_ids(b, expected) for b in batches), [])
  np.testing.assert_array_equal(np.concatenate([b["input_ids"] for b in batches]),
                                tokens(tokenizer, [captions[i] for i in ids]))
  # data.caption_key names a JSON field; a list there is several captions of one image.
  config = {"source": "webdataset", "path": pattern, "eval_path": pattern, "caption_key": "alt"}
  batches = list(eval_data(config, tokenizer))
  ids = sum((row_ids(b, expected) for b in batches), [])
  text = np.concatenate([b["text_input_ids"] for b in batches])
  np.testing.assert_array_equal(
      text, tokens(tokenizer, [c for i in ids for c in (f"alt {i}", f"other {i}")]))
  for batch in take(train_iter(config, tokenizer), 6):  # one of the two drawn per use
    drawn = batch["input_ids"].tolist()
    for row, i in zip(drawn, row_ids(batch, expected), strict=True):
      assert row in tokens(tokenizer, [f"alt {i}", f"other {i}"]).tolist()


def test_webdataset_unreadable_members_are_counted(shards, photos, tokenizer, caplog):
  encoded, captions, expected = photos
  samples = img2dataset_samples(photos)[:8]
  samples += [{"jpg": b"not an image", "txt": b"garbage"},  # undecodable image
              {"txt": b"a caption without its image"},  # no image member
              {"jpg": encoded[8], "txt": b"  "},  # an empty caption
              {"jpg": encoded[9], "json": b"{not json"}]  # no usable caption
  bad = shards / "bad"
  paths = write_shards(bad, samples, num_shards=2)
  # A third shard cut short mid-member: its samples before the cut are read, then one count.
  truncated = io.BytesIO()
  with tarfile.open(fileobj=truncated, mode="w") as tar:
    add_member(tar, "x0010.png", encoded[10])
    add_member(tar, "x0010.txt", captions[10].encode())
    add_member(tar, "x0011.png", encoded[11])
  truncated.seek(0)
  with tarfile.open(fileobj=truncated) as tar:
    cut = tar.getmember("x0011.png").offset_data + 100
  (bad / "00002.tar").write_bytes(truncated.getvalue()[:cut])
  pattern = str(bad / "*.tar")
  config = {"source": "webdataset", "path": pattern, "eval_path": pattern}
  data = eval_data(config, tokenizer)
  ids = sum((row_ids(b, expected) for b in data), [])
  assert sorted(ids) == [*range(8), 10]
  assert data.num_read == 14 and data.num_skipped == 5  # 4 bad samples + the broken shard
  assert (f"webdataset shard {paths[0].parent / '00002.tar'}: unreadable after 1 sample"
          in caplog.text)
  iterator = train_iter(config, tokenizer)
  for step in range(1, 8):  # 2 epochs of 14 records
    row_ids(next(iterator), expected)  # only real images reach a batch
    assert iterator.num_read - iterator.num_skipped == 4 * step
  assert iterator.num_skipped >= 5


def test_webdataset_reads_through_tf_gfile(photos, tokenizer):
  # Any tf.io.gfile filesystem (gs://, ...): here TF's in-memory ram://.
  import tensorflow as tf

  _, captions, expected = photos
  for shard in range(2):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
      for i in range(shard, 4, 2):
        add_member(tar, f"{i:04d}.jpg", photos[0][i])
        add_member(tar, f"{i:04d}.txt", captions[i].encode())
    with tf.io.gfile.GFile(f"ram://wds/{shard:05d}.tar", "wb") as f:
      f.write(buffer.getvalue())
  pattern = "ram://wds/{00000..00001}.tar"
  config = {"source": "webdataset", "path": pattern, "eval_path": pattern}
  ids = sum((row_ids(b, expected) for b in eval_data(config, tokenizer)), [])
  assert ids == [0, 2, 1, 3]


def test_webdataset_refuses_views(shards, tokenizer):
  config = {"source": "webdataset", "path": str(shards / "good" / "*.tar"), "num_views": 2,
            "num_train_examples": 4}
  with pytest.raises(ValueError, match="data.num_views=2 needs .* unset data.num_views"):
    train_iter(config, tokenizer)


# --- class folders --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory, photos):
  """4 images in each of cat/, dog/, golden_retriever/ (one in a subfolder), a hidden file
  and a non-image that are ignored."""
  encoded, _, expected = photos
  root = tmp_path_factory.mktemp("folders")
  labels = []
  for i in range(NUM):
    label = i % 3
    folder = root / ("cat", "dog", "golden_retriever")[label]
    folder = folder / "more" if i == 11 else folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{i:02d}.png").write_bytes(encoded[i])
    labels.append(label)
  (root / "cat" / ".hidden.png").write_bytes(encoded[0])
  (root / "dog" / "notes.txt").write_text("not an image")
  return root, np.asarray(labels), expected


def test_folder_source_trains_on_labelled_photos_with_template_captions(class_folder,
                                                                        tokenizer):
  root, labels, expected = class_folder
  names = ("cat", "dog", "golden retriever")
  templates = ("a photo of a {}.", "a picture of a {}.")
  config = {"source": "folder", "path": str(root), "eval_path": str(root), "seed": 2,
            "templates": templates}
  uninterrupted = take(train_iter(config, tokenizer), 6)
  drawn = set()
  for batch in uninterrupted:
    for row, i in zip(batch["input_ids"].tolist(), row_ids(batch, expected), strict=True):
      options = tokens(tokenizer, [t.format(names[labels[i]]) for t in templates]).tolist()
      assert row in options  # the caption names the photo's own class
      drawn.add(options.index(row))
  assert drawn == {0, 1}  # both templates are used
  first_epoch = sum((row_ids(b, expected) for b in uninterrupted[:3]), [])
  assert sorted(first_epoch) == list(range(NUM))
  for a, b in zip(uninterrupted[2:], take(train_iter(config, tokenizer, start=2), 4),
                  strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
  # Two hosts: disjoint halves of the photos.
  hosts = [set(sum((row_ids(b, expected) for b in take(train_iter(
      config, tokenizer, index=i, count=2), 3)), [])) for i in range(2)]
  assert not hosts[0] & hosts[1] and hosts[0] | hosts[1] == set(range(NUM))

  # Evaluation: labels and class names for zero-shot, in sorted folder order.
  data = eval_data(config, tokenizer)
  batches = list(data)
  assert tuple(data.class_names) == names
  ids = sum((row_ids(b, expected) for b in batches), [])
  assert sorted(ids) == list(range(NUM))
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), labels[ids])


def test_folder_source_mistakes_are_named(class_folder, tmp_path, tokenizer):
  root, _, _ = class_folder
  with pytest.raises(ValueError, match="data.class_names has 2 names but .* 3 class folders"):
    train_iter({"source": "folder", "path": str(root), "class_names": ("a", "b")}, tokenizer)
  renamed = eval_data({"source": "folder", "path": str(root), "eval_path": str(root),
                       "class_names": ("kitty", "puppy", "goldie")}, tokenizer)
  assert tuple(renamed.class_names) == ("kitty", "puppy", "goldie")
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    train_iter({"source": "folder", "path": str(tmp_path / "nowhere")}, tokenizer)
  (tmp_path / "empty" / "cat").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="No images"):
    train_iter({"source": "folder", "path": str(tmp_path / "empty")}, tokenizer)
  with pytest.raises(ValueError, match="needs data.path"):
    train_iter({"source": "folder"}, tokenizer)
  with pytest.raises(ValueError, match="captioned by templates"):
    train_iter({"source": "folder", "path": str(root), "num_views": 2}, tokenizer)


def test_a_student_trains_on_a_class_folder(class_folder, tmp_path):
  # The point of the folder source: fine-tune or distil on one's own labelled photos, end to
  # end through the trainer (a few steps of the tiny contrastive run).
  import importlib.util

  from trainer_procs import TINY_CONFIG

  from clipdistill_jax import train

  spec = importlib.util.spec_from_file_location("tiny_train", TINY_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  root, _, _ = class_folder
  config.data.update(dict(source="folder", path=str(root), templates=("a photo of a {}.",)))
  config.eval.every = 0
  # tiny_train's batch (16) and shapes: the program other tests compiled, from the cache.
  config.train.update(dict(total_steps=2, log_every=1, checkpoint_every=2))
  result = train.train(config, str(tmp_path))
  assert result["metrics"]["data/num_read"] >= 32 and result["metrics"]["data/num_skipped"] == 0
  assert np.isfinite(result["metrics"]["loss/total"])
