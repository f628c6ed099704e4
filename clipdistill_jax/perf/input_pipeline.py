"""Input-pipeline benchmark: our tf.data pipeline next to a PyTorch DataLoader peer.

Run by the benchmark in its own process per measurement (`python -m
clipdistill_jax.perf.input_pipeline --spec S --out O`), pinned to `spec['cpus']` (sched
affinity), so "per core" means what it says. Both sides do the whole job of a training input
pipeline for JPEG files: read, decode, resize the short side, center crop, normalize,
tokenize the captions (CLIP BPE, 77 tokens), batch.

  ours  data.pipeline.make_train_iterator on a manifest or TFRecords (the trainer's own
        iterator; tf.data with as many threads as cores, data.image_decoder 'pil' or 'tf',
        data.decoded_cache_mb as the spec says)
  peer  what a PyTorch user writes: a Dataset that opens each file with PIL and runs
        transformers' CLIPImageProcessor, a collate_fn that runs CLIPTokenizer on the batch's
        captions, a torch DataLoader with one worker process per core (persistent, prefetch
        factor 2). The tokenizer is loaded from the package's own files (no hub).

Both are timed after `warmup_batches` (worker start-up, first reads), over `batches` batches,
by the wall clock (images_per_s) and by the CPU time the work took (images_per_cpu_s: images
per CPU-second of this process's threads, plus, for the peer, of its workers, which time
their own __getitem__ and collate_fn calls). On a machine shared with other work the wall
clock measures the neighbours as much as the code; the CPU time is what a core would spend
on the same images alone, so "per core" figures come from it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from clipdistill_jax.perf import common


def _pin(cpus: list[int]) -> None:
  if cpus and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, set(cpus))


def _time_batches(iterator, warmup: int, batches: int, batch_size: int,
                  worker_cpu_s=lambda batch: 0.0) -> dict[str, Any]:
  """Wall and CPU time of `batches` batches; worker_cpu_s(batch): CPU seconds other
  processes spent on that batch."""
  for _ in range(warmup):
    next(iterator)
  times, worker_cpu = [], 0.0
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(batches):
    t = time.perf_counter()
    worker_cpu += worker_cpu_s(next(iterator))
    times.append(time.perf_counter() - t)
  seconds = time.perf_counter() - start
  cpu_s = time.process_time() - cpu_start + worker_cpu
  return {"seconds": seconds, "images": batches * batch_size,
          "images_per_s": batches * batch_size / seconds, "cpu_s": cpu_s,
          "worker_cpu_s": worker_cpu, "images_per_cpu_s": batches * batch_size / cpu_s,
          "batch_time": common.summarize_times(times)}


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
  """Our trainer's iterator over spec['source'] ('manifest' | 'tfrecord') at spec['cpus']."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  _pin(spec["cpus"])
  from clipdistill_jax.data import defaults, pipeline
  from clipdistill_jax.data.tokenizer import load_tokenizer

  cfg = defaults.default_data_config()
  cfg.source, cfg.path = spec["source"], spec["path"]
  cfg.num_threads = len(spec["cpus"])
  cfg.image_decoder = spec["image_decoder"]
  cfg.decoded_cache_mb = spec.get("decoded_cache_mb", cfg.decoded_cache_mb)
  started = time.perf_counter()
  iterator = pipeline.make_train_iterator(
      cfg, global_batch_size=spec["batch_size"], image_size=spec["image_size"],
      context_length=spec["context_length"], tokenizer=load_tokenizer(), process_index=0,
      process_count=1, start_step=0)
  result = _time_batches(iterator, spec["warmup_batches"], spec["batches"], spec["batch_size"])
  iterator.close()
  return {**spec, **result, "setup_s": time.perf_counter() - started - result["seconds"]}


def _peer_parts(spec: dict[str, Any]):
  """(dataset, collate_fn) of the PyTorch peer (module docstring)."""
  os.environ["USE_TF"] = "0"
  os.environ.setdefault("USE_FLAX", "0")
  import PIL.Image
  import torch
  import transformers

  from clipdistill_jax.data import preprocess
  from clipdistill_jax.data.tokenizer import ASSETS_DIR

  processor = transformers.CLIPImageProcessor(**{
      k: v for k, v in preprocess.preprocessor_config(spec["image_size"]).items()
      if k not in ("image_processor_type", "processor_class")})
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(ASSETS_DIR))
  with open(spec["path"]) as f:
    rows = [json.loads(line) for line in f if line.strip()]

  class Photos(torch.utils.data.Dataset):
    def __len__(self):
      return len(rows)

    def __getitem__(self, i):
      cpu = time.process_time()
      with PIL.Image.open(rows[i]["image"]) as image:
        pixels = processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]
      return pixels, rows[i]["caption"], time.process_time() - cpu

  def collate(items):
    cpu = time.process_time()
    text = tokenizer([c for _, c, _ in items], padding="max_length", truncation=True,
                     max_length=spec["context_length"], return_tensors="pt")
    batch = {"pixel_values": torch.stack([p for p, _, _ in items]),
             "input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}
    batch["cpu_s"] = sum(c for _, _, c in items) + time.process_time() - cpu
    return batch

  return Photos(), collate, type(processor).__name__


def run_peer(spec: dict[str, Any]) -> dict[str, Any]:
  _pin(spec["cpus"])
  import torch

  started = time.perf_counter()
  dataset, collate, processor_class = _peer_parts(spec)
  workers = len(spec["cpus"])
  loader = torch.utils.data.DataLoader(
      dataset, batch_size=spec["batch_size"], shuffle=True, num_workers=workers,
      collate_fn=collate, drop_last=True, persistent_workers=True, prefetch_factor=2,
      generator=torch.Generator().manual_seed(0))

  def endless():
    while True:
      yield from loader
  result = _time_batches(endless(), spec["warmup_batches"], spec["batches"], spec["batch_size"],
                         worker_cpu_s=lambda batch: batch["cpu_s"])
  return {**spec, **result, "setup_s": time.perf_counter() - started - result["seconds"],
          "framework": f"torch {torch.__version__}", "image_processor": processor_class,
          "num_workers": workers}


def run(spec: dict[str, Any]) -> dict[str, Any]:
  return run_peer(spec) if spec["side"] == "peer" else run_ours(spec)


def main(argv: list[str] | None = None) -> None:
  common.child_main(run, __doc__, argv)


if __name__ == "__main__":
  main(sys.argv[1:])
