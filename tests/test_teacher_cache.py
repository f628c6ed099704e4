"""The cached teacher: written in the trainer's order, checked, refused where it cannot
serve a config, and read by the trainer in place of the live teacher."""

import json

import jax
import ml_dtypes
import numpy as np
import pytest
from tiny_models import tiny_distill_config

from clipdistill_jax import teacher_cache, train
from clipdistill_jax.data import pipeline
from clipdistill_jax.data.tokenizer import load_tokenizer
from clipdistill_jax.models import hf
from clipdistill_jax.perf import benchmark
from clipdistill_jax.writers import read_jsonl


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  config = benchmark.teacher_config_for("tiny")
  path = tmp_path_factory.mktemp("teacher")
  hf.save_pretrained(config, benchmark.random_params(config, 3), path)
  return str(path)


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

  cache = teacher_cache.TeacherCache(out)
  cache.check_config(config, process_count=1)
  models = train.build_models(config)
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
    merged = teacher_cache.merge_cached(batch, cached, step)  # checks the row order
    want = embed(models.teacher_params, batch)
    np.testing.assert_allclose(merged["teacher_image_embeds"].astype(np.float32),
                               want.image_embeds, atol=1e-2)
    np.testing.assert_allclose(merged["teacher_text_embeds"].astype(np.float32),
                               want.text_embeds, atol=1e-2)
  with pytest.raises(teacher_cache.TeacherCacheError, match="ends at step 3"):
    list(cache.batches(start_step=2))
  # Resume: a lost shard is rewritten identically, the others are kept.
  last = out / "teacher-00000002-host000.safetensors"
  before = last.read_bytes()
  last.unlink()
  teacher_cache.write_teacher_cache(config, out, num_steps=3, steps_per_shard=2,
                                    log=lambda m: None)
  assert last.read_bytes() == before
  # A batch from another step is caught.
  with pytest.raises(teacher_cache.TeacherCacheError, match="not the ones"):
    teacher_cache.merge_cached(next(batches), cached_steps[0][1], 3)


def test_cached_mode_refuses_what_it_cannot_serve(teacher_dir, tmp_path):
  for overrides, message in (({"loss.weights.hidden": 0.35}, "hidden=0.35"),
                             ({"loss.weights.attention": 0.2}, "attention=0.2"),
                             ({"data.crop_min_scale": 0.5}, "augmentation"),
                             ({"data.flip": True}, "augmentation")):
    with pytest.raises(teacher_cache.TeacherCacheError, match=message):
      teacher_cache.check_cacheable(_cache_config(teacher_dir, **overrides))
  with pytest.raises(teacher_cache.TeacherCacheError, match="augmentation"):
    teacher_cache.write_teacher_cache(_cache_config(teacher_dir, **{"data.flip": True}),
                                      tmp_path / "x", num_steps=1)
  with pytest.raises(FileNotFoundError, match="python -m clipdistill_jax.teacher_cache"):
    teacher_cache.TeacherCache(tmp_path / "nothing")

  out = tmp_path / "cache"
  teacher_cache.write_teacher_cache(_cache_config(teacher_dir), out, num_steps=2,
                                    log=lambda m: None)
  cache = teacher_cache.TeacherCache(out)
  with pytest.raises(teacher_cache.TeacherCacheError, match="global_batch_size"):
    cache.check_config(_cache_config(teacher_dir, **{"train.batch_size": 16}), 1)
  with pytest.raises(teacher_cache.TeacherCacheError, match="holds 2 steps"):
    cache.check_config(_cache_config(teacher_dir, **{"train.total_steps": 5}), 1)
  with pytest.raises(teacher_cache.TeacherCacheError, match="other settings"):
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
  with pytest.raises(teacher_cache.TeacherCacheError, match="holds 3 steps"):
    train.train(config, str(tmp_path / "longer"))
  config.train.total_steps, config.loss.weights.attention = 3, 0.2
  with pytest.raises(teacher_cache.TeacherCacheError, match="attention=0.2"):
    train.train(config, str(tmp_path / "attention"))
