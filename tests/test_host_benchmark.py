"""The host side: the fast image decoder, the input benchmark's two sides, the loop benchmark,
and the figures and warnings the benchmark derives."""

import json

import numpy as np
import PIL.Image
import pytest

from clipdistill_jax.data import defaults, pipeline, preprocess
from clipdistill_jax.data.batches import TooManyCorruptImagesError
from clipdistill_jax.perf import benchmark, host, input_pipeline, photos

FAST_CHILDREN = {"XLA_FLAGS": "--xla_backend_optimization_level=0"}
# The largest difference of the 'tf' decoder from CLIPImageProcessor in normalized units
# (1/255 of a channel is about 0.015): measured 0.10 at most, 0.002 on average, over 64 of
# the benchmark's 500 x 375 photos (README, Performance).
FAST_MAX_DIFF, FAST_MEAN_DIFF = 0.15, 0.01


@pytest.fixture(scope="module")
def photo_set(tmp_path_factory):
  return photos.write_photo_set(tmp_path_factory.mktemp("photos"), 16, size=(500, 375))


def _reference(path: str, size: int = 224) -> np.ndarray:
  from transformers import CLIPImageProcessorPil

  processor = CLIPImageProcessorPil(**{k: v for k, v in preprocess.preprocessor_config(
      size).items() if k not in ("image_processor_type", "processor_class")})
  with PIL.Image.open(path) as image:
    pixels = processor(images=image.convert("RGB"), return_tensors="np")["pixel_values"][0]
  return np.moveaxis(pixels, 0, -1)


def test_photo_set_is_real_sized_jpegs(photo_set):
  rows = [json.loads(line) for line in open(photo_set["manifest"])]
  assert len(rows) == 16 and len({r["caption"] for r in rows}) > 1
  with PIL.Image.open(rows[0]["image"]) as image:
    assert image.format == "JPEG" and image.size == (500, 375)
  assert 15_000 < photo_set["mean_jpeg_bytes"] < 150_000


def test_tf_decoder_is_close_to_clip_image_processor(photo_set):
  tf = pytest.importorskip("tensorflow")
  fast = tf.function(lambda encoded: preprocess.tf_fast_preprocess(encoded, 224))
  rows = [json.loads(line) for line in open(photo_set["manifest"])]
  diffs = []
  for row in rows[:6]:
    image, ok = fast(tf.constant(open(row["image"], "rb").read()))
    assert bool(ok)
    diffs.append(np.abs(image.numpy() - _reference(row["image"])))
  assert max(d.max() for d in diffs) < FAST_MAX_DIFF
  assert np.mean([d.mean() for d in diffs]) < FAST_MEAN_DIFF
  # Other formats (PNG, grey) decode too; undecodable bytes fail inside the op.
  png = PIL.Image.fromarray(np.full((40, 60), 128, np.uint8))
  path = photo_set["manifest"] + ".png"
  png.save(path)
  image, ok = fast(tf.constant(open(path, "rb").read()))
  assert bool(ok) and image.shape == (224, 224, 3)
  np.testing.assert_allclose(image.numpy(), _reference(path), atol=FAST_MAX_DIFF)
  with pytest.raises(tf.errors.InvalidArgumentError):
    fast(tf.constant(b"not an image"))


def test_tf_decoder_in_the_pipeline_counts_bad_files_and_keeps_the_limit(photo_set, tmp_path):
  rows = [json.loads(line) for line in open(photo_set["manifest"])][:8]
  (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
  rows.append({"image": str(tmp_path / "bad.jpg"), "caption": "a broken file"})
  manifest = tmp_path / "m.jsonl"
  manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
  from clipdistill_jax.data.tokenizer import load_tokenizer

  def first_batch(**data):
    it = pipeline.make_train_iterator(
        {"source": "manifest", "path": str(manifest), "image_decoder": "tf", **data},
        global_batch_size=8, image_size=32, context_length=16, tokenizer=load_tokenizer(),
        process_index=0, process_count=1)
    batch = next(it)
    metrics = it.metrics()
    it.close()
    return batch, metrics
  batch, metrics = first_batch()
  assert batch["image"].shape == (8, 32, 32, 3) and np.abs(batch["image"]).max() > 0.5
  assert metrics["data/num_skipped"] == 1
  # 500 x 375 = 187,500 pixels: a lower limit skips every photo (from the JPEG header).
  with pytest.raises(TooManyCorruptImagesError, match="could not be read or decoded"):
    first_batch(max_image_pixels=100_000, corrupt_check_after=4, max_consecutive_corrupt=5)


def test_image_decoder_is_checked():
  with pytest.raises(ValueError, match="data.image_decoder='cv2'.*'pil'.*'tf'"):
    defaults.resolve_data_config({"image_decoder": "cv2"})


def test_input_sides_do_the_same_work(photo_set):
  """Ours (the trainer's iterator) and the peer's Dataset + collate_fn give the same pixels
  (the exact decoder) and the same token ids for the same files."""
  spec = dict(path=photo_set["manifest"], image_size=224, context_length=77, batch_size=4,
              batches=1, warmup_batches=0, cpus=[], source="manifest", image_decoder="pil")
  ours = input_pipeline.run_ours(spec)
  assert ours["images_per_s"] > 0 and ours["images"] == 4 and ours["cpu_s"] > 0
  dataset, collate, processor_class = input_pipeline._peer_parts(spec)
  batch = collate([dataset[i] for i in range(4)])
  assert batch["cpu_s"] > 0  # the workers' CPU time travels with each batch
  assert processor_class.startswith("CLIPImageProcessor")
  assert tuple(batch["pixel_values"].shape) == (4, 3, 224, 224)
  rows = [json.loads(line) for line in open(photo_set["manifest"])]
  np.testing.assert_allclose(np.moveaxis(batch["pixel_values"][0].numpy(), 0, -1),
                             preprocess.decode_and_preprocess(open(rows[0]["image"], "rb")
                                                              .read()), atol=1e-5)
  from clipdistill_jax.data.tokenizer import load_tokenizer
  ids, mask = load_tokenizer()([rows[i]["caption"] for i in range(4)], 77)
  np.testing.assert_array_equal(batch["input_ids"].numpy(), ids)
  np.testing.assert_array_equal(batch["attention_mask"].numpy(), mask)


def test_input_figures_are_per_core_and_against_the_peer_at_the_same_cores():
  runs = {"peer_1core": {"images_per_s": 100.0, "images_per_cpu_s": 110.0},
          "peer_2core": {"images_per_s": 150.0, "images_per_cpu_s": 100.0},
          "manifest_pil_1core": {"images_per_s": 120.0, "images_per_cpu_s": 132.0},
          "manifest_pil_2core": {"images_per_s": 240.0, "images_per_cpu_s": 160.0},
          "tfrecord_tf_2core": {"error": "exit code 1"}}
  figures = host.input_figures(runs, cores=2)
  # Per core: images per CPU-second; by the wall clock: images/s / cores.
  assert figures["images_per_s_per_core"]["manifest_pil_2core"] == 160.0
  assert figures["wall_images_per_s_per_core"]["manifest_pil_2core"] == 120.0
  assert figures["input_ratio_vs_peer"] == {"1core": 1.2, "2core": 1.6}
  assert figures["wall_ratio_vs_peer"]["manifest_pil_2core"] == 1.6
  assert figures["input_images_per_s_per_core"] == {"1core": 132.0, "2core": 160.0}
  assert "tfrecord_tf_2core" not in figures["ratio_vs_peer"]


def test_input_benchmark_decodes_every_read_but_times_a_later_epoch_from_the_cache(tmp_path):
  specs = []

  def run_child(module, spec):
    assert module == "clipdistill_jax.perf.input_pipeline"
    specs.append(spec)
    return {"images_per_s": 100.0, "images_per_cpu_s": 100.0}

  result = host.run_input(run_child, root=tmp_path, batch_size=8, image_size=32,
                          context_length=16, num_images=20, jpeg_size=(40, 30), cores=1,
                          decoders=("pil", "tf"), batches=2, warmup_batches=1,
                          log=lambda line: None, repeats=1)
  by_name = {spec["name"]: spec for spec in specs}
  ours = [spec for spec in specs if spec["side"] == "ours"]
  assert len(ours) == 5  # manifest and TFRecords with each decoder, and the cached epoch
  cached = by_name.pop("input_manifest_pil_cached_1core")
  # One whole epoch (20 images in batches of 8: 3 batches) read before the timed batches,
  # with the default data.decoded_cache_mb; every other run decodes every image it reads.
  assert cached["warmup_batches"] == 1 + 3 and "decoded_cache_mb" not in cached
  assert all(spec["decoded_cache_mb"] == 0 and spec["warmup_batches"] == 1
             for spec in by_name.values() if spec["side"] == "ours")
  assert result["ratio_vs_peer"]["manifest_pil_cached_1core"] == 1.0


def test_bf16_slower_than_fp32_warns_naming_the_knob():
  results = {"bf16_teacher": {"device_kind": "cpu"}, "bf16": {"device_kind": "cpu"}}
  warnings = benchmark.precision_warnings(
      {"bf16_teacher_vs_online": 0.39, "bf16_vs_online": 1.7}, results)
  assert len(warnings) == 1
  assert "0.39x" in warnings[0] and "teacher.dtype" in warnings[0] and "cpu" in warnings[0]
  assert benchmark.precision_warnings({"bf16_teacher_vs_online": 1.3}, results) == []


def test_loop_runs_the_trainer_on_jpegs_and_times_its_steps(tmp_path):
  from tiny_models import tiny_distill_config

  from clipdistill_jax import checkpoints
  from clipdistill_jax.perf import loop

  teacher = tmp_path / "teacher"
  config = tiny_distill_config(**{"train.log_every": 2, "train.batch_size": 8,
                                  "evals": ()})
  config.teacher.source = str(teacher)
  from tiny_models import tiny_student

  from clipdistill_jax.models import hf
  from clipdistill_jax.models.config import tiny_config
  hf.save_pretrained(*tiny_student(tiny_config().text_config.eos_token_id), str(teacher))
  result = loop.run_loop(dict(config=config.to_dict(), workdir=str(tmp_path / "loop"),
                              image_size=32, num_images=16, interval=2, warmup_steps=2,
                              steps=4, checkpoint_every=None))
  assert result["timed_steps"] == 4 and result["total_steps"] == 6
  assert result["first_timed_step"] == 2 and result["jpeg_size"] == [43, 32]
  assert len(result["interval_steps_per_s"]) == 2 and result["steps_per_s"] > 0
  assert result["cpu_s_per_step"] > 0  # the process's CPU between the first and last note
  # Checkpoints off: none within the timed steps (2, 6); the final save comes after them.
  manager = checkpoints.make_manager(str(tmp_path / "loop" / "run"), save_every=100, keep=3)
  saved = list(manager.all_steps())
  assert 6 in saved and not [s for s in saved if 2 < s < 6]
  metrics = [json.loads(line) for line in open(tmp_path / "loop" / "run" / "metrics.jsonl")]
  assert [m["step"] for m in metrics if "loss/total" in m] == [2, 4, 6]
  # The in-memory loop: the same trainer on as many images rendered once and kept in memory.
  result = loop.run_loop(dict(config=config.to_dict(), workdir=str(tmp_path / "loop"),
                              image_size=32, num_images=16, interval=2, warmup_steps=2,
                              steps=4, checkpoint_every=None, source="memory",
                              run_name="in_memory"))
  assert result["timed_steps"] == 4 and result["steps_per_s"] > 0
  assert result["data"] == {"source": "synthetic", "num_train_examples": 16}
  assert (tmp_path / "loop" / "in_memory" / "metrics.jsonl").exists()


def test_loop_report_takes_the_median_run_and_says_so():
  from clipdistill_jax.perf import host, loop

  runs = [{"steps_per_s": s} for s in (30.0, 40.0, 35.0)]
  assert loop._median_run(runs) == {"steps_per_s": 35.0, "all_steps_per_s": [30.0, 40.0, 35.0]}
  report = {"loop": {"loop": {"steps_per_s": 35.0, "cpu_s_per_step": 0.047},
                     "bare": {"steps_per_s": 50.0, "cpu_s_per_step": 0.0346}, "cores": 2,
                     "loop_efficiency": 0.7, "loop_efficiency_all": [0.6, 0.8, 0.7],
                     "loop_efficiency_in_memory": 0.9, "loop_efficiency_cpu_ceiling": 0.851}}
  assert host.summary_lines(report) == [
      "loop: 35.00 steps/s vs the bare step's 50.00: loop_efficiency 0.700 (median of 0.600, "
      "0.800, 0.700); in memory 0.900; the cores allow 0.851 (47.0 ms of CPU per loop step, "
      "34.6 per bare step, 2 cores)"]


def test_loop_cpu_ceiling_is_what_the_cores_allow():
  from clipdistill_jax.perf import loop

  # A 20 ms bare step; a loop step needing 47 ms of CPU on 2 cores takes >= 23.5 ms.
  assert loop.cpu_ceiling(0.020, 0.047, 2) == pytest.approx(0.020 / 0.0235)
  assert loop.cpu_ceiling(0.020, 0.030, 2) == 1.0  # the cores have room: no ceiling below 1
  assert loop.cpu_ceiling(0.020, 0.047, 16) == 1.0


def test_step_timing_reports_cpu_time_apart_from_wall_time():
  import time

  from clipdistill_jax.perf import common

  def spin():  # 20 ms of this process's CPU
    start = time.process_time()
    while time.process_time() - start < 0.02:
      pass

  def matmul():
    time.sleep(1e-4)

  times, peaks, cpu = common.time_steps_with_peak(lambda: time.sleep(0.05), matmul, 2, 2,
                                                  matmul_runs=1)
  assert len(times) == len(peaks) == len(cpu) == 2
  assert min(times) >= 0.05 and max(cpu) < 0.025  # sleeping takes wall time, not CPU
  _, _, cpu = common.time_steps_with_peak(spin, matmul, 2, 2, matmul_runs=1)
  assert min(cpu) >= 0.02
