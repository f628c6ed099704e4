"""data.num_train_examples: training on a fixed subset, epoch after epoch, for every source."""

import collections
import json

import numpy as np
import pytest
from test_data import SIZE, row_ids, write_img2dataset_shards, write_jsonl, write_local_set

from clipdistill_jax.data import caches, pipeline, preprocess
from clipdistill_jax.data.synthetic import SyntheticCaptions
from clipdistill_jax.data.tokenizer import load_tokenizer

CONTEXT, ROWS = 16, 10


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer()


def batches(config, tokenizer, n, *, batch, start=0, index=0, count=1):
  it = pipeline.make_train_iterator(
      config, global_batch_size=batch, image_size=SIZE, context_length=CONTEXT,
      tokenizer=tokenizer, process_index=index, process_count=count, start_step=start)
  return it, [next(it) for _ in range(n)]


def test_synthetic_subset_is_a_fresh_permutation_each_epoch(tokenizer):
  config = {"source": "synthetic", "num_train_examples": 8, "seed": 3}
  it, _ = batches(config, tokenizer, 0, batch=4)
  epochs = [it.example_indices(range(8 * e, 8 * (e + 1))) for e in range(3)]
  for order in epochs:
    assert sorted(order) == list(range(8))  # the same 8 examples every epoch
  assert len({tuple(o) for o in epochs}) == 3  # in a fresh order each time
  # Without the knob the stream is endless: position p is example p.
  full, _ = batches({"source": "synthetic"}, tokenizer, 0, batch=4)
  assert full.example_indices(range(20, 24)) == [20, 21, 22, 23]
  # The batches hold exactly those examples, and a resume mid-epoch repeats them.
  _, run = batches(config, tokenizer, 5, batch=4)
  data = SyntheticCaptions(SIZE, seed=3)
  want = data.examples(epochs[0][4:8])[0]
  np.testing.assert_allclose(run[1]["image"], preprocess.preprocess_images(want, SIZE))
  _, resumed = batches(config, tokenizer, 2, batch=4, start=3)
  for a, b in zip(run[3:], resumed, strict=True):
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
  # Two hosts split each global batch of the subset.
  _, host0 = batches(config, tokenizer, 1, batch=4, index=0, count=2)
  _, host1 = batches(config, tokenizer, 1, batch=4, index=1, count=2)
  np.testing.assert_array_equal(np.concatenate([host0[0]["image"], host1[0]["image"]]),
                                run[0]["image"])


def test_a_synthetic_subset_held_in_memory_reads_what_rendering_each_time_reads(tokenizer,
                                                                              monkeypatch):
  config = {"source": "synthetic", "num_train_examples": 8, "seed": 3}
  _, cached = batches(config, tokenizer, 6, batch=4)  # three epochs, rendered once
  monkeypatch.setattr(pipeline, "_SYNTHETIC_CACHE_BYTES", 0)
  it, rendered = batches(config, tokenizer, 6, batch=4)
  assert it._cache is None
  for a, b in zip(cached, rendered, strict=True):
    for key in ("image", "input_ids", "attention_mask"):
      np.testing.assert_array_equal(a[key], b[key])
      assert a[key].dtype == b[key].dtype


@pytest.mark.parametrize("source", ["manifest", "tfrecord"])
def test_a_local_set_held_in_memory_reads_what_decoding_each_time_reads(tmp_path, tokenizer,
                                                                      monkeypatch, source):
  """data.decoded_cache_mb: each good image of a manifest (files by path) or of TFRecords
  (bytes; a fixed subset, ids in record order) is decoded once in three epochs, the batches
  are those of decoding at every read (crops and flips included), and a broken image is
  still read, and counted, every epoch."""
  root, _, _ = write_local_set(tmp_path, ROWS, render_size=48, seed=5)  # resized to SIZE
  (root / "broken.png").write_bytes(b"not an image")
  rows = [json.loads(line) for line in (root / "m.jsonl").read_text().splitlines()]
  rows.append({"image": "broken.png", "caption": "a broken file"})
  write_jsonl(root / "m2.jsonl", rows)
  pattern = write_img2dataset_shards(
      root / "shards2", [(root / row["image"]).read_bytes() for row in rows],
      [row["caption"] for row in rows], num_shards=2)
  decoded = collections.Counter()
  decode_image = preprocess.decode_image

  def counting_decode(encoded, *args, **kwargs):
    decoded[bytes(encoded)] += 1
    return decode_image(encoded, *args, **kwargs)

  monkeypatch.setattr(preprocess, "decode_image", counting_decode)
  config = {"seed": 3, "crop_min_scale": 0.6, "flip": True, "num_parallel_calls": 1,
            **({"source": "manifest", "path": str(root / "m2.jsonl")} if source == "manifest"
               else {"source": "tfrecord", "path": pattern, "num_train_examples": ROWS + 1})}
  runs = {}
  for cache_mb in (1024, 0):
    decoded.clear()
    it, run = batches({**config, "decoded_cache_mb": cache_mb}, tokenizer, 6, batch=5)
    runs[cache_mb] = run, dict(decoded), it.num_skipped
    it.close()
  (cached, cached_decodes, cached_skipped), (each, each_decodes, each_skipped) = runs[1024], runs[0]
  for a, b in zip(cached, each, strict=True):
    for key in ("image", "input_ids", "attention_mask"):
      np.testing.assert_array_equal(a[key], b[key])
  broken = b"not an image"
  assert cached_skipped == each_skipped >= 2  # 30 good examples: the broken one read 2-3 times
  assert cached_decodes.pop(broken) >= 2 and each_decodes.pop(broken) >= 2
  # 30 good examples read: each decoded once with the cache, at every read without it.
  assert set(cached_decodes.values()) == {1} and sum(each_decodes.values()) >= 3 * ROWS
  if source == "manifest":  # three whole epochs; TFRecords' shuffle buffer mixes epochs
    assert len(cached_decodes) == len(each_decodes) == ROWS
    assert min(each_decodes.values()) >= 2


def test_decoded_image_cache_keeps_what_fits():
  cache = caches.DecodedImageCache(max_bytes=2 * 16 * 16 * 3)
  pixels = [np.full((16, 16, 3), i, np.uint8) for i in range(3)]
  for i, image in enumerate(pixels):
    cache.put(i, image)
  assert len(cache) == 2 and cache.nbytes == 2 * 16 * 16 * 3
  np.testing.assert_array_equal(cache.get(1), pixels[1])
  assert cache.get(2) is None
  assert (cache.hits, cache.misses) == (1, 1)
  with pytest.raises(ValueError, match=r"data.decoded_cache_mb=-1 must be .* >= 0"):
    pipeline.resolve_data_config({"decoded_cache_mb": -1})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  return write_local_set(tmp_path_factory.mktemp("subset"), ROWS, render_size=SIZE, seed=11)


def test_manifest_subset_is_its_first_rows(files, tokenizer):
  root, pixels, _ = files
  config = {"source": "manifest", "path": str(root / "m.jsonl"), "num_train_examples": 4}
  _, run = batches(config, tokenizer, 3, batch=4)
  for batch in run:  # each step is one whole epoch of the 4 rows, in a new order
    assert sorted(row_ids(batch, pixels)) == [0, 1, 2, 3]
  assert len({tuple(row_ids(b, pixels)) for b in run}) > 1


def test_tfrecord_subset_is_its_first_records(files, tokenizer):
  _, pixels, pattern = files
  # Sorted files, records in file order: shard 00000 holds rows 0, 2, 4, 6, 8.
  config = {"source": "tfrecord", "path": pattern, "num_train_examples": 3, "shuffle_buffer": 4}
  _, run = batches(config, tokenizer, 4, batch=3)
  seen = sum((row_ids(b, pixels) for b in run), [])
  assert set(seen) == {0, 2, 4}


def test_num_train_examples_is_validated(tokenizer):
  with pytest.raises(ValueError, match="num_train_examples"):
    batches({"source": "synthetic", "num_train_examples": 0}, tokenizer, 1, batch=2)
