"""Size, speed and memory of a CLIP model: the efficiency half of the results table.

Everything is measured on jax.devices()[0] (a CPU on a laptop/CI box, one chip on a TPU VM),
single-device, as the model is deployed: params are copied onto that one device.

Memory. `peak_memory_mb` = bytes of the parameters as held + the measured increase of memory
in use while encoding one batch of images and then one batch of texts of the largest batch
size (the first run after compilation, so compiler memory is not counted):
  * accelerators: `device.memory_stats()` peak_bytes_in_use after the run minus bytes_in_use
    before it (only meaningful when the run raised the process's peak: see the method key);
  * CPU on Linux: host resident memory, the peak (VmHWM in /proc/self/status, reset before the
    run by writing 5 to /proc/self/clear_refs) minus VmRSS before the run. The allocator may
    reuse memory freed earlier, so this increase is a lower bound on what XLA allocated.
`peak_memory_method` says which was used; where neither works (or the device peak did not
move) it falls back to XLA's buffer assignment. `xla_memory_mb` always reports that plan:
params + the largest (inputs + outputs + scratch) of the two compiled encoders, which is what
XLA allocates for the call on TPU and a solid cross-check elsewhere.
"""

from __future__ import annotations

import re
import statistics
import time
from typing import Any

import jax
import numpy as np

from clipdistill_jax.models.clip import CLIPModel, count_params
from clipdistill_jax.models.config import CLIPConfig

MB = 1e6  # sizes in megabytes (10^6 bytes), as file sizes are shown on the hub and on disk
VISION_SUBTREES = ("vision_model", "visual_projection")
TEXT_SUBTREES = ("text_model", "text_projection")


def tower_param_counts(params: dict) -> dict[str, int]:
  """params_vision (incl. visual_projection), params_text (incl. text_projection), params_total
  (also counts logit_scale)."""
  missing = [k for k in VISION_SUBTREES + TEXT_SUBTREES if k not in params]
  if missing:
    raise ValueError(f"params lack {missing}; pass the CLIP param dict (init_params / "
                     "load_pretrained), not a {'params': ...} wrapper or a single tower.")
  return {
      "params_vision": sum(count_params(params[k]) for k in VISION_SUBTREES),
      "params_text": sum(count_params(params[k]) for k in TEXT_SUBTREES),
      "params_total": count_params(params),
  }


def _example_inputs(config: CLIPConfig, batch_size: int, seed: int = 0
                    ) -> dict[str, tuple[np.ndarray, ...]]:
  vision, text = config.vision_config, config.text_config
  rng = np.random.default_rng(seed)
  pixels = rng.standard_normal(
      (batch_size, vision.image_size, vision.image_size, vision.num_channels), np.float32)
  length = text.max_position_embeddings
  # Full-length texts (the slowest case): BOS, random tokens, EOT last (where both pooling
  # conventions look for it).
  eos = text.vocab_size - 1 if text.pools_at_argmax else text.eos_token_id
  ids = rng.integers(0, min(text.vocab_size - 2, 49405), (batch_size, length), dtype=np.int32)
  ids[:, 0] = min(text.bos_token_id, text.vocab_size - 2)
  ids[:, -1] = eos
  return {"image": (pixels,), "text": (ids, np.ones_like(ids))}


def _tower_fn(model: CLIPModel, tower: str):
  if tower == "image":
    return lambda p, x: model.apply({"params": p}, x, method=CLIPModel.encode_image).image_embeds
  return lambda p, ids, mask: model.apply({"params": p}, ids, mask,
                                          method=CLIPModel.encode_text).text_embeds


def _status_bytes(field: str) -> int | None:
  try:
    with open("/proc/self/status") as f:
      match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
  except OSError:
    return None
  return int(match.group(1)) * 1024 if match else None


def _reset_peak_rss() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    return True
  except OSError:
    return False


def _measure_encoding_memory(run, device) -> tuple[int | None, str]:
  """(bytes the run added on top of what was in use before it, method)."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    in_use, peak_before = stats["bytes_in_use"], stats["peak_bytes_in_use"]
    run()
    peak_after = device.memory_stats()["peak_bytes_in_use"]
    if peak_after > peak_before:
      return peak_after - in_use, "device_memory_stats"
    return None, "xla_buffer_assignment (device peak was set before this run)"
  if device.platform == "cpu" and _reset_peak_rss():
    rss_before = _status_bytes("VmRSS")
    run()
    peak = _status_bytes("VmHWM")
    if rss_before is not None and peak is not None:
      return max(0, peak - rss_before), "host_rss_peak"
  run()
  return None, "xla_buffer_assignment"


def _xla_bytes(compiled) -> dict[str, int] | None:
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    return None
  if analysis is None:
    return None
  return {"output": int(analysis.output_size_in_bytes), "temp": int(analysis.temp_size_in_bytes)}


def model_stats(model: CLIPModel, params: dict, config: CLIPConfig | None = None, *,
                batch_sizes: tuple[int, ...] = (1, 32), repeats: int = 5) -> dict[str, Any]:
  """Parameter counts, sizes, latency/throughput per tower and batch size, peak memory.

  Keys: params_vision, params_text, params_total, params_m (millions), size_mb_fp32,
  size_mb_bf16 (weights only, 10^6 bytes); for each batch size b and tower t in (image,
  text): {t}_latency_ms_b{b} (median of `repeats` timed calls after a warm-up, wall clock to
  block_until_ready) and {t}_throughput_b{b} (items/s); latency_ms_b{b} / throughput_b{b}
  (the image tower's, the article's "inference time"); peak_memory_mb, peak_memory_method,
  xla_memory_mb (see the module docstring), memory_batch_size, device.
  """
  config = config or model.config
  if repeats < 1 or not batch_sizes or min(batch_sizes) < 1:
    raise ValueError(f"Need repeats >= 1 and positive batch sizes; got repeats={repeats}, "
                     f"batch_sizes={batch_sizes}.")
  counts = tower_param_counts(params)
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
  stats: dict[str, Any] = {
      **counts,
      "params_m": counts["params_total"] / 1e6,
      "size_mb_fp32": counts["params_total"] * 4 / MB,
      "size_mb_bf16": counts["params_total"] * 2 / MB,
  }
  device = jax.devices()[0]
  stats["device"] = f"{device.platform}:{device.device_kind}"
  params = jax.device_put(params, device)

  compiled, inputs = {}, {}
  for b in sorted(set(batch_sizes)):
    examples = _example_inputs(config, b)
    for tower in ("image", "text"):
      arrays = tuple(jax.device_put(x, device) for x in examples[tower])
      inputs[tower, b] = arrays
      compiled[tower, b] = jax.jit(_tower_fn(model, tower)).lower(params, *arrays).compile()

  # Memory first: the first run of the largest batch after compilation.
  largest = max(batch_sizes)

  def run_largest():
    for tower in ("image", "text"):
      compiled[tower, largest](params, *inputs[tower, largest]).block_until_ready()

  measured, method = _measure_encoding_memory(run_largest, device)
  xla_extra = []
  for tower in ("image", "text"):
    plan = _xla_bytes(compiled[tower, largest])
    if plan is not None:
      input_bytes = sum(x.nbytes for x in inputs[tower, largest])
      xla_extra.append(input_bytes + plan["output"] + plan["temp"])
  stats["xla_memory_mb"] = (param_bytes + max(xla_extra)) / MB if xla_extra else None
  if measured is not None:
    stats["peak_memory_mb"] = (param_bytes + measured) / MB
  else:
    stats["peak_memory_mb"] = stats["xla_memory_mb"]
  stats["peak_memory_method"] = method
  stats["memory_batch_size"] = largest

  for (tower, b), fn in compiled.items():
    fn(params, *inputs[tower, b]).block_until_ready()  # warm-up
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      fn(params, *inputs[tower, b]).block_until_ready()
      times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    stats[f"{tower}_latency_ms_b{b}"] = seconds * 1e3
    stats[f"{tower}_throughput_b{b}"] = b / seconds
  for b in batch_sizes:
    stats[f"latency_ms_b{b}"] = stats[f"image_latency_ms_b{b}"]
    stats[f"throughput_b{b}"] = stats[f"image_throughput_b{b}"]
  return stats

