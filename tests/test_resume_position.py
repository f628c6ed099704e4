"""Exact resume of every training source after unreadable records were dropped.

A checkpoint stores each host's reader state (iterator.state(): the next record's number and
the run's read / skipped counts); a stream rebuilt from it must hand out the uninterrupted
stream's next batches, bit for bit, and go on counting from the run's totals. Restarting at
step x batch instead starts early by the number of records dropped so far.
"""

import numpy as np
import pytest
import test_data
from test_data import (
  CONTEXT,
  SIZE,
  assert_batches_equal,
  take,
  train_iter,
  write_img2dataset_shards,
)

from clipdistill_jax.data import pipeline

# test_data's fixtures: its local image set (a corrupt and a missing file among them), a tiny
# prepared tfds dataset, the tokenizer.
local_data, tfds_dir, tokenizer = test_data.local_data, test_data.tfds_dir, test_data.tokenizer
BATCH, BEFORE, AFTER = 4, 4, 4  # batches before the "preemption", batches compared after it


def resumed_iter(config, tokenizer, state):
  return pipeline.make_train_iterator(
      config, global_batch_size=BATCH, image_size=SIZE, context_length=CONTEXT,
      tokenizer=tokenizer, process_index=0, process_count=1, reader_state=state)


def check_exact_resume(config, tokenizer):
  """Batches BEFORE.. of one stream == those of a stream resumed from its state at BEFORE."""
  stream = train_iter(config, tokenizer, batch=BATCH)
  take(stream, BEFORE)
  state = stream.state()
  assert state["num_skipped"] >= 1, "the data must drop a record before the resume"
  # Each dropped record moved the reader one record past step x batch.
  assert state["position"] == BEFORE * BATCH + state["num_skipped"]
  assert state["num_read"] == state["position"]
  expected = take(stream, AFTER)
  resumed = resumed_iter(config, tokenizer, state)
  assert_batches_equal(expected, take(resumed, AFTER))
  assert resumed.state() == stream.state()  # the whole run's counts, not since the resume
  assert resumed.metrics() == stream.metrics()
  # What a resume at step x batch would have read instead: early, so different batches.
  by_step = train_iter(config, tokenizer, batch=BATCH, start=BEFORE)
  first = next(by_step)
  assert not all(np.array_equal(first[k], expected[0][k]) for k in first)
  for it in (stream, resumed, by_step):
    it.close()


def test_manifest_resumes_exactly_after_dropped_images(local_data, tokenizer):
  root, _ = local_data
  # 14 rows of which one is not an image and one is missing: dropped and counted.
  check_exact_resume({"source": "manifest", "path": str(root / "with_corrupt.jsonl"),
                      "seed": 3}, tokenizer)


def test_manifest_views_resume_exactly_after_dropped_images(local_data, tokenizer):
  root, _ = local_data
  check_exact_resume({"source": "manifest", "path": str(root / "with_corrupt.jsonl"),
                      "num_views": 2, "crop_min_scale": 0.5, "flip": True}, tokenizer)


def test_tfrecord_resumes_exactly_after_dropped_images(local_data, tokenizer, tmp_path):
  root, expected = local_data
  encoded = [(root / f"img{i}.png").read_bytes() for i in range(len(expected["captions"]))]
  captions = list(expected["captions"])
  encoded.insert(3, b"not an image at all")  # an img2dataset shard with one broken record
  captions.insert(3, "a broken record")
  pattern = write_img2dataset_shards(tmp_path / "shards", encoded, captions, num_shards=2)
  check_exact_resume({"source": "tfrecord", "path": pattern, "shuffle_buffer": 4,
                      "crop_min_scale": 0.6}, tokenizer)


def test_tfds_resumes_exactly_after_dropped_images(tfds_dir, tokenizer):
  # The last train example has no captions under captions/text: dropped and counted.
  check_exact_resume({"source": "tfds", "name": "clipdistill_tiny_shapes",
                      "data_dir": tfds_dir, "caption_key": "captions/text",
                      "shuffle_buffer": 4}, tokenizer)


def test_synthetic_reader_state_resumes_like_its_step(tokenizer):
  config = {"source": "synthetic"}
  stream = train_iter(config, tokenizer, batch=BATCH)
  take(stream, 3)
  state = stream.state()
  assert state == {"position": 3 * BATCH, "num_read": 3 * BATCH, "num_skipped": 0}
  assert_batches_equal(take(stream, 2), take(resumed_iter(config, tokenizer, state), 2))
  with pytest.raises(ValueError, match="step boundary"):
    resumed_iter(config, tokenizer, {"position": 3, "num_read": 3, "num_skipped": 0})
