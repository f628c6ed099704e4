"""The cached teacher: written in the trainer's order (step caches) or per example and
augmented view (multi-view caches), checked, refused where it cannot serve a config, and read
by the trainer in place of the live teacher."""

import json

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from test_data import png_bytes, write_jsonl
from tiny_models import tiny_distill_config

from clipdistill_jax import (
  run_builder,
  teacher_cache,
  teacher_cache_format,
  teacher_cache_reader,
  train,
)
from clipdistill_jax.data import pipeline
from clipdistill_jax.data.synthetic import SyntheticCaptions
from clipdistill_jax.data.tokenizer import load_tokenizer
from clipdistill_jax.writers import read_jsonl


def shard_contents(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """A shard's tensors and metadata. Compared as values, not bytes: safetensors writes the
  metadata's keys in an order of its own that changes between processes."""
  with safe_open(str(path), framework="numpy") as f:
    return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def assert_same_shard(got, want) -> None:
  assert got[1] == want[1]
  assert sorted(got[0]) == sorted(want[0])
  for name, array in want[0].items():
    assert got[0][name].dtype == array.dtype
    np.testing.assert_array_equal(got[0][name], array, err_msg=name)


def _cache_config(teacher_dir, **overrides):
  c = tiny_distill_config(**{"loss.weights.hidden": 0.0, "loss.weights.attention": 0.0,
                 "train.batch_size": 8, "train.total_steps": 3, **overrides})
  c.teacher.source = teacher_dir
  return c


def test_cache_round_trip_in_training_order(teacher_dir, tmp_path):
  config = _cache_config(teacher_dir)
  out = teacher_cache.write_teacher_cache(config, tmp_path / "cache", num_steps=3,
                                          steps_per_shard=2, log=lambda m: None)
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["complete"] and manifest["num_steps"] == 3
  assert sorted(p.name for p in out.glob("*.safetensors")) == [
      "teacher-00000000-host000.safetensors", "teacher-00000002-host000.safetensors"]

  cache = teacher_cache_reader.TeacherCache(out)
  cache.check_config(config, process_count=1)
  models = run_builder.build_models(config)
  batches = pipeline.make_train_iterator(
      config.data, global_batch_size=8, image_size=models.student_config.vision_config.image_size,
      context_length=models.context_length, tokenizer=load_tokenizer(None), process_index=0,
      process_count=1)
  embed = jax.jit(lambda p, b: models.teacher.apply({"params": p}, b["image"], b["input_ids"],
                                                     b["attention_mask"]))
  cached_steps = list(zip(range(3), cache.batches(), strict=False))
  assert len(cached_steps) == 3
  for step, cached in cached_steps:
    batch = next(batches)
    batch.pop("num_skipped", None)
    for k in ("teacher_image_embeds", "teacher_text_embeds"):
      assert cached[k].dtype == ml_dtypes.bfloat16 and cached[k].shape == (8, 24)
    merged = teacher_cache_reader.merge_cached(batch, cached, step)  # checks the row order
    want = embed(models.teacher_params, batch)
    np.testing.assert_allclose(merged["teacher_image_embeds"].astype(np.float32),
                               want.image_embeds, atol=1e-2)
    np.testing.assert_allclose(merged["teacher_text_embeds"].astype(np.float32),
                               want.text_embeds, atol=1e-2)
  with pytest.raises(teacher_cache_format.TeacherCacheError, match="ends at step 3"):
    list(cache.batches(start_step=2))
  # Resume: a lost shard is rewritten identically, the others are kept.
  last = out / "teacher-00000002-host000.safetensors"
  before = shard_contents(last)
  last.unlink()
  teacher_cache.write_teacher_cache(config, out, num_steps=3, steps_per_shard=2,
                                    log=lambda m: None)
  assert_same_shard(shard_contents(last), before)
  # A batch from another step is caught.
  with pytest.raises(teacher_cache_format.TeacherCacheError, match="not the ones"):
    teacher_cache_reader.merge_cached(next(batches), cached_steps[0][1], 3)


def test_cached_mode_refuses_what_it_cannot_serve(teacher_dir, tmp_path):
  for overrides, message in (({"loss.weights.hidden": 0.35}, "hidden=0.35"),
                             ({"loss.weights.attention": 0.2}, "attention=0.2"),
                             ({"data.crop_min_scale": 0.5}, "augmentation.*--views K"),
                             ({"data.flip": True}, "augmentation.*--views K")):
    with pytest.raises(teacher_cache_format.TeacherCacheError, match=message):
      teacher_cache_format.check_cacheable(_cache_config(teacher_dir, **overrides))
  with pytest.raises(teacher_cache_format.TeacherCacheError, match="augmentation"):
    teacher_cache.write_teacher_cache(_cache_config(teacher_dir, **{"data.flip": True}),
                                      tmp_path / "x", num_steps=1)
  with pytest.raises(FileNotFoundError, match="python -m clipdistill_jax.teacher_cache"):
    teacher_cache_reader.TeacherCache(tmp_path / "nothing")

  out = tmp_path / "cache"
  teacher_cache.write_teacher_cache(_cache_config(teacher_dir), out, num_steps=2,
                                    log=lambda m: None)
  cache = teacher_cache_reader.TeacherCache(out)
  with pytest.raises(teacher_cache_format.TeacherCacheError, match="global_batch_size"):
    cache.check_config(_cache_config(teacher_dir, **{"train.batch_size": 16}), 1)
  with pytest.raises(teacher_cache_format.TeacherCacheError, match="holds 2 steps"):
    cache.check_config(_cache_config(teacher_dir, **{"train.total_steps": 5}), 1)
  with pytest.raises(teacher_cache_format.TeacherCacheError, match="other settings"):
    teacher_cache.write_teacher_cache(_cache_config(teacher_dir, **{"data.seed": 1}), out,
                                      num_steps=2)


def _component_losses(workdir):
  return {r["step"]: {k: r[k] for k in ("loss/feature", "loss/logit_kl", "loss/contrastive",
                                        "loss/total")}
          for r in read_jsonl(workdir / "metrics.jsonl") if "loss/total" in r}


def test_trainer_reads_the_cache_in_place_of_the_teacher(teacher_dir, tmp_path):
  """Same run twice, teacher live and from the cache: the same losses up to the cache's
  bf16 rounding, at every step."""
  config = _cache_config(teacher_dir, **{"train.log_every": 1, "eval.every": 0,
                                         "train.checkpoint_every": 3})
  cache_dir = teacher_cache.write_teacher_cache(config, tmp_path / "cache", num_steps=3,
                                                log=lambda m: None)
  train.train(config, str(tmp_path / "online"))
  config.teacher.cache_dir = str(cache_dir)
  result = train.train(config, str(tmp_path / "cached"))
  assert result["step"] == 3
  online, cached = (_component_losses(tmp_path / d) for d in ("online", "cached"))
  assert sorted(cached) == [1, 2, 3]
  for step in (1, 2, 3):
    for key, value in online[step].items():
      assert cached[step][key] == pytest.approx(value, rel=2e-2, abs=1e-4), (step, key)

  # Asking for more steps than were cached, or for a teacher-hungry loss, is refused up front.
  config.train.total_steps = 4
  with pytest.raises(teacher_cache_format.TeacherCacheError, match="holds 3 steps"):
    train.train(config, str(tmp_path / "longer"))
  config.train.total_steps, config.loss.weights.attention = 3, 0.2
  with pytest.raises(teacher_cache_format.TeacherCacheError, match="attention=0.2"):
    train.train(config, str(tmp_path / "attention"))


# --- multi-view caches -------------------------------------------------------------------------

VIEWS, ROWS = 3, 12


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
  """ROWS 40 px PNGs with their captions (the pipeline resizes them to the tiny 32 px)."""
  root = tmp_path_factory.mktemp("views_data")
  source = SyntheticCaptions(40, seed=9)
  rows = []
  for i in range(ROWS):
    pixels, caption, _ = source.example(i)
    (root / f"img{i}.png").write_bytes(png_bytes(pixels))
    rows.append({"image": f"img{i}.png", "caption": caption})
  write_jsonl(root / "train.jsonl", rows)
  return str(root / "train.jsonl")


def _views_config(teacher_dir, manifest, **overrides):
  return _cache_config(teacher_dir, **{
      "data.source": "manifest", "data.path": manifest, "data.image_key": "image",
      "data.caption_key": "caption", "data.crop_min_scale": 0.5,
      "data.flip": True, "data.seed": 2, **overrides})


def test_views_cache_round_trip(teacher_dir, manifest, tmp_path):
  """Every (example, view) row is the live teacher's output on the training batch that shows
  that view; shards resume; a changed caption or crop is caught."""
  config = _views_config(teacher_dir, manifest)
  out = teacher_cache.write_teacher_cache(config, tmp_path / "cache", views=VIEWS,
                                          steps_per_shard=1, log=lambda m: None)
  manifest_json = json.loads((out / "manifest.json").read_text())
  assert manifest_json["complete"] and manifest_json["kind"] == "views"
  assert manifest_json["num_views"] == VIEWS and manifest_json["num_examples"] == ROWS
  assert manifest_json["shards"] == ["teacher-views-000000000.safetensors",
                                     "teacher-views-000000008.safetensors"]

  config.data.num_views = VIEWS
  cache = teacher_cache_reader.TeacherCache(out)
  cache.check_config(config, process_count=1, image_size=32, context_length=16)
  rows = cache.lookup(np.arange(ROWS), np.zeros(ROWS, int))
  assert rows["image_embeds"].dtype == ml_dtypes.bfloat16
  assert rows["image_embeds"].shape == rows["text_embeds"].shape == (ROWS, 24)
  assert rows["augmentation"].shape == (ROWS, 4) and rows["valid"].all()

  models = run_builder.build_models(config)
  batches = pipeline.make_train_iterator(
      config.data, global_batch_size=8, image_size=32, context_length=models.context_length,
      tokenizer=load_tokenizer(None), process_index=0, process_count=1)
  embed = jax.jit(lambda p, b: models.teacher.apply({"params": p}, b["image"], b["input_ids"],
                                                     b["attention_mask"]))
  merge = cache.merger(0)
  # Within bf16 rounding (half an ulp: 2^-8 relative). The random tiny teacher's views of
  # one image differ by only a few ulps, so the other views must fail the same test.
  bf16 = dict(rtol=2 ** -8, atol=1e-5)
  seen = set()
  for step in range(3 * VIEWS):  # 8 of 12 rows a step: 2 * VIEWS epochs
    batch = next(batches)
    merged = merge(batch, step)  # checks captions and crops
    seen |= set(zip(batch["example_id"].tolist(), batch["view"].tolist(), strict=True))
    want = embed(models.teacher_params, pipeline.without_example_fields(batch))
    np.testing.assert_allclose(merged["teacher_image_embeds"].astype(np.float32),
                               want.image_embeds, **bf16)
    np.testing.assert_allclose(merged["teacher_text_embeds"].astype(np.float32),
                               want.text_embeds, **bf16)
    for shift in range(1, VIEWS):
      other = cache.lookup(batch["example_id"], (batch["view"] + shift) % VIEWS)
      assert not np.allclose(other["image_embeds"].astype(np.float32), want.image_embeds,
                             **bf16)
  assert len(seen) == ROWS * VIEWS  # every stored view is used

  with pytest.raises(teacher_cache_format.TeacherCacheError, match="crop/flip of example"):
    cache.merge_views({**batch, "view": (batch["view"] + 1) % VIEWS}, 9)
  changed = {**batch, "input_ids": batch["input_ids"].copy()}
  changed["input_ids"][0, 1] += 1
  with pytest.raises(teacher_cache_format.TeacherCacheError, match="caption of example"):
    cache.merge_views(changed, 9)
  with pytest.raises(teacher_cache_format.TeacherCacheError, match="example 12 view 0 is not in"):
    cache.lookup(np.array([12]), np.array([0]))

  # Resume: a lost shard is rewritten identically, the others are kept.
  last = out / "teacher-views-000000008.safetensors"
  before = shard_contents(last)
  last.unlink()
  logs = []
  teacher_cache.write_teacher_cache(config, out, steps_per_shard=1, log=logs.append)
  assert_same_shard(shard_contents(last), before)
  assert "resuming the teacher cache at example 8" in logs[0]


def test_views_cache_refuses_what_it_cannot_serve(teacher_dir, manifest, tmp_path):
  out = teacher_cache.write_teacher_cache(_views_config(teacher_dir, manifest), tmp_path / "c",
                                          views=2, steps_per_shard=1, log=lambda m: None)
  cache = teacher_cache_reader.TeacherCache(out)
  good = _views_config(teacher_dir, manifest, **{"data.num_views": 2})
  cache.check_config(good, 1, image_size=32, context_length=16)
  # Other batch sizes, host counts and lengths of training are fine: rows are per example.
  cache.check_config(_views_config(teacher_dir, manifest, **{
      "data.num_views": 2, "train.batch_size": 16, "train.total_steps": 1000}), 2)
  for overrides, message in (
      ({}, "holds 2 augmented views.*--config.data.num_views=2"),
      ({"data.num_views": 3}, "holds 2 augmented views"),
      ({"data.num_views": 2, "data.seed": 5}, "data.seed differ"),
      ({"data.num_views": 2, "data.flip": False}, "data.flip differ"),
      ({"data.num_views": 2, "data.num_train_examples": 6}, "data.num_train_examples"),
      ({"data.num_views": 2, "tokenizer": "/elsewhere"}, "tokenizer"),
      ({"data.num_views": 2, "loss.weights.hidden": 0.35}, "hidden=0.35")):
    with pytest.raises(teacher_cache_format.TeacherCacheError, match=message):
      cache.check_config(_views_config(teacher_dir, manifest, **overrides), 1)
  other_teacher = _views_config(teacher_dir, manifest, **{"data.num_views": 2})
  other_teacher.teacher.source = str(tmp_path / "another_teacher")
  with pytest.raises(teacher_cache_format.TeacherCacheError, match="teacher_source"):
    cache.check_config(other_teacher, 1)
  with pytest.raises(teacher_cache_format.TeacherCacheError, match="image_size=32.*image_size=64"):
    cache.check_config(good, 1, image_size=64)
  with pytest.raises(teacher_cache_format.TeacherCacheError, match="read by example and view"):
    next(cache.batches())

  # Writing: views need fixed example ids; steps do not apply; one K; same settings to resume.
  with pytest.raises(teacher_cache_format.TeacherCacheError, match="needs a finite training set"):
    teacher_cache.write_teacher_cache(_cache_config(teacher_dir), tmp_path / "x", views=2)
  with pytest.raises(teacher_cache_format.TeacherCacheError, match="drop --num_steps"):
    teacher_cache.write_teacher_cache(good, tmp_path / "x", num_steps=3)
  with pytest.raises(teacher_cache_format.TeacherCacheError, match="--views=3 but"):
    teacher_cache.write_teacher_cache(good, tmp_path / "x", views=3)
  with pytest.raises(teacher_cache_format.TeacherCacheError, match="other settings"):
    teacher_cache.write_teacher_cache(_views_config(teacher_dir, manifest, **{"data.seed": 1}),
                                      out, views=2, steps_per_shard=1)
  # A step cache cannot serve fixed views.
  steps = teacher_cache.write_teacher_cache(_cache_config(teacher_dir), tmp_path / "steps",
                                            num_steps=1, log=lambda m: None)
  with pytest.raises(teacher_cache_format.TeacherCacheError, match="write a multi-view cache"):
    teacher_cache_reader.TeacherCache(steps).check_config(
        _views_config(teacher_dir, manifest, **{"data.num_views": 2}), 1)


def test_trainer_reads_a_views_cache_in_place_of_the_teacher(teacher_dir, manifest, tmp_path):
  """The same augmented run twice, teacher live and from a multi-view cache: the same losses
  up to the cache's bf16 rounding, at every step."""
  config = _views_config(teacher_dir, manifest, **{
      "data.num_views": VIEWS, "train.total_steps": 4, "train.log_every": 1, "eval.every": 0,
      "train.checkpoint_every": 4})
  cache_dir = teacher_cache.write_teacher_cache(config, tmp_path / "cache", log=lambda m: None)
  train.train(config, str(tmp_path / "online"))
  config.teacher.cache_dir = str(cache_dir)
  result = train.train(config, str(tmp_path / "cached"))
  assert result["step"] == 4
  online, cached = (_component_losses(tmp_path / d) for d in ("online", "cached"))
  assert sorted(cached) == [1, 2, 3, 4]
  for step in (1, 2, 3, 4):
    for key, value in online[step].items():
      assert cached[step][key] == pytest.approx(value, rel=2e-2, abs=1e-4), (step, key)

  # Training without the views, or with others, is refused before step 1.
  config.data.num_views = None
  with pytest.raises(teacher_cache_format.TeacherCacheError, match="--config.data.num_views=3"):
    train.train(config, str(tmp_path / "no_views"))
